"""Checks of the Triton kernels on the CPU, through Triton's interpreter.

`test_backends.py` runs this file in a subprocess with `TRITON_INTERPRET=1`: the interpreter is
chosen when the kernels are defined, so it cannot be switched on inside a running test
session. Every check compares the `triton` backend with the reference; the script prints one
line per check and exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import gmnm
from gmnm import functional as GF
from gmnm.backends import select, triton_failure

# (shape, dim, groups, base): shared, grouped and per-channel parameters along several dims
CASES = [
    ((3, 4, 6), -1, 1, "gelu"),
    ((3, 4, 6), -1, 3, "linear"),
    ((3, 4, 6), -1, 6, None),
    ((3, 4, 6), 1, 4, "silu"),
    ((3, 4, 6), 0, 3, "linear"),
    ((5, 70), -1, 70, "relu"),
    ((2, 3, 5, 7), 1, 1, "gelu_tanh"),
]


def _inputs(
    shape: tuple[int, ...], groups: int, base: str | None, dtype: torch.dtype, k: int = 3
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 2
    pi = torch.randn(groups, k, generator=generator, dtype=dtype)
    mu = torch.randn(groups, k, generator=generator, dtype=dtype)
    rho = torch.randn(groups, k, generator=generator, dtype=dtype) * 0.3
    tensors = [x, pi, mu, rho]
    if base == "linear":
        tensors += [torch.randn(groups, generator=generator, dtype=dtype) for _ in range(2)]
    return tuple(t.requires_grad_() for t in tensors)


def _run(
    inputs: tuple[torch.Tensor, ...], base: str | None, dim: int, backend: str
) -> torch.Tensor:
    gmnm.set_backend(backend)
    x, pi, mu, rho, *ac = inputs
    a, c = ac if ac else (None, None)
    return GF.activation(x, pi, mu, rho, base, a, c, dim=dim)


def check_values_and_gradients_match_the_reference() -> None:
    for shape, dim, groups, base in CASES:
        inputs = _inputs(shape, groups, base, torch.float64)
        grad = torch.randn(shape, dtype=torch.float64)
        outputs = {}
        for backend in ("triton", "reference"):
            out = _run(inputs, base, dim, backend)
            outputs[backend] = (out, torch.autograd.grad(out, inputs, grad))
        (out_t, grads_t), (out_r, grads_r) = outputs["triton"], outputs["reference"]
        torch.testing.assert_close(out_t, out_r, rtol=1e-12, atol=1e-12)
        for got, expected in zip(grads_t, grads_r, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
        print(f"values and gradients match: {shape} dim={dim} groups={groups} base={base}")


def check_gradcheck_in_float64() -> None:
    for shape, dim, groups, base in CASES[:5]:
        inputs = _inputs(shape, groups, base, torch.float64)

        def fn(*args: torch.Tensor, base: str | None = base, dim: int = dim) -> torch.Tensor:
            return _run(args, base, dim, "triton")

        # fast mode (random projections): the interpreter runs each kernel launch in numpy
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
        print(f"gradcheck passes: {shape} dim={dim} groups={groups} base={base}")


def check_half_inputs_are_computed_in_fp32() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape, dim, groups, base in CASES[:3]:
            x, pi, mu, rho, *ac = _inputs(shape, groups, base, torch.float32)
            inputs = (x.detach().to(dtype).requires_grad_(), pi, mu, rho, *ac)
            out = _run(inputs, base, dim, "triton")
            expected = _run(inputs, base, dim, "reference")
            assert out.dtype == dtype, (out.dtype, dtype)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
            out.float().sum().backward()
            assert x.grad is None and inputs[0].grad is not None
            assert inputs[0].grad.dtype == dtype and pi.grad is not None
    print("half inputs: computed in fp32, returned and differentiated in their own dtype")


def check_residual_modules_are_exact() -> None:
    gmnm.set_backend("triton")
    x = torch.randn(4, 33) * 4
    for base in (nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()):
        assert torch.equal(gmnm.GMNMActivation(8, base=base)(x), base(x)), base
    print("residual modules are exact")


def check_an_input_of_another_width_than_channels_is_refused() -> None:
    gmnm.set_backend("triton")
    module = gmnm.GMNMActivation(4, base="gelu", channels=12, groups=12, init="random")
    module(torch.randn(2, 12))
    try:
        module(torch.randn(2, 24))
    except ValueError as error:
        assert "channels=12" in str(error) and "the input has 24" in str(error), error
    else:
        raise AssertionError("a 24-channel input was accepted by a 12-channel module")
    print("an input of another width than channels is refused")


def check_nothing_of_size_k_is_saved() -> None:
    gmnm.set_backend("triton")
    x = torch.randn(64, 10, requires_grad=True)
    module = gmnm.GMNMActivation(16, base="gelu", channels=10, groups=10, init="random")
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    # x itself and the (10, 16) parameters; a broadcast would save (64, 10, 16)
    assert all(s == x.shape or s.numel() <= module.pi.numel() for s in saved), saved
    print(f"saved for backward: {[tuple(s) for s in saved]}")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    assert select(torch.zeros(1)).name != "triton", "auto must not pick Triton for CPU tensors"
    check_values_and_gradients_match_the_reference()
    check_gradcheck_in_float64()
    check_half_inputs_are_computed_in_fp32()
    check_residual_modules_are_exact()
    check_an_input_of_another_width_than_channels_is_refused()
    check_nothing_of_size_k_is_saved()
    # a kernel that failed would have fallen back to the plain path and matched the reference
    assert triton_failure("cpu") is None, f"the Triton kernels failed: {triton_failure('cpu')}"
    print("all Triton checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
