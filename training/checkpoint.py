"""Checkpoints: written completely or not at all, and found again for `--resume`.

A checkpoint is `OUT/checkpoints/step-N/`: a `surgery.save` directory (so `surgery.load` opens
it), `checkpoint.json` (`step`, `metrics`, `created_at`, and the task and class names), and, for
fine-tunes, `training_state.pt` with what an exact resume needs (optimizer, scheduler, scaler,
data order, every rank's RNG). It is written as `step-N.tmp-*`, every file fsynced, then renamed,
so a crash or a full disk never leaves a half checkpoint under a final name.

`training_state.pt` is written and read only by this engine, with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.errors import DiskFullError
from training.protocol import (
    CHECKPOINT_INFO_FILE,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    TRAINING_STATE_FILE,
)

logger = logging.getLogger(__name__)

_FINAL_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
_TEMPORARY_MARK = ".tmp-"
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    info: dict[str, Any]

    @property
    def resumable(self) -> bool:
        return (self.path / TRAINING_STATE_FILE).is_file()


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS_DIR / f"{CHECKPOINT_PREFIX}{step}"


def list_checkpoints(out_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = out_dir / CHECKPOINTS_DIR
    found: list[Checkpoint] = []
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        match = _FINAL_NAME.match(entry.name)
        info_file = entry / CHECKPOINT_INFO_FILE
        if not match or not info_file.is_file():
            continue
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring checkpoint %s: unreadable %s", entry, CHECKPOINT_INFO_FILE)
            continue
        found.append(Checkpoint(int(match.group(1)), entry, info))
    return sorted(found, key=lambda c: c.step)


def newest_resumable(out_dir: Path) -> Checkpoint | None:
    resumable = [c for c in list_checkpoints(out_dir) if c.resumable]
    return resumable[-1] if resumable else None


def remove_partial(out_dir: Path) -> None:
    """Delete temporary checkpoint directories a killed run left behind."""
    root = out_dir / CHECKPOINTS_DIR
    if root.is_dir():
        for entry in root.iterdir():
            if _TEMPORARY_MARK in entry.name:
                logger.info("removing the partial checkpoint %s of an earlier run", entry.name)
                shutil.rmtree(entry, ignore_errors=True)


def is_disk_full(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) means the filesystem is full.

    Writers in other languages (safetensors) report ENOSPC only in their message text.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in _DISK_FULL_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON under a temporary name, fsync, rename: readers never see half a file."""
    partial = path.with_name(f"{path.name}{_TEMPORARY_MARK}{secrets.token_hex(4)}")
    try:
        with partial.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_checkpoint(
    out_dir: Path,
    step: int,
    save_model: Callable[[Path], None],
    info: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Checkpoint:
    """Write checkpoint `step-N` atomically; an existing one of that step is replaced.

    Raises `DiskFullError` when the filesystem fills up; the partial directory is removed and
    every earlier checkpoint stays as it was.
    """
    final = checkpoint_dir(out_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f"{final.name}{_TEMPORARY_MARK}{secrets.token_hex(4)}")
    info = {"step": step, "created_at": int(time.time()), **info}
    try:
        partial.mkdir()
        save_model(partial)
        if training_state is not None:
            buffer = io.BytesIO()
            torch.save(training_state, buffer)
            (partial / TRAINING_STATE_FILE).write_bytes(buffer.getvalue())
        (partial / CHECKPOINT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _fsync_tree(partial)
        _install(partial, final)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            kept = [c.path.name for c in list_checkpoints(out_dir)]
            raise DiskFullError(
                f"no space left on the device holding {out_dir} while writing checkpoint "
                f"{final.name}; free space or give the job a larger volume. Earlier checkpoints "
                f"are intact: {', '.join(kept) or 'none'}"
            ) from error
        raise
    logger.info("checkpoint %s written", final)
    return Checkpoint(step, final, info)


def _install(partial: Path, final: Path) -> None:
    if final.exists():
        # A resumed run reaches a step an earlier run already saved: swap the new one in.
        retired = final.with_name(f"{final.name}{_TEMPORARY_MARK}old-{secrets.token_hex(4)}")
        final.rename(retired)
        partial.rename(final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        partial.rename(final)
    _fsync_dir(final.parent)


def read_training_state(checkpoint: Checkpoint) -> dict[str, Any]:
    state: dict[str, Any] = torch.load(
        checkpoint.path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True
    )
    return state
