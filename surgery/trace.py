"""One forward pass that records every activation and softmax a model runs, and who ran it.

The plan and the audit both need to know more than the module tree shows: which module's own
`forward` calls `F.gelu` or `.softmax(-1)`, how often an activation module is called per call of
its caller, and which attention layers go through the transformers attention registry. A global
module hook keeps the stack of running modules and a `TorchFunctionMode` sees every functional
op; an op belongs to the innermost running module that is part of the model (modules built on the
fly inside `forward`, like a module-level `gelu` singleton, are looked through).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from gmnm import GMNMActivation, GMNMSoftmax
from surgery.registry import OP_CALLABLES, bind_call, module_kind, stored_arguments

logger = logging.getLogger(__name__)

# A call site of a functional op: (owner path, op family, index of the call within one forward
# call of the owner). The router counts calls the same way.
OpKey = tuple[str, str, int]


@dataclass
class ModuleRecord:
    """How a registered activation or softmax module was called during the trace."""

    calls: int = 0
    max_calls_per_caller_call: int = 0
    # each module whose own forward called it -> the most calls within one call of that module
    callers: dict[str, int] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None


@dataclass
class OpRecord:
    """How one functional call site behaved during the trace."""

    calls: int = 0
    shape: tuple[int, ...] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    owner_class: str = ""


def call_site_path(owner: str, family: str, index: int) -> str:
    """The site path of a functional call: `owner:op#index` (`<model>` for the root)."""
    return f"{owner or '<model>'}:{family}#{index}"


@dataclass
class Trace:
    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    ops: dict[OpKey, OpRecord] = field(default_factory=dict)
    # attention layers that called the transformers attention registry -> the eager function
    # their family passes as the default (what the GMNM attention function runs)
    attention_functions: dict[str, Callable[..., Any]] = field(default_factory=dict)
    attention_heads: dict[str, int] = field(default_factory=dict)
    # owner path -> op families that other model modules emitted while the owner was running
    nested: dict[str, set[str]] = field(default_factory=dict)
    called: set[str] = field(default_factory=set)
    output: Any = None  # what the model returned
    # site path -> (smallest, largest) finite input value, when the trace records ranges
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)


def is_gmnm_module(module: nn.Module) -> bool:
    return isinstance(module, (GMNMActivation, GMNMSoftmax)) or getattr(
        module, "_gmnm_container", False
    )


class _Frame:
    __slots__ = ("counters", "module", "path", "skip")

    def __init__(self, module: nn.Module, path: str | None, skip: bool) -> None:
        self.module = module
        self.path = path  # None when the module is not part of the model
        self.skip = skip  # ops inside belong to this module as a whole (a site or a GMNM module)
        self.counters: Counter[str] = Counter()


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: _Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in OP_CALLABLES:
            self.tracer.record_op(func, args, kwargs)
        return func(*args, **kwargs)


class _Tracer:
    def __init__(self, model: nn.Module, record_ranges: bool = False) -> None:
        self.record_ranges = record_ranges
        self.paths: dict[int, str] = {}
        for path, module in model.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(module), path)
        self.stack: list[_Frame] = []
        self.trace = Trace()

    def _owner(self) -> _Frame | None:
        for frame in reversed(self.stack):
            if frame.path is not None:
                return frame
        return None

    def _mark_nested(self, family: str, owner: _Frame | None) -> None:
        for frame in self.stack:
            if frame.path is not None and frame is not owner:
                self.trace.nested.setdefault(frame.path, set()).add(family)

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        path = self.paths.get(id(module))
        skip = is_gmnm_module(module) or module_kind(module) is not None
        if path is not None and module_kind(module) is not None and not self._inside_gmnm():
            record = self.trace.modules.setdefault(path, ModuleRecord())
            record.calls += 1
            caller = self._owner()
            if caller is not None:
                assert caller.path is not None
                caller.counters["module:" + path] += 1
                count = caller.counters["module:" + path]
                record.callers[caller.path] = max(record.callers.get(caller.path, 0), count)
                record.max_calls_per_caller_call = max(record.max_calls_per_caller_call, count)
            if args and isinstance(args[0], Tensor):
                record.shape = tuple(args[0].shape)
                self._record_range(path, args[0])
        if path is not None:
            self.trace.called.add(path)
        self.stack.append(_Frame(module, path, skip))

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.stack and self.stack[-1].module is module:
            self.stack.pop()

    def _record_range(self, site: str, values: Tensor) -> None:
        if not self.record_ranges or not values.is_floating_point():
            return
        finite = values.detach()[torch.isfinite(values.detach())]
        if not finite.numel():
            return
        low, high = float(finite.min()), float(finite.max())
        if site in self.trace.ranges:
            low = min(low, self.trace.ranges[site][0])
            high = max(high, self.trace.ranges[site][1])
        self.trace.ranges[site] = (low, high)

    def _inside_gmnm(self) -> bool:
        return any(is_gmnm_module(frame.module) for frame in self.stack)

    def record_op(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        call = bind_call(func, args, kwargs)
        owner = self._owner()
        self._mark_nested(call.family, owner)
        if owner is None or owner.skip or self._inside_gmnm():
            return
        assert owner.path is not None
        index = owner.counters[call.family]
        owner.counters[call.family] += 1
        record = self.trace.ops.setdefault((owner.path, call.family, index), OpRecord())
        record.calls += 1
        record.shape = tuple(call.input.shape)
        self._record_range(call_site_path(owner.path, call.family, index), call.input)
        record.arguments = stored_arguments(call)
        record.owner_class = type(owner.module).__name__


@contextlib.contextmanager
def _module_hooks(tracer: _Tracer) -> Iterator[None]:
    handles: list[RemovableHandle] = [
        nn.modules.module.register_module_forward_pre_hook(tracer.pre_hook),
        nn.modules.module.register_module_forward_hook(tracer.post_hook, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _capture_attention_registry(tracer: _Tracer) -> Iterator[None]:
    """Record which eager function every registry attention layer runs.

    The default a layer passes to `get_interface` is its family's eager attention: the function
    the GMNM attention function runs. (The model runs with eager attention meanwhile, so that the
    masks are the eager ones too.)
    """
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return

    def get_interface(attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
        def capture(module: nn.Module, query: Tensor, *args: Any, **kwargs: Any) -> Any:
            path = tracer.paths.get(id(module))
            if path is not None:
                tracer.trace.attention_functions[path] = default
                if query.dim() == 4:
                    tracer.trace.attention_heads[path] = int(query.shape[1])
            return default(module, query, *args, **kwargs)

        return capture

    ALL_ATTENTION_FUNCTIONS.get_interface = get_interface  # type: ignore[method-assign]
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS.get_interface


@contextlib.contextmanager
def eager_attention(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run a transformers model with eager attention (and eager masks) for the duration."""
    config: Any = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = (
        enabled and previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    )
    if switch:
        model.set_attn_implementation("eager")  # type: ignore[operator]
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(previous)  # type: ignore[operator]


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[list[str]]:
    """Turn timm's fused attention off for the duration (restored afterwards)."""
    changed: list[tuple[nn.Module, str]] = []
    for path, module in model.named_modules():
        if isinstance(getattr(module, "fused_attn", None), bool) and module.fused_attn:
            setattr(module, "fused_attn", False)  # noqa: B010
            changed.append((module, path))
    try:
        yield [path for _, path in changed]
    finally:
        for module, _ in changed:
            setattr(module, "fused_attn", True)  # noqa: B010 (nn.Module types it as Tensor)


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration; each module's training flag is restored."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in flags:
            module.training = training


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call a model with probe inputs: a dict of keyword arguments, a tuple, or one tensor."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def trace_model(
    model: nn.Module, inputs: Any, *, discover: bool, record_ranges: bool = False
) -> Trace:
    """Run `model` once on `inputs` and record every activation and softmax it runs.

    With `discover`, attention runs unfused (timm) and through each family's eager function
    (transformers), so that the softmax the conversion will replace is visible. With
    `record_ranges`, the smallest and largest input value of every site is kept.
    """
    tracer = _Tracer(model, record_ranges)
    with contextlib.ExitStack() as stack:
        stack.enter_context(evaluation(model))
        if discover:
            stack.enter_context(eager_attention(model))
            stack.enter_context(unfused_attention(model))
            stack.enter_context(_capture_attention_registry(tracer))
        stack.enter_context(_module_hooks(tracer))
        stack.enter_context(_Recorder(tracer))
        tracer.trace.output = run_model(model, inputs)
    return tracer.trace


def fingerprint(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((tensor.data_ptr(), tensor._version) for tensor in tensors)
