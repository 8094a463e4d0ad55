"""Data parallelism on CPU: two gloo ranks train like one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from tests.training.helpers import read_json, series, train_losses
from training.finetune import run_fine_tune
from training.protocol import CHECKPOINT_INFO_FILE, METRICS_FILE
from training.spec import FineTuneSpec

ROOT = Path(__file__).resolve().parents[2]


def _spec(model: Path, reviews: tuple[Path, Path], processes: int) -> dict[str, Any]:
    train, valid = reviews
    return {
        "model": str(model),
        "device": "cpu",
        "seed": 3,
        "conversion": {"gmnm": {"num_components": 4}},
        "data": {
            "train": {"path": str(train)},
            "validation": {"path": str(valid)},
            "max_length": 16,
        },
        "hyperparameters": {
            "batch_size": 8,
            "gradient_accumulation_steps": 2,
            "max_steps": 6,
            "learning_rate": 2e-3,
            "log_interval": 1,
            "checkpoint_interval": 3,
            "num_processes": processes,
        },
    }


def _run(command: list[str], out: Path, spec: dict[str, Any]) -> None:
    spec_path = out.parent / f"{out.name}.json"
    spec_path.write_text(json.dumps(spec))
    done = subprocess.run(
        [*command, "--spec", str(spec_path), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def _assert_same_training(reference: Path, other: Path) -> None:
    expected, got = train_losses(reference), train_losses(other)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    accuracy = series(reference, "train_accuracy")  # right predictions summed over the ranks
    assert sorted(accuracy) == list(range(1, 7))
    assert series(other, "train_accuracy") == accuracy
    a = surgery.load(reference / "checkpoints" / "step-6").state_dict()
    b = surgery.load(other / "checkpoints" / "step-6").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert read_json(other / METRICS_FILE)["valid_loss"] == pytest.approx(
        read_json(reference / METRICS_FILE)["valid_loss"], rel=1e-5
    )


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_and_so_does_the_builtin_launcher(
    tmp_path: Path, tiny_bert_no_dropout: Path, reviews: tuple[Path, Path]
) -> None:
    single = tmp_path / "single"
    run_fine_tune(FineTuneSpec.model_validate(_spec(tiny_bert_no_dropout, reviews, 1)), single)

    torchrun = tmp_path / "torchrun"
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "training.cli",
            "train",
        ],
        torchrun,
        _spec(tiny_bert_no_dropout, reviews, 2),
    )
    _assert_same_training(single, torchrun)
    info = read_json(torchrun / "checkpoints" / "step-3" / CHECKPOINT_INFO_FILE)
    assert info["step"] == 3 and "valid_loss" in info["metrics"]
    assert "2 processes" in (torchrun / "events.jsonl").read_text()

    launched = tmp_path / "launched"
    _run(
        [sys.executable, "-m", "training.cli", "train"],
        launched,
        _spec(tiny_bert_no_dropout, reviews, 2),
    )
    _assert_same_training(single, launched)
