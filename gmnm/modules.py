"""The GMNM modules: an element-wise activation, a softmax for attention, and a vector layer."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from gmnm import functional as GF
from gmnm.config import BASE_NAMES, LINEAR_BASE, MODULE_BASE_PREFIX, GMNMConfig
from gmnm.fit import fit_mixture

logger = logging.getLogger(__name__)

# Calibration uses at most this many values per group: torch.quantile refuses huge inputs and a
# random sample of this size pins quantiles to well under a percent.
_CALIBRATION_SAMPLE = 1 << 20


def module_base_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{MODULE_BASE_PREFIX}{cls.__module__}.{cls.__qualname__}"


def _out_of_place(module: nn.Module) -> nn.Module:
    """In-place activations would overwrite the input the mixture still needs."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        setattr(module, "inplace", False)  # noqa: B010 (nn.Module types attributes as Tensor)
    return module


def fused_base_name(module: nn.Module) -> str | None:
    """The base name whose PyTorch function computes exactly what `module` does, if known.

    Matched by exact class (a subclass may override forward), so the fused kernels can take the
    replaced activation into their own pass and stay bit-exact.
    """
    cls = type(module)
    if cls is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}.get(cls)


class _MixtureParameters(nn.Module):
    """pi, mu, rho of shape (groups, K), kept in fp32 even when the model is cast to half.

    Mixture weights cancel each other in a trained module; rounded to bf16 they give errors of
    order 10, so `model.to(torch.bfloat16)` (or `.half()`) leaves these parameters (and their
    gradients) in fp32 while moving them to the new device; the kernels compute in fp32 and
    return the input's dtype. Casting to float64 is followed.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        if recurse:
            for module in self.children():
                module._apply(fn)

        def keep_full_precision(t: Tensor) -> Tensor:
            result = fn(t)
            half = (torch.float16, torch.bfloat16)
            if result.dtype in half and t.is_floating_point() and t.dtype not in half:
                return t.detach().to(result.device, copy=True)
            return result

        return super()._apply(keep_full_precision, recurse=False)

    def _init_mixture(self, groups: int, k: int, low: float, high: float) -> None:
        mu, rho = GF.initial_centres(k, low, high)
        self.pi = nn.Parameter(torch.zeros(groups, k))
        self.mu = nn.Parameter(mu.float().expand(groups, k).clone())
        self.rho = nn.Parameter(rho.float().expand(groups, k).clone())

    def _recentre(self, values: Tensor, dim: int) -> tuple[float, float]:
        """Put centres on the quantiles of `values` per group; return the pooled 1%..99% range."""
        groups, k = self.pi.shape
        v = values.detach().float().movedim(dim, -1)
        if groups == 1:
            per_group = v.reshape(1, -1)
        else:
            per_group = v.reshape(-1, groups, v.shape[-1] // groups).transpose(0, 1)
            per_group = per_group.reshape(groups, -1)
        if per_group.shape[1] > _CALIBRATION_SAMPLE:
            generator = torch.Generator().manual_seed(0)
            idx = torch.randint(per_group.shape[1], (_CALIBRATION_SAMPLE,), generator=generator)
            per_group = per_group[:, idx.to(per_group.device)]
        levels = (torch.arange(k, dtype=torch.float32, device=v.device) + 0.5) / k
        centres = torch.quantile(per_group, levels, dim=1).T  # (groups, K)
        spread = (centres[:, -1] - centres[:, 0]).clamp_min(1e-3) / max(k - 1, 1)
        with torch.no_grad():
            self.mu.copy_(centres)
            self.rho.copy_((-spread.log()).unsqueeze(1).expand(groups, k))
        pooled = per_group.flatten()[:_CALIBRATION_SAMPLE]
        bounds = torch.quantile(pooled, torch.tensor([0.01, 0.99], device=v.device))
        return float(bounds[0]), float(bounds[1])


class GMNMActivation(_MixtureParameters):
    """`y = base(x) + sum_k pi_k * exp(-0.5 * ((x - mu_k) * exp(rho_k))^2)`, element-wise.

    Args:
        num_components: K, the number of Gaussian components.
        base: a name from `gmnm.config.BASE_NAMES`, the replaced activation module itself,
            `"linear"` for a learned `a*x + c`, or None for the mixture alone.
        init: `"residual"` (pi = 0: exactly the base at step 0), `"fit"` (least-squares fit of
            mixture plus linear term to the base over `init_range`; the base is then dropped and
            `fit_max_error` holds the achieved max error), or `"random"` (training from scratch).
        channels, groups: one parameter set per group of `channels // groups` channels along the
            last dimension; `groups=1` (default) shares one set across the layer.
        init_range: where the components are spread at init (and the fit range).

    The parameters (pi, mu, rho, and a, c of a linear base) stay fp32 when the model is cast to
    bf16/fp16; half inputs are computed in fp32 and returned in their own dtype. Bases
    `"gelu"`, `"gelu_tanh"`, `"relu"`, `"silu"`, `"identity"`, `"linear"` and the exact torch
    modules `nn.GELU`, `nn.ReLU`, `nn.SiLU`, `nn.Identity` run in the same kernel pass as the
    mixture (see `gmnm.backends`); other bases are applied separately and added.
    """

    def __init__(
        self,
        num_components: int = 8,
        base: str | nn.Module | None = "gelu",
        init: str = "residual",
        channels: int | None = None,
        groups: int = 1,
        init_range: tuple[float, float] = (-3.0, 3.0),
    ) -> None:
        super().__init__()
        base_module = base if isinstance(base, nn.Module) else None
        base_name = module_base_name(base) if isinstance(base, nn.Module) else base
        self._config = GMNMConfig(
            num_components=num_components,
            base=base_name,
            init=init,
            channels=channels,
            groups=groups,
            init_range=init_range,
        )
        self.base_module = _out_of_place(base_module) if base_module is not None else None
        self.fit_max_error: float | None = None
        self._init_mixture(groups, num_components, *self._config.init_range)
        self._runtime_base = base_name
        if base_name == LINEAR_BASE:
            self._init_linear(groups, slope=1.0, intercept=0.0)
        if init == "fit":
            self._fit(*self._config.init_range)
        elif init == "random":
            self._randomise()

    @classmethod
    def from_config(
        cls, config: GMNMConfig, base_module: nn.Module | None = None
    ) -> GMNMActivation:
        """Rebuild a module from its config; a `module:` base needs the module passed in."""
        base: str | nn.Module | None = config.base
        if isinstance(config.base, str) and config.base.startswith(MODULE_BASE_PREFIX):
            if base_module is None:
                raise ValueError(
                    f"config base {config.base!r} is an activation module; pass it as base_module"
                )
            base = base_module
        return cls(
            num_components=config.num_components,
            base=base,
            init=config.init,
            channels=config.channels,
            groups=config.groups,
            init_range=config.init_range,
        )

    @property
    def config(self) -> GMNMConfig:
        return self._config

    def _init_linear(self, groups: int, slope: float, intercept: float) -> None:
        self.a = nn.Parameter(torch.full((groups,), slope))
        self.c = nn.Parameter(torch.full((groups,), intercept))

    def _base_function(self) -> Callable[[Tensor], Tensor]:
        if self.base_module is not None:
            return self.base_module
        assert isinstance(self._config.base, str) and self._config.base in BASE_NAMES
        return GF.BASE_FUNCTIONS[self._config.base]

    def _fit(self, low: float, high: float) -> None:
        groups = self.pi.shape[0]
        result = fit_mixture(self._base_function(), self.pi.shape[1], low, high)
        with torch.no_grad():
            self.pi.copy_(result.pi.expand(groups, -1))
            self.mu.copy_(result.mu.expand(groups, -1))
            self.rho.copy_(result.rho.expand(groups, -1))
        if not hasattr(self, "a"):
            self._init_linear(groups, result.a, result.c)
        else:
            with torch.no_grad():
                self.a.fill_(result.a)
                self.c.fill_(result.c)
        self._runtime_base = LINEAR_BASE
        self.fit_max_error = result.max_error

    def _randomise(self) -> None:
        groups, k = self.pi.shape
        low, high = self._config.init_range
        with torch.no_grad():
            self.pi.normal_(0.0, 1.0 / math.sqrt(k))
            self.mu.uniform_(low, high)

    def _check_channels(self, x: Tensor) -> None:
        """Refuse an input of another width than `channels`: the groups would silently span
        several channels each (or fail to divide them)."""
        channels = self._config.channels
        width = x.shape[-1] if x.dim() else 1
        if channels is None or width == channels:
            return
        raise ValueError(
            f"GMNMActivation was built for channels={channels} along the last dimension (groups="
            f"{self._config.groups}), but the input has {width} (shape {tuple(x.shape)}); build "
            f"it with channels={width} and groups dividing {width}, or leave channels unset "
            "(groups=1) to share one parameter set across any width"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._check_channels(x)
        if self._runtime_base == LINEAR_BASE:
            return GF.activation(x, self.pi, self.mu, self.rho, LINEAR_BASE, self.a, self.c)
        if self._runtime_base is None:
            return GF.activation(x, self.pi, self.mu, self.rho, None)
        if self.base_module is None:
            return GF.activation(x, self.pi, self.mu, self.rho, self._config.base)
        name = fused_base_name(self.base_module)
        if name is not None:
            return GF.activation(x, self.pi, self.mu, self.rho, name)
        return self.base_module(x) + GF.mixture(x, self.pi, self.mu, self.rho, dim=-1)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Re-centre the components on the quantiles of a sample of real inputs `x`.

        Meant for a freshly initialised module: in residual mode it stays exact (pi is still 0);
        with `init="fit"` the fit is redone over the sample's 1%..99% range.
        """
        if self._config.init == "residual" and bool(self.pi.detach().abs().max() > 0):
            raise ValueError(
                "calibrate() moves the components of a residual module that has already been "
                "trained (pi != 0) and would change its output; calibrate before training"
            )
        self._check_channels(x)
        low, high = self._recentre(x, dim=-1)
        if self._config.init == "fit" and high > low:
            self._fit(low, high)

    def extra_repr(self) -> str:
        base = self._config.base if self.base_module is None else "module"
        parts = [f"num_components={self.pi.shape[1]}", f"base={base}", f"init={self._config.init}"]
        if self.pi.shape[0] > 1:
            parts.append(f"groups={self.pi.shape[0]}")
        return ", ".join(parts)


class GMNMSoftmax(_MixtureParameters):
    """`softmax(s + G(s))` along `dim`, G a mixture initialised to zero (exact softmax at init).

    With `heads` given, each head (along `head_dim` of the input) has its own parameters.
    Masked entries (-inf) stay masked; a fully masked row gives zeros; computed in fp32. The
    parameters stay fp32 when the model is cast to bf16/fp16.
    """

    def __init__(
        self,
        dim: int = -1,
        num_components: int = 8,
        heads: int | None = None,
        head_dim: int = 1,
        init_range: tuple[float, float] = (-3.0, 3.0),
    ) -> None:
        super().__init__()
        self._config = GMNMConfig(
            num_components=num_components,
            base=None,
            init="residual",
            dim=dim,
            heads=heads,
            head_dim=head_dim,
            init_range=init_range,
        )
        self.dim = dim
        self.head_dim = head_dim
        self._init_mixture(heads or 1, num_components, *self._config.init_range)

    @classmethod
    def from_config(cls, config: GMNMConfig) -> GMNMSoftmax:
        return cls(
            dim=config.dim,
            num_components=config.num_components,
            heads=config.heads,
            head_dim=config.head_dim,
            init_range=config.init_range,
        )

    @property
    def config(self) -> GMNMConfig:
        return self._config

    def forward(self, scores: Tensor) -> Tensor:
        group_dim = self.head_dim if self.pi.shape[0] > 1 else -1
        if self.pi.shape[0] > 1 and scores.shape[group_dim] != self.pi.shape[0]:
            raise ValueError(
                f"GMNMSoftmax has parameters for {self.pi.shape[0]} heads but the scores have "
                f"{scores.shape[group_dim]} along head_dim={self.head_dim} (shape "
                f"{tuple(scores.shape)})"
            )
        return GF.gmnm_softmax(
            scores, self.pi, self.mu, self.rho, dim=self.dim, group_dim=group_dim
        )

    @torch.no_grad()
    def calibrate(self, scores: Tensor) -> None:
        """Re-centre the components on the quantiles of real (unmasked) attention scores."""
        if bool(self.pi.detach().abs().max() > 0):
            raise ValueError(
                "calibrate() would change a trained GMNMSoftmax; calibrate before training"
            )
        group_dim = self.head_dim if self.pi.shape[0] > 1 else -1
        finite = torch.where(
            torch.isfinite(scores) & (scores > torch.finfo(scores.dtype).min / 2), scores, torch.nan
        )
        filled = torch.where(finite.isnan(), finite.nanmedian(), finite)
        self._recentre(filled, dim=group_dim % scores.dim())

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_components={self.pi.shape[1]}, heads={self._config.heads}"


class GMNMLayer(nn.Module):
    """The vector (Augmented Gaussian Projection) form, for building networks from scratch.

    For `num_components` = m projections of rank `num_projections` = r:
    `y_i^2 = ||P_i (x - mu_i)||^2`, `G(x) = sum_i pi_i exp(-0.5 y_i^2)`, computed as one
    `Linear(d -> m*r)` (its bias plays the role of -P_i mu_i), a squared sum over r, the
    exponential, and one `Linear(m -> out)` holding the weights pi.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_components: int,
        num_projections: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if min(in_features, out_features, num_components, num_projections) < 1:
            raise ValueError(
                "GMNMLayer needs in_features, out_features, num_components and num_projections "
                f">= 1; got {in_features}, {out_features}, {num_components}, {num_projections}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.num_components = num_components
        self.num_projections = num_projections
        self.project = nn.Linear(in_features, num_components * num_projections)
        self.mix = nn.Linear(num_components, out_features, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-variance projections so that y^2 is O(num_projections) at init and the Gaussians
        # neither vanish nor saturate; centres spread like the inputs.
        nn.init.normal_(self.project.weight, std=1.0 / math.sqrt(self.in_features))
        nn.init.uniform_(self.project.bias, -1.0, 1.0)
        nn.init.normal_(self.mix.weight, std=1.0 / math.sqrt(self.num_components))
        if self.mix.bias is not None:
            nn.init.zeros_(self.mix.bias)

    def forward(self, x: Tensor) -> Tensor:
        projected = self.project(x)  # (..., m*r)
        projected = projected.unflatten(-1, (self.num_components, self.num_projections))
        squared = projected.pow(2).sum(-1)  # (..., m)
        return self.mix(torch.exp(-0.5 * squared))

    @property
    def config(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_components": self.num_components,
            "num_projections": self.num_projections,
            "bias": self.mix.bias is not None,
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_components={self.num_components}, num_projections={self.num_projections}"
        )
