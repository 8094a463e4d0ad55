"""One short, prepared check of the GMNM Triton kernel on a CUDA GPU.

    python benchmarks/gpu_check.py                 # on a CUDA machine (a lent H200)
    python benchmarks/gpu_check.py --dry-run       # anywhere: CPU, Triton's interpreter

On CUDA it
1. checks that `auto` picks the Triton backend for CUDA tensors;
2. compares the Triton kernel with the reference (`gmnm.functional.activation_reference`) in
   fp32 (against a float64 reference) and bf16, values and all gradients, over shared, grouped
   and per-channel parameters, several `dim`s and the fused bases;
3. checks that residual GMNM modules equal the activation they replace bit for bit;
4. times forward+backward of GMNMActivation (K = 4, 8, 16; shared and per-channel) against
   nn.GELU on [32, 197, 3072] in fp32 and bf16 (CUDA events, medians of interleaved runs) and
   reports peak memory (`torch.cuda.max_memory_allocated` above the inputs);
5. writes everything to `--out` (default benchmarks/results/gpu_check.json) and prints it.

`--dry-run` runs steps 2-4 on the CPU with small shapes through Triton's interpreter
(TRITON_INTERPRET=1, set here before the kernels are defined); its timings only show that the
code runs. Exit status: 0 when every check passes, 1 on any mismatch, 2 when CUDA is missing
and `--dry-run` was not given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"

CASES = [
    # (shape, dim, groups, base)
    ((64, 3072), -1, 1, "gelu"),
    ((64, 3072), -1, 3072, "gelu"),
    ((64, 3072), -1, 12, "linear"),
    ((8, 12, 64, 64), 1, 12, None),
    ((16, 96, 14, 14), 1, 96, "silu"),
    ((32, 197, 768), -1, 1, "gelu_tanh"),
    ((4097,), 0, 1, "relu"),
]
DRY_CASES = [
    ((6, 40), -1, 1, "gelu"),
    ((6, 40), -1, 40, "gelu"),
    ((6, 40), -1, 4, "linear"),
    ((2, 3, 4, 5), 1, 3, None),
    ((3, 8, 2, 2), 1, 8, "silu"),
]
BENCH_SHAPE = (32, 197, 3072)
DRY_BENCH_SHAPE = (2, 4, 96)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and Triton's interpreter")
    parser.add_argument("--out", type=Path, default=None, help=f"result JSON (default {RESULTS})")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("CUDA is not available; use --dry-run to check the script on the CPU")
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    report: dict[str, Any] = {"device": _device_name(device), "dry_run": args.dry_run}
    failures: list[str] = []

    report["auto_backend"] = _check_auto(device, failures, args.dry_run)
    report["correctness"] = _check_correctness(device, DRY_CASES if args.dry_run else CASES)
    failures += [f"{c['case']} {c['dtype']}: {c['error']}" for c in report["correctness"]]
    failures += _check_residual(device, (6, 40) if args.dry_run else (64, 3072))
    shape = DRY_BENCH_SHAPE if args.dry_run else BENCH_SHAPE
    repeats = 1 if args.dry_run else args.repeats
    report["timing"] = {
        str(dtype).removeprefix("torch."): _time_variants(device, shape, dtype, repeats)
        for dtype in (torch.float32, torch.bfloat16)
    }
    report["failures"] = failures

    print(json.dumps(report, indent=2))
    out = args.out or (None if args.dry_run else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    if failures:
        print(f"FAILED: {len(failures)} check(s)", *failures, sep="\n  ")
        return 1
    print("dry run passed" if args.dry_run else "all GPU checks passed")
    return 0


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu (Triton interpreter)"


def _check_auto(device: Any, failures: list[str], dry_run: bool) -> str:
    import torch

    from gmnm import backends

    name = backends.select(torch.zeros(4, device=device)).name
    if dry_run and name == "triton":
        failures.append("auto sent CPU tensors to Triton's interpreter")
    if not dry_run and name != "triton":
        failures.append(f"auto picked {name!r} for CUDA tensors instead of 'triton'")
    return name


def _inputs(
    shape: tuple[int, ...], groups: int, base: str | None, device: Any, k: int = 8
) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(0)

    def rand(*size: int, scale: float = 1.0) -> Any:
        return (torch.randn(*size, generator=generator, dtype=torch.float64) * scale).to(device)

    tensors = [
        rand(*shape, scale=2.0),
        rand(groups, k),
        rand(groups, k),
        rand(groups, k, scale=0.3),
    ]
    if base == "linear":
        tensors += [rand(groups), rand(groups)]
    return tensors


def _forward_backward(
    backend: str, tensors: list[Any], base: str | None, dim: int, grad: Any
) -> list[Any]:
    import torch

    import gmnm
    from gmnm import functional as GF

    gmnm.set_backend(backend)
    try:
        inputs = [t.detach().requires_grad_() for t in tensors]
        x, pi, mu, rho, *ac = inputs
        a, c = ac if ac else (None, None)
        out = GF.activation(x, pi, mu, rho, base, a, c, dim=dim)
        grads = torch.autograd.grad(out, inputs, grad.to(out.dtype))
        return [out.detach(), *grads]
    finally:
        gmnm.set_backend("auto")


def _check_correctness(device: Any, cases: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Mismatches of the Triton kernel against the reference; an empty list when all agree."""
    import torch

    mismatches = []
    names = ["out", "grad_x", "grad_pi", "grad_mu", "grad_rho", "grad_a", "grad_c"]
    for shape, dim, groups, base in cases:
        tensors = _inputs(shape, groups, base, device)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
        reference = _forward_backward("reference", tensors, base, dim, grad.double())
        for dtype in (torch.float32, torch.bfloat16):
            # parameters stay fp32 as in the modules; only the input takes the dtype
            cast = [tensors[0].to(dtype)] + [t.float() for t in tensors[1:]]
            got = _forward_backward("triton", cast, base, dim, grad)
            if dtype == torch.bfloat16:
                want = _forward_backward("reference", cast, base, dim, grad)
                tolerance = 2e-2
            else:
                want, tolerance = reference, 1e-4
            for name, g, w in zip(names, got, want, strict=False):
                error = _relative_error(g, w)
                if not error <= tolerance:
                    mismatches.append(
                        {
                            "case": f"{shape} dim={dim} groups={groups} base={base}",
                            "dtype": str(dtype),
                            "error": f"{name} relative error {error:.3g} > {tolerance}",
                        }
                    )
    return mismatches


def _relative_error(got: Any, want: Any) -> float:
    diff = (got.double() - want.double()).abs().max().item()
    return diff / max(want.double().abs().max().item(), 1e-6)


def _check_residual(device: Any, shape: tuple[int, ...]) -> list[str]:
    import torch
    from torch import nn

    import gmnm

    failures = []
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device) * 4
    gmnm.set_backend("triton")
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for base in (nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()):
                module = gmnm.GMNMActivation(8, base=base).to(device)
                xd = x.to(dtype)
                if not torch.equal(module(xd), base(xd)):
                    failures.append(f"residual GMNMActivation({base}) differs from it in {dtype}")
    finally:
        gmnm.set_backend("auto")
    return failures


def _time_variants(
    device: Any, shape: tuple[int, ...], dtype: Any, repeats: int
) -> dict[str, dict[str, float]]:
    import torch
    from torch import nn

    import gmnm

    channels = shape[-1]
    variants: dict[str, nn.Module] = {"gelu": nn.GELU()}
    for k in (4, 8, 16):
        variants[f"gmnm_k{k}_shared"] = gmnm.GMNMActivation(k, init="random")
        variants[f"gmnm_k{k}_per_channel"] = gmnm.GMNMActivation(
            k, init="random", channels=channels, groups=channels
        )
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn(shape, device=device, dtype=dtype)
    modules = {name: m.to(device) for name, m in variants.items()}

    def step(module: nn.Module) -> None:
        xr = x.detach().requires_grad_()
        module(xr).backward(grad)

    times: dict[str, list[float]] = {name: [] for name in modules}
    peaks: dict[str, float] = {}
    gmnm.set_backend("triton")
    try:
        for name, module in modules.items():
            step(module)  # warm-up: compilation
            peaks[name] = _peak_bytes(device, lambda m=module: step(m))
        for _ in range(repeats):
            for name, module in modules.items():
                times[name].append(_timed(device, lambda m=module: step(m)))
    finally:
        gmnm.set_backend("auto")
    base_time, base_peak = statistics.median(times["gelu"]), peaks["gelu"]
    return {
        name: {
            "median_ms": statistics.median(t) * 1e3,
            "time_ratio_vs_gelu": statistics.median(t) / base_time,
            "peak_bytes": peaks[name],
            "memory_ratio_vs_gelu": peaks[name] / base_peak if base_peak else None,
        }
        for name, t in times.items()
    }


def _timed(device: Any, fn: Callable[[], None]) -> float:
    import torch

    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3


def _peak_bytes(device: Any, fn: Callable[[], None]) -> float:
    """Peak CUDA memory above what was allocated before `fn` (0 on the CPU dry run)."""
    import torch

    if device.type != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


if __name__ == "__main__":
    sys.exit(main())
