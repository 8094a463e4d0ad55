"""Small helpers the training tests share."""

import json
from pathlib import Path
from typing import Any

from training.events import metric_series, read_events
from training.protocol import CHECKPOINTS_DIR, EVENTS_FILE


def events_of(out_dir: Path) -> list[dict[str, Any]]:
    return read_events(out_dir / EVENTS_FILE)


def train_losses(out_dir: Path) -> dict[int, float]:
    steps, values = metric_series(events_of(out_dir), "train_loss")
    return dict(zip(steps, values, strict=True))


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    root = out_dir / CHECKPOINTS_DIR
    return sorted(root.iterdir(), key=lambda p: int(p.name.split("-")[1]))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
