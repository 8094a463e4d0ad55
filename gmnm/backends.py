"""Implementations of the mixture and how one is chosen.

Every backend computes exactly `gmnm.functional.mixture_reference` (the oracle in the tests);
all but `reference` save only the input and the parameters for backward and recompute the
Gaussians there, so no [..., K] tensor outlives the forward pass, and reduce the parameter
gradients per group inside the backward.

- `triton`: a Triton kernel with an explicit backward kernel, for CUDA tensors. If a kernel
  fails to compile or launch on a device, one warning is logged, the failure is remembered
  (`triton_failure`) and that device uses `recompute` from then on, forced or not.
- `cpp`: a C++/OpenMP kernel for CPU tensors, built on first use (`gmnm.cpu_kernel`); if the
  build fails, one warning is logged and `auto` moves on to `recompute`.
- `compile`: the `recompute` path under `torch.compile`. Never picked by `auto`: on CPU the C++
  kernel is faster and on CUDA the Triton kernel is; force it with `set_backend("compile")`.
- `recompute`: plain PyTorch, a loop over components in a custom autograd function. Runs
  everywhere; the fallback, and what runs inside a caller's `torch.compile` or `torch.export`
  (it is traceable, the kernels are not).
- `reference`: the broadcast oracle (K times the memory); for export and debugging.

The kernels also take the base activation into the same call (`functional.activation`): for
`FUSED_BASES` PyTorch computes the base itself (so residual modules stay bit-exact) and the
kernel adds the mixture in place; its backward adds the mixture's gradient to PyTorch's own
base gradient in place, so a GMNM activation holds no more memory than the activation it
replaced. A learned linear base `a*x + c` is computed inside the kernel.

`set_backend(name)` or the environment variable `GMNM_BACKEND` forces one; the default `auto`
takes the first backend in `AUTO_ORDER` that is available for the input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from gmnm import cpu_kernel
from gmnm.functional import (
    BASE_FUNCTIONS,
    LINEAR_BASE,
    Z_CLAMP,
    check_shapes,
    compute_dtype,
    linear_term,
    mixture_reference,
)

logger = logging.getLogger(__name__)

MixtureFn = Callable[[Tensor, Tensor, Tensor, Tensor, int], Tensor]
# (x, pi, mu, rho, dim, base, a, c) -> base(x) + mixture(x)
ActivationFn = Callable[
    [Tensor, Tensor, Tensor, Tensor, int, "str | None", "Tensor | None", "Tensor | None"], Tensor
]

# Bases the kernels take into their own pass; any other base is applied separately and added.
FUSED_BASES = ("gelu", "gelu_tanh", "relu", "silu", "identity")


@dataclass(frozen=True)
class Backend:
    """One implementation: whether it can run an input, and its mixture and activation.

    `available` says whether the backend can run the input when forced; `automatic` whether
    `auto` may pick it (None: the same as `available`).
    """

    name: str
    available: Callable[[Tensor], bool]
    run: MixtureFn
    activation: ActivationFn
    automatic: Callable[[Tensor], bool] | None = None


# ---------------------------------------------------------------------------------------------
# Shared helpers


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


def layout(x: Tensor, dim: int, groups: int) -> tuple[int, int, int]:
    """(C, inner, G): x seen as [outer, C, inner] with C channels along `dim`."""
    if x.dim() == 0:
        return 1, 1, groups
    dim = dim % x.dim()
    inner = 1
    for size in x.shape[dim + 1 :]:
        inner *= size
    return x.shape[dim], inner, groups


def base_forward(base: str, x: Tensor) -> Tensor:
    return BASE_FUNCTIONS[base](x)


def base_backward(base: str, grad: Tensor, x: Tensor) -> Tensor:
    """The gradient PyTorch's own autograd computes for a fused base, from the input x."""
    if base == "gelu":
        return torch.ops.aten.gelu_backward(grad, x, approximate="none")
    if base == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    if base == "relu":
        # relu's autograd thresholds its output, which is positive exactly where x is
        return torch.ops.aten.threshold_backward(grad, x, 0.0)
    if base == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if base == "identity":
        return grad.clone()
    raise ValueError(f"base {base!r} is not fused; fused bases are {', '.join(FUSED_BASES)}")


def compose(
    mixture_fn: MixtureFn,
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    dim: int,
    base: str | None,
    a: Tensor | None,
    c: Tensor | None,
) -> Tensor:
    """base(x) + mixture(x) with the base applied separately (the unfused form)."""
    y = mixture_fn(x, pi, mu, rho, dim)
    if base == LINEAR_BASE:
        assert a is not None and c is not None
        return linear_term(x, a, c, dim) + y
    if base is None:
        return y
    return base_forward(base, x) + y


# ---------------------------------------------------------------------------------------------
# recompute: plain PyTorch


def recompute_forward(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> Tensor:
    """The mixture by a loop over components, in the compute dtype, returned in x's dtype."""
    dtype = compute_dtype(x, pi)
    xf = x.to(dtype)
    scale = rho.to(dtype).exp()
    out = torch.zeros_like(xf)
    for k in range(pi.shape[1]):
        z = (xf - _channel_view(x, mu[:, k].to(dtype), dim)) * _channel_view(x, scale[:, k], dim)
        z = z.clamp(-Z_CLAMP, Z_CLAMP)
        out += _channel_view(x, pi[:, k].to(dtype), dim) * torch.exp(-0.5 * z * z)
    return out.to(x.dtype)


def recompute_backward(
    x: Tensor, grad_out: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the mixture for x, pi, mu, rho, recomputing the Gaussians."""
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
    )


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
        return recompute_forward(x, pi, mu, rho, dim)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, pi, mu, rho = ctx.saved_tensors  # type: ignore[attr-defined]
        return (*recompute_backward(x, grad_out, pi, mu, rho, ctx.dim), None)  # type: ignore[attr-defined]


def _recompute(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> Tensor:
    out: Tensor = _RecomputeMixture.apply(x, pi, mu, rho, dim)
    return out


def _recompute_activation(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    dim: int,
    base: str | None,
    a: Tensor | None,
    c: Tensor | None,
) -> Tensor:
    return compose(_recompute, x, pi, mu, rho, dim, base, a, c)


def _reference_activation(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    dim: int,
    base: str | None,
    a: Tensor | None,
    c: Tensor | None,
) -> Tensor:
    return compose(mixture_reference, x, pi, mu, rho, dim, base, a, c)


# ---------------------------------------------------------------------------------------------
# The kernels (cpp, triton): one autograd function, two sets of kernels


class KernelOps(Protocol):
    """What a fused kernel provides; see `gmnm.cpu_kernel` for the argument conventions."""

    def forward(
        self,
        x: Tensor,
        out: Tensor,
        layout: tuple[int, int, int],
        pi: Tensor,
        mu: Tensor,
        scale: Tensor,
        mode: int,
        a: Tensor | None = None,
        c: Tensor | None = None,
    ) -> None: ...

    def backward(
        self,
        x: Tensor,
        grad: Tensor,
        grad_x: Tensor,
        layout: tuple[int, int, int],
        pi: Tensor,
        mu: Tensor,
        scale: Tensor,
        mode: int,
        a: Tensor | None = None,
    ) -> Tensor: ...


@dataclass(frozen=True)
class _Kernel:
    ops: Any  # a module with `forward` and `backward` as in KernelOps
    # Input dtypes the kernel reads and writes directly; others go through the compute dtype.
    native: tuple[torch.dtype, ...]


def _storage_dtype(kernel: _Kernel, x: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel reads x in: x's own when native and consistent with `dtype`."""
    half = x.dtype in (torch.float16, torch.bfloat16)
    if x.dtype in kernel.native and (x.dtype == dtype or (half and dtype == torch.float32)):
        return x.dtype
    return dtype


class _KernelActivation(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        pi: Tensor,
        mu: Tensor,
        rho: Tensor,
        a: Tensor | None,
        c: Tensor | None,
        dim: int,
        base: str | None,
        kernel: _Kernel,
    ) -> Tensor:
        dtype = compute_dtype(x, pi)
        storage = _storage_dtype(kernel, x, dtype)
        shape = layout(x, dim, pi.shape[0])
        xs = x.contiguous().to(storage)
        pi_c, mu_c, scale = _kernel_params(pi, mu, rho, dtype)
        a_c = c_c = None

        # the buffer the mixture is added to: nothing, PyTorch's own base(x), or a*x + c
        if base is None:
            out, mode = torch.empty_like(xs), cpu_kernel.MODE_WRITE
        elif base == LINEAR_BASE:
            assert a is not None and c is not None
            out, mode = torch.empty_like(xs), cpu_kernel.MODE_LINEAR
            a_c, c_c = a.detach().to(dtype).contiguous(), c.detach().to(dtype).contiguous()
        else:
            out = base_forward(base, x.contiguous()).to(storage).contiguous()
            mode = cpu_kernel.MODE_ACCUMULATE

        kernel.ops.forward(xs, out, shape, pi_c, mu_c, scale, mode, a_c, c_c)
        linear = [a, c] if a is not None and c is not None else []
        ctx.save_for_backward(x, pi, mu, rho, *linear)
        ctx.dim, ctx.base, ctx.kernel, ctx.mode = dim, base, kernel, mode  # type: ignore[attr-defined]
        return out.to(x.dtype).view(x.shape)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, pi, mu, rho, *rest = ctx.saved_tensors  # type: ignore[attr-defined]
        a, c = rest if rest else (None, None)
        base: str | None = ctx.base  # type: ignore[attr-defined]
        kernel: _Kernel = ctx.kernel  # type: ignore[attr-defined]
        mode: int = ctx.mode  # type: ignore[attr-defined]
        dim: int = ctx.dim  # type: ignore[attr-defined]
        dtype = compute_dtype(x, pi)
        storage = _storage_dtype(kernel, x, dtype)
        shape = layout(x, dim, pi.shape[0])
        xs = x.contiguous().to(storage)
        grad = grad_out.to(x.dtype).contiguous()
        pi_c, mu_c, scale = _kernel_params(pi, mu, rho, dtype)
        a_c = a.detach().to(dtype).contiguous() if a is not None else None

        # the buffer the mixture's input gradient is added to, as in forward
        if mode == cpu_kernel.MODE_ACCUMULATE:
            assert base is not None
            grad_x = base_backward(base, grad, x.contiguous()).to(storage).contiguous()
        else:
            grad_x = torch.empty_like(xs)
        try:
            sums = kernel.ops.backward(
                xs, grad.to(storage), grad_x, shape, pi_c, mu_c, scale, mode, a_c
            )
        except KernelLaunchError:
            # the backward kernel compiles on its first use, after a forward that ran
            return _recomputed_gradients(x, pi, mu, rho, a, c, dim, base, grad_out)

        k = pi.shape[1]
        pi64, scale64 = pi.detach().double(), scale.double()
        grad_pi = sums[:, :k].to(pi.dtype)
        grad_mu = (pi64 * scale64 * sums[:, k : 2 * k]).to(mu.dtype)
        grad_rho = (-pi64 * sums[:, 2 * k : 3 * k]).to(rho.dtype)
        grad_a = grad_c = None
        if mode == cpu_kernel.MODE_LINEAR:
            assert a is not None
            grad_a = sums[:, 3 * k].to(a.dtype)
            grad_c = sums[:, 3 * k + 1].to(a.dtype)
        grad_input = grad_x.to(x.dtype).view(x.shape)
        return grad_input, grad_pi, grad_mu, grad_rho, grad_a, grad_c, None, None, None


def _recomputed_gradients(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    a: Tensor | None,
    c: Tensor | None,
    dim: int,
    base: str | None,
    grad_out: Tensor,
) -> tuple[Tensor | None, ...]:
    """`_KernelActivation.backward`'s gradients by the plain path, for a kernel that failed."""
    linear = [a, c] if a is not None and c is not None else []
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (x, pi, mu, rho, *linear)]
        x_in, pi_in, mu_in, rho_in = inputs[:4]
        a_in, c_in = (inputs[4], inputs[5]) if linear else (None, None)
        out = _recompute_activation(x_in, pi_in, mu_in, rho_in, dim, base, a_in, c_in)
        grads = torch.autograd.grad(out, inputs, grad_out)
    grad_a, grad_c = (grads[4], grads[5]) if linear else (None, None)
    return (*grads[:4], grad_a, grad_c, None, None, None)


def _kernel_params(pi: Tensor, mu: Tensor, rho: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    pi_c = pi.detach().to(dtype).contiguous()
    mu_c = mu.detach().to(dtype).contiguous()
    scale = rho.detach().to(dtype).exp().contiguous()
    return pi_c, mu_c, scale


def _kernel_activation(kernel: _Kernel) -> ActivationFn:
    def run(
        x: Tensor,
        pi: Tensor,
        mu: Tensor,
        rho: Tensor,
        dim: int,
        base: str | None,
        a: Tensor | None,
        c: Tensor | None,
    ) -> Tensor:
        if x.numel() == 0:
            return _recompute_activation(x, pi, mu, rho, dim, base, a, c)
        if base is not None and base != LINEAR_BASE and base not in FUSED_BASES:
            return compose(_kernel_mixture(kernel), x, pi, mu, rho, dim, base, a, c)
        out: Tensor = _KernelActivation.apply(x, pi, mu, rho, a, c, dim, base, kernel)
        return out

    return run


def _kernel_mixture(kernel: _Kernel) -> MixtureFn:
    activation = _kernel_activation(kernel)

    def run(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> Tensor:
        return activation(x, pi, mu, rho, dim, None, None, None)

    return run


# ---------------------------------------------------------------------------------------------
# cpp

_CPP = _Kernel(cpu_kernel, native=(torch.float32, torch.float64, torch.bfloat16))


def _cpp_available(x: Tensor) -> bool:
    return cpu_kernel.supports(x) and cpu_kernel.library() is not None


# ---------------------------------------------------------------------------------------------
# triton

_triton_import_error: str | None = None
_TRITON: _Kernel | None = None
# device ("cuda:0") -> why the Triton kernels failed there; that device uses `recompute`
_triton_failures: dict[str, str] = {}


class KernelLaunchError(RuntimeError):
    """A fused kernel failed to compile or launch; the caller computes with the plain path."""


class _GuardedTritonOps:
    """`gmnm.triton_kernels`, with a failure to compile or launch remembered for the device,
    logged once, and raised as `KernelLaunchError`."""

    def __init__(self, kernels: Any) -> None:
        self.kernels = kernels

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> None:
        self._call(self.kernels.forward, x, *args, **kwargs)

    def backward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out: Tensor = self._call(self.kernels.backward, x, *args, **kwargs)
        return out

    def _call(self, kernel: Callable[..., Any], x: Tensor, *args: Any, **kwargs: Any) -> Any:
        try:
            return kernel(x, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # the device is full, not unable to run the kernel
        except Exception as error:
            # Triton's compiler and driver fail in many types (its own TritonError, RuntimeError
            # from the driver, ValueError for pointers it cannot use, AssertionError from code
            # generation, OSError from ptxas); each means the kernel cannot run on this device
            _remember_triton_failure(x.device, error)
            raise KernelLaunchError(str(error)) from error


def _remember_triton_failure(device: torch.device, error: BaseException) -> None:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0]}" if lines else repr(error)
    _triton_failures[str(device)] = reason
    logger.warning(
        "the GMNM Triton kernel failed to compile or launch on %s (%s); falling back to the "
        "plain PyTorch path on that device, which is slower. Set GMNM_BACKEND=recompute to "
        "choose the plain path explicitly.",
        device,
        reason,
    )


def triton_failure(device: torch.device | str) -> str | None:
    """Why the Triton kernels failed on `device`, once they have; None otherwise."""
    return _triton_failures.get(str(device))


def reset_triton_failures() -> None:
    """Forget the devices where the Triton kernels failed, so that the next use tries again."""
    _triton_failures.clear()


def _triton_kernel() -> _Kernel | None:
    """The Triton kernels, imported on first use; None when triton cannot be imported."""
    global _TRITON, _triton_import_error
    if _TRITON is None and _triton_import_error is None:
        try:
            from gmnm import triton_kernels
        except ImportError as error:
            _triton_import_error = str(error)
            logger.info("Triton is not importable (%s); CUDA inputs use another backend", error)
            return None
        native = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        _TRITON = _Kernel(_GuardedTritonOps(triton_kernels), native=native)
    return _TRITON


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_automatic(x: Tensor) -> bool:
    return x.is_cuda and _triton_kernel() is not None and triton_failure(x.device) is None


def _triton_available(x: Tensor) -> bool:
    if x.device.type == "cpu" and triton_interpreting():
        return _triton_kernel() is not None
    return _triton_automatic(x)


def _triton_activation(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    dim: int,
    base: str | None,
    a: Tensor | None,
    c: Tensor | None,
) -> Tensor:
    kernel = _triton_kernel()
    assert kernel is not None
    if triton_failure(x.device) is None:
        try:
            return _kernel_activation(kernel)(x, pi, mu, rho, dim, base, a, c)
        except KernelLaunchError:
            pass  # logged and remembered: this device takes the plain path from now on
    return _recompute_activation(x, pi, mu, rho, dim, base, a, c)


def _triton_mixture(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> Tensor:
    return _triton_activation(x, pi, mu, rho, dim, None, None, None)


# ---------------------------------------------------------------------------------------------
# compile: the recompute path under torch.compile

_compiled: Callable[..., Tensor] | None = None
_compile_failure: str | None = None


def _compile_activation(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    dim: int,
    base: str | None,
    a: Tensor | None,
    c: Tensor | None,
) -> Tensor:
    global _compiled, _compile_failure
    if _compile_failure is None:
        if _compiled is None:
            _compiled = torch.compile(_recompute_activation, dynamic=False)
        try:
            return _compiled(x, pi, mu, rho, dim, base, a, c)
        except (RuntimeError, OSError) as error:
            _compile_failure = str(error).strip().splitlines()[0] if str(error) else repr(error)
            logger.warning(
                "torch.compile failed for the GMNM mixture (%s); using the plain PyTorch path",
                _compile_failure,
            )
    return _recompute_activation(x, pi, mu, rho, dim, base, a, c)


def _compile_mixture(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int) -> Tensor:
    return _compile_activation(x, pi, mu, rho, dim, None, None, None)


# ---------------------------------------------------------------------------------------------
# Registry and dispatch

BACKENDS: dict[str, Backend] = {
    "triton": Backend(
        "triton", _triton_available, _triton_mixture, _triton_activation, _triton_automatic
    ),
    "cpp": Backend("cpp", _cpp_available, _kernel_mixture(_CPP), _kernel_activation(_CPP)),
    "compile": Backend(
        "compile", lambda x: True, _compile_mixture, _compile_activation, lambda x: False
    ),
    "recompute": Backend("recompute", lambda x: True, _recompute, _recompute_activation),
    "reference": Backend("reference", lambda x: True, mixture_reference, _reference_activation),
}
AUTO_ORDER: list[str] = ["triton", "cpp", "recompute"]

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
    if name == "reference":
        return BACKENDS[name]
    if torch.compiler.is_compiling():
        # Inside a caller's torch.compile or torch.export only traceable code can run; the
        # plain path is, and the compiler fuses it.
        return BACKENDS["recompute"]
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"GMNM_BACKEND={name!r} is not a backend; valid: auto, {', '.join(BACKENDS)}"
            )
        backend = BACKENDS[name]
        if not backend.available(x):
            reason = f": {cpu_kernel.failure()}" if name == "cpp" and cpu_kernel.failure() else ""
            raise RuntimeError(
                f"GMNM backend {name!r} is not available for this input ({x.device}, {x.dtype})"
                f"{reason}; use set_backend('auto') to let GMNM choose"
            )
        return backend
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        automatic = backend.automatic or backend.available
        if automatic(x):
            return backend
    return BACKENDS["recompute"]


def dispatch(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, dim: int = -1) -> Tensor:
    check_shapes(x, pi, mu, rho, dim)
    dim = dim % x.dim() if x.dim() else 0
    return select(x).run(x, pi, mu, rho, dim)


def dispatch_activation(
    x: Tensor,
    pi: Tensor,
    mu: Tensor,
    rho: Tensor,
    base: str | None,
    a: Tensor | None = None,
    c: Tensor | None = None,
    dim: int = -1,
) -> Tensor:
    check_shapes(x, pi, mu, rho, dim)
    if base == LINEAR_BASE and (a is None or c is None):
        raise ValueError("base='linear' needs the slope a and intercept c, each of shape (G,)")
    if base is not None and base != LINEAR_BASE and base not in BASE_FUNCTIONS:
        raise ValueError(
            f"unknown base {base!r}; valid: {', '.join(BASE_FUNCTIONS)}, {LINEAR_BASE!r}, None"
        )
    dim = dim % x.dim() if x.dim() else 0
    return select(x).activation(x, pi, mu, rho, dim, base, a, c)
