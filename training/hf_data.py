"""Hugging Face data sets: a hub id (from the hub or its local cache) or a `save_to_disk` folder.

`datasets` reads Arrow files and JSON metadata here, never pickles; data-set loading scripts are
not supported by current `datasets` releases, so a hub id cannot run code either.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

from training.archive import ArchiveLimits, check_image_bytes
from training.data import Examples, LazyInputs, LoadedData, _label_text
from training.errors import DataError
from training.spec import DataSource

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HELD_OUT_SPLITS = ("validation", "valid", "test")
# Column names common data sets use when the configured default is absent.
_FALLBACK_COLUMNS = {
    "text": ("text", "sentence", "content", "review", "document"),
    "label": ("label", "labels", "fine_label", "coarse_label"),
    "image": ("image", "img", "picture"),
}
_FIX_ROW = "replace or drop that row (e.g. with Dataset.filter) and save the data set again"


class HFColumn(LazyInputs):
    """One column of a `datasets.Dataset`, read row by row on access."""

    def __init__(self, dataset: Any, column: str, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.column = column
        self.indices = list(indices) if indices is not None else list(range(len(dataset)))

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self.select(self.indices[index])
        return self.dataset[self.indices[index]][self.column]

    def select(self, indices: Sequence[int]) -> HFColumn:
        return HFColumn(self.dataset, self.column, [self.indices[i] for i in indices])


def _open(reference: str) -> dict[str, Any]:
    import datasets

    path = Path(reference)
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
        elif _ID.match(reference):
            loaded = datasets.load_dataset(reference)
        else:
            raise DataError(
                f"data set {reference!r} is neither a folder written by save_to_disk nor a "
                "Hugging Face data set id (org/name)"
            )
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise DataError(
            f"cannot load the data set {reference!r}: {error}. A hub id works only when the "
            "hub is reachable or the data set is in the local cache; otherwise upload a file or "
            "a save_to_disk folder"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def _column(dataset: Any, wanted: str, role: str, where: str) -> str:
    columns = list(dataset.column_names)
    if wanted in columns:
        return wanted
    if wanted == role:  # the default name: try the names common data sets use
        for candidate in _FALLBACK_COLUMNS[role]:
            if candidate in columns:
                return candidate
    raise DataError(
        f"{where}: no column {wanted!r} (columns: {', '.join(columns)}); set {role}_column in "
        "the data source"
    )


def _examples(dataset: Any, source: DataSource, task: str, where: str) -> Examples:
    import datasets

    if len(dataset) == 0:
        raise DataError(f"{where}: the split is empty")
    kind = "image" if task == "image-classification" else "text"
    wanted = source.image_column if kind == "image" else source.text_column
    input_column = _column(dataset, wanted, kind, where)
    locations = [f"{where} row {i}" for i in range(len(dataset))]
    inputs: Sequence[Any]
    if kind == "image":
        _check_images(dataset, input_column, where)
        inputs = HFColumn(dataset, input_column)
    else:
        inputs = [str(value) for value in dataset[input_column]]
    if task == "causal-lm":
        return Examples(kind, inputs, None, locations, where)
    label_column = _column(dataset, source.label_column, "label", where)
    feature = dataset.features[label_column]
    values = dataset[label_column]
    classes = None
    if isinstance(feature, datasets.ClassLabel):
        classes = list(feature.names)
        labels = [classes[int(v)] for v in values]
    else:
        labels = [
            _label_text(v, loc, label_column) for v, loc in zip(values, locations, strict=True)
        ]
    return Examples(kind, inputs, labels, locations, where, classes)


def _check_images(dataset: Any, column: str, where: str) -> None:
    """Check every image of the split once, undecoded, as archive images are: an unreadable one
    is refused here, naming its row, instead of when its batch comes up during training."""
    import datasets

    if not isinstance(dataset.features[column], datasets.Image):
        return  # arrays and the like: preprocessing checks their shape example by example
    undecoded = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    limits = ArchiveLimits()
    values = (value for batch in undecoded.iter(batch_size=256) for value in batch[column])
    for row, value in enumerate(values):
        _check_image(value, f"{where} row {row}", limits)


def _check_image(value: dict[str, Any] | None, where: str, limits: ArchiveLimits) -> None:
    """`value` is what `datasets.Image(decode=False)` gives: the image's bytes or its file."""
    if value is None or (value.get("bytes") is None and not value.get("path")):
        raise DataError(f"{where} holds no image; {_FIX_ROW}")
    data = value.get("bytes")
    if data is None:
        try:
            data = Path(value["path"]).read_bytes()
        except OSError as error:
            raise DataError(
                f"{where}: cannot read its image file {value['path']!r} ({error.strerror}); "
                + _FIX_ROW
            ) from None
    try:
        check_image_bytes(data, where, limits)
    except DataError as error:
        raise DataError(f"{error.message}; {_FIX_ROW}") from None


def load_hf_source(source: DataSource, task: str) -> LoadedData:
    """The requested split (default train) and, when the set has one, its held-out split."""
    assert source.hf_dataset is not None
    splits = _open(source.hf_dataset)
    name = source.split or ("train" if "train" in splits else next(iter(splits)))
    if name not in splits:
        raise DataError(
            f"data set {source.hf_dataset!r} has no split {name!r} (splits: {', '.join(splits)})"
        )
    train = _examples(splits[name], source, task, f"{source.hf_dataset} {name}")
    held_out = None
    if source.split is None:
        other = next((s for s in _HELD_OUT_SPLITS if s in splits and s != name), None)
        if other is not None:
            held_out = _examples(splits[other], source, task, f"{source.hf_dataset} {other}")
    logger.info("data set %s: split %s with %d rows", source.hf_dataset, name, len(train))
    return LoadedData(train, held_out)
