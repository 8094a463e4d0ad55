"""The data sets and what training on them means: batches, the loss, and the reported metric.

Each task has four splits. `train` and `val` are what the learning-rate sweep fits and scores;
`train_full` and `test` are what the reported runs fit and score. Where the data set comes with a
fixed train/test split (MNIST-1D, digits) the validation set is carved out of its training part
and `train_full` is that whole part again; where the data are sampled or cut from text, `val` is a
separate sample and `train_full` is `train`.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLITS = ("train", "val", "train_full", "test")
Batch = tuple[Tensor, Tensor]


class Task(ABC):
    name: str
    metric: str
    higher_is_better: bool
    data: Mapping[str, Any]  # split name -> that split's data

    @abstractmethod
    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """A random training batch from `split`."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The training loss on one batch."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, final: bool) -> float:
        """The metric on `split` (a cheaper subset for curve points where `final` is False)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Where the data come from and how large each split is, for the JSON."""


@dataclass
class TensorTask(Task):
    """Inputs and targets held in memory: classification (accuracy) or regression (MSE)."""

    name: str
    kind: str  # "classification" | "regression"
    data: dict[str, Batch]
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metric = "accuracy" if self.kind == "classification" else "mse"
        self.higher_is_better = self.kind == "classification"

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        x, y = self.data[split]
        idx = torch.randint(len(x), (batch_size,), generator=generator)
        return x[idx], y[idx]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        out = model(x)
        if self.kind == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, final: bool) -> float:
        x, y = self.data[split]
        outs = torch.cat([model(chunk) for chunk in x.split(2048)])
        if self.kind == "classification":
            return float((outs.argmax(-1) == y).float().mean())
        return float(F.mse_loss(outs, y))

    def describe(self) -> dict[str, Any]:
        sizes = {split: len(self.data[split][0]) for split in SPLITS}
        return {**self.source, "split_sizes": sizes}


def _classification(
    name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]], **source: Any
) -> TensorTask:
    data = {
        split: (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))
        for split, (x, y) in splits.items()
    }
    return TensorTask(name, "classification", data, dict(source))


def mnist1d_task(val_size: int = 400) -> TensorTask:
    """MNIST-1D generated locally with the package's default arguments (4,000 train, 1,000 test;
    the package would otherwise try to download a pickle). Its samples are already shuffled, so
    the validation set is the last `val_size` training samples."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    dataset = make_dataset(args)
    x, y = dataset["x"], dataset["y"]
    splits = {
        "train": (x[:-val_size], y[:-val_size]),
        "val": (x[-val_size:], y[-val_size:]),
        "train_full": (x, y),
        "test": (dataset["x_test"], dataset["y_test"]),
    }
    return _classification(
        "mnist1d",
        splits,
        source="mnist1d.data.make_dataset(get_dataset_args()), generated locally",
        generator_seed=args.seed,
        num_samples=args.num_samples,
        train_split=args.train_split,
    )


def digits_task(seed: int = 0) -> TensorTask:
    """scikit-learn's 8x8 handwritten digits, pixels scaled to [0, 1], a fixed stratified 80/20
    train/test split, and 20% of the training part held out for the sweep."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_tr, y_tr, test_size=0.2, random_state=seed, stratify=y_tr
    )
    splits = {
        "train": (x_fit, y_fit),
        "val": (x_val, y_val),
        "train_full": (x_tr, y_tr),
        "test": (x_te, y_te),
    }
    return _classification(
        "digits",
        splits,
        source="sklearn.datasets.load_digits, pixels / 16",
        split=f"train_test_split(test_size=0.2, stratify=y, random_state={seed})",
    )


# --- function approximation -----------------------------------------------------------------------

RIDGE_WIDTH = 0.05


def _sin_cos(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sin(np.pi * x) * np.cos(np.pi * y)


def _exp_sin(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.exp(np.sin(np.pi * x) + y**2)


def _ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * ((y - 0.5 * np.sin(np.pi * x)) / RIDGE_WIDTH) ** 2)


FUNCTIONS = {
    "sin_cos": ("sin(pi x) cos(pi y)", _sin_cos),
    "exp_sin": ("exp(sin(pi x) + y^2)", _exp_sin),
    "ridge": (f"exp(-0.5 ((y - 0.5 sin(pi x)) / {RIDGE_WIDTH})^2), a ridge along a sine", _ridge),
}


def function_task(
    name: str, sizes: tuple[int, int, int] = (2000, 1000, 10000), seed: int = 2024
) -> TensorTask:
    """Noise-free samples of one of `FUNCTIONS`, uniform on [-1, 1]^2, drawn once from `seed`."""
    formula, fn = FUNCTIONS[name]
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in zip(("train", "val", "test"), sizes, strict=True):
        points = rng.uniform(-1.0, 1.0, size=(n, 2))
        target = fn(points[:, 0], points[:, 1])[:, None]
        data[split] = (
            torch.as_tensor(points, dtype=torch.float32),
            torch.as_tensor(target, dtype=torch.float32),
        )
    data["train_full"] = data["train"]
    source = {"function": formula, "domain": "[-1, 1]^2, uniform", "sampling_seed": seed}
    return TensorTask(f"function_{name}", "regression", data, source)


# --- character language model ---------------------------------------------------------------

# Real text that every Python 3.11 install carries: standard-library modules, read as bytes.
TEXT_FILES = (
    "argparse.py",
    "difflib.py",
    "inspect.py",
    "typing.py",
    "functools.py",
    "textwrap.py",
    "dataclasses.py",
    "subprocess.py",
)


@dataclass
class CharLMTask(Task):
    """Next-byte prediction over windows of `context` bytes; the metric is bits per character
    (the text is ASCII source code, so one byte is one character)."""

    data: dict[str, Tensor]
    context: int
    curve_windows: int
    final_windows: int
    files: list[dict[str, Any]]

    def __post_init__(self) -> None:
        self.name = "charlm"
        self.metric = "bpc"
        self.higher_is_better = False

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        text = self.data[split]
        starts = torch.randint(len(text) - self.context - 1, (batch_size,), generator=generator)
        windows = torch.stack([text[s : s + self.context + 1] for s in starts.tolist()])
        return windows[:, :-1].long(), windows[:, 1:].long()

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        logits = model(x)  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, final: bool) -> float:
        text = self.data[split]
        available = (len(text) - 1) // self.context
        count = min(available, self.final_windows if final else self.curve_windows)
        # evenly spaced, non-overlapping windows: the same ones for every model and seed
        starts = torch.linspace(0, (available - 1) * self.context, count).long()
        starts = (starts // self.context) * self.context
        total = 0.0
        for chunk in starts.split(64):
            windows = torch.stack([text[s : s + self.context + 1] for s in chunk.tolist()]).long()
            logits = model(windows[:, :-1])
            total += float(
                F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
            )
        return total / (len(starts) * self.context) / math.log(2)

    def describe(self) -> dict[str, Any]:
        return {
            "source": "Python standard library modules, read as bytes",
            "stdlib": sysconfig.get_paths()["stdlib"],
            "files": self.files,
            "split": "per file: first 90% train, next 5% val, last 5% test",
            "split_bytes": {split: len(self.data[split]) for split in SPLITS},
            "context": self.context,
            "eval_windows": {"curve": self.curve_windows, "final": self.final_windows},
        }


def charlm_task(context: int, curve_windows: int, final_windows: int) -> CharLMTask:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    files = []
    for name in TEXT_FILES:
        raw = (stdlib / name).read_bytes()
        files.append(
            {"file": name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()[:16]}
        )
        a, b = int(len(raw) * 0.90), int(len(raw) * 0.95)
        parts["train"].append(raw[:a])
        parts["val"].append(raw[a:b])
        parts["test"].append(raw[b:])
    data = {
        split: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
        for split, chunks in parts.items()
    }
    data["train_full"] = data["train"]
    return CharLMTask(data, context, curve_windows, final_windows, files)
