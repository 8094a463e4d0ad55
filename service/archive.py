"""Deterministic checkpoint archives: the same directory always gives the same bytes.

Members are sorted, carry mtime 0, owner root/root with empty names and normalised modes, and the
tar is uncompressed (gzip would add a timestamp), so the archive's sha256 doubles as its ETag.
Every member sits under one top-level directory named after the checkpoint id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from pathlib import Path

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def _normalised(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    info.pax_headers = {}
    return info


def write_archive(
    source: Path, destination: Path, top: str, exclude: frozenset[str] = frozenset()
) -> tuple[str, int]:
    """Archive `source` into `destination` (atomically); returns (sha256 hex, size in bytes).

    `exclude` names top-level files of `source` to leave out.
    """
    paths = sorted(
        (path for path in source.rglob("*") if path.relative_to(source).as_posix() not in exclude),
        key=lambda path: path.relative_to(source).as_posix(),
    )
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(temporary, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(_normalised(tar.gettarinfo(str(source), arcname=top)))
        for path in paths:
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue  # only regular files and directories belong in a checkpoint
            arcname = f"{top}/{path.relative_to(source).as_posix()}"
            info = _normalised(tar.gettarinfo(str(path), arcname=arcname))
            if info.isdir():
                tar.addfile(info)
            else:
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
    digest = file_sha256(temporary)
    size = temporary.stat().st_size
    temporary.replace(destination)
    return digest, size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
