"""What the plan finds and decides, and how calls that are not modules get routed."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from surgery_models import timm_probe, tiny_timm, tiny_transformers
from timm.models import build_model_with_cfg, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

import surgery
from gmnm import GMNMActivation, GMNMConfig, GMNMSoftmax
from surgery.inputs import max_abs_diff
from surgery.persistence import MANIFEST_FILE
from surgery.routing import CallSiteActivations
from surgery.trace import evaluation, run_model


def _outputs(model: nn.Module, inputs: Any) -> Any:
    with evaluation(model):
        return run_model(model, inputs)


def _perturb(model: nn.Module, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(0)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(surgery.gmnm_parameter_names(model)):
            if name.endswith(".pi"):
                shape = parameters[name].shape
                parameters[name].copy_(torch.randn(shape, generator=generator) * scale)


def test_gates_and_heads_are_listed_with_a_reason_but_not_replaced_by_default() -> None:
    model = tiny_timm("mobilenetv3_small_100")
    plan = surgery.plan(model, probe_inputs=timm_probe("mobilenetv3_small_100"))
    gates = [site for site in plan.sites if site.kind == "gate"]
    assert gates and not any(site.replace for site in gates)
    assert "add 'gate' to targets" in (gates[0].reason or "")

    bert = tiny_transformers("bert")
    pooler = [s for s in surgery.plan(bert).sites if s.path == "pooler.activation"]
    assert [(s.kind, s.replace) for s in pooler] == [("head", False)]


def test_targeting_every_kind_replaces_gates_and_heads_and_leaves_nothing_to_audit() -> None:
    model = tiny_timm("mobilenetv3_small_100")
    probe = timm_probe("mobilenetv3_small_100")
    plan = surgery.plan(model, targets=surgery.KINDS, probe_inputs=probe)
    assert all(site.replace for site in plan.sites)
    report = surgery.convert(model, plan, probe_inputs=probe)
    assert report.max_abs_diff == 0.0
    assert report.sites_replaced["gate"] >= 1
    assert surgery.audit(model, probe, include_kept=True) == []


def test_excluded_sites_stay_original_and_the_audit_reports_them_only_when_asked() -> None:
    model = tiny_transformers("bert", num_hidden_layers=2)
    plan = surgery.plan(model, exclude=["encoder.layer.0.*"])
    kept = {site.path for site in plan.sites if not site.replace}
    assert "encoder.layer.0.intermediate.intermediate_act_fn" in kept
    assert "encoder.layer.0.attention.self:softmax#0" in kept
    assert all("excluded by pattern" in (s.reason or "") for s in plan.sites if "layer.0" in s.path)

    report = surgery.convert(model, plan)
    assert report.max_abs_diff == 0.0 and report.audit == []
    probe = surgery.example_inputs(model)
    kept_findings = {f.path for f in surgery.audit(model, probe, include_kept=True)}
    assert "encoder.layer.0.attention.self:softmax#0" in kept_findings
    assert not isinstance(model.encoder.layer[0].intermediate.intermediate_act_fn, GMNMActivation)
    assert isinstance(model.encoder.layer[1].intermediate.intermediate_act_fn, GMNMActivation)


def test_include_patterns_restrict_the_plan_to_matching_sites() -> None:
    model = tiny_transformers("bert", num_hidden_layers=2)
    plan = surgery.plan(model, include=["encoder.layer.1.*"])
    assert {s.path for s in plan.replaced} == {
        "encoder.layer.1.intermediate.intermediate_act_fn",
        "encoder.layer.1.attention.self:softmax#0",
    }


def test_an_include_pattern_that_matches_no_site_is_refused_naming_paths_that_exist() -> None:
    model = tiny_timm("resnet18")
    probe = timm_probe("resnet18")
    with pytest.raises(
        surgery.UnmatchedPatternError, match="'layer9.\\*' match no site"
    ) as refused:
        surgery.plan(model, include=["layer1.*", "layer9.*"], probe_inputs=probe)
    assert "'layer1.0.act1'" in str(refused.value) and "--dry-run" in str(refused.value)
    # a path that is a module but not a site matches nothing either: sites are below it
    with pytest.raises(surgery.UnmatchedPatternError, match="'layer1' match no site"):
        surgery.plan(model, include=["layer1"], probe_inputs=probe)


def test_an_exclude_pattern_that_matches_no_site_is_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = tiny_timm("resnet18")
    with caplog.at_level(logging.WARNING, logger="surgery"):
        plan = surgery.plan(model, exclude=["layer9.*"], probe_inputs=timm_probe("resnet18"))
    assert all(site.replace for site in plan.sites)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'layer9.*' matches no site of ResNet" in warnings[0]


def test_unknown_target_kinds_are_refused_with_the_valid_kinds() -> None:
    with pytest.raises(surgery.ConversionError, match="valid kinds are activation, softmax"):
        surgery.plan(tiny_timm("resnet18"), targets=("activations",))


def test_plan_reports_parameters_and_renders_as_table_and_dict() -> None:
    model = tiny_transformers("gpt2")
    plan = surgery.plan(model, config=GMNMConfig(num_components=4))
    data = plan.to_dict()
    assert data["summary"]["softmax"] == {"found": 1, "replace": 1}
    softmax = next(s for s in plan.sites if s.kind == "softmax")
    assert softmax.heads == 2 and softmax.params == 3 * 4 * 2
    assert "h.0.attn:softmax#0" in plan.table()
    assert data["params_to_add"] == sum(s.params for s in plan.replaced)


class _SharedActivationBlock(nn.Module):
    """Calls one in-place ReLU twice, like res2net and DLA blocks do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_an_activation_called_twice_gets_parameters_per_call_unless_shared() -> None:
    torch.manual_seed(0)
    probe = torch.randn(4, 8)
    model = nn.Sequential(_SharedActivationBlock(), _SharedActivationBlock())
    plan = surgery.plan(model, probe_inputs=probe)
    site = next(s for s in plan.sites if s.path == "0.act")
    assert site.shared and site.calls_per_caller == 2 and site.caller == "0"

    report = surgery.convert(model, plan, GMNMConfig(num_components=4), probe_inputs=probe)
    assert report.max_abs_diff == 0.0 and report.audit == []
    assert isinstance(model[0].act, CallSiteActivations)
    assert len(surgery.gmnm_parameter_names(model)) == 2 * 2 * 3

    # the second call's mixture changes the output; the first call's module is untouched by it
    before = _outputs(model, probe)
    with torch.no_grad():
        model[0].act.calls[1].pi.fill_(0.3)
    assert max_abs_diff(before, _outputs(model, probe)) > 0

    shared = nn.Sequential(_SharedActivationBlock())
    shared_plan = surgery.plan(shared, probe_inputs=probe)
    surgery.convert(shared, shared_plan, probe_inputs=probe, share_calls=True)
    assert isinstance(shared[0].act, GMNMActivation)


def test_shared_activations_of_a_timm_model_round_trip(tmp_path: Any) -> None:
    model = timm.create_model(
        "res2net50_26w_4s", pretrained=False, num_classes=3, layers=[1, 1, 1, 1]
    )
    probe = torch.randn(1, 3, 32, 32)
    plan = surgery.plan(model.eval(), probe_inputs=probe)
    assert any(s.shared and s.calls_per_caller > 1 for s in plan.sites)
    report = surgery.convert(model, plan, GMNMConfig(num_components=2), probe_inputs=probe)
    assert report.max_abs_diff == 0.0 and report.audit == []
    _perturb(model)
    expected = _outputs(model, probe)
    surgery.save(model, tmp_path)
    assert max_abs_diff(expected, _outputs(surgery.load(tmp_path), probe)) == 0.0

    # manifests written before sites recorded their callers load alike
    manifest_path = tmp_path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["sites"]:
        entry["site"].pop("callers")
    manifest_path.write_text(json.dumps(manifest))
    assert max_abs_diff(expected, _outputs(surgery.load(tmp_path), probe)) == 0.0


class _Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, outer_act: nn.Module) -> torch.Tensor:
        return outer_act(self.act(self.fc(x)))


class _ParentAndChildCallOneActivation(nn.Module):
    """The root calls its child's `act`, and the child calls the root's `act` it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.act = nn.SiLU()
        self.child = _Child()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(self.act(self.child.act(self.fc(x))), self.act)


def test_an_activation_called_from_several_modules_gets_parameters_per_call_site() -> None:
    torch.manual_seed(0)
    probe = torch.randn(4, 8)
    model = _ParentAndChildCallOneActivation()
    plan = surgery.plan(model, probe_inputs=probe)
    assert [(site.path, site.shared) for site in plan.sites] == [("act", True), ("child.act", True)]

    report = surgery.convert(model, plan, probe_inputs=probe)
    assert report.max_abs_diff == 0.0 and report.audit == []
    assert len(surgery.gmnm_parameter_names(model)) == 4 * 3
    assert plan.to_dict()["params_to_add"] == 4 * 3 * 8
    assert [site.callers for site in plan.sites] == [{"": 1, "child": 1}] * 2
    # each call site runs its own module, once per forward (in a deep copy too)
    copied = copy.deepcopy(model)
    ran: list[str] = []
    for path in ("act", "child.act"):
        for index, module in enumerate(copied.get_submodule(path).calls):
            module.register_forward_hook(lambda *_, name=f"{path}.calls.{index}": ran.append(name))
    _outputs(copied, probe)
    assert sorted(ran) == ["act.calls.0", "act.calls.1", "child.act.calls.0", "child.act.calls.1"]

    # and asked to, one set for all of them
    shared = _ParentAndChildCallOneActivation()
    surgery.convert(shared, surgery.plan(shared, probe_inputs=probe), share_calls=True)
    assert isinstance(shared.act, GMNMActivation) and isinstance(shared.child.act, GMNMActivation)


class _BlockCallingAnActivationItIsHanded(BasicBlock):
    def forward(self, x: torch.Tensor, act: nn.Module | None = None) -> torch.Tensor:
        out = super().forward(x)
        return act(out) if act is not None else out


class _SharedActivationResNet(ResNet):
    """A tiny ResNet whose root and first block call each other's activations: the root's
    `act1` is called by the root and by `layer1.0`, `layer4.0.act2` by its block and the root."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(block=_BlockCallingAnActivationItIsHanded, layers=[1, 1, 1, 1], **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1[0](x, self.act1)
        return self.layer4(self.layer3(self.layer2(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.layer4[0].act2(self.global_pool(x))
        return x if pre_logits else self.fc(x)


@register_model
def gmnm_test_shared_activation_resnet(pretrained: bool = False, **kwargs: Any) -> ResNet:
    # surgery.load rebuilds a timm model by its registered name
    name = "gmnm_test_shared_activation_resnet"
    # a pretrained_cfg of its own keeps timm from warning that none is registered
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {
        "architecture": name,
        "input_size": (3, 32, 32),
        "classifier": "fc",
    }
    return build_model_with_cfg(_SharedActivationResNet, name, pretrained, **kwargs)


def test_activations_called_from_several_modules_of_a_timm_model_round_trip(
    tmp_path: Any,
) -> None:
    model = timm.create_model("gmnm_test_shared_activation_resnet", num_classes=3).eval()
    probe = torch.randn(2, 3, 32, 32)
    plan = surgery.plan(model, probe_inputs=probe)
    report = surgery.convert(model, plan, GMNMConfig(num_components=2), probe_inputs=probe)
    assert report.max_abs_diff == 0.0 and report.audit == []
    assert isinstance(model.act1, CallSiteActivations)
    assert isinstance(model.layer4[0].act2, CallSiteActivations)
    _perturb(model)
    expected = _outputs(model, probe)
    surgery.save(model, tmp_path)
    loaded = surgery.load(tmp_path)
    assert surgery.gmnm_parameter_names(loaded) == surgery.gmnm_parameter_names(model)
    assert max_abs_diff(expected, _outputs(loaded, probe)) == 0.0
    # each call site's parameters are its own: changing one changes the output
    with torch.no_grad():
        loaded.act1.calls[1].pi.add_(0.5)
    assert max_abs_diff(expected, _outputs(loaded, probe)) > 0


def test_a_relu_built_inside_a_head_forward_is_routed_when_heads_are_targeted() -> None:
    # DistilBERT's classification head calls nn.ReLU() created inside its forward
    model = tiny_transformers("distilbert", AutoModelForSequenceClassification, num_labels=3)
    probe = surgery.example_inputs(model)
    plan = surgery.plan(model, targets=("activation", "softmax", "head"))
    site = next(s for s in plan.sites if s.op == "relu")
    assert (site.path, site.kind, site.replace) == ("<model>:relu#0", "head", True)
    report = surgery.convert(model, plan)
    assert report.max_abs_diff == 0.0 and report.audit == []
    before = _outputs(model, probe)
    with torch.no_grad():
        model.gmnm["relu_0"].pi.fill_(0.5)
    assert max_abs_diff(before, _outputs(model, probe)) > 0


def test_robertas_lm_head_gelu_singleton_is_routed_as_a_head_site() -> None:
    model = tiny_transformers("roberta", AutoModelForMaskedLM)
    plan = surgery.plan(model, targets=surgery.KINDS)
    assert any(s.path == "lm_head:gelu#0" and s.kind == "head" for s in plan.sites)
    report = surgery.convert(model, plan)
    assert report.max_abs_diff == 0.0
    assert surgery.audit(model, surgery.example_inputs(model), include_kept=True) == []


def test_whispers_functional_gelu_in_the_encoder_stem_gets_one_module_per_call() -> None:
    model = tiny_transformers("whisper")
    plan = surgery.plan(model)
    stem = [s.path for s in plan.replaced if s.owner == "encoder"]
    assert stem == ["encoder:gelu#0", "encoder:gelu#1"]
    # the encoder's own layers also run GELU, so the route must tell its own calls apart
    assert all(s.check_frames for s in plan.replaced if s.owner == "encoder")
    report = surgery.convert(model, plan)
    assert report.max_abs_diff == 0.0 and report.audit == []
    assert set(model.encoder.gmnm.keys()) == {"gelu_0", "gelu_1"}


class _FunctionalNet(nn.Module):
    """Functional calls of every shape the router handles."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.gate = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        y = F.relu(y, inplace=True)
        y.tanh_()  # used as a statement: the route must keep the in-place result
        weights = self.gate(x).softmax(dim=1)  # over tokens: not attention
        return y * weights.sum(-1, keepdim=True)


def test_sdpa_in_place_calls_and_non_attention_softmax_are_routed_exactly() -> None:
    torch.manual_seed(0)
    model, probe = _FunctionalNet(), torch.randn(2, 5, 8)
    plan = surgery.plan(model, targets=surgery.KINDS, probe_inputs=probe)
    kinds = {s.path: s.kind for s in plan.sites}
    assert kinds == {
        "<model>:sdpa#0": "softmax",
        "<model>:relu#0": "activation",
        "<model>:tanh#0": "activation",
        "<model>:softmax#0": "gate",
    }
    report = surgery.convert(model, plan, probe_inputs=probe)
    assert report.max_abs_diff <= 1e-6  # SDPA is written out, so rounding may differ
    assert report.audit == []
    assert isinstance(model.gmnm["sdpa_0"], GMNMSoftmax) and model.gmnm["sdpa_0"].config.heads == 2


def test_padding_masks_survive_conversion() -> None:
    model = tiny_transformers("bert")
    surgery.convert(model, surgery.plan(model))
    _perturb(model)
    inputs = surgery.example_inputs(model)
    changed = {**inputs, "input_ids": inputs["input_ids"].clone()}
    changed["input_ids"][1, -3:] = 7  # only padded positions differ
    a, b = _outputs(model, inputs).last_hidden_state, _outputs(model, changed).last_hidden_state
    assert torch.equal(a[1, :-3], b[1, :-3])


def test_causal_masks_survive_conversion() -> None:
    model = tiny_transformers("gpt2")
    surgery.convert(model, surgery.plan(model))
    _perturb(model)
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 100
    a = _outputs(model, {"input_ids": ids}).last_hidden_state
    b = _outputs(model, {"input_ids": changed}).last_hidden_state
    assert torch.equal(a[0, :-1], b[0, :-1]) and not torch.equal(a[0, -1], b[0, -1])


def test_generation_with_a_kv_cache_matches_the_original_at_residual_init() -> None:
    model = tiny_transformers("llama", AutoModelForCausalLM)
    ids = torch.tensor([[3, 5, 7, 9], [0, 0, 4, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # left padding
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    model.set_attn_implementation("eager")
    expected = model.generate(input_ids=ids, attention_mask=mask, **settings)
    surgery.convert(model, surgery.plan(model))
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **settings), expected)


def test_half_precision_models_keep_fp32_mixtures_and_stay_exact() -> None:
    model = tiny_transformers("llama").to(torch.bfloat16)
    report = surgery.convert(model, surgery.plan(model))
    assert report.max_abs_diff == 0.0
    assert {
        p.dtype for n, p in model.named_parameters() if n in surgery.gmnm_parameter_names(model)
    } == {torch.float32}

    double = tiny_timm("vit_tiny_patch16_224").double()
    probe = timm_probe("vit_tiny_patch16_224").double()
    surgery.convert(double, surgery.plan(double, probe_inputs=probe), probe_inputs=probe)
    assert {p.dtype for p in double.parameters()} == {torch.float64}


def test_converting_twice_is_refused() -> None:
    model = tiny_timm("resnet18")
    probe = timm_probe("resnet18")
    plan = surgery.plan(model, probe_inputs=probe)
    surgery.convert(model, plan, probe_inputs=probe)
    with pytest.raises(surgery.ConversionError, match="already"):
        surgery.convert(model, plan, probe_inputs=probe)
    with pytest.raises(surgery.ConversionError, match="already contains GMNM modules"):
        surgery.plan(model, probe_inputs=probe)


def test_groups_apply_to_channels_last_sites_and_are_refused_for_images() -> None:
    vit = tiny_timm("vit_tiny_patch16_224")
    probe = timm_probe("vit_tiny_patch16_224")
    config = GMNMConfig(num_components=2)
    plan = surgery.plan(vit, probe_inputs=probe)
    report = surgery.convert(vit, plan, config, probe_inputs=probe, groups="channel")
    assert report.max_abs_diff == 0.0
    assert vit.blocks[0].mlp.act.pi.shape == (128, 2)  # the MLP's hidden width

    resnet = tiny_timm("resnet18")
    probe = timm_probe("resnet18")
    plan = surgery.plan(resnet, probe_inputs=probe)
    with pytest.raises(surgery.ConversionError, match="not channels-last"):
        surgery.convert(resnet, plan, config, probe_inputs=probe, groups=4)
    assert not surgery.is_converted(resnet)


def test_config_fields_convert_sets_per_site_are_refused_up_front_with_what_to_use() -> None:
    bert = tiny_transformers("bert")
    plan = surgery.plan(bert)
    config = GMNMConfig(num_components=4, base="linear", groups=2, channels=64)
    with pytest.raises(surgery.ConversionError) as refused:
        surgery.convert(bert, plan, config)
    message = str(refused.value)
    assert "base='linear'" in message and "init='fit'" in message
    assert "groups=2" in message and "channels=64" in message and "groups= argument" in message
    for config in (GMNMConfig(heads=2), GMNMConfig(dim=1), GMNMConfig(extra={"a": 1})):
        with pytest.raises(surgery.ConversionError, match="leave these at their defaults"):
            surgery.convert(bert, plan, config)
    # nothing changed, and a plan made with such a config is refused by convert as well
    assert not surgery.is_converted(bert)
    with pytest.raises(surgery.ConversionError, match="base=None"):
        surgery.convert(bert, surgery.plan(bert, config=GMNMConfig(base=None)))
    report = surgery.convert(bert, plan, GMNMConfig(num_components=4, init_range=(-2.0, 2.0)))
    assert report.max_abs_diff == 0.0


def test_calibration_moves_the_centres_and_keeps_residual_conversion_exact() -> None:
    model = tiny_transformers("bert")
    inputs = surgery.example_inputs(model)
    report = surgery.convert(model, surgery.plan(model), calibration_inputs=inputs)
    assert report.calibrated and report.max_abs_diff == 0.0
    act = model.encoder.layer[0].intermediate.intermediate_act_fn
    assert not torch.equal(act.mu, torch.linspace(-3, 3, 8).unsqueeze(0))


def test_fit_init_reports_its_error_and_stays_close_to_the_original() -> None:
    model = tiny_transformers("bert")
    inputs = surgery.example_inputs(model)
    config = GMNMConfig(num_components=8, init="fit")
    report = surgery.convert(model, surgery.plan(model), config, calibration_inputs=inputs)
    assert report.fit_max_error is not None and report.fit_max_error < 0.05
    assert 0 < report.max_abs_diff < 0.1
    assert any("residual form" in note for note in report.notes)


def test_attention_layers_the_probe_does_not_reach_are_listed_not_skipped() -> None:
    model = tiny_transformers("bert", is_decoder=True, add_cross_attention=True)
    site = next(
        s for s in surgery.plan(model).sites if s.owner == "encoder.layer.0.crossattention.self"
    )
    assert not site.replace and "not reached by the probe" in (site.reason or "")

    # with encoder states in the probe, the cross-attention is traced and converted too
    encoder_states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    inputs = {**surgery.example_inputs(model), "encoder_hidden_states": encoder_states}
    plan = surgery.plan(model, probe_inputs=inputs)
    assert all(s.replace for s in plan.sites if s.kind == "softmax")
    report = surgery.convert(model, plan)
    assert report.max_abs_diff == 0.0 and report.audit == []


def test_a_deep_copy_of_a_converted_model_routes_to_its_own_modules() -> None:
    model = tiny_transformers("deberta-v2")  # its softmax is routed inside the layer's forward
    surgery.convert(model, surgery.plan(model))
    inputs = surgery.example_inputs(model)
    before = _outputs(model, inputs)
    twin = copy.deepcopy(model)
    _perturb(twin)
    assert max_abs_diff(before, _outputs(model, inputs)) == 0.0
    assert max_abs_diff(before, _outputs(twin, inputs)) > 0
    assert surgery.audit(twin, inputs) == []


def test_a_probe_the_model_cannot_take_is_refused_with_a_hint() -> None:
    with pytest.raises(surgery.UnsupportedModelError, match="pass probe_inputs"):
        surgery.plan(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), probe_inputs=torch.randn(2, 5))
    with pytest.raises(surgery.UnsupportedModelError, match="neither a transformers nor a timm"):
        surgery.plan(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_default_probes_pad_a_second_text_row_and_take_one_image() -> None:
    text = surgery.example_inputs(tiny_transformers("bert"))
    assert text["input_ids"].shape[0] == 2
    assert text["attention_mask"][0].all() and not text["attention_mask"][1].all()
    clip = surgery.example_inputs(tiny_transformers("clip"))
    assert clip["input_ids"].shape[0] == 2 and clip["pixel_values"].shape[0] == 2
    assert surgery.example_inputs(tiny_transformers("vit"))["pixel_values"].shape[0] == 1
    assert surgery.example_inputs(tiny_timm("resnet18")).shape[0] == 1
    assert surgery.example_inputs(tiny_timm("resnet18"), batch_size=3).shape[0] == 3
