"""Job events: `events.jsonl` for the service, log lines for people, and `curves.png`.

Every event is one JSON object on its own line, flushed as it is written (format in
`training.protocol`). Training metrics events carry `train_loss` (and `train_accuracy` for
classification, both over the logging interval), `learning_rate`, `gmnm_learning_rate`,
`grad_norm`, `samples_per_second` (and `tokens_per_second` for text), `peak_memory_mb` and
`trained_samples`/`trained_tokens`; evaluation events carry the evaluation's metrics prefixed
`valid_` (`valid_loss`, `valid_accuracy`, `valid_macro_f1`, `valid_perplexity`, ...).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.protocol import EVENT_MESSAGE, EVENT_METRICS, EVENTS_FILE

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventLog:
    """Appends events to `OUT/events.jsonl` (only where `enabled`, i.e. on rank 0)."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.path = out_dir / EVENTS_FILE
        self.enabled = enabled
        self._handle = self.path.open("a", encoding="utf-8") if enabled else None

    def _write(self, event: dict[str, Any]) -> None:
        if self._handle is None:
            return
        self._handle.write(json.dumps(event, allow_nan=False) + "\n")
        self._handle.flush()

    def message(self, text: str, step: int | None = None, level: int = logging.INFO) -> None:
        if not self.enabled:
            return
        logger.log(level, text)
        self._write({"type": EVENT_MESSAGE, "time": time.time(), "step": step, "message": text})

    def metrics(
        self,
        step: int | None,
        values: dict[str, float | int | None],
        message: str,
        total_steps: int | None = None,
        epoch: float | None = None,
    ) -> None:
        if not self.enabled:
            return
        logger.info(message)
        event: dict[str, Any] = {
            "type": EVENT_METRICS,
            "time": time.time(),
            "step": step,
            "message": message,
            "values": {key: _clean(value) for key, value in values.items()},
        }
        if total_steps is not None:
            event["total_steps"] = total_steps
        if epoch is not None:
            event["epoch"] = round(epoch, 4)
        self._write(event)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_events(path: Path) -> list[dict[str, Any]]:
    """Events of a job, skipping a last line a killed writer may have left half written."""
    events: list[dict[str, Any]] = []
    if not path.is_file():
        return events
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def metric_series(events: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; where a resumed job logged a step twice the later wins."""
    by_step: dict[int, float] = {}
    for event in events:
        values = event.get("values") or {}
        step = event.get("step")
        if event.get("type") == EVENT_METRICS and values.get(name) is not None and step is not None:
            by_step[int(step)] = float(values[name])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_curves(events_path: Path, target: Path) -> None:
    """Write `curves.png`: see `curves_figure`."""
    import matplotlib.pyplot as plt

    figure = curves_figure(read_events(events_path))
    figure.savefig(target, dpi=100)
    plt.close(figure)


def curves_figure(events: list[dict[str, Any]]) -> Figure:
    """Training and validation loss on one panel; training and validation accuracy (with the
    validation macro-F1) on the other, or perplexity for causal LM, all against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 4))
    _plot(loss_axis, events, [("train_loss", "training"), ("valid_loss", "validation")])
    loss_axis.set(xlabel="step", ylabel="loss", title="Loss")
    if metric_series(events, "train_accuracy")[0] or metric_series(events, "valid_accuracy")[0]:
        _plot(
            score_axis,
            events,
            [
                ("train_accuracy", "training"),
                ("valid_accuracy", "validation"),
                ("valid_macro_f1", "validation macro-F1"),
            ],
        )
        score_axis.set(xlabel="step", ylabel="accuracy", title="Accuracy")
    else:
        # a causal LM: the training perplexity follows from the interval's mean loss
        steps, losses = metric_series(events, "train_loss")
        perplexities = [math.exp(min(loss, 700.0)) for loss in losses]
        _plot_line(score_axis, steps, perplexities, "training")
        _plot(score_axis, events, [("valid_perplexity", "validation")])
        score_axis.set(xlabel="step", ylabel="perplexity", title="Perplexity", yscale="log")
    for axis in (loss_axis, score_axis):
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    return figure


def _plot(axis: Axes, events: list[dict[str, Any]], series: list[tuple[str, str]]) -> None:
    for name, label in series:
        _plot_line(axis, *metric_series(events, name), label)


def _plot_line(axis: Axes, steps: list[int], values: list[float], label: str) -> None:
    if steps:
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)


class Progress:
    """A progress bar on a terminal (rank 0 only); nothing otherwise, the log lines suffice."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float | None) -> None:
        if self._bar is not None:
            self._bar.n = step
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
