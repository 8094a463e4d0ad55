"""Evaluation: loss, accuracy and macro-F1 for classification, perplexity for causal LM.

The examples are split across ranks and the sums (and the confusion matrix) are reduced, so a
data-parallel job evaluates each example once and every rank gets the same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from training.distributed import DistContext, all_reduce
from training.models import forward, loss_and_stats
from training.preprocess import ExampleDataset

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def macro_f1(confusion: Tensor) -> float:
    """Mean F1 over the classes that occur in the targets or the predictions (rows: targets)."""
    confusion = confusion.double()
    true_positive = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (predicted + actual) > 0
    if not bool(present.any()):
        return 0.0
    f1 = 2 * true_positive / (predicted + actual).clamp_min(1)
    return float(f1[present].mean())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    library: str,
    task: str,
    dataset: ExampleDataset,
    collate: Callable[[list[dict[str, Tensor]]], Batch],
    batch_size: int,
    ctx: DistContext,
    autocast: Callable[[], AbstractContextManager[Any]],
    num_classes: int | None = None,
) -> dict[str, float]:
    """Metrics of `model` on `dataset` (every rank returns the same dict)."""
    was_training = model.training
    model.eval()
    size = len(dataset)
    mine = list(range(ctx.rank, size, ctx.world_size))
    device = ctx.device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, units, correct
    classes = num_classes or 0
    confusion = torch.zeros(classes * classes, dtype=torch.long, device=device)
    for start in range(0, len(mine), batch_size):
        batch = to_device(collate([dataset[i] for i in mine[start : start + batch_size]]), device)
        with autocast():
            logits = forward(model, library, batch)
        _, losses, predictions = loss_and_stats(task, logits, batch["labels"])
        targets = batch["labels"][:, 1:].reshape(-1) if task == "causal-lm" else batch["labels"]
        totals[0] += losses.double().sum()
        totals[1] += losses.numel()
        totals[2] += (predictions == targets).sum()
        if classes:
            confusion += torch.bincount(targets * classes + predictions, minlength=classes**2)
    all_reduce(totals, ctx)
    all_reduce(confusion, ctx)
    model.train(was_training)
    loss_sum, units, correct = (float(v) for v in totals)
    if units == 0:
        return {}
    loss = loss_sum / units
    if task == "causal-lm":
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": correct / units,
            "tokens": int(units),
        }
    return {
        "loss": loss,
        "accuracy": correct / units,
        "macro_f1": macro_f1(confusion.view(classes, classes)) if classes else float("nan"),
        "samples": int(units),
    }
