"""The conversion over every supported architecture, from tiny configs with random weights.

For each model: the plan finds the expected kinds of site; residual conversion changes no output;
the audit finds nothing left outside GMNM; a backward pass reaches every GMNM parameter; with
perturbed mixtures the outputs change (the GMNM modules are really in the computation) and a
save/load round trip reproduces them exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from surgery_models import (
    TIMM_KWARGS,
    TRANSFORMERS_CONFIGS,
    timm_probe,
    tiny_timm,
    tiny_transformers,
)
from torch import nn

import surgery
from gmnm import GMNMConfig
from surgery.inputs import max_abs_diff, output_tensors
from surgery.trace import evaluation, run_model

BASE = {"activation", "softmax"}
EXPECTED_KINDS: dict[str, set[str]] = {
    **{name: set(BASE) for name in TRANSFORMERS_CONFIGS},
    "bert": BASE | {"head"},
    "roberta": BASE | {"head"},
    "vit": BASE | {"head"},
    "resnet18": {"activation"},
    "resnet50": {"activation"},
    "convnext_tiny": {"activation"},
    "vit_tiny_patch16_224": set(BASE),
    "deit_tiny_patch16_224": set(BASE),
    "swin_tiny_patch4_window7_224": set(BASE),
    "efficientnet_b0": {"activation", "gate"},
    "mobilenetv3_small_100": {"activation", "gate"},
    "regnety_002": {"activation", "gate"},
    "beit_base_patch16_224": set(BASE),
    "eva02_tiny_patch14_224": set(BASE),
}
SWEEP = list(TRANSFORMERS_CONFIGS) + list(TIMM_KWARGS)


def _build(name: str) -> tuple[nn.Module, Any]:
    if name in TRANSFORMERS_CONFIGS:
        model = tiny_transformers(name)
        return model, surgery.example_inputs(model)
    return tiny_timm(name), timm_probe(name)


def _outputs(model: nn.Module, probe: Any) -> Any:
    with evaluation(model):
        return run_model(model, probe)


def _loss(model: nn.Module, probe: Any) -> torch.Tensor:
    return sum(t.float().pow(2).mean() for t in output_tensors(run_model(model, probe)))  # type: ignore[return-value]


@pytest.mark.parametrize("name", SWEEP)
def test_residual_conversion_is_exact_audited_trainable_and_round_trips(
    name: str, tmp_path: Any
) -> None:
    model, probe = _build(name)

    plan = surgery.plan(model, probe_inputs=probe)
    found = {site.kind for site in plan.sites}
    assert EXPECTED_KINDS[name] <= found, f"plan found {found}"
    assert all(site.kind in plan.targets for site in plan.replaced)

    report = surgery.convert(model, plan, GMNMConfig(num_components=4), probe_inputs=probe)
    assert report.max_abs_diff == 0.0
    assert report.audit == []
    for kind in EXPECTED_KINDS[name] & BASE:
        assert report.sites_replaced.get(kind, 0) >= 1
    assert report.params_added > 0

    # backward reaches every GMNM parameter
    names = surgery.gmnm_parameter_names(model)
    parameters = dict(model.named_parameters())
    model.eval()
    _loss(model, probe).backward()
    assert [n for n in names if parameters[n].grad is None] == []
    # (a single site's gradient can be zero: timm zero-initialises the last norm of each block)
    assert sum(float(parameters[n].grad.abs().sum()) for n in names if n.endswith(".pi")) > 0

    # perturbed mixtures change the outputs, and survive a save/load round trip exactly
    original = _outputs(model, probe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in sorted(names):
            if n.endswith(".pi"):
                parameters[n].copy_(torch.randn(parameters[n].shape, generator=generator) * 0.5)
    perturbed = _outputs(model, probe)
    # any change shows the GMNM modules compute; CPU runs are deterministic, and ConvNeXt's layer
    # scale (1e-6 at init) shrinks the change to about 1e-6
    assert max_abs_diff(original, perturbed) > 0

    surgery.save(model, tmp_path)
    loaded = surgery.load(tmp_path)
    assert surgery.is_converted(loaded)
    assert max_abs_diff(perturbed, _outputs(loaded, probe)) == 0.0
    assert surgery.audit(loaded, probe) == []
