"""Data sources: uploaded files, built-in sets and Hugging Face data sets, read into examples.

`inspect_file` is what the service calls on upload; `load_examples` is what a job calls. Both
refuse bad data with a `DataError` naming the file and the line (or archive entry), so a user
learns what to fix before any training starts. Nothing here unpickles anything: files are parsed
as text, archives are checked by `training.archive`, and the built-in sets are generated locally.

Examples stay raw here (strings, image files, arrays); turning them into tensors is the model's
business (`training.preprocess`).
"""

from __future__ import annotations

import abc
import csv
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.archive import ArchiveLimits, ImageArchive, extract_images, is_archive
from training.errors import DataError
from training.spec import DataSource, suffix_format

logger = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "text", "image-archive")
_SNIFF_BYTES = 64 * 1024
# Files that hold Python objects rather than data: loading one can run arbitrary code.
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt", ".npy", ".npz")
_PICKLE_PROTOCOL_MARK = 0x80


@dataclass(frozen=True)
class FileInfo:
    """What an uploaded file holds: its format, how many examples, and what it can be used for."""

    format: str
    rows: int
    size_bytes: int
    columns: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rows": self.rows,
            "size_bytes": self.size_bytes,
            "columns": list(self.columns),
            "labels": list(self.labels) if self.labels is not None else None,
        }


class LazyInputs(Sequence[Any], abc.ABC):
    """Inputs read on access (images of a Hugging Face data set), so that splitting and
    subsetting do not decode every image up front."""

    @abc.abstractmethod
    def select(self, indices: Sequence[int]) -> LazyInputs:
        """The inputs at `indices`, still unread."""


@dataclass
class Examples:
    """Raw examples of one split.

    `kind` is "text" (inputs are strings), "image" (paths of image files or PIL images) or
    "signal" (1-D or 2-D float arrays of a built-in set). `labels` are class names as strings
    (None for causal LM); `locations` say where each example came from, for error messages.
    """

    kind: str
    inputs: Sequence[Any]
    labels: list[str] | None
    locations: list[str]
    source: str
    classes: list[str] | None = None  # the class order a set defines itself (built-in, HF)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inputs)

    def subset(self, indices: Sequence[int]) -> Examples:
        if isinstance(self.inputs, LazyInputs):
            inputs: Sequence[Any] = self.inputs.select(indices)
        else:
            inputs = [self.inputs[i] for i in indices]
        return Examples(
            kind=self.kind,
            inputs=inputs,
            labels=[self.labels[i] for i in indices] if self.labels is not None else None,
            locations=[self.locations[i] for i in indices],
            source=self.source,
            classes=self.classes,
            extras=self.extras,
        )


# ---------------------------------------------------------------------------------------------
# inspecting uploads


def detect_format(path: Path, format: str = "auto") -> str:
    """The file's format: `format` when given, else its suffix, else a look at its content."""
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"{path.name}: unknown format {format!r}; use one of {FORMATS}")
        return format
    by_suffix = suffix_format(path.name)
    if by_suffix:
        return by_suffix
    if is_archive(path):
        return "image-archive"
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    first = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    if first.startswith(b"{"):
        return "jsonl"
    return "text"


def inspect_file(
    path: str | Path, format: str = "auto", limits: ArchiveLimits | None = None
) -> FileInfo:
    """Check an uploaded data file and say what it holds.

    `format` is one of jsonl, csv, text, image-archive, or auto (the suffix of `path`, then the
    content: pass the suffix of the user's original file name when the stored name has none).
    Raises `DataError` naming the file and the line or archive entry that is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path.name}: the file is empty")
    _refuse_pickle(path)
    fmt = detect_format(path, format)
    if fmt == "jsonl":
        return _inspect_jsonl(path, size)
    if fmt == "csv":
        return _inspect_csv(path, size)
    if fmt == "text":
        return _inspect_text(path, size)
    return _inspect_archive(path, size, limits)


def _refuse_pickle(path: Path) -> None:
    """Refuse pickled Python objects (by name, or by the protocol byte they start with)."""
    with path.open("rb") as handle:
        head = handle.read(2)
    by_content = len(head) == 2 and head[0] == _PICKLE_PROTOCOL_MARK and 2 <= head[1] <= 5
    if by_content or path.name.lower().endswith(_PICKLE_SUFFIXES):
        raise DataError(
            f"{path.name}: this is a pickled Python object (or a format built on pickle), which "
            "is never loaded because unpickling can run any code; export the data as JSONL, "
            "CSV, plain text or an image archive"
        )


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file, refusing undecodable or binary content by line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if b"\x00" in raw:
                raise DataError(
                    f"{path.name} line {number}: contains NUL bytes; this looks like a binary "
                    "file, not text"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path.name} line {number}: not valid UTF-8 ({error.reason} at byte "
                    f"{error.start}); save the file as UTF-8"
                ) from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path.name} line {number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path.name} line {number}: expected a JSON object such as "
                '{"text": "...", "label": "..."}, got ' + type(row).__name__
            )
        yield number, row


def _label_text(value: Any, where: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(
            f"{where}: {column} must be a string or an integer, got {json.dumps(value)[:60]}"
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{where}: {column} {value} is not a class (use a name or integer)")
        value = int(value)
    return str(value)


def _inspect_jsonl(path: Path, size: int) -> FileInfo:
    rows = 0
    common: set[str] | None = None
    order: list[str] = []
    labels: set[str] = set()
    first: tuple[int, bool] | None = None  # the first line, and whether it has a label
    for number, row in _jsonl_rows(path):
        rows += 1
        if common is None:
            common, order = set(row), list(row)
        else:
            common &= set(row)
        if first is None:
            first = (number, "label" in row)
        elif ("label" in row) != first[1]:
            what = "no 'label' field" if first[1] else "a 'label' field"
            raise DataError(
                f"{path.name} line {number}: {what}, unlike line {first[0]}; give every line a "
                "label (classification) or none (causal-lm)"
            )
        if "label" in row:
            labels.add(_label_text(row["label"], f"{path.name} line {number}", "label"))
    if rows == 0 or common is None:
        raise DataError(f"{path.name}: the file has no JSON lines")
    columns = tuple(c for c in order if c in common)
    return FileInfo(
        "jsonl", rows, size, columns, _sorted_labels(labels) if "label" in common else None
    )


def _csv_reader(path: Path) -> Iterator[tuple[int, list[str]]]:
    lines = (line for _, line in _read_lines(path))
    reader = csv.reader(lines)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as error:
        raise DataError(f"{path.name} line {reader.line_num}: {error}") from None


def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    rows = _csv_reader(path)
    try:
        _, header = next(rows)
    except StopIteration:
        raise DataError(f"{path.name}: the file is empty") from None
    header = [name.strip() for name in header]
    if header and header[0].startswith(("{", "[")):
        raise DataError(
            f"{path.name} line 1: this looks like JSON, not CSV; save JSON lines as .jsonl"
        )
    if not header or any(not name for name in header):
        raise DataError(f"{path.name} line 1: the header row needs a name for every column")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise DataError(f"{path.name} line 1: duplicate column names {', '.join(duplicates)}")

    def records() -> Iterator[tuple[int, dict[str, str]]]:
        for number, row in rows:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path.name} line {number}: {len(row)} fields, but the header names "
                    f"{len(header)} ({', '.join(header)}); quote fields that contain commas"
                )
            yield number, dict(zip(header, row, strict=True))

    return header, records()


def _inspect_csv(path: Path, size: int) -> FileInfo:
    header, records = _csv_rows(path)
    rows = 0
    labels = set()
    for number, record in records:
        rows += 1
        if "label" in record:
            label = record["label"].strip()
            if not label:
                raise DataError(
                    f"{path.name} line {number}: the 'label' column is empty; give every row a "
                    "label, or drop the column for causal-lm"
                )
            labels.add(label)
    if rows == 0:
        raise DataError(f"{path.name}: the file has a header but no rows")
    return FileInfo(
        "csv", rows, size, tuple(header), _sorted_labels(labels) if "label" in header else None
    )


def _inspect_text(path: Path, size: int) -> FileInfo:
    rows = sum(1 for _, line in _read_lines(path) if line.strip())
    if rows == 0:
        raise DataError(f"{path.name}: the file holds only blank lines")
    return FileInfo("text", rows, size)


def _inspect_archive(path: Path, size: int, limits: ArchiveLimits | None) -> FileInfo:
    with ImageArchive(path, limits) as archive:
        for image in archive.images:
            archive.verify(image, archive.read(image))
        labels = _sorted_labels({image.label for image in archive.images})
        return FileInfo("image-archive", len(archive.images), size, (), labels)


def _sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """Integer-like labels in numeric order ("2" before "10"), others alphabetically."""
    if labels and all(_is_int(label) for label in labels):
        return tuple(sorted(labels, key=int))
    return tuple(sorted(labels))


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def sorted_labels(labels: Sequence[str]) -> list[str]:
    return list(_sorted_labels(set(labels)))


# ---------------------------------------------------------------------------------------------
# loading examples for a job


@dataclass
class LoadedData:
    """A source read for a job: its examples and, when the set has one, its own held-out split."""

    train: Examples
    held_out: Examples | None = None


def load_source(
    source: DataSource,
    task: str,
    work_dir: Path,
    limits: ArchiveLimits | None = None,
) -> LoadedData:
    """Read one data source for `task`. Image archives are extracted below `work_dir`."""
    if source.builtin == "digits":
        return LoadedData(_digits())
    if source.builtin == "mnist1d":
        return _mnist1d()
    if source.hf_dataset:
        from training.hf_data import load_hf_source  # datasets is heavy: import on use

        return load_hf_source(source, task)
    assert source.path is not None
    path = Path(source.path)
    if not path.is_file():
        raise DataError(f"{path.name}: no such file (data source {source.path!r})")
    if path.stat().st_size == 0:
        raise DataError(f"{path.name}: the file is empty")
    fmt = source.resolved_format() or detect_format(path)
    if fmt == "image-archive":
        return LoadedData(_archive_examples(path, work_dir, limits))
    if fmt == "text":
        return LoadedData(_text_examples(path))
    needs_label = task != "causal-lm"
    if fmt == "jsonl":
        return LoadedData(_jsonl_examples(path, source, needs_label))
    return LoadedData(_csv_examples(path, source, needs_label))


def _jsonl_examples(path: Path, source: DataSource, needs_label: bool) -> Examples:
    inputs, labels, locations = [], [], []
    for number, row in _jsonl_rows(path):
        where = f"{path.name} line {number}"
        text = row.get(source.text_column)
        if not isinstance(text, str):
            found = ", ".join(row) or "none"
            raise DataError(
                f"{where}: no string field {source.text_column!r} (fields: {found}); set "
                "text_column in the data source to the field holding the text"
            )
        if needs_label:
            if source.label_column not in row:
                raise DataError(
                    f"{where}: no field {source.label_column!r} for the class; set label_column "
                    "in the data source, or use task causal-lm for unlabelled text"
                )
            labels.append(_label_text(row[source.label_column], where, source.label_column))
        inputs.append(text)
        locations.append(where)
    if not inputs:
        raise DataError(f"{path.name}: the file has no JSON lines")
    return Examples("text", inputs, labels if needs_label else None, locations, path.name)


def _csv_examples(path: Path, source: DataSource, needs_label: bool) -> Examples:
    header, records = _csv_rows(path)
    wanted = [source.text_column] + ([source.label_column] if needs_label else [])
    missing = [name for name in wanted if name not in header]
    if missing:
        raise DataError(
            f"{path.name} line 1: no column {' or '.join(repr(m) for m in missing)} (columns: "
            f"{', '.join(header)}); set text_column/label_column in the data source"
        )
    inputs, labels, locations = [], [], []
    for number, record in records:
        where = f"{path.name} line {number}"
        if needs_label:
            label = record[source.label_column].strip()
            if not label:
                raise DataError(f"{where}: the {source.label_column!r} column is empty")
            labels.append(label)
        inputs.append(record[source.text_column])
        locations.append(where)
    if not inputs:
        raise DataError(f"{path.name}: the file has a header but no rows")
    return Examples("text", inputs, labels if needs_label else None, locations, path.name)


def _text_examples(path: Path) -> Examples:
    inputs, locations = [], []
    for number, line in _read_lines(path):
        if line.strip():
            inputs.append(line)
            locations.append(f"{path.name} line {number}")
    if not inputs:
        raise DataError(f"{path.name}: the file holds only blank lines")
    return Examples("text", inputs, None, locations, path.name, extras={"plain_text": True})


def _archive_examples(path: Path, work_dir: Path, limits: ArchiveLimits | None) -> Examples:
    target = work_dir / f"images-{path.stem}-{random.getrandbits(32):08x}"
    extracted = extract_images(path, target, limits)
    return Examples(
        "image",
        [file for file, _, _ in extracted],
        [label for _, label, _ in extracted],
        [f"{path.name} entry {entry!r}" for _, _, entry in extracted],
        path.name,
    )


def _digits() -> Examples:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # (N, 8, 8) in [0, 1]
    labels = [str(int(t)) for t in digits.target]
    classes = [str(i) for i in range(10)]
    locations = [f"digits sample {i}" for i in range(len(labels))]
    return Examples("signal", list(images), labels, locations, "digits", classes)


def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """MNIST-1D as generated by the package, cached as a plain .npz (about 5 s to generate)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    cache = _cache_dir() / f"mnist1d-{args.num_samples}-{args.seed}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    # make_dataset seeds the global numpy and random generators; keep the job's own state.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)  # generated from templates locally; get_dataset would download
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = {key: np.asarray(data[key]) for key in ("x", "y", "x_test", "y_test")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            partial, x=arrays["x"], y=arrays["y"], x_test=arrays["x_test"], y_test=arrays["y_test"]
        )
        partial.replace(cache)
    except OSError as error:
        logger.info("could not cache MNIST-1D at %s: %s", cache, error)
    return arrays


def _cache_dir() -> Path:
    configured = os.environ.get("GMNM_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gmnm"


def _mnist1d() -> LoadedData:
    arrays = _mnist1d_arrays()
    classes = [str(i) for i in range(10)]

    def split(x: np.ndarray, y: np.ndarray, name: str) -> Examples:
        # (1, 40): one row of pixels; the standardised values are mapped from [-4, 4] to [0, 1]
        # like grey levels so that the model's own normalisation applies as to any image.
        signals = [np.clip((row[None, :] + 4.0) / 8.0, 0.0, 1.0).astype(np.float32) for row in x]
        labels = [str(int(t)) for t in y]
        locations = [f"mnist1d {name} sample {i}" for i in range(len(labels))]
        return Examples("signal", signals, labels, locations, "mnist1d", classes)

    return LoadedData(
        split(arrays["x"], arrays["y"], "train"), split(arrays["x_test"], arrays["y_test"], "test")
    )


def split_fraction(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random split: (kept, held out), the held-out part `fraction` of the examples."""
    count = len(examples)
    held = int(round(count * fraction))
    if fraction > 0 and count > 1:
        held = min(max(held, 1), count - 1)
    order = np.random.default_rng(seed).permutation(count)
    return examples.subset(sorted(order[held:].tolist())), examples.subset(
        sorted(order[:held].tolist())
    )


def resolve_classes(
    train: Examples | None, others: Sequence[Examples], given: Sequence[str] | None
) -> list[str]:
    """The class list in head order, and a check that every example's label is in it."""
    if given is not None:
        classes = list(given)
    elif train is not None and train.classes is not None:
        classes = list(train.classes)
    elif train is not None and train.labels is not None:
        classes = sorted_labels(train.labels)
    else:
        labels = [label for ex in others for label in (ex.labels or [])]
        classes = (others[0].classes if others and others[0].classes else None) or sorted_labels(
            labels
        )
    known = set(classes)
    for examples in ([train] if train is not None else []) + list(others):
        for label, where in zip(examples.labels or [], examples.locations, strict=False):
            if label not in known:
                shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
                raise DataError(
                    f"{where}: label {label!r} is not one of the classes ({shown}); "
                    "fix the label, or list every class in data.labels"
                )
    if len(classes) < 2:
        raise DataError(
            f"{train.source if train is not None else 'the data'}: only one class "
            f"({', '.join(classes)}); classification needs at least two"
        )
    return classes
