"""Checkpoint archives are byte-for-byte reproducible and extract to the original directory."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from service.archive import write_archive


def make_checkpoint(root: Path) -> Path:
    directory = root / "step-10"
    (directory / "nested").mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(os.urandom(5000))
    (directory / "manifest.json").write_text('{"sites": []}')
    (directory / "nested" / "optimizer.pt").write_bytes(b"state" * 100)
    return directory


def test_archive_bytes_do_not_depend_on_mtimes_or_creation_order(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "a")
    first = write_archive(source, tmp_path / "one.tar", top="ftckpt-1")
    for path in source.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    second = write_archive(source, tmp_path / "two.tar", top="ftckpt-1")
    assert first == second
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()


def test_archive_extracts_to_the_same_files_under_the_checkpoint_id(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "a")
    write_archive(source, tmp_path / "c.tar", top="ftckpt-9")
    with tarfile.open(tmp_path / "c.tar") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    extracted = tmp_path / "out" / "ftckpt-9"
    for path in source.rglob("*"):
        if path.is_file():
            assert (extracted / path.relative_to(source)).read_bytes() == path.read_bytes()


def test_symlinks_are_left_out_of_the_archive(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "a")
    (source / "leak").symlink_to("/etc/passwd")
    write_archive(source, tmp_path / "c.tar", top="x")
    with tarfile.open(tmp_path / "c.tar") as tar:
        assert "x/leak" not in tar.getnames()
