"""Resume is exact, cancellation stops between steps with a checkpoint, and a full disk is
reported as such without harming earlier checkpoints."""

import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from tests.training.helpers import checkpoint_dirs, read_json, train_losses
from training import finetune
from training.checkpoint import TRAINING_STATE_FILE, list_checkpoints
from training.errors import DiskFullError, SpecError
from training.finetune import run_fine_tune
from training.protocol import CANCEL_FILE, CHECKPOINT_INFO_FILE
from training.runtime import CancelToken
from training.spec import FineTuneSpec


def _spec(model: Path, reviews: tuple[Path, Path], **hyperparameters: Any) -> FineTuneSpec:
    train, valid = reviews
    return FineTuneSpec.model_validate(
        {
            "model": str(model),
            "device": "cpu",
            "seed": 7,
            "conversion": {"gmnm": {"num_components": 4}},
            "data": {
                "train": {"path": str(train)},
                "validation": {"path": str(valid)},
                "max_length": 16,
            },
            "hyperparameters": {
                "batch_size": 8,
                "learning_rate": 2e-3,
                "log_interval": 1,
                "max_steps": 20,
                "gradient_accumulation_steps": 2,
                "warmup_steps": 4,
                **hyperparameters,
            },
        }
    )


@pytest.fixture
def sigterm_cancels() -> Iterator[dict[str, CancelToken]]:
    """Route SIGTERM to the job's CancelToken put in the returned dict, as the entry point does."""
    holder: dict[str, CancelToken] = {}

    def handler(signum: int, frame: object) -> None:
        holder["token"].request()

    previous = signal.signal(signal.SIGTERM, handler)
    yield holder
    signal.signal(signal.SIGTERM, previous)


def test_resume_after_sigterm_gives_the_same_losses_and_weights(
    tmp_path: Path,
    tiny_bert: Path,
    reviews: tuple[Path, Path],
    sigterm_cancels: dict[str, CancelToken],
) -> None:
    spec = _spec(tiny_bert, reviews)  # dropout 0.1: the RNG state must come back exactly

    straight = tmp_path / "straight"
    assert run_fine_tune(spec, straight).status == "succeeded"

    interrupted = tmp_path / "interrupted"
    token = CancelToken(interrupted)
    sigterm_cancels["token"] = token

    def terminate_at_ten(step: int) -> None:
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    first = run_fine_tune(spec, interrupted, cancel=token, on_step=terminate_at_ten)
    assert (first.status, first.step) == ("cancelled", 10)
    cancelled = read_json(interrupted / "checkpoints" / "step-10" / CHECKPOINT_INFO_FILE)
    assert cancelled["reason"] == "cancelled"
    assert run_fine_tune(spec, interrupted, resume=True).status == "succeeded"

    assert train_losses(interrupted) == train_losses(straight)
    assert sorted(train_losses(straight)) == list(range(1, 21))
    final_a = surgery.load(straight / "checkpoints" / "step-20").state_dict()
    final_b = surgery.load(interrupted / "checkpoints" / "step-20").state_dict()
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name


def test_cancel_file_stops_the_job_with_a_checkpoint(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    out = tmp_path / "job"

    def cancel_at_three(step: int) -> None:
        if step == 3:
            (out / CANCEL_FILE).touch()

    result = run_fine_tune(_spec(tiny_bert, reviews), out, on_step=cancel_at_three)
    assert (result.status, result.step) == ("cancelled", 3)
    [checkpoint] = list_checkpoints(out)
    assert checkpoint.step == 3 and (checkpoint.path / TRAINING_STATE_FILE).is_file()


def test_a_second_run_without_resume_refuses_a_directory_with_checkpoints(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    out = tmp_path / "job"
    run_fine_tune(_spec(tiny_bert, reviews, max_steps=2), out)
    with pytest.raises(SpecError, match="already holds checkpoints; pass --resume"):
        run_fine_tune(_spec(tiny_bert, reviews, max_steps=2), out)


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "job"
    real_save = finetune.save_model

    def save_until_full(model: torch.nn.Module, directory: Path) -> None:
        if directory.name.startswith("step-4."):
            (directory / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(model, directory)

    monkeypatch.setattr(finetune, "save_model", save_until_full)
    spec = _spec(tiny_bert, reviews, max_steps=6, checkpoint_interval=2)
    with pytest.raises(DiskFullError, match="Earlier checkpoints are intact: step-2") as caught:
        run_fine_tune(spec, out)
    assert caught.value.code == "disk_full"
    assert [d.name for d in checkpoint_dirs(out)] == ["step-2"]
    assert surgery.is_converted(surgery.load(out / "checkpoints" / "step-2"))


def test_time_limit_ends_the_job_early_with_a_final_checkpoint(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    out = tmp_path / "job"
    spec = _spec(tiny_bert, reviews, max_steps=100_000)
    spec = spec.model_copy(update={"limits": spec.limits.model_copy(update={"max_minutes": 0.02})})
    result = run_fine_tune(spec, out)
    assert result.status == "succeeded" and 0 < result.step < 100_000
    info = read_json(checkpoint_dirs(out)[-1] / CHECKPOINT_INFO_FILE)
    assert info["step"] == result.step and "valid_accuracy" in info["metrics"]
    assert read_json(out / "result.json")["stopped_by"] == "time_limit"
