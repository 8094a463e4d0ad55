"""The functions behind the GMNM modules.

The mixture of one element x with parameters of its channel group is

    G(x) = sum_k pi_k * exp(-0.5 * z_k^2),   z_k = (x - mu_k) * exp(rho_k)

Parameters have shape (G, K): G groups of channels along `dim`, K components. `mixture` picks
the fastest implementation available for the input (see `gmnm.backends`); `mixture_reference`
is the plain broadcast version, kept as the test oracle and for export. `activation` adds a base
activation (`base(x) + G(x)`), in one pass where the backend fuses that base.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from gmnm.config import LINEAR_BASE

logger = logging.getLogger(__name__)

# |z| beyond this contributes exp(-450) or less; clamping keeps masked (-inf) and overflowing
# inputs from turning gradients into NaN (0 * inf) without changing any finite result in fp32.
Z_CLAMP = 30.0


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


BASE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "mish": F.mish,
    "elu": F.elu,
    "softplus": F.softplus,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


def compute_dtype(x: Tensor, param: Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, otherwise the wider of the input and parameter dtypes."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return torch.promote_types(torch.float32, param.dtype)
    return torch.promote_types(x.dtype, param.dtype)


def check_shapes(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> None:
    """Raise a ValueError naming the mismatch between an input and mixture parameters."""
    if not (pi.shape == mu.shape == rho.shape) or pi.dim() != 2:
        raise ValueError(
            "mixture parameters must all have shape (groups, components); got "
            f"pi {tuple(pi.shape)}, mu {tuple(mu.shape)}, rho {tuple(rho.shape)}"
        )
    groups = pi.shape[0]
    if groups == 1:
        return
    channels = x.shape[dim] if x.dim() else 1
    if channels % groups:
        raise ValueError(
            f"input has {channels} channels along dim {dim}, which {groups} parameter groups do "
            "not divide; build the module with channels equal to that size"
        )


def _expand_params(x: Tensor, params: Tensor, dim: int) -> Tensor:
    """(G, K) parameters as a tensor that broadcasts against x.unsqueeze(-1)."""
    groups, k = params.shape
    shape = [1] * x.dim() + [k]
    if groups == 1:
        return params.reshape(shape)
    dim = dim % x.dim()
    channels = x.shape[dim]
    shape[dim] = channels
    return params.repeat_interleave(channels // groups, dim=0).reshape(shape)


def mixture_reference(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int = -1) -> Tensor:
    """The mixture by broadcasting to [..., K]: simple, exact, and K times the memory."""
    check_shapes(x, pi, mu, rho, dim)
    dtype = compute_dtype(x, pi)
    xf = x.to(dtype).unsqueeze(-1)
    pi_, mu_, rho_ = (_expand_params(x, p.to(dtype), dim) for p in (pi, mu, rho))
    z = ((xf - mu_) * rho_.exp()).clamp(-Z_CLAMP, Z_CLAMP)
    return (pi_ * torch.exp(-0.5 * z * z)).sum(-1).to(x.dtype)


def mixture(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int = -1) -> Tensor:
    """The mixture through the fastest backend available for this input."""
    from gmnm import backends

    return backends.dispatch(x, pi, mu, rho, dim)


def activation(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    base: str | None,
    a: Tensor | None = None,
    c: Tensor | None = None,
    dim: int = -1,
) -> Tensor:
    """`base(x) + mixture(x)` through the fastest backend available for this input.

    `base` is a name from `BASE_FUNCTIONS`, `"linear"` (then `a*x + c` with `a`, `c` of shape
    (G,)), or None for the mixture alone. The value of the base term is exactly what the
    PyTorch function computes, so with `pi = 0` the result equals `base(x)` bit for bit.
    """
    from gmnm import backends

    return backends.dispatch_activation(x, pi, mu, rho, base, a, c, dim)


def activation_reference(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    base: str | None,
    a: Tensor | None = None,
    c: Tensor | None = None,
    dim: int = -1,
) -> Tensor:
    """`activation` from `mixture_reference` and the plain base function: the test oracle."""
    y = mixture_reference(x, pi, mu, rho, dim)
    if base == LINEAR_BASE:
        if a is None or c is None:
            raise ValueError("base='linear' needs the slope a and intercept c, each of shape (G,)")
        return linear_term(x, a, c, dim) + y
    if base is None:
        return y
    return BASE_FUNCTIONS[base](x) + y


def expand_per_channel(x: Tensor, values: Tensor, dim: int) -> Tensor:
    """Per-group values of shape (G,) broadcast against x along `dim`."""
    groups = values.shape[0]
    if groups == 1:
        return values.reshape(())
    dim = dim % x.dim()
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return values.repeat_interleave(x.shape[dim] // groups).reshape(shape)


def linear_term(x: Tensor, a: Tensor, c: Tensor, dim: int = -1) -> Tensor:
    """The learned base `a*x + c`, computed in fp32 for half inputs, returned in x's dtype."""
    dtype = compute_dtype(x, a)
    xf = x.to(dtype)
    out = expand_per_channel(x, a.to(dtype), dim) * xf + expand_per_channel(x, c.to(dtype), dim)
    return out.to(x.dtype)


def gmnm_softmax(
    s: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int = -1, group_dim: int = -1
) -> Tensor:
    """softmax(s + G(s)) along `dim`, in fp32, with masked (-inf) entries staying masked.

    Parameters are grouped along `group_dim` (the head dimension for per-head parameters). A row
    whose entries are all masked returns zeros instead of softmax's NaNs.
    """
    sf = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    finite = torch.isfinite(sf)
    g = mixture(torch.where(finite, sf, torch.zeros_like(sf)), pi, mu, rho, dim=group_dim)
    z = sf + g.to(sf.dtype)
    dead = torch.isneginf(z.amax(dim=dim, keepdim=True))
    z = z.masked_fill(dead, 0.0)
    p = torch.softmax(z, dim=dim).masked_fill(dead, 0.0)
    return p.to(s.dtype)


def initial_centres(k: int, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Centres evenly over [low, high] and log-widths so that neighbours overlap at one sigma."""
    mu = (
        torch.linspace(low, high, k, dtype=torch.float64)
        if k > 1
        else torch.tensor([0.5 * (low + high)], dtype=torch.float64)
    )
    spacing = (high - low) / max(k - 1, 1)
    rho = torch.full((k,), -math.log(spacing), dtype=torch.float64)
    return mu, rho
