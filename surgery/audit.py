"""The audit: run a model once and list every nonlinearity that still ran outside GMNM.

It is the independent check of a conversion. A converted model records the sites its plan chose
to keep (gates, heads, excluded paths); those are not findings unless `include_kept` asks for
them. An unconverted model keeps nothing, so its audit lists every activation and softmax.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from surgery.convert import surgery_state
from surgery.registry import HEAD, OP_FAMILIES, SOFTMAX, class_name, is_head_path, module_kind
from surgery.trace import trace_model

logger = logging.getLogger(__name__)


@dataclass
class Finding:
    """A nonlinearity that ran outside every GMNM module during the audit's forward pass."""

    path: str
    kind: str
    implementation: str
    calls: int
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _family(op: str) -> str:
    # a kept attention layer may run fused (SDPA) where the plan saw its softmax
    return "softmax" if op in ("softmax", "sdpa") else op


def audit(model: nn.Module, example_inputs: Any, *, include_kept: bool = False) -> list[Finding]:
    """Run `model` on `example_inputs` and return what ran outside GMNM modules.

    Each finding names the site (module path, or `owner:op#index` for a call inside a forward),
    its kind, what computed it and how often it ran. Empty when everything is routed.
    """
    return audit_run(model, example_inputs, include_kept=include_kept)[0]


def audit_run(
    model: nn.Module, example_inputs: Any, *, include_kept: bool = False
) -> tuple[list[Finding], Any]:
    """`audit`, also returning what the model returned on the inputs."""
    state = surgery_state(model) or {}
    kept: set[tuple[str, str, int]] = set()
    for site in state.get("kept", []):
        kept.add((site["owner"], _family(site["op"] or "module"), site["index"]))

    trace = trace_model(model, example_inputs, discover=False)
    modules = dict(model.named_modules())
    findings = []
    for path, record in trace.modules.items():
        module = modules.get(path)
        kind = module_kind(module) if module is not None else None
        if kind is None or module is None:
            continue
        if kind != SOFTMAX and kind != "gate" and is_head_path(path):
            kind = HEAD
        is_kept = (path, "module", 0) in kept
        if is_kept and not include_kept:
            continue
        findings.append(Finding(path, kind, class_name(module), record.calls, is_kept))
    for (owner, op, index), op_record in sorted(trace.ops.items()):
        is_kept = (owner, _family(op), index) in kept
        if is_kept and not include_kept:
            continue
        kind = OP_FAMILIES[op].kind
        findings.append(
            Finding(
                f"{owner or '<model>'}:{op}#{index}",
                kind,
                f"{op} call in {op_record.owner_class}.forward",
                op_record.calls,
                is_kept,
            )
        )
    if findings:
        logger.info("audit of %s: %d findings", type(model).__name__, len(findings))
    return findings, trace.output
