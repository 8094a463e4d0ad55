"""Every backend of the mixture against the reference: values, gradients, dtypes, memory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import gmnm
from gmnm import backends, cpu_kernel
from gmnm import functional as GF

REPO = Path(__file__).resolve().parents[2]

# (shape, dim, groups, base): shared, grouped and per-channel parameters, along the last and
# other dimensions, with the fused bases and the learned linear base
CASES = [
    ((3, 4, 6), -1, 1, "gelu"),
    ((3, 4, 6), -1, 1, None),
    ((3, 4, 6), -1, 3, "linear"),
    ((3, 4, 6), -1, 6, "gelu"),
    ((3, 4, 6), -1, 6, "linear"),
    ((3, 4, 6), 1, 4, None),
    ((3, 4, 6), 1, 2, "silu"),
    ((3, 4, 6), 0, 3, "linear"),
    ((2, 3, 5), 1, 1, "relu"),
    ((70,), 0, 70, "gelu_tanh"),
    ((2, 5), -1, 1, "tanh"),
]
CASE_IDS = [f"{shape}-dim{dim}-groups{g}-{base}" for shape, dim, g, base in CASES]


def make_inputs(
    shape: tuple[int, ...],
    groups: int,
    base: str | None,
    dtype: torch.dtype = torch.float64,
    k: int = 3,
    seed: int = 0,
) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=dtype) * 2
    pi = torch.randn(groups, k, generator=generator, dtype=dtype)
    mu = torch.randn(groups, k, generator=generator, dtype=dtype)
    rho = torch.randn(groups, k, generator=generator, dtype=dtype) * 0.3
    tensors = [x, pi, mu, rho]
    if base == "linear":
        tensors += [torch.randn(groups, generator=generator, dtype=dtype) for _ in range(2)]
    return tuple(t.requires_grad_() for t in tensors)


def activation_fn(base: str | None, dim: int) -> Callable[..., Tensor]:
    def fn(x: Tensor, pi: Tensor, mu: Tensor, rho: Tensor, *ac: Tensor) -> Tensor:
        a, c = ac if ac else (None, None)
        return GF.activation(x, pi, mu, rho, base, a, c, dim=dim)

    return fn


@pytest.mark.parametrize("backend", ["cpp", "recompute", "reference"])
@pytest.mark.parametrize(("shape", "dim", "groups", "base"), CASES, ids=CASE_IDS)
def test_backend_passes_gradcheck_and_matches_the_reference_in_float64(
    backend: str, shape: tuple[int, ...], dim: int, groups: int, base: str | None
) -> None:
    inputs = make_inputs(shape, groups, base)
    fn = activation_fn(base, dim)
    expected = GF.activation_reference(*inputs[:4], base, *inputs[4:], dim=dim)
    grad = torch.randn(shape, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, inputs, grad)

    gmnm.set_backend(backend)
    assert backends.select(inputs[0]).name == backend
    out = fn(*inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, inputs, grad), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("shape", "dim", "groups", "base"), [CASES[7]], ids=[CASE_IDS[7]])
def test_compile_backend_passes_gradcheck_in_float64(
    shape: tuple[int, ...], dim: int, groups: int, base: str | None
) -> None:
    inputs = make_inputs(shape, groups, base)
    fn = activation_fn(base, dim)
    expected = GF.activation_reference(*inputs[:4], base, *inputs[4:], dim=dim)
    gmnm.set_backend("compile")
    torch.testing.assert_close(fn(*inputs), expected, rtol=1e-12, atol=1e-12)
    # fast mode (random projections) keeps this to one compiled graph per direction
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    assert backends._compile_failure is None


def test_models_with_gmnm_modules_export_and_compile_with_fullgraph() -> None:
    # inside a caller's torch.export / torch.compile the traceable plain path runs
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 12),
        gmnm.GMNMActivation(4, base=nn.GELU(), channels=12, groups=12, init="random"),
        nn.Linear(12, 6),
    )
    x = torch.randn(5, 8)
    eager = model(x)
    eager_grad = torch.autograd.grad(eager.sum(), model[1].pi)[0]

    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), eager)

    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), model[1].pi)[0], eager_grad)


def test_triton_kernels_match_the_reference_under_the_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_interpreted.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all Triton checks passed" in result.stdout


def test_cpu_kernel_reduces_parameter_gradients_across_threads() -> None:
    # large enough for two threads and many chunks and flushes of the partial sums
    torch.set_num_threads(2)
    for shape, dim, groups in [((64, 2048), -1, 1), ((16, 8, 1024), 1, 8), ((128, 1024), -1, 1024)]:
        x32, pi, mu, rho, a, c = make_inputs(shape, groups, "linear", torch.float32, k=8)
        grad = torch.randn(shape)
        gmnm.set_backend("cpp")
        out = GF.activation(x32, pi, mu, rho, "linear", a, c, dim=dim)
        got = torch.autograd.grad(out, (x32, pi, mu, rho, a, c), grad)

        inputs64 = [t.detach().double().requires_grad_() for t in (x32, pi, mu, rho, a, c)]
        ref = GF.activation_reference(*inputs64[:4], "linear", *inputs64[4:], dim=dim)
        want = torch.autograd.grad(ref, inputs64, grad.double())
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        for g, w in zip(got, want, strict=True):
            scale = w.abs().max().item()
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("backend", ["cpp", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_fp32_and_returned_in_their_dtype(
    backend: str, dtype: torch.dtype
) -> None:
    x, pi, mu, rho = make_inputs((4, 6, 40), 40, "gelu", torch.float32)
    xh = x.detach().to(dtype).requires_grad_()
    gmnm.set_backend(backend)
    out = GF.activation(xh, pi, mu, rho, "gelu")
    expected = GF.activation_reference(xh, pi, mu, rho, "gelu")
    assert out.dtype == dtype
    # the reference adds the base and the mixture in the half dtype; the kernels add in fp32
    torch.testing.assert_close(out, expected, rtol=1e-2, atol=2e-2)
    out.float().square().sum().backward()
    assert xh.grad is not None and xh.grad.dtype == dtype
    assert pi.grad is not None and pi.grad.dtype == torch.float32


def saved_tensors(fn: Callable[[], Tensor]) -> list[tuple[torch.Size, int]]:
    """Shape and storage address of every tensor autograd saves while running fn."""
    saved: list[tuple[torch.Size, int]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append((t.shape, t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn().sum().backward()
    return saved


@pytest.mark.parametrize("backend", ["cpp", "recompute"])
@pytest.mark.parametrize("groups", [1, 10])
def test_only_the_input_and_the_parameters_are_saved_for_backward(
    backend: str, groups: int
) -> None:
    gmnm.set_backend(backend)
    x = torch.randn(64, 10, requires_grad=True)
    module = gmnm.GMNMActivation(16, base="gelu", channels=10, groups=groups, init="random")
    saved = saved_tensors(lambda: module(x))
    # a broadcast would save (64, 10, 16); x may be saved more than once (by the mixture and by
    # the unfused base), but always as x itself, never a copy
    assert saved and all(s in (x.shape, module.pi.shape) for s, _ in saved), saved
    assert {p for s, p in saved if s == x.shape} == {x.untyped_storage().data_ptr()}


def test_the_reference_does_save_a_tensor_of_size_k() -> None:
    # shows that the saved-tensor check above can fail
    gmnm.set_backend("reference")
    x = torch.randn(64, 10, requires_grad=True)
    saved = saved_tensors(lambda: gmnm.GMNMActivation(16, base="gelu", init="random")(x))
    assert (64, 10, 16) in [tuple(s) for s, _ in saved]


def test_auto_picks_the_cpu_kernel_for_cpu_tensors() -> None:
    assert backends.select(torch.zeros(3)).name == "cpp"
    assert backends.select(torch.zeros(3, dtype=torch.bfloat16)).name == "cpp"


def test_unknown_or_unavailable_backends_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid: auto, triton, cpp, compile, recompute"):
        gmnm.set_backend("fast")
    if backends.triton_interpreting():
        pytest.fail("TRITON_INTERPRET must not be set for the in-process tests")
    gmnm.set_backend("triton")
    with pytest.raises(RuntimeError, match="not available for this input"):
        GF.mixture(torch.zeros(3), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def test_a_failing_cpu_build_falls_back_to_plain_pytorch_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from torch.utils import cpp_extension

    def failing_load(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error building extension 'gmnm_mixture_cpu'")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    cpu_kernel.reset()
    try:
        x = torch.randn(5, 7, requires_grad=True)
        module = gmnm.GMNMActivation(4, base="gelu", init="random")
        with caplog.at_level(logging.WARNING, logger="gmnm"):
            first = module(x)
            first.sum().backward()
            second = module(x)
        warnings = [r for r in caplog.records if r.name == "gmnm.cpu_kernel"]
        assert len(warnings) == 1
        assert "could not be built" in warnings[0].getMessage()
        assert backends.select(x).name == "recompute"
        expected = GF.activation_reference(x, module.pi, module.mu, module.rho, "gelu")
        torch.testing.assert_close(first, expected)
        torch.testing.assert_close(second, expected)
        gmnm.set_backend("cpp")
        with pytest.raises(RuntimeError, match="Error building extension"):
            module(x)
    finally:
        monkeypatch.undo()
        cpu_kernel.reset()
    assert backends.select(torch.zeros(3)).name == "cpp"


@pytest.fixture
def triton_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The triton backend forced on CPU tensors, where its kernels cannot launch without the
    interpreter, as on a GPU whose driver or compiler fails them."""
    monkeypatch.setattr(backends, "triton_interpreting", lambda: True)
    backends.reset_triton_failures()
    gmnm.set_backend("triton")
    yield
    backends.reset_triton_failures()


def test_a_triton_kernel_that_fails_to_launch_falls_back_to_plain_pytorch_with_one_warning(
    triton_on_the_cpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gmnm import triton_kernels

    def failing_launch(*args: object, **kwargs: object) -> None:
        raise RuntimeError("PTX assembly failed: sm_00 is not supported\nmore detail")

    monkeypatch.setattr(triton_kernels, "forward", failing_launch)
    x, pi, mu, rho, a, c = make_inputs((4, 6), 3, "linear", torch.float32)
    with caplog.at_level(logging.WARNING, logger="gmnm"):
        first = GF.activation(x, pi, mu, rho, "linear", a, c)
        grads = torch.autograd.grad(first.sum(), (x, pi, mu, rho, a, c))
        second = GF.activation(x, pi, mu, rho, "gelu")
    warnings = [r.getMessage() for r in caplog.records if r.name == "gmnm.backends"]
    assert len(warnings) == 1, warnings
    assert "failed to compile or launch on cpu (RuntimeError: PTX assembly failed" in warnings[0]
    assert (
        backends.triton_failure("cpu")
        == "RuntimeError: PTX assembly failed: sm_00 is not supported"
    )

    expected = GF.activation_reference(x, pi, mu, rho, "linear", a, c)
    torch.testing.assert_close(first, expected)
    want = torch.autograd.grad(expected.sum(), (x, pi, mu, rho, a, c))
    for got, w in zip(grads, want, strict=True):
        torch.testing.assert_close(got, w)
    torch.testing.assert_close(second, GF.activation_reference(x, pi, mu, rho, "gelu"))


def test_a_triton_backward_kernel_that_fails_falls_back_for_the_gradients(
    triton_on_the_cpu: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gmnm import triton_kernels

    def failing_launch(*args: object, **kwargs: object) -> None:
        raise ValueError("Pointer argument (at 0) cannot be accessed from Triton")

    # the forward kernel runs (the C++ kernel takes the same arguments), the backward one fails
    monkeypatch.setattr(triton_kernels, "forward", cpu_kernel.forward)
    monkeypatch.setattr(triton_kernels, "backward", failing_launch)
    for base in ("gelu", "linear", None):
        backends.reset_triton_failures()
        caplog.clear()
        inputs = make_inputs((3, 4, 6), 6, base, torch.float64)
        fn = activation_fn(base, -1)
        with caplog.at_level(logging.WARNING, logger="gmnm"):
            out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        assert len([r for r in caplog.records if r.name == "gmnm.backends"]) == 1
        assert "ValueError: Pointer argument" in (backends.triton_failure("cpu") or "")

        expected = GF.activation_reference(*inputs[:4], base, *inputs[4:])
        torch.testing.assert_close(out, expected)
        want = torch.autograd.grad(expected, inputs, torch.ones_like(expected))
        for got, w in zip(grads, want, strict=True):
            torch.testing.assert_close(got, w)


def test_a_machine_without_a_compiler_imports_and_runs_on_the_plain_path(
    tmp_path: Path,
) -> None:
    script = (
        "import torch, gmnm\n"
        "from gmnm import backends\n"
        "x = torch.randn(4, 9, requires_grad=True)\n"
        "y = gmnm.GMNMActivation(4, base='gelu')(x)\n"
        "y.sum().backward()\n"
        "gmnm.GMNMActivation(4, base='relu')(x)\n"
        "assert torch.equal(y, torch.nn.functional.gelu(x))\n"
        "print('backend', backends.select(x).name)\n"
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "GMNM_EXTENSIONS_DIR": str(tmp_path / "extensions"),
    }
    env.pop("GMNM_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "backend recompute" in result.stdout
    assert result.stderr.count("could not be built") == 1, result.stderr


def test_gpu_check_dry_run_passes_on_the_cpu() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run passed" in result.stdout


def test_modules_use_the_fused_kernel_for_exact_torch_activation_modules() -> None:
    assert gmnm.modules.fused_base_name(nn.GELU()) == "gelu"
    assert gmnm.modules.fused_base_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert gmnm.modules.fused_base_name(nn.ReLU(inplace=True)) == "relu"

    class MyGELU(nn.GELU):
        pass

    assert gmnm.modules.fused_base_name(MyGELU()) is None
    assert gmnm.modules.fused_base_name(nn.Tanh()) is None
