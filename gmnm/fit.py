"""Least-squares fit of a mixture plus a linear term to a fixed activation (`init="fit"`).

The mixture weights and the linear term enter linearly, so for given centres and widths they are
solved exactly (ridge least squares); L-BFGS moves only the centres and widths through that
solution (variable projection). This reaches errors around 1e-3 at K = 8 in well under a second,
where plain gradient descent on all parameters stalls orders of magnitude higher.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gmnm.functional import initial_centres

logger = logging.getLogger(__name__)

_GRID_POINTS = 1025
_CHECK_POINTS = 8193
# Keeps the solve well conditioned and the weights bounded: large cancelling weights are exact in
# fp64 and useless in fp32/bf16.
_RIDGE = 1e-9


@dataclass(frozen=True)
class FitResult:
    """Fitted parameters (fp32, shape (K,) and scalars) and the max error on the fit range."""

    pi: Tensor
    mu: Tensor
    rho: Tensor
    a: float
    c: float
    max_error: float


_CACHE: dict[tuple[str, int, float, float], FitResult] = {}


def fit_mixture(
    fn: Callable[[Tensor], Tensor], num_components: int, low: float, high: float
) -> FitResult:
    """Fit `sum_k pi_k exp(-0.5((x-mu_k)s_k)^2) + a*x + c` to `fn` on [low, high].

    Results are cached by the function's values on the grid, so converting a model with many
    identical activations fits once.
    """
    grid = torch.linspace(low, high, _GRID_POINTS, dtype=torch.float64)
    with torch.no_grad():
        target = fn(grid.float()).double()
    key = (hashlib.sha256(target.numpy().tobytes()).hexdigest(), num_components, low, high)
    if key not in _CACHE:
        _CACHE[key] = _fit(fn, grid, target, num_components, low, high)
    return _CACHE[key]


def _design(x: Tensor, mu: Tensor, rho: Tensor) -> Tensor:
    z = (x[:, None] - mu[None, :]) * rho.exp()[None, :]
    gaussians = torch.exp(-0.5 * z * z)
    return torch.cat([gaussians, x[:, None], torch.ones_like(x)[:, None]], dim=1)


def _solve(design: Tensor, target: Tensor) -> Tensor:
    gram = design.T @ design
    ridge = _RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, design.T @ target)


def _fit(
    fn: Callable[[Tensor], Tensor],
    grid: Tensor,
    target: Tensor,
    k: int,
    low: float,
    high: float,
) -> FitResult:
    mu0, rho0 = initial_centres(k, low, high)
    mu = mu0.clone().requires_grad_(True)
    rho = rho0.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [mu, rho], lr=1.0, max_iter=400, tolerance_grad=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        design = _design(grid, mu, rho)
        loss = ((design @ _solve(design, target) - target) ** 2).mean()
        loss.backward()
        return loss

    optimizer.step(closure)

    with torch.no_grad():
        weights = _solve(_design(grid, mu, rho), target)
        check = torch.linspace(low, high, _CHECK_POINTS, dtype=torch.float64)
        approx = _design(check, mu, rho) @ weights
        max_error = (approx - fn(check.float()).double()).abs().max().item()
    logger.debug("fitted %d components on [%g, %g]: max error %.3g", k, low, high, max_error)
    return FitResult(
        pi=weights[:k].float(),
        mu=mu.detach().float(),
        rho=rho.detach().float(),
        a=weights[k].item(),
        c=weights[k + 1].item(),
        max_error=max_error,
    )
