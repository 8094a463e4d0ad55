"""The training protocol every comparison follows, and the statistics reported from it.

For each variant of an experiment:
1. Sweep: train once (the first seed) per learning rate of the grid on the `train` split and
   score each on `val`; the best validation metric picks the learning rate. Where the best rate
   is the grid's smallest or largest, the grid is extended past that end by the grid's own ratio
   (up to `max_extensions` times), so that the chosen rate is not an artefact of where the grid
   stopped. The test set plays no part in the choice.
2. Report: train once per seed with that learning rate on `train_full` and score on `test`. Where
   `train_full` is `train`, the sweep's run for the first seed is that seed's reported run.

Every run has the same optimiser budget: Adam, the same steps and batch size, a linear warm-up
over the first `warmup_fraction` of the steps, cosine decay to zero, gradient norm clipped to 1.
The test metric is recorded at `eval_points` evenly spaced steps for the curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from accuracy_lib.models import count_parameters
from accuracy_lib.tasks import Task

Log = Callable[[str], None]


@dataclass(frozen=True)
class Budget:
    steps: int
    batch_size: int
    lr_grid: tuple[float, ...]
    seeds: tuple[int, ...]
    eval_points: int = 20
    max_extensions: int = 2
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["optimizer"] = "Adam (betas 0.9, 0.999, no weight decay)"
        data["schedule"] = "linear warm-up, then cosine decay to 0"
        return data


@dataclass
class Variant:
    name: str
    description: str
    build: Callable[[], nn.Module]
    baseline: str  # the variant whose final test metric the others race to


@dataclass
class Run:
    lr: float
    seed: int
    fit_split: str
    curve_steps: list[int]
    curve: list[float]
    val: float
    test: float
    loss_first: float
    loss_last: float
    train_seconds: float
    diverged: bool = False


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _eval_steps(steps: int, points: int) -> list[int]:
    return sorted({round(i * steps / points) for i in range(points + 1)})


def train(
    task: Task, variant: Variant, lr: float, seed: int, fit_split: str, budget: Budget
) -> Run:
    """One training run; returns its test curve, final val/test metrics and training time."""
    torch.manual_seed(seed)
    model = variant.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, round(budget.warmup_fraction * budget.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, budget.steps, warmup)
    )
    generator = torch.Generator().manual_seed(seed)
    eval_at = set(_eval_steps(budget.steps, budget.eval_points))
    curve_steps: list[int] = []
    curve: list[float] = []
    losses: list[float] = []
    seconds = 0.0
    diverged = False

    for step in range(budget.steps + 1):
        # the curve: test metric before this step's update
        if step in eval_at:
            model.eval()
            curve_steps.append(step)
            curve.append(task.evaluate(model, "test", final=False))
            model.train()
        if step == budget.steps:
            break

        # one optimiser step, timed without the evaluations
        start = time.perf_counter()
        batch = task.sample(fit_split, budget.batch_size, generator)
        loss = task.loss(model, batch)
        if not torch.isfinite(loss):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), budget.grad_clip)
        optimizer.step()
        scheduler.step()
        seconds += time.perf_counter() - start
        losses.append(float(loss.detach()))

    model.eval()
    tail = losses[-max(1, len(losses) // 20) :]
    nan = float("nan")
    return Run(
        lr=lr,
        seed=seed,
        fit_split=fit_split,
        curve_steps=curve_steps,
        curve=curve,
        val=nan if diverged else task.evaluate(model, "val", final=True),
        test=nan if diverged else task.evaluate(model, "test", final=True),
        loss_first=losses[0] if losses else nan,
        loss_last=float(np.mean(tail)) if losses else nan,
        train_seconds=seconds,
        diverged=diverged,
    )


def _better(task: Task, a: float, b: float) -> bool:
    """Whether metric a beats b (NaN, a diverged run, never wins)."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if task.higher_is_better else a < b


@dataclass
class VariantResult:
    variant: Variant
    parameters: int
    sweep: dict[float, Run]
    lr: float
    runs: list[Run] = field(default_factory=list)


def run_variant(task: Task, variant: Variant, budget: Budget, log: Log) -> VariantResult:
    """Sweep the learning rate on validation, then train every seed with the chosen one."""
    parameters = count_parameters(variant.build())
    refit = task.data["train_full"] is not task.data["train"]
    first = budget.seeds[0]

    # the sweep (skipped when the grid has a single rate)
    sweep: dict[float, Run] = {}

    def try_rate(rate: float) -> None:
        run = train(task, variant, rate, first, "train", budget)
        sweep[rate] = run
        log(f"  {variant.name:<22} sweep lr={rate:.3g}: val {task.metric} {run.val:.4g}")

    def best_rate() -> float:
        best = min(sweep) if sweep else budget.lr_grid[0]
        for candidate in sorted(sweep):
            if _better(task, sweep[candidate].val, sweep[best].val):
                best = candidate
        return best

    if len(budget.lr_grid) > 1:
        for rate in budget.lr_grid:
            try_rate(rate)
        ratio = budget.lr_grid[1] / budget.lr_grid[0]
        for _ in range(budget.max_extensions):
            best, rates = best_rate(), sorted(sweep)
            if best == rates[-1]:
                try_rate(best * ratio)
            elif best == rates[0]:
                try_rate(best / ratio)
            else:
                break
    lr = best_rate()

    # the reported runs
    result = VariantResult(variant, parameters, sweep, lr)
    for seed in budget.seeds:
        if seed == first and lr in sweep and not refit:
            run = sweep[lr]
        else:
            run = train(task, variant, lr, seed, "train_full", budget)
        result.runs.append(run)
        log(
            f"  {variant.name:<22} lr={lr:g} seed={seed}: test {task.metric} {run.test:.4g}, "
            f"loss {run.loss_first:.3g} -> {run.loss_last:.3g}, {run.train_seconds:.1f} s"
        )
    return result


def interleaved_step_times(
    task: Task, variants: list[Variant], budget: Budget, rounds: int = 7, steps: int = 10
) -> dict[str, float]:
    """Median seconds per training step of each variant, measured in turns (variant A, B, C, A,
    B, C, ...) so that load from other processes on a shared machine falls on all of them alike;
    the wall times of the full runs, taken minutes apart, are not comparable in the same way."""
    models = {}
    for variant in variants:
        torch.manual_seed(0)
        model = variant.build()
        models[variant.name] = (model, torch.optim.Adam(model.parameters(), lr=1e-4))
    generator = torch.Generator().manual_seed(0)
    batch = task.sample("train", budget.batch_size, generator)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(rounds + 1):
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss = task.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_ > 0:  # the first round warms up caches and lazily built kernels
                samples[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(times)) for name, times in samples.items()}


# --- statistics ----------------------------------------------------------------------------------


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds (None where every run diverged)."""
    ok = _finite(values)
    return {
        "mean": float(np.mean(ok)) if ok else None,
        "std": float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0 if ok else None,
        "per_seed": [v if math.isfinite(v) else None for v in values],
    }


def _mean_curve(runs: list[Run]) -> tuple[list[int], np.ndarray, np.ndarray]:
    complete = [r for r in runs if not r.diverged]
    if not complete:
        return [], np.array([]), np.array([])
    curves = np.array([r.curve for r in complete])
    std = curves.std(0, ddof=1) if len(complete) > 1 else np.zeros(curves.shape[1])
    return complete[0].curve_steps, curves.mean(0), std


def steps_to_reach(task: Task, steps: list[int], curve: np.ndarray, target: float) -> int | None:
    """The first evaluated step where the mean curve is at least as good as `target`."""
    for step, value in zip(steps, curve, strict=True):
        if value >= target if task.higher_is_better else value <= target:
            return step
    return None


def summarise(
    task: Task, results: dict[str, VariantResult], step_times: dict[str, float]
) -> dict[str, Any]:
    """The JSON of one experiment's variants: metrics, counts, curves, steps to the baseline."""
    out: dict[str, Any] = {}
    for name, result in results.items():
        baseline = results[result.variant.baseline]
        steps, mean, std = _mean_curve(result.runs)
        base_steps, base_mean, _ = _mean_curve(baseline.runs)
        target = float(base_mean[-1]) if len(base_mean) else float("nan")
        seconds = [r.train_seconds for r in result.runs]
        base_seconds = float(np.mean([r.train_seconds for r in baseline.runs]))
        out[name] = {
            "description": result.variant.description,
            "parameters": result.parameters,
            "parameters_vs_baseline": result.parameters / baseline.parameters,
            "baseline": baseline.variant.name,
            "lr": result.lr,
            "lr_sweep_val": {
                f"{lr:.3g}": _json_float(result.sweep[lr].val) for lr in sorted(result.sweep)
            },
            "lr_at_sweep_edge": bool(result.sweep)
            and result.lr in (min(result.sweep), max(result.sweep)),
            "test": mean_std([r.test for r in result.runs]),
            "val_at_chosen_lr": _json_float(result.sweep[result.lr].val)
            if result.lr in result.sweep
            else None,
            "baseline_final_curve_value": _json_float(target),
            "steps_to_baseline": steps_to_reach(task, steps, mean, target) if steps else None,
            "train_seconds": mean_std(seconds),
            "wall_ratio_vs_baseline": float(np.mean(seconds)) / base_seconds,
            "step_seconds_interleaved": step_times[name],
            "time_ratio_vs_baseline": step_times[name] / step_times[baseline.variant.name],
            "loss_first": [_json_float(r.loss_first) for r in result.runs],
            "loss_last": [_json_float(r.loss_last) for r in result.runs],
            "diverged_runs": sum(r.diverged for r in result.runs),
            "curve": {
                "steps": steps,
                "mean": mean.tolist(),
                "std": std.tolist(),
                "per_seed": [r.curve for r in result.runs if not r.diverged],
            },
        }
    return out


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None
