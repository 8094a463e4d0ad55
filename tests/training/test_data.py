"""Data files: what inspect_file reports, and the clear errors bad files of each kind give."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.archive import ArchiveLimits
from training.data import inspect_file, load_source, resolve_classes, split_fraction
from training.errors import DataError
from training.runtime import prepare_data
from training.spec import DataSource, DataSpec


def _png(value: int = 128, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def _tar(path: Path, entries: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_jsonl_file_reports_rows_columns_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    info = inspect_file(path)
    assert (info.format, info.rows, info.columns, info.labels) == (
        "jsonl",
        2,
        ("text", "label"),
        ("neg", "pos"),
    )


def test_csv_file_reports_header_and_integer_labels_in_numeric_order(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"hello, world",10\nbye,2\n')
    info = inspect_file(path)
    assert (info.format, info.rows, info.columns, info.labels) == (
        "csv",
        2,
        ("text", "label"),
        ("2", "10"),
    )


def test_plain_text_counts_non_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("one line\n\nanother\n")
    assert inspect_file(path).rows == 2


def test_file_without_suffix_is_sniffed_and_format_can_be_forced(tmp_path: Path) -> None:
    path = tmp_path / "file-abc123"
    path.write_text('{"text": "x"}\n')
    assert inspect_file(path).format == "jsonl"
    path.write_text("a,b\n1,2\n")
    assert inspect_file(path).format == "text"
    assert inspect_file(path, format="csv").columns == ("a", "b")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "empty.jsonl: the file is empty"),
        ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', r"bad.jsonl line 2: not valid JSON"),
        ("list.jsonl", '["a", 1]\n', "list.jsonl line 1: expected a JSON object"),
        ("float.jsonl", '{"text": "a", "label": 0.5}\n', "float.jsonl line 1: label 0.5"),
        ("ragged.csv", "text,label\na,1\nb,2,3\n", "ragged.csv line 3: 3 fields"),
        ("header.csv", "text,\na,1\n", "header.csv line 1: the header row needs a name"),
        ("blank.txt", "\n\n  \n", "blank.txt: the file holds only blank lines"),
    ],
)
def test_bad_text_files_name_the_file_and_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        inspect_file(path)


def test_text_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DataError, match="latin.txt line 2: not valid UTF-8"):
        inspect_file(path)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_image_archive_lists_classes_below_a_common_top_folder(tmp_path: Path, kind: str) -> None:
    entries = {"pets/cat/a.png": _png(), "pets/cat/b.png": _png(3), "pets/dog/c.png": _png(9)}
    path = (
        _zip(tmp_path / "pets.zip", entries)
        if kind == "zip"
        else _tar(tmp_path / "pets.tgz", entries)
    )
    info = inspect_file(path)
    assert (info.format, info.rows, info.labels) == ("image-archive", 3, ("cat", "dog"))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"../evil/a.png": b"x"}, "'..' component"),
        ({"/abs/a.png": b"x"}, "absolute path"),
        ({"cat/a.png": b"not an image"}, "entry 'cat/a.png' is not a readable image"),
        ({"cat/notes.txt": b"hi", "cat/a.png": b""}, "'cat/notes.txt' is not an image"),
        ({"a.png": b"x"}, "'a.png' is not at <class>/<image>"),
    ],
)
def test_unsafe_or_malformed_zip_entries_are_refused(
    tmp_path: Path, entries: dict[str, bytes], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        inspect_file(_zip(tmp_path / "bad.zip", entries))


def test_tar_with_a_symlink_is_refused_before_anything_is_extracted(tmp_path: Path) -> None:
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as archive:
        info = tarfile.TarInfo("cat/a.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    with pytest.raises(DataError, match="'cat/a.png' is a link"):
        load_source(DataSource(path=str(path)), "image-classification", tmp_path / "work")
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.png"))


def test_zip_bomb_is_refused_by_its_declared_size_and_ratio(tmp_path: Path) -> None:
    path = _zip(tmp_path / "bomb.zip", {"cat/a.png": b"\0" * (4 * 1024**2)})
    with pytest.raises(DataError, match="expands .*-fold"):
        inspect_file(path)
    with pytest.raises(DataError, match="declares 4194304 bytes, more than the limit"):
        inspect_file(path, limits=ArchiveLimits(max_entry_bytes=1024**2))


def test_archive_entry_count_is_bounded(tmp_path: Path) -> None:
    path = _zip(tmp_path / "many.zip", {f"c/{i}.png": _png() for i in range(5)})
    with pytest.raises(DataError, match="more than 3 entries"):
        inspect_file(path, limits=ArchiveLimits(max_entries=3))


def test_archive_images_are_extracted_under_names_of_our_choosing(tmp_path: Path) -> None:
    path = _tar(tmp_path / "set.tar.gz", {"b/x.png": _png(1), "a/y.PNG": _png(2)})
    loaded = load_source(DataSource(path=str(path)), "image-classification", tmp_path / "work")
    assert loaded.train.labels == ["b", "a"]
    assert [p.parent.parent for p in loaded.train.inputs] == [tmp_path / "work"] * 2
    assert loaded.train.locations[1] == "set.tar.gz entry 'a/y.PNG'"


def test_jsonl_without_the_label_field_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="t.jsonl line 2: no field 'label'"):
        load_source(DataSource(path=str(path)), "text-classification", tmp_path)
    loaded = load_source(DataSource(path=str(path)), "causal-lm", tmp_path)
    assert loaded.train.inputs == ["a", "b"] and loaded.train.labels is None


def test_csv_columns_come_from_the_data_source(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("review,stars\nnice,5\nmeh,2\n")
    with pytest.raises(DataError, match="no column 'text' or 'label'"):
        load_source(DataSource(path=str(path)), "text-classification", tmp_path)
    source = DataSource(path=str(path), text_column="review", label_column="stars")
    loaded = load_source(source, "text-classification", tmp_path)
    assert loaded.train.inputs == ["nice", "meh"] and loaded.train.labels == ["5", "2"]


def test_label_outside_the_class_list_names_its_line(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    valid = tmp_path / "valid.jsonl"
    valid.write_text('{"text": "c", "label": "x"}\n{"text": "d", "label": "z"}\n')
    a = load_source(DataSource(path=str(train)), "text-classification", tmp_path).train
    b = load_source(DataSource(path=str(valid)), "text-classification", tmp_path).train
    with pytest.raises(
        DataError, match=r"valid.jsonl line 2: label 'z' is not one of the classes \(x, y\)"
    ):
        resolve_classes(a, [b], None)
    assert resolve_classes(a, [b], ["x", "y", "z"]) == ["x", "y", "z"]


def test_builtin_sets_load_locally_with_their_own_splits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GMNM_CACHE_DIR", str(tmp_path))  # generate MNIST-1D, not read a cache
    digits = load_source(DataSource(builtin="digits"), "image-classification", Path("."))
    assert len(digits.train) == 1797 and digits.held_out is None
    assert digits.train.inputs[0].shape == (8, 8) and digits.train.classes == [
        str(i) for i in range(10)
    ]
    state = np.random.get_state()[1].copy()
    mnist = load_source(DataSource(builtin="mnist1d"), "image-classification", Path("."))
    assert np.array_equal(state, np.random.get_state()[1]), "global numpy RNG must be untouched"
    assert len(mnist.train) == 4000 and mnist.held_out is not None and len(mnist.held_out) == 1000
    assert mnist.train.inputs[0].shape == (1, 40)
    cached = load_source(DataSource(builtin="mnist1d"), "image-classification", Path("."))
    assert np.array_equal(cached.train.inputs[7], mnist.train.inputs[7])
    assert cached.train.labels == mnist.train.labels


def test_seeded_fraction_split_is_reproducible_and_disjoint() -> None:
    digits = load_source(DataSource(builtin="digits"), "image-classification", Path(".")).train
    kept, held = split_fraction(digits, 0.2, seed=3)
    again, _ = split_fraction(digits, 0.2, seed=3)
    assert len(held) == 359 and len(kept) + len(held) == len(digits)
    assert kept.locations == again.locations
    assert not set(kept.locations) & set(held.locations)


def _save_reviews(directory: Path, text_column: str, test: dict[str, list]) -> None:
    """A save_to_disk data set with neg/pos class names: three train rows and the given test."""
    import datasets

    features = datasets.Features(
        {text_column: datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = {text_column: ["bad", "good", "fine"], "label": [0, 1, 1]}
    splits = {"train": train, "test": {text_column: test["text"], "label": test["label"]}}
    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(rows, features=features) for name, rows in splits.items()}
    ).save_to_disk(directory)


def test_save_to_disk_directory_loads_with_class_names_and_held_out_split(tmp_path: Path) -> None:
    _save_reviews(tmp_path / "ds", "sentence", {"text": ["bad"], "label": [0]})
    loaded = load_source(
        DataSource(hf_dataset=str(tmp_path / "ds")), "text-classification", tmp_path
    )
    assert loaded.train.inputs == ["bad", "good", "fine"]
    assert loaded.train.labels == ["neg", "pos", "pos"] and loaded.train.classes == ["neg", "pos"]
    assert loaded.held_out is not None and loaded.held_out.labels == ["neg"]


def test_unreachable_hub_data_set_says_what_to_do_instead(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="upload a file or a save_to_disk folder"):
        load_source(DataSource(hf_dataset="nobody/no-such-set"), "text-classification", tmp_path)


def test_a_data_set_named_for_validation_gives_its_held_out_split(tmp_path: Path) -> None:
    _save_reviews(tmp_path / "ds", "text", {"text": ["awful"], "label": [0]})
    reviews = tmp_path / "reviews.jsonl"
    reviews.write_text('{"text": "great", "label": "pos"}\n{"text": "poor", "label": "neg"}\n')

    def validation_of(source: dict) -> list:
        data = DataSpec(train={"path": str(reviews)}, validation=source)
        splits = prepare_data(data, "text-classification", seed=0, work_dir=tmp_path)
        assert splits.validation is not None and splits.train is not None
        assert splits.train.inputs == ["great", "poor"]
        return list(splits.validation.inputs)

    assert validation_of({"hf_dataset": str(tmp_path / "ds")}) == ["awful"]
    assert validation_of({"hf_dataset": str(tmp_path / "ds"), "split": "train"}) == [
        "bad",
        "good",
        "fine",
    ]


def _save_images(directory: Path, test_images: list[bytes | None]) -> None:
    """A save_to_disk image data set: three good train images and the given test ones."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])}
    )

    def split(images: list[bytes | None]) -> datasets.Dataset:
        rows = [None if data is None else {"bytes": data, "path": None} for data in images]
        labels = [i % 2 for i in range(len(images))]
        return datasets.Dataset.from_dict({"image": rows, "label": labels}, features=features)

    train = split([_png(10), _png(200), _png(30)])
    datasets.DatasetDict({"train": train, "test": split(test_images)}).save_to_disk(directory)


def test_saved_image_data_set_loads_with_its_images(tmp_path: Path) -> None:
    _save_images(tmp_path / "ds", [_png(90)])
    loaded = load_source(
        DataSource(hf_dataset=str(tmp_path / "ds")), "image-classification", tmp_path
    )
    assert loaded.train.labels == ["dark", "light", "dark"]
    assert loaded.train.inputs[1].size == (6, 6)
    assert loaded.held_out is not None and len(loaded.held_out) == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"\x89PNG\r\n\x1a\n broken", r"ds test row 1 is not a readable image \(.*\); replace or"),
        (None, "ds test row 1 holds no image; replace or drop that row"),
    ],
)
def test_unreadable_image_in_a_saved_data_set_is_refused_when_it_is_loaded(
    tmp_path: Path, bad: bytes | None, message: str
) -> None:
    _save_images(tmp_path / "ds", [_png(90), bad, _png(20)])
    with pytest.raises(DataError, match=message):
        load_source(DataSource(hf_dataset=str(tmp_path / "ds")), "image-classification", tmp_path)
