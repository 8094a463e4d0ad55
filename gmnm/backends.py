"""Implementations of the mixture and how one is chosen.

Every backend computes exactly `gmnm.functional.mixture_reference` (the oracle in the tests) but
saves only the input and the parameters for backward and recomputes the Gaussians there, so no
[..., K] tensor outlives the forward pass.

- `recompute`: plain PyTorch, a loop over components in a custom autograd function. Runs
  everywhere; the fallback.
- `reference`: the broadcast oracle (K times the memory); for export and debugging.

`set_backend(name)` or the environment variable `GMNM_BACKEND` forces one; the default `auto`
takes the first backend in `AUTO_ORDER` that is available for the input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gmnm.functional import Z_CLAMP, check_shapes, compute_dtype, mixture_reference

logger = logging.getLogger(__name__)

MixtureFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[Tensor], bool]
    run: MixtureFn


def group_sum(t: Tensor, groups: int, dim: int) -> Tensor:
    """Sum t over every element of each parameter group: shape (groups,)."""
    if groups == 1:
        return t.sum().reshape(1)
    per_channel = t.movedim(dim, -1).reshape(-1, t.shape[dim]).sum(0)
    return per_channel.reshape(groups, -1).sum(1)


def _channel_view(x: Tensor, values: Tensor, dim: int) -> Tensor:
    """Per-group values (G,) broadcast against x along dim."""
    groups = values.shape[0]
    if groups == 1:
        return values.reshape(())
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return values.repeat_interleave(x.shape[dim] // groups).reshape(shape)


class _RecomputeMixture(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        pi: Tensor,
        mu: Tensor,
        rho: Tensor,
        dim: int,
    ) -> Tensor:
        ctx.save_for_backward(x, pi, mu, rho)
        ctx.dim = dim  # type: ignore[attr-defined]
        dtype = compute_dtype(x, pi)
        xf = x.to(dtype)
        scale = rho.to(dtype).exp()
        out = torch.zeros_like(xf)
        for k in range(pi.shape[1]):
            z = (xf - _channel_view(x, mu[:, k].to(dtype), dim)) * _channel_view(
                x, scale[:, k], dim
            )
            z = z.clamp(-Z_CLAMP, Z_CLAMP)
            out += _channel_view(x, pi[:, k].to(dtype), dim) * torch.exp(-0.5 * z * z)
        return out.to(x.dtype)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, pi, mu, rho = ctx.saved_tensors  # type: ignore[attr-defined]
        dim: int = ctx.dim  # type: ignore[attr-defined]
        dtype = compute_dtype(x, pi)
        xf = x.to(dtype)
        g = grad_out.to(dtype)
        scale = rho.to(dtype).exp()
        groups, k_total = pi.shape
        grad_x = torch.zeros_like(xf)
        grad_pi, grad_mu, grad_rho = (
            torch.zeros(pi.shape, dtype=dtype, device=x.device) for _ in range(3)
        )
        for k in range(k_total):
            s_k = _channel_view(x, scale[:, k], dim)
            z = ((xf - _channel_view(x, mu[:, k].to(dtype), dim)) * s_k).clamp(-Z_CLAMP, Z_CLAMP)
            e = torch.exp(-0.5 * z * z)
            grad_pi[:, k] = group_sum(g * e, groups, dim)
            # dG/dz for this component, times the incoming gradient
            t = g * e * z * _channel_view(x, -pi[:, k].to(dtype), dim)
            grad_x += t * s_k
            grad_mu[:, k] = -group_sum(t, groups, dim) * scale[:, k]
            grad_rho[:, k] = group_sum(t * z, groups, dim)
        return (
            grad_x.to(x.dtype),
            grad_pi.to(pi.dtype),
            grad_mu.to(mu.dtype),
            grad_rho.to(rho.dtype),
            None,
        )


def _recompute(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> Tensor:
    out: Tensor = _RecomputeMixture.apply(x, pi, mu, rho, dim)
    return out


BACKENDS: dict[str, Backend] = {
    "recompute": Backend("recompute", lambda x: True, _recompute),
    "reference": Backend("reference", lambda x: True, mixture_reference),
}
AUTO_ORDER: list[str] = ["recompute"]

_forced: str | None = None


def set_backend(name: str | None) -> None:
    """Force one backend for every mixture (None or "auto" restores automatic choice)."""
    global _forced
    if name in (None, "auto"):
        _forced = None
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown GMNM backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    _forced = name


def get_backend() -> str:
    """The forced backend's name, or "auto"."""
    return _forced or os.environ.get("GMNM_BACKEND") or "auto"


def select(x: Tensor) -> Backend:
    """The backend `dispatch` would use for this input."""
    name = get_backend()
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"GMNM_BACKEND={name!r} is not a backend; valid: auto, {', '.join(BACKENDS)}"
            )
        backend = BACKENDS[name]
        if not backend.available(x):
            raise RuntimeError(
                f"GMNM backend {name!r} is not available for this input ({x.device}, {x.dtype})"
            )
        return backend
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        if backend.available(x):
            return backend
    return BACKENDS["recompute"]


def dispatch(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int = -1) -> Tensor:
    check_shapes(x, pi, mu, rho, dim)
    dim = dim % x.dim()
    return select(x).run(x, pi, mu, rho, dim)
