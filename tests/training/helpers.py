"""Small helpers the training tests share."""

import json
from pathlib import Path
from typing import Any

from training.events import metric_series, read_events
from training.protocol import CHECKPOINTS_DIR, EVENTS_FILE


def events_of(out_dir: Path) -> list[dict[str, Any]]:
    return read_events(out_dir / EVENTS_FILE)


def series(out_dir: Path, name: str) -> dict[int, float]:
    """One metric of a job's events by step."""
    steps, values = metric_series(events_of(out_dir), name)
    return dict(zip(steps, values, strict=True))


def train_losses(out_dir: Path) -> dict[int, float]:
    return series(out_dir, "train_loss")


def training_values(out_dir: Path) -> list[dict[str, Any]]:
    """The values of every training metrics event (one per logging interval)."""
    return [
        event["values"]
        for event in events_of(out_dir)
        if event["type"] == "metrics" and "train_loss" in event["values"]
    ]


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINTS_DIR
    return sorted(root.iterdir(), key=lambda p: int(p.name.split("-")[1]))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
