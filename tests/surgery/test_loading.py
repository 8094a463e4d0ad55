"""Loading by reference, and saving and loading converted and unconverted models."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError
from surgery_models import timm_probe, tiny_timm, tiny_transformers
from timm.models import save_for_hf
from torch import nn
from transformers import AutoModelForSequenceClassification, BertModel, BertTokenizer

import surgery
from surgery.inputs import max_abs_diff
from surgery.loading import hub_file
from surgery.persistence import CONVERTED_MARKER, GMNM_WEIGHTS, MANIFEST_FILE
from surgery.trace import evaluation, run_model


def _outputs(model: nn.Module, inputs: Any) -> Any:
    with evaluation(model):
        return run_model(model, inputs)


def _perturb(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(surgery.gmnm_parameter_names(model)):
            if name.endswith(".pi"):
                shape = parameters[name].shape
                parameters[name].copy_(torch.randn(shape, generator=generator) * 0.5)


@pytest.fixture
def bert_dir(tmp_path: Path) -> Path:
    """A transformers model directory with safetensors weights and a tokenizer."""
    directory = tmp_path / "bert"
    tiny_transformers("bert").save_pretrained(directory)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(directory)
    return directory


@pytest.fixture
def timm_dir(tmp_path: Path) -> Path:
    """A timm hub-format directory: config.json (architecture, model_args) and safetensors."""
    directory = tmp_path / "vit"
    save_for_hf(tiny_timm("vit_tiny_patch16_224"), directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("https://huggingface.co/bert-base-uncased", "is a URL"),
        ("org/../secrets", "contains '..'"),
        ("org/a..b", "contains '..'"),
        ("hf-hub:timm/a..b", "contains '..'"),
        ("", "empty"),
        ("org/name with spaces", "malformed"),
        ("org/a--b", "malformed"),
        ("a/b.", "malformed"),
        ("-org/name", "malformed"),
        ("org/name.git", "malformed"),
        ("org/sub/name", "malformed"),
        ("x" * 97, "malformed"),
        ("hf-hub:not a name", "not a valid timm hub name"),
        ("hf-hub:org/a--b", "not a valid timm hub name"),
    ],
)
def test_malformed_references_are_refused_with_the_accepted_forms(
    reference: str, message: str
) -> None:
    with pytest.raises(surgery.UnknownModelError, match=message) as refused:
        surgery.validate_reference(reference)
    assert "org/name" in str(refused.value)
    # the service checks references from users with local paths refused; the same refusals
    with pytest.raises(surgery.UnknownModelError, match=message):
        surgery.validate_reference(reference, allow_local=False)


@pytest.mark.parametrize("reference", ["org/a..b", "org/a--b", "a/b.", "org/" + "x" * 97])
def test_references_the_hub_would_refuse_are_unknown_models_not_hub_errors(
    reference: str,
) -> None:
    with pytest.raises(surgery.UnknownModelError, match="Hugging Face id"):
        surgery.load_model(reference)


def test_a_hub_validation_error_past_the_syntax_check_is_an_unknown_model() -> None:
    # hub_file is reached only through validate_reference; called directly, the hub's own check
    # raises, and that still comes out as an UnknownModelError
    with pytest.raises(surgery.UnknownModelError, match="does not accept 'org/a--b'"):
        hub_file("org/a--b", "config.json", None)


def test_valid_references_pass_the_syntax_check_and_local_paths_can_be_refused() -> None:
    for reference in (
        "google/vit-base-patch16-224",
        "resnet50.a1_in1k",
        "hf-hub:timm/resnet18.a1_in1k",
        "gpt2",
        "org/" + "x" * 96,
        "_org/a-b_c.d",
    ):
        surgery.validate_reference(reference)
    with pytest.raises(surgery.UnknownModelError, match="local path"):
        surgery.validate_reference("/etc", allow_local=False)


def test_a_timm_registry_name_builds_its_architecture_without_weights() -> None:
    loaded = surgery.load_model("resnet18", pretrained=False, num_labels=7)
    assert (loaded.library, loaded.reference, loaded.revision) == ("timm", "resnet18", None)
    assert type(loaded.model).__name__ == "ResNet" and loaded.model.fc.out_features == 7
    assert loaded.task == "image-classification" and loaded.num_labels == 7
    assert loaded.data_config is not None and loaded.data_config["input_size"] == (3, 224, 224)
    assert surgery.load_model("resnet18.a1_in1k", pretrained=False).reference == "resnet18.a1_in1k"
    with pytest.raises(surgery.UnsupportedModelError, match="give the repository as 'hf-hub:"):
        surgery.load_model("resnet18", pretrained=False, revision="main")


class _NoSuchRevisionError(RevisionNotFoundError):
    def __init__(self) -> None:
        Exception.__init__(self, "404 Revision Not Found")  # without the HTTP response


@pytest.mark.parametrize(
    ("error", "filename", "advice"),
    [
        (_NoSuchRevisionError(), "config.json", "give a branch, tag or commit hash"),
        (EntryNotFoundError("404"), "config.json", "not a transformers or timm model repository"),
        (EntryNotFoundError("404"), "model.safetensors", "load it with pretrained=False"),
    ],
)
def test_hub_errors_say_how_to_fix_them(
    monkeypatch: pytest.MonkeyPatch, error: Exception, filename: str, advice: str
) -> None:
    def download(*args: object, **kwargs: object) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(surgery.UnknownModelError, match=advice):
        hub_file("org/name", filename, "v2")


def test_a_directory_of_neither_library_says_what_a_model_directory_holds(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(surgery.UnknownModelError, match="save_pretrained .* save_for_hf"):
        surgery.load_model(str(tmp_path))


def test_remote_code_in_a_local_directory_runs_when_allowed(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "configuration_tiny.py").write_text(
        textwrap.dedent(
            """
            from transformers import PretrainedConfig

            class TinyConfig(PretrainedConfig):
                model_type = "gmnm-test-tiny"

                def __init__(self, hidden_size=8, **kwargs):
                    self.hidden_size = hidden_size
                    super().__init__(**kwargs)
            """
        )
    )
    (model_dir / "modeling_tiny.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from transformers import PreTrainedModel

            from .configuration_tiny import TinyConfig

            class TinyModel(PreTrainedModel):
                config_class = TinyConfig

                def __init__(self, config):
                    super().__init__(config)
                    self.fc = nn.Linear(config.hidden_size, config.hidden_size)
                    self.act = nn.GELU()
                    self.post_init()

                def forward(self, x):
                    return self.act(self.fc(x))
            """
        )
    )
    auto_map = {
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModel": "modeling_tiny.TinyModel",
    }
    config = {"model_type": "gmnm-test-tiny", "architectures": ["TinyModel"], "auto_map": auto_map}
    (model_dir / "config.json").write_text(json.dumps(config))
    weights = {"fc.weight": torch.full((8, 8), 0.5), "fc.bias": torch.zeros(8)}
    safetensors.torch.save_file(weights, str(model_dir / "model.safetensors"))

    # transformers copies the repository's code into its modules cache, read once at import
    script = textwrap.dedent(
        f"""
        import torch
        import surgery
        try:
            surgery.load_model({str(model_dir)!r})
        except surgery.RemoteCodeRefusedError as error:
            print("refused:", error)
        loaded = surgery.load_model({str(model_dir)!r}, trust_remote_code=True)
        print(type(loaded.model).__name__, loaded.library, loaded.task)
        print(bool((loaded.model.fc.weight == 0.5).all()))
        probe = torch.randn(2, 8)
        report = surgery.convert(
            loaded.model, surgery.plan(loaded.model, probe_inputs=probe), probe_inputs=probe
        )
        print(report.sites_replaced, report.max_abs_diff, report.audit)
        """
    )
    env = {
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("refused:") and "trust_remote_code=True" in lines[0]
    assert lines[1:] == [
        "TinyModel transformers feature-extraction",
        "True",
        "{'activation': 1} 0.0 []",
    ]
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr


def test_a_model_missing_from_the_offline_cache_is_an_unknown_model() -> None:
    with pytest.raises(surgery.UnknownModelError, match="offline|not found"):
        surgery.load_model("no-such-org/no-such-model-anywhere")


def test_a_transformers_directory_loads_with_its_tokenizer_and_source(bert_dir: Path) -> None:
    loaded = surgery.load_model(str(bert_dir))
    assert (loaded.library, loaded.task, loaded.converted) == (
        "transformers",
        "feature-extraction",
        False,
    )
    assert isinstance(loaded.model, BertModel)
    assert loaded.processor is not None
    expected = dict(BertModel.from_pretrained(bert_dir).named_parameters())
    assert all(torch.equal(p, expected[n]) for n, p in loaded.model.named_parameters())

    random = surgery.load_model(str(bert_dir), pretrained=False)
    assert not torch.equal(random.model.pooler.dense.weight, loaded.model.pooler.dense.weight)


def test_a_task_and_num_labels_pick_and_size_the_head(bert_dir: Path) -> None:
    loaded = surgery.load_model(str(bert_dir), task="text-classification", num_labels=3)
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.num_labels == 3 and loaded.model.classifier.out_features == 3
    with pytest.raises(
        surgery.UnsupportedModelError,
        match="no image-classification head for that family; load it for one of",
    ):
        surgery.load_model(str(bert_dir), task="image-classification")


def test_a_timm_directory_loads_and_its_classifier_can_be_resized(timm_dir: Path) -> None:
    loaded = surgery.load_model(str(timm_dir))
    assert loaded.library == "timm" and loaded.data_config["input_size"] == (3, 32, 32)
    resized = surgery.load_model(str(timm_dir), num_labels=7)
    assert resized.model.get_classifier().out_features == 7
    assert torch.equal(
        resized.model.blocks[0].mlp.fc1.weight, loaded.model.blocks[0].mlp.fc1.weight
    )


def test_remote_code_is_refused_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "my-own-arch",
                "auto_map": {"AutoConfig": "modeling.MyConfig", "AutoModel": "modeling.MyModel"},
            }
        )
    )
    with pytest.raises(surgery.RemoteCodeRefusedError, match="trust_remote_code=True"):
        surgery.load_model(str(tmp_path))


def test_pickled_checkpoints_are_never_unpickled(
    tmp_path: Path, bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.load was called")

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bert_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(surgery.UnsupportedModelError, match="safetensors"):
        surgery.load_model(str(pickled))

    # save and load of converted models go through safetensors and JSON only
    loaded = surgery.load_model(str(bert_dir))
    surgery.convert(loaded.model, surgery.plan(loaded.model))
    surgery.save(loaded.model, tmp_path / "converted")
    surgery.load(tmp_path / "converted")


def test_hub_ids_resolve_offline_from_the_cache_with_their_revision(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    bert_snapshot = cache / "models--org--tiny-bert" / "snapshots" / ("a" * 40)
    tiny_transformers("bert").save_pretrained(bert_snapshot)
    (cache / "models--org--tiny-bert" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-bert" / "refs" / "main").write_text("a" * 40)
    timm_snapshot = cache / "models--org--tiny-vit" / "snapshots" / ("b" * 40)
    save_for_hf(tiny_timm("vit_tiny_patch16_224"), timm_snapshot, safe_serialization=True)
    (cache / "models--org--tiny-vit" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-vit" / "refs" / "main").write_text("b" * 40)

    # huggingface_hub reads the cache location once, at import: a fresh interpreter
    script = textwrap.dedent(
        """
        import torch
        import surgery
        bert = surgery.load_model("org/tiny-bert")
        vit = surgery.load_model("org/tiny-vit")
        hub = surgery.load_model("hf-hub:org/tiny-vit")
        pinned = surgery.load_model("hf-hub:org/tiny-vit", revision="b" * 40)
        random = surgery.load_model("hf-hub:org/tiny-vit", pretrained=False)
        try:
            surgery.load_model("org/missing")
        except surgery.UnknownModelError as error:
            missing = str(error)
        try:
            surgery.load_model("hf-hub:org/missing")
        except surgery.UnknownModelError as error:
            hub_missing = str(error)
        print(bert.library, bert.revision[:4], vit.library, vit.revision[:4], hub.revision[:4])
        print(missing)
        print(hub.reference, pinned.revision[:4], random.library, random.revision)
        print(torch.equal(hub.model.head.weight, pinned.model.head.weight))
        print(torch.equal(hub.model.head.weight, random.model.head.weight))
        print(hub_missing)
        """
    )
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "transformers aaaa timm bbbb bbbb"
    assert "offline" in lines[1]
    assert lines[2:5] == ["hf-hub:org/tiny-vit bbbb timm None", "True", "False"]
    assert "'org/missing'" in lines[5] and "offline" in lines[5]


def test_a_converted_directory_holds_everything_to_rebuild_it(
    bert_dir: Path, tmp_path: Path
) -> None:
    loaded = surgery.load_model(str(bert_dir))
    surgery.convert(loaded.model, surgery.plan(loaded.model))
    _perturb(loaded.model)
    out = surgery.save(loaded.model, tmp_path / "out")
    files = {path.name for path in out.iterdir()}
    assert {
        MANIFEST_FILE,
        GMNM_WEIGHTS,
        "model.safetensors",
        "config.json",
        "tokenizer.json",
    } <= files

    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["converted"] and manifest["library"] == "transformers"
    assert manifest["attention"]["implementation"] == "gmnm"
    assert {entry["site"]["kind"] for entry in manifest["sites"]} == {"activation", "softmax"}
    assert all(entry["config"]["num_components"] == 8 for entry in manifest["sites"])
    gmnm_keys = set(safetensors.torch.load_file(str(out / GMNM_WEIGHTS)))
    assert gmnm_keys == surgery.gmnm_parameter_names(loaded.model)

    again = surgery.load_model(str(out))
    assert again.converted and again.manifest is not None and again.processor is not None
    inputs = surgery.example_inputs(loaded.model)
    assert max_abs_diff(_outputs(loaded.model, inputs), _outputs(again.model, inputs)) == 0.0


def test_plain_from_pretrained_on_a_converted_directory_warns_that_it_is_converted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_transformers("bert")
    surgery.convert(model, surgery.plan(model))
    surgery.save(model, tmp_path)
    import transformers

    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            BertModel.from_pretrained(tmp_path)
    finally:
        transformers.logging.disable_propagation()
    assert CONVERTED_MARKER in caplog.text


def test_loading_with_another_num_labels_reinitialises_only_the_head(tmp_path: Path) -> None:
    model = tiny_transformers("bert", AutoModelForSequenceClassification, num_labels=2)
    surgery.convert(model, surgery.plan(model))
    _perturb(model)
    surgery.save(model, tmp_path)

    loaded = surgery.load_model(str(tmp_path), num_labels=5)
    assert loaded.model.classifier.out_features == 5 and loaded.num_labels == 5
    new = dict(loaded.model.named_parameters())
    for name, parameter in model.named_parameters():
        if not name.startswith("classifier."):
            assert torch.equal(parameter, new[name]), name


def test_loading_a_saved_base_model_for_a_task_maps_every_site(tmp_path: Path) -> None:
    model = tiny_transformers("bert")
    surgery.convert(model, surgery.plan(model))
    _perturb(model)
    surgery.save(model, tmp_path)
    loaded = surgery.load_model(str(tmp_path), task="text-classification", num_labels=3)
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    names = surgery.gmnm_parameter_names(loaded.model)
    assert names == {f"bert.{name}" for name in surgery.gmnm_parameter_names(model)}
    parameters = dict(loaded.model.named_parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, parameters[f"bert.{name}"]), name


def test_an_unconverted_model_saves_and_loads_alike(tmp_path: Path) -> None:
    model = tiny_timm("resnet18")
    surgery.save(model, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["sites"] == [] and not manifest["converted"]
    loaded = surgery.load(tmp_path)
    assert not surgery.is_converted(loaded)
    probe = timm_probe("resnet18")
    assert max_abs_diff(_outputs(model, probe), _outputs(loaded, probe)) == 0.0
    # and a plain timm load reads the same base weights
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert max_abs_diff(_outputs(model, probe), _outputs(plain, probe)) == 0.0


@pytest.mark.parametrize(
    "damage", ["missing_weights", "unknown_module", "foreign_function", "newer", "twice"]
)
def test_damaged_directories_raise_manifest_errors(tmp_path: Path, damage: str) -> None:
    model = tiny_transformers("bert")
    surgery.convert(model, surgery.plan(model))
    surgery.save(model, tmp_path)
    manifest_path = tmp_path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    if damage == "missing_weights":
        (tmp_path / GMNM_WEIGHTS).unlink()
    elif damage == "unknown_module":
        manifest["sites"][0]["site"]["path"] = manifest["sites"][0]["module"] = "encoder.nowhere"
    elif damage == "foreign_function":
        manifest["attention"]["eager"] = {"encoder.layer.0.attention.self": "os:system"}
    elif damage == "twice":
        manifest["sites"].append(manifest["sites"][0])
    else:
        manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(surgery.ManifestError) as damaged:
        surgery.load(tmp_path)
    if damage == "twice":
        assert "listed twice" in str(damaged.value)
        assert "remove the duplicate entry" in str(damaged.value)


def test_gmnm_parameter_names_leave_out_the_replaced_modules_own_parameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU())
    probe = torch.randn(2, 4)
    surgery.convert(model, surgery.plan(model, probe_inputs=probe), probe_inputs=probe)
    assert surgery.gmnm_parameter_names(model) == {"1.pi", "1.mu", "1.rho"}
    assert "1.base_module.weight" in dict(model.named_parameters())


def test_a_converted_timm_model_saves_in_timms_format(tmp_path: Path) -> None:
    model = tiny_timm("swin_tiny_patch4_window7_224")
    probe = timm_probe("swin_tiny_patch4_window7_224")
    surgery.convert(model, surgery.plan(model, probe_inputs=probe), probe_inputs=probe)
    surgery.save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "swin_tiny_patch4_window7_224"
    assert config["model_args"]["depths"] == [1, 1, 1, 1]
    base = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert not any(".pi" in key or "gmnm" in key for key in base)
    loaded = surgery.load_model(str(tmp_path))
    assert loaded.converted and loaded.library == "timm"
    assert max_abs_diff(_outputs(model, probe), _outputs(loaded.model, probe)) == 0.0
