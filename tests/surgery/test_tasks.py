"""Loading a converted directory for another task, and saving what was loaded.

A fine-tune loads a converted directory with the job's task (`load_model(dir, task=...,
num_labels=...)`), trains it and saves checkpoints with `surgery.save`; each checkpoint must load
again. The base model keeps its GMNM sites and parameters whatever head is put around it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from surgery_models import timm_probe, tiny_timm, tiny_transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

import surgery
from surgery.convert import surgery_state
from surgery.inputs import max_abs_diff
from surgery.persistence import MANIFEST_FILE
from surgery.trace import evaluation, run_model

TASK_CLASSES = {
    "feature-extraction": AutoModel,
    "text-classification": AutoModelForSequenceClassification,
    "causal-lm": AutoModelForCausalLM,
}
CLASS_NAMES = {
    "bert": {
        "feature-extraction": "BertModel",
        "text-classification": "BertForSequenceClassification",
        "causal-lm": "BertLMHeadModel",
    },
    "gpt2": {
        "feature-extraction": "GPT2Model",
        "text-classification": "GPT2ForSequenceClassification",
        "causal-lm": "GPT2LMHeadModel",
    },
}
TOKENS = {"input_ids": torch.tensor([[2, 5, 9, 3, 0], [2, 7, 3, 0, 0]])}
TOKENS["attention_mask"] = (TOKENS["input_ids"] > 0).long()


def _outputs(model: nn.Module, inputs: Any) -> Any:
    with evaluation(model):
        return run_model(model, inputs)


def _hidden_states(model: nn.Module) -> torch.Tensor:
    """What the base model computes, whatever head sits on it."""
    with evaluation(model):
        return model.base_model(**TOKENS).last_hidden_state  # type: ignore[operator]


def _perturb(model: nn.Module) -> None:
    """Non-zero mixture weights, so that the GMNM modules change what the model computes."""
    generator = torch.Generator().manual_seed(0)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(surgery.gmnm_parameter_names(model)):
            if name.endswith(".pi"):
                shape = parameters[name].shape
                parameters[name].copy_(torch.randn(shape, generator=generator) * 0.5)


def _converted_dir(directory: Path, family: str, task: str) -> nn.Module:
    """A tiny model of `family` with the head of `task`, converted, perturbed and saved."""
    options: dict[str, Any] = {"pad_token_id": 0}
    if task == "text-classification":
        options["num_labels"] = 2
    model = tiny_transformers(family, TASK_CLASSES[task], **options)
    surgery.convert(model, surgery.plan(model))
    _perturb(model)
    surgery.save(model, directory)
    return model


def _assert_record_names_modules_of(model: nn.Module) -> None:
    """Every path the conversion record holds (what save writes) is a module of `model`."""
    state = surgery_state(model)
    assert state is not None and state["sites"]
    modules = dict(model.named_modules())
    for entry in state["sites"]:
        site = entry["site"]
        assert site["owner"] in modules and entry["module"] in modules, site["path"]
        if site["route"] == "module":
            assert site["path"] in modules
        else:
            assert site["path"].startswith(f"{site['owner']}:")
    for path in list(state["attention"].get("eager", {})) + state["unfused"]:
        assert path in modules, path


def test_a_base_model_conversion_fine_tuned_for_classification_saves_checkpoints_that_load(
    tmp_path: Path,
) -> None:
    # a plain transformers directory, converted without a task (the bare BertModel)
    source = tmp_path / "bert"
    tiny_transformers("bert").save_pretrained(source)
    bare = surgery.load_model(str(source))
    assert type(bare.model).__name__ == "BertModel"
    surgery.convert(bare.model, surgery.plan(bare.model))
    surgery.save(bare.model, tmp_path / "converted")

    # what a fine-tune does: load for its task, train, save a checkpoint
    job = surgery.load_model(str(tmp_path / "converted"), task="text-classification", num_labels=3)
    model = job.model
    assert type(model).__name__ == "BertForSequenceClassification"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(**TOKENS, labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    surgery.save(model, tmp_path / "checkpoint")

    manifest = json.loads((tmp_path / "checkpoint" / MANIFEST_FILE).read_text())
    assert manifest["model_class"] == "BertForSequenceClassification"
    assert all(path.startswith("bert.") for path in manifest["attention"]["eager"])
    assert all(entry["module"].startswith("bert.") for entry in manifest["sites"])

    # the checkpoint loads, as evaluation opens it and as a resumed job does
    for again in (
        surgery.load(tmp_path / "checkpoint"),
        surgery.load_model(
            str(tmp_path / "checkpoint"), task="text-classification", num_labels=3
        ).model,
    ):
        assert type(again).__name__ == "BertForSequenceClassification"
        assert surgery.gmnm_parameter_names(again) == surgery.gmnm_parameter_names(model)
        assert max_abs_diff(_outputs(model, TOKENS), _outputs(again, TOKENS)) == 0.0
        assert surgery.audit(again, TOKENS) == []


@pytest.mark.parametrize(
    ("family", "saved_task", "task"),
    [
        ("bert", "feature-extraction", "text-classification"),
        ("bert", "feature-extraction", "causal-lm"),
        ("bert", "text-classification", None),
        ("bert", "text-classification", "feature-extraction"),
        ("bert", "text-classification", "causal-lm"),
        ("bert", "causal-lm", "causal-lm"),
        ("bert", "causal-lm", "feature-extraction"),
        ("bert", "causal-lm", "text-classification"),
        ("gpt2", "causal-lm", "causal-lm"),
        ("gpt2", "causal-lm", "text-classification"),
        ("gpt2", "causal-lm", "feature-extraction"),
        ("gpt2", "feature-extraction", "causal-lm"),
    ],
)
def test_a_converted_directory_loaded_for_any_task_keeps_its_base_model_and_saves_again(
    tmp_path: Path, family: str, saved_task: str, task: str | None
) -> None:
    original = _converted_dir(tmp_path / "saved", family, saved_task)
    num_labels = 3 if task == "text-classification" else None
    loaded = surgery.load_model(str(tmp_path / "saved"), task=task, num_labels=num_labels)
    assert type(loaded.model).__name__ == CLASS_NAMES[family][task or saved_task]

    # the base model computes what the saved one did, with the same GMNM parameters
    assert max_abs_diff(_hidden_states(original), _hidden_states(loaded.model)) == 0.0
    saved_base: Any = original.base_model
    loaded_base: Any = loaded.model.base_model
    names = surgery.gmnm_parameter_names(saved_base)
    assert surgery.gmnm_parameter_names(loaded_base) == names
    for name in names:
        assert torch.equal(saved_base.get_parameter(name), loaded_base.get_parameter(name)), name
    _assert_record_names_modules_of(loaded.model)

    # what was loaded saves, and that loads to the same model
    surgery.save(loaded.model, tmp_path / "again")
    again = surgery.load(tmp_path / "again")
    assert type(again) is type(loaded.model)
    assert max_abs_diff(_outputs(loaded.model, TOKENS), _outputs(again, TOKENS)) == 0.0
    _assert_record_names_modules_of(again)


def test_a_task_the_family_has_no_head_for_is_refused_with_the_tasks_it_has(
    tmp_path: Path,
) -> None:
    _converted_dir(tmp_path / "bert", "bert", "feature-extraction")
    with pytest.raises(surgery.UnsupportedModelError, match="no image-classification head") as info:
        surgery.load_model(str(tmp_path / "bert"), task="image-classification")
    assert "text-classification, causal-lm, feature-extraction" in str(info.value)

    model = tiny_timm("vit_tiny_patch16_224")
    probe = timm_probe("vit_tiny_patch16_224")
    surgery.convert(model, surgery.plan(model, probe_inputs=probe), probe_inputs=probe)
    surgery.save(model, tmp_path / "vit")
    for task in ("text-classification", "causal-lm"):
        with pytest.raises(surgery.UnsupportedModelError, match="timm image model"):
            surgery.load_model(str(tmp_path / "vit"), task=task)


def test_a_task_model_that_does_not_contain_the_saved_model_is_refused(tmp_path: Path) -> None:
    # CLIP's image classifier holds the vision tower alone, not the whole CLIPModel
    model = tiny_transformers("clip")
    surgery.convert(model, surgery.plan(model))
    surgery.save(model, tmp_path)
    with pytest.raises(surgery.UnsupportedModelError, match="does not contain") as info:
        surgery.load_model(str(tmp_path), task="image-classification", num_labels=3)
    assert "load it for task 'feature-extraction'" in str(info.value)


def test_a_timm_model_with_a_converted_head_keeps_its_sites_when_the_classifier_changes(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "convnext_tiny",
        pretrained=False,
        num_classes=5,
        depths=(1, 1, 1, 1),
        dims=(16, 32, 64, 128),
        head_hidden_size=32,
    ).eval()
    probe = timm_probe("convnext_tiny")
    plan = surgery.plan(model, targets=surgery.KINDS, probe_inputs=probe)
    assert "head.pre_logits.act" in {site.path for site in plan.replaced}
    surgery.convert(model, plan, probe_inputs=probe)
    _perturb(model)
    surgery.save(model, tmp_path / "saved")

    loaded = surgery.load_model(str(tmp_path / "saved"), task="image-classification", num_labels=3)
    assert _outputs(loaded.model, probe).shape == (2, 3)
    assert surgery.gmnm_parameter_names(loaded.model) == surgery.gmnm_parameter_names(model)
    parameters = dict(loaded.model.named_parameters())
    for name in surgery.gmnm_parameter_names(model):
        assert torch.equal(dict(model.named_parameters())[name], parameters[name]), name
    surgery.save(loaded.model, tmp_path / "again")
    again = surgery.load(tmp_path / "again")
    assert max_abs_diff(_outputs(loaded.model, probe), _outputs(again, probe)) == 0.0


def test_a_checkpoint_whose_attention_record_kept_the_first_models_paths_still_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # such manifests were written when a directory loaded for another task was saved again
    _converted_dir(tmp_path / "saved", "bert", "feature-extraction")
    loaded = surgery.load_model(str(tmp_path / "saved"), task="text-classification", num_labels=3)
    surgery.save(loaded.model, tmp_path / "checkpoint")
    manifest_path = tmp_path / "checkpoint" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    eager = manifest["attention"]["eager"]
    manifest["attention"]["eager"] = {k.removeprefix("bert."): v for k, v in eager.items()}
    manifest_path.write_text(json.dumps(manifest))

    with caplog.at_level(logging.WARNING, logger="surgery.persistence"):
        again = surgery.load(tmp_path / "checkpoint")
    assert "earlier version" in caplog.text
    assert max_abs_diff(_outputs(loaded.model, TOKENS), _outputs(again, TOKENS)) == 0.0
    _assert_record_names_modules_of(again)
