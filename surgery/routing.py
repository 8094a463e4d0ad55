"""Routing nonlinearities that are not modules to the GMNM modules that replace them.

A softmax or activation computed by a functional call inside some module's `forward` (timm's
attention, DeBERTa, BLOOM, Whisper's convolution stem, a head that builds `nn.ReLU()` on the fly)
cannot be swapped like a module. The module that makes the call (its *owner*) gets a `Route`: its
`forward` runs under a `TorchFunctionMode` that sends the n-th call of each routed op family to
the GMNM module stored at `owner.gmnm[key]`, and lets every other call through. Attention layers
of transformers families that use the attention registry are routed the same way from inside the
registered `"gmnm"` attention function, which runs the family's own eager attention.
"""

from __future__ import annotations

import functools
import logging
import sys
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from gmnm import GMNMActivation
from surgery.errors import UnsupportedModelError
from surgery.registry import OP_CALLABLES, OP_FAMILIES, SOFTMAX, OpCall, bind_call

logger = logging.getLogger(__name__)

GMNM_ATTENTION = "gmnm"
CONTAINER = "gmnm"  # the ModuleDict on an owner that holds the GMNM modules of its calls
ROUTE_ATTR = "_gmnm_route"
ATTENTION_ROUTE_ATTR = "_gmnm_attention_route"


@dataclass
class Route:
    """What one owner routes: op family -> {index of the call within one forward: module key}.

    `check_frames` is set when modules below the owner also run ops of a routed family (Whisper's
    encoder layers run GELU while the encoder's own forward is active): a call is then only routed
    when it is made by the owner's own code, found by walking the Python stack. `calls` names
    the `CallSiteActivations` the owner calls, with the owner's index among their callers: the
    owner's forward runs as that caller of each (a reference, as the owner need not be above
    the activation in the module tree; a deepcopy of the whole model maps it to the copy).
    """

    targets: dict[str, dict[int, str]] = field(default_factory=dict)
    check_frames: bool = False
    calls: list[tuple[CallSiteActivations, int]] = field(default_factory=list)
    eager: Callable[..., Any] | None = None


class CallSiteActivations(nn.Module):
    """An activation module called several times per forward, one GMNM module per call.

    `calls_per_caller[c]` modules belong to the c-th caller (a module whose forward calls the
    activation), in order: the i-th call within one call of that caller goes to its i-th module.
    Each caller's route marks it as the running caller while its forward runs (nested callers
    stack), which restarts its count.
    """

    _gmnm_container = True

    def __init__(
        self, activations: list[GMNMActivation], calls_per_caller: list[int] | None = None
    ) -> None:
        super().__init__()
        counts = calls_per_caller or [len(activations)]
        if min(counts) < 1 or sum(counts) != len(activations):
            raise ValueError(
                f"calls per caller {counts} do not add up to the {len(activations)} activations"
            )
        self.calls = nn.ModuleList(activations)
        self.calls_per_caller = counts
        self._first = [sum(counts[:caller]) for caller in range(len(counts))]
        self._next = [0] * len(counts)
        self._running: list[int] = []

    def enter(self, caller: int) -> None:
        self._running.append(caller)
        self._next[caller] = 0

    def leave(self) -> None:
        self._running.pop()

    def forward(self, x: Tensor) -> Tensor:
        # a call from outside every traced caller (a path the probe did not take) counts as the
        # first caller's
        caller = self._running[-1] if self._running else 0
        index = self._next[caller]
        self._next[caller] = (index + 1) % self.calls_per_caller[caller]
        out: Tensor = self.calls[self._first[caller] + index](x)
        return out


class RouteMode(TorchFunctionMode):
    def __init__(self, owner: nn.Module, route: Route) -> None:
        super().__init__()
        self.owner = owner
        self.route = route
        self.counters: Counter[str] = Counter()
        self._subtree: set[int] | None = None

    def _called_by_owner(self) -> bool:
        """Whether the op being handled was called by the owner's own code, not a submodule's."""
        if self._subtree is None:
            self._subtree = {id(module) for module in self.owner.modules()}
        frame = sys._getframe(2)
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, nn.Module):
                if candidate is self.owner:
                    return True
                if id(candidate) in self._subtree:
                    return False
            frame = frame.f_back  # type: ignore[assignment]
        return False

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        entry = OP_CALLABLES.get(func)
        if entry is None or entry[0] not in self.route.targets:
            return func(*args, **kwargs)
        family = entry[0]
        if self.route.check_frames and not self._called_by_owner():
            return func(*args, **kwargs)
        index = self.counters[family]
        self.counters[family] += 1
        key = self.route.targets[family].get(index)
        if key is None:
            return func(*args, **kwargs)
        module = getattr(self.owner, CONTAINER)[key]
        return apply_replacement(module, bind_call(func, args, kwargs))


def apply_replacement(module: nn.Module, call: OpCall) -> Tensor:
    """Compute one routed call with its GMNM module."""
    if call.family == "sdpa":
        return _decomposed_attention(module, call)
    if OP_FAMILIES[call.family].kind == SOFTMAX:
        scores = call.input
        dtype = call.arguments.get("dtype")
        if dtype is not None:
            scores = scores.to(dtype)
        dim = call.arguments.get("dim")
        expected = getattr(module, "dim", -1)
        if dim is not None and dim % scores.dim() != expected % scores.dim():
            raise UnsupportedModelError(
                f"a softmax routed to {type(module).__name__} runs over dim {dim}, but the module "
                f"was built for dim {expected}; the model changed since it was converted"
            )
        out: Tensor = module(scores)
        return out
    if call.inplace:
        # an in-place call must still leave its result in the input tensor; the mixture saves
        # its own input for backward, so it gets a copy
        result = module(call.input.clone())
        return call.input.copy_(result)
    result = module(call.input)
    return result


def _decomposed_attention(module: nn.Module, call: OpCall) -> Tensor:
    """`scaled_dot_product_attention` written out, with the GMNM softmax in place of softmax."""
    query = call.input
    key: Tensor = call.arguments["key"]
    value: Tensor = call.arguments["value"]
    mask: Tensor | None = call.arguments.get("attn_mask")
    scale = call.arguments.get("scale") or query.shape[-1] ** -0.5
    if call.arguments.get("enable_gqa") and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)

    scores = query @ key.transpose(-2, -1) * scale  # (B, H, L, S)
    if call.arguments.get("is_causal"):
        length, source = query.shape[-2], key.shape[-2]
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    probs = module(scores)
    dropout = float(call.arguments.get("dropout_p") or 0.0)
    if dropout > 0:
        probs = F.dropout(probs, dropout, training=True)
    return probs @ value


@functools.cache
def _routed_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        route: Route = getattr(self, ROUTE_ATTR)
        for activation, caller in route.calls:
            activation.enter(caller)
        try:
            if not route.targets:
                return original(self, *args, **kwargs)
            with RouteMode(self, route):
                return original(self, *args, **kwargs)
        finally:
            for activation, _ in route.calls:
                activation.leave()

    return forward


def install_forward_route(owner: nn.Module, route: Route) -> None:
    """Make `owner.forward` run under `route` (an instance attribute, so deepcopy keeps it)."""
    original = type(owner).forward
    setattr(owner, ROUTE_ATTR, route)
    owner.forward = types.MethodType(_routed_forward(original), owner)


def install_attention_route(owner: nn.Module, route: Route) -> None:
    setattr(owner, ATTENTION_ROUTE_ATTR, route)


def family_eager_attention(module: nn.Module) -> Callable[..., Any]:
    """The eager attention function of a transformers layer's family (its modeling module)."""
    route: Route | None = getattr(module, ATTENTION_ROUTE_ATTR, None)
    if route is not None and route.eager is not None:
        return route.eager
    modeling = sys.modules.get(type(module).__module__)
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} runs the GMNM attention but its family has no "
            "eager_attention_forward to run it with; convert this model with "
            "targets=('activation',) to leave its attention as it is"
        )
    function: Callable[..., Any] = eager
    return function


def gmnm_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> Any:
    """The attention function registered as "gmnm": the family's eager attention, routed."""
    eager = family_eager_attention(module)
    route: Route | None = getattr(module, ATTENTION_ROUTE_ATTR, None)
    if route is None or not route.targets:
        return eager(module, query, key, value, attention_mask, **kwargs)
    with RouteMode(module, route):
        return eager(module, query, key, value, attention_mask, **kwargs)


@functools.cache
def register_attention() -> None:
    """Register the GMNM attention function AND its mask function with transformers.

    Without the mask registration transformers builds no mask for an unknown implementation and
    causal and padding masks silently vanish; the eager mask builder gives the masks eager uses.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(GMNM_ATTENTION, gmnm_attention_forward)
    AttentionMaskInterface.register(GMNM_ATTENTION, eager_mask)
