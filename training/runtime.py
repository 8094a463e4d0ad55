"""What every job shares: cancellation, precision, seeding and RNG state, and its data splits."""

from __future__ import annotations

import logging
import random
import resource
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import Examples, load_source, resolve_classes, split_fraction
from training.errors import SpecError
from training.protocol import CANCEL_FILE
from training.spec import DataSpec

logger = logging.getLogger(__name__)


class CancelToken:
    """Set by SIGTERM/SIGINT (see `training.cli`) or by a CANCEL file in the output directory."""

    def __init__(self, out_dir: Path) -> None:
        self.cancel_file = out_dir / CANCEL_FILE
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def is_set(self) -> bool:
        return self.requested or self.cancel_file.exists()


class JobCancelled(Exception):  # noqa: N818 (a stop request, not an error)
    """Raised inside a job that was asked to stop before it could do any work."""


def resolve_precision(requested: str, device: torch.device) -> str:
    """fp32, bf16 or fp16 for this device ("auto": bf16 where CUDA supports it)."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise SpecError(
            "precision: fp16 needs a CUDA device (its loss scaling is CUDA-only), but the job "
            f"runs on {device.type}; use bf16 or fp32"
        )
    return requested


def autocast_factory(
    precision: str, device: torch.device
) -> Callable[[], AbstractContextManager[Any]]:
    """A context manager factory: autocast to bf16/fp16, or nothing for fp32. GMNM modules keep
    their own parameters and arithmetic in fp32 inside it."""
    if precision == "fp32":
        return nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast() -> AbstractContextManager[Any]:
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    """This process's generators, in a form `torch.load(weights_only=True)` reads back."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "keys": torch.tensor(keys, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached": float(np_cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    python = state["python"]
    random.setstate((python["version"], tuple(int(k) for k in python["keys"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory of the job so far: CUDA allocations, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def work_directory(out_dir: Path) -> Iterator[Path]:
    """Scratch space for extracted archives, inside the job's directory, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class DataSplits:
    train: Examples | None
    validation: Examples | None
    classes: list[str] | None


def prepare_data(
    data: DataSpec,
    task: str,
    seed: int,
    work_dir: Path,
    classes: list[str] | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> DataSplits:
    """Read the training and validation examples and settle the class list.

    Validation is the `validation` source, else the training set's own held-out split, else a
    seeded `validation_fraction` of the training examples (the same seed gives the same split
    to a fine-tune and to an evaluation of its checkpoints).
    """
    train = validation = None
    if data.train is not None:
        loaded = load_source(data.train, task, work_dir)
        train = loaded.train
        if data.validation is None:
            if loaded.held_out is not None:
                validation = loaded.held_out
            elif data.validation_fraction > 0:
                train, validation = split_fraction(train, data.validation_fraction, seed)
    if data.validation is not None:
        # a named set as the validation source means its own held-out split (MNIST-1D's test
        # split, a data set's validation split) unless the source names a split itself
        loaded = load_source(data.validation, task, work_dir)
        validation = loaded.train if loaded.held_out is None else loaded.held_out
    if train is not None and max_train is not None and len(train) > max_train:
        train = train.subset(range(max_train))
    if validation is not None and max_eval is not None and len(validation) > max_eval:
        validation = validation.subset(range(max_eval))
    if task != "causal-lm":
        others = [validation] if validation is not None else []
        classes = resolve_classes(train, others, classes or data.labels)
    return DataSplits(train, validation, classes)
