"""What surgery can convert: the one table of activation classes, functional ops and site kinds.

Activation modules are matched by exact class (module path and qualified name), never with
`isinstance`: a subclass may compute something else, and the class recorded in the manifest must
be the one that runs so that residual conversion stays bit-exact. Functional calls (`F.gelu(x)`,
`x.softmax(-1)`, ...) are matched through the op families below, which the tracer, the router and
the audit share, so that all three count the same calls.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# The kinds of site. `targets` of a plan name kinds; the default converts activations and the
# attention softmax, and lists gates and head activations without replacing them.
ACTIVATION = "activation"
GATE = "gate"
HEAD = "head"
SOFTMAX = "softmax"
KINDS = (ACTIVATION, SOFTMAX, GATE, HEAD)
DEFAULT_TARGETS = (ACTIVATION, SOFTMAX)

_TORCH = "torch.nn.modules.activation"
_HF = "transformers.activations"
_TIMM = "timm.layers.activations"
_TIMM_ME = "timm.layers.activations_me"

# Exact class -> kind. Sigmoid-like classes are gates: they scale features (squeeze-excitation,
# gated units) rather than shape them, so they are listed but not replaced by default.
ACTIVATION_CLASSES: dict[str, str] = {
    **{
        f"{_TORCH}.{name}": ACTIVATION
        for name in (
            "ReLU",
            "ReLU6",
            "GELU",
            "SiLU",
            "Mish",
            "ELU",
            "CELU",
            "SELU",
            "LeakyReLU",
            "PReLU",
            "Hardswish",
            "Hardtanh",
            "Softplus",
            "Softsign",
            "Tanh",
            "Tanhshrink",
        )
    },
    f"{_TORCH}.Sigmoid": GATE,
    f"{_TORCH}.Hardsigmoid": GATE,
    **{
        f"{_HF}.{name}": ACTIVATION
        for name in (
            "GELUActivation",
            "NewGELUActivation",
            "FastGELUActivation",
            "QuickGELUActivation",
            "ClippedGELUActivation",
            "AccurateGELUActivation",
            "GELUTanh",
            "PytorchGELUTanh",
            "SiLUActivation",
            "MishActivation",
            "LaplaceActivation",
            "ReLUSquaredActivation",
            "SqrtSoftplusActivation",
            "XIELUActivation",
        )
    },
    # formula classes defined inside one model family
    "transformers.models.bloom.modeling_bloom.BloomGelu": ACTIVATION,
    **{
        f"{_TIMM}.{name}": ACTIVATION
        for name in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "HardSwish", "HardMish")
    },
    f"{_TIMM}.Tanh": ACTIVATION,
    f"{_TIMM}.PReLU": ACTIVATION,
    f"{_TIMM}.Sigmoid": GATE,
    f"{_TIMM}.HardSigmoid": GATE,
    **{
        f"{_TIMM_ME}.{name}": ACTIVATION
        for name in ("SwishMe", "MishMe", "HardSwishMe", "HardMishMe")
    },
    f"{_TIMM_ME}.HardSigmoidMe": GATE,
}

SOFTMAX_CLASSES = frozenset({f"{_TORCH}.Softmax"})

# Path components that mark a classification or pooling head. Activations there shape features
# for one task only (BERT's pooler tanh, a pre-logits layer), so they are not converted by default.
HEAD_COMPONENTS = frozenset(
    {
        "pooler",
        "classifier",
        "pre_classifier",
        "cls",
        "pre_logits",
        "score",
        "qa_outputs",
        "lm_head",
        "head",
        "heads",
        "classification_head",
    }
)


def class_name(module: nn.Module | type) -> str:
    cls = module if isinstance(module, type) else type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def module_kind(module: nn.Module) -> str | None:
    """The kind of an activation or softmax module, or None when it is neither."""
    return _class_kind(class_name(module))


@functools.cache
def _class_kind(name: str) -> str | None:
    if name in SOFTMAX_CLASSES:
        return SOFTMAX
    return ACTIVATION_CLASSES.get(name)


def is_head_path(path: str) -> bool:
    return any(part in HEAD_COMPONENTS or part.endswith("_head") for part in path.split("."))


@dataclass(frozen=True)
class OpFamily:
    """Functional calls that compute the same nonlinearity, and how to call it out of place.

    `parameters` names the arguments after the input, in positional order, for the canonical
    function; `tensor_parameters` are those that are tensors and so never stored in a manifest.
    """

    name: str
    kind: str
    function: Callable[..., Tensor]
    parameters: tuple[str, ...]
    tensor_parameters: tuple[str, ...] = ()


def _family_table() -> tuple[
    dict[str, OpFamily], dict[Callable[..., Any], tuple[str, tuple[str, ...]]]
]:
    families: dict[str, OpFamily] = {}
    callables: dict[Callable[..., Any], tuple[str, tuple[str, ...]]] = {}

    def add(
        family: OpFamily, *functions: Callable[..., Any], signature: Iterable[str] = ()
    ) -> None:
        families[family.name] = family
        params = tuple(signature) or family.parameters
        for function in functions:
            callables[function] = (family.name, params)

    T = torch.Tensor
    inplace = ("inplace",)
    add(OpFamily("relu", ACTIVATION, F.relu, inplace), F.relu, torch.relu, T.relu)
    add(
        OpFamily("relu", ACTIVATION, F.relu, inplace),
        torch.relu_,
        T.relu_,
        F.relu_,
        signature=("_",),
    )
    add(OpFamily("relu6", ACTIVATION, F.relu6, inplace), F.relu6)
    add(
        OpFamily("hardtanh", ACTIVATION, F.hardtanh, ("min_val", "max_val", "inplace")),
        F.hardtanh,
        F.hardtanh_,
    )
    add(
        OpFamily("leaky_relu", ACTIVATION, F.leaky_relu, ("negative_slope", "inplace")),
        F.leaky_relu,
        F.leaky_relu_,
    )
    add(OpFamily("elu", ACTIVATION, F.elu, ("alpha", "inplace")), F.elu, F.elu_)
    add(OpFamily("celu", ACTIVATION, F.celu, ("alpha", "inplace")), F.celu, F.celu_)
    add(OpFamily("selu", ACTIVATION, F.selu, inplace), F.selu, torch.selu, torch.selu_)
    add(OpFamily("gelu", ACTIVATION, F.gelu, ("approximate",)), F.gelu)
    add(OpFamily("silu", ACTIVATION, F.silu, inplace), F.silu)
    add(OpFamily("mish", ACTIVATION, F.mish, inplace), F.mish)
    add(OpFamily("softplus", ACTIVATION, F.softplus, ("beta", "threshold")), F.softplus)
    add(OpFamily("hardswish", ACTIVATION, F.hardswish, inplace), F.hardswish)
    add(OpFamily("hardsigmoid", GATE, F.hardsigmoid, inplace), F.hardsigmoid)
    add(OpFamily("sigmoid", GATE, torch.sigmoid, ()), torch.sigmoid, T.sigmoid, F.sigmoid)
    add(OpFamily("sigmoid", GATE, torch.sigmoid, ()), torch.sigmoid_, T.sigmoid_)
    add(OpFamily("tanh", ACTIVATION, torch.tanh, ()), torch.tanh, T.tanh, F.tanh)
    add(OpFamily("tanh", ACTIVATION, torch.tanh, ()), torch.tanh_, T.tanh_)
    add(
        OpFamily("softmax", SOFTMAX, torch.softmax, ("dim", "dtype")),
        torch.softmax,
        T.softmax,
    )
    add(
        OpFamily("softmax", SOFTMAX, torch.softmax, ("dim", "dtype")),
        F.softmax,
        signature=("dim", "_stacklevel", "dtype"),
    )
    add(
        OpFamily(
            "sdpa",
            SOFTMAX,
            F.scaled_dot_product_attention,
            ("key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
            tensor_parameters=("key", "value", "attn_mask"),
        ),
        F.scaled_dot_product_attention,
    )
    return families, callables


OP_FAMILIES, OP_CALLABLES = _family_table()

# Ops whose name ends in "_" change their input in place even without an `inplace` argument.
INPLACE_CALLABLES = frozenset(
    f
    for f in OP_CALLABLES
    if getattr(f, "__name__", "").endswith("_") and not getattr(f, "__name__", "").startswith("_")
)


@dataclass(frozen=True)
class OpCall:
    """One functional call, normalised: its family, input and the remaining arguments by name."""

    family: str
    input: Tensor
    arguments: dict[str, Any]
    inplace: bool


def bind_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> OpCall:
    family, names = OP_CALLABLES[func]
    arguments = dict(zip(names, args[1:], strict=False))
    arguments.update(kwargs)
    arguments.pop("_", None)
    arguments.pop("_stacklevel", None)
    inplace = func in INPLACE_CALLABLES or bool(arguments.pop("inplace", False))
    source = args[0] if args else arguments.pop("input")
    return OpCall(family, source, arguments, inplace)


def stored_arguments(call: OpCall) -> dict[str, Any]:
    """The arguments of an activation call that a manifest keeps (JSON scalars only)."""
    family = OP_FAMILIES[call.family]
    return {
        name: value
        for name, value in call.arguments.items()
        if name not in family.tensor_parameters and isinstance(value, (bool, int, float, str))
    }


class FunctionalActivation(nn.Module):
    """A functional activation call (`F.gelu(x, approximate="tanh")`) as a module.

    It is the base of the `GMNMActivation` that replaces such a call, so that the replacement
    computes exactly what the call did at residual initialisation.
    """

    def __init__(self, op: str, arguments: dict[str, Any] | None = None) -> None:
        super().__init__()
        if op not in OP_FAMILIES or OP_FAMILIES[op].kind == SOFTMAX:
            valid = sorted(name for name, f in OP_FAMILIES.items() if f.kind != SOFTMAX)
            raise ValueError(f"unknown activation op {op!r}; valid ops are {', '.join(valid)}")
        self.op = op
        self.arguments = dict(arguments or {})

    def forward(self, x: Tensor) -> Tensor:
        return OP_FAMILIES[self.op].function(x, **self.arguments)

    def extra_repr(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.arguments.items())
        return f"op={self.op}{args}"
