"""Forward+backward time and peak memory of GMNMActivation against nn.GELU on the CPU.

    python benchmarks/activation.py                    # one thread, [32, 197, 3072] float32
    python benchmarks/activation.py --threads 2 --repeats 9

Variants: nn.GELU; GMNMActivation with K = 4, 8, 16 components, parameters shared across the
layer and per channel (3072 sets), on the backend `auto` picks (the C++ kernel on this CPU);
for context the plain PyTorch path (`recompute`) and `torch.compile` of it at K = 4 and 8
(`--no-context` leaves those out).

Time: all variants run in one process, interleaved (variant after variant, `--repeats`
rounds, after one warm-up each), and the median per variant is reported, so load from other
processes hits every variant alike. Each step is `module(x).backward(grad)` with a fresh leaf
x, so the input gradient is allocated every step as in training.

Peak memory: each variant runs in a fresh subprocess that builds the module and the input,
warms up once, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs one step
and reads `VmHWM`; the figure is that peak minus the resident size just before the step, i.e.
the memory the step itself adds on top of x, grad and the module (for GELU: its output and
the input gradient). Large tensors are allocated with mmap and returned on free, so the counter
sees every allocation. The bytes autograd saves for backward (unique storages, from
`torch.autograd.graph.saved_tensors_hooks`) are reported as well.

Writes benchmarks/results/activation.json and activation.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import gmnm
from gmnm import backends

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {"variant": "gmnm_k8_shared", "time_ratio_vs_gelu": 3.0, "memory_ratio_vs_gelu": 1.5}


def variant_specs(context: bool) -> dict[str, dict[str, Any]]:
    """name -> {K, sharing, backend}; K None is nn.GELU."""
    specs: dict[str, dict[str, Any]] = {"gelu": {"K": None, "sharing": None, "backend": None}}
    for k in (4, 8, 16):
        for sharing in ("shared", "per_channel"):
            specs[f"gmnm_k{k}_{sharing}"] = {"K": k, "sharing": sharing, "backend": "auto"}
    if context:
        specs["recompute_k8_shared"] = {"K": 8, "sharing": "shared", "backend": "recompute"}
        for k in (4, 8):
            specs[f"compile_k{k}_shared"] = {"K": k, "sharing": "shared", "backend": "compile"}
    return specs


def build(spec: dict[str, Any], channels: int) -> nn.Module:
    if spec["K"] is None:
        return nn.GELU()
    groups = channels if spec["sharing"] == "per_channel" else 1
    module = gmnm.GMNMActivation(
        spec["K"], base="gelu", init="random", channels=channels, groups=groups
    )
    return _WithBackend(module, spec["backend"])


class _WithBackend(nn.Module):
    """Runs the wrapped module with one backend forced (for interleaved variants)."""

    def __init__(self, module: nn.Module, backend: str) -> None:
        super().__init__()
        self.module = module
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        gmnm.set_backend(self.backend)
        try:
            return self.module(x)
        finally:
            gmnm.set_backend("auto")


def step(module: nn.Module, x: Tensor, grad: Tensor) -> None:
    leaf = x.detach().requires_grad_()
    module(leaf).backward(grad)


def saved_bytes(module: nn.Module, x: Tensor, grad: Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(module, x, grad)
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------
# peak memory, one fresh process per variant


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; peak RSS needs Linux")


def measure_memory_here(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run in the child process: peak RSS added by one forward+backward step."""
    torch.set_num_threads(args.threads)
    spec = variant_specs(context=True)[name]
    module = build(spec, args.shape[-1])
    x, grad = torch.randn(args.shape), torch.randn(args.shape)
    step(module, x, grad)  # warm-up: kernel build or compilation, first-touch of code pages
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step(module, x, grad)
    peak = _status_kib("VmHWM")
    return {"peak_bytes": (peak - before) * 1024, "saved_bytes": saved_bytes(module, x, grad)}


def measure_memory(name: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--memory-child", name, "--threads", str(args.threads)]
    command += ["--shape", *map(str, args.shape)]
    # every large allocation through mmap, so that freeing returns it and the peak is honest
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {name} failed:\n{result.stderr}")
    measured: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return measured


# ---------------------------------------------------------------------------------------------
# time, all variants interleaved in this process


def measure_times(
    modules: dict[str, nn.Module], x: Tensor, grad: Tensor, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and CPU seconds (this process, all its threads) per step and variant."""
    for name, module in modules.items():
        start = time.perf_counter()
        step(module, x, grad)
        print(f"  warm-up {name}: {time.perf_counter() - start:.2f} s", flush=True)
    wall: dict[str, list[float]] = {name: [] for name in modules}
    cpu: dict[str, list[float]] = {name: [] for name in modules}
    for round_index in range(repeats):
        for name, module in modules.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step(module, x, grad)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        print(f"  round {round_index + 1}/{repeats} done", flush=True)
    return wall, cpu


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    specs = variant_specs(args.context)
    x, grad = torch.randn(args.shape), torch.randn(args.shape)
    modules = {name: build(spec, args.shape[-1]) for name, spec in specs.items()}
    auto_backend = backends.select(x).name

    print(f"timing {len(modules)} variants on {list(args.shape)}, {args.threads} thread(s)")
    times, cpu_times = measure_times(modules, x, grad, args.repeats)
    print("measuring peak memory, one subprocess per variant")
    memory = {name: measure_memory(name, args) for name in specs}

    gelu_time = statistics.median(times["gelu"])
    gelu_cpu = statistics.median(cpu_times["gelu"])
    gelu_peak = memory["gelu"]["peak_bytes"]
    variants = {}
    for name, spec in specs.items():
        median = statistics.median(times[name])
        backend = spec["backend"]
        variants[name] = {
            "components": spec["K"],
            "sharing": spec["sharing"],
            "backend": auto_backend if backend == "auto" else backend,
            "median_ms": round(median * 1e3, 2),
            "time_ratio_vs_gelu": round(median / gelu_time, 3),
            "median_cpu_ms": round(statistics.median(cpu_times[name]) * 1e3, 2),
            "cpu_time_ratio_vs_gelu": round(statistics.median(cpu_times[name]) / gelu_cpu, 3),
            "peak_bytes": memory[name]["peak_bytes"],
            "memory_ratio_vs_gelu": round(memory[name]["peak_bytes"] / gelu_peak, 3),
            "saved_for_backward_bytes": memory[name]["saved_bytes"],
            "times_ms": [round(t * 1e3, 2) for t in times[name]],
        }
    target = variants[TARGETS["variant"]]
    return {
        "shape": list(args.shape),
        "dtype": "float32",
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "auto_backend_on_cpu": auto_backend,
        "time_method": (
            "median of interleaved forward+backward steps in one process: wall clock "
            "(time_ratio_vs_gelu) and this process's CPU time (cpu_time_ratio_vs_gelu, less "
            "sensitive to other processes on a shared machine)"
        ),
        "load_average_at_start": list(os.getloadavg()),
        "memory_method": (
            "fresh subprocess per variant: VmHWM after one step minus VmRSS before it, "
            "peak reset through /proc/self/clear_refs after a warm-up step"
        ),
        "targets": {
            **TARGETS,
            "time_met": target["time_ratio_vs_gelu"] <= TARGETS["time_ratio_vs_gelu"],
            "memory_met": target["memory_ratio_vs_gelu"] <= TARGETS["memory_ratio_vs_gelu"],
        },
        "variants": variants,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    names = [n for n in result["variants"] if n != "gelu"]
    time_ratios = [result["variants"][n]["time_ratio_vs_gelu"] for n in names]
    memory_ratios = [result["variants"][n]["memory_ratio_vs_gelu"] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, values, title, target in (
        (axes[0], time_ratios, "forward+backward time / GELU", TARGETS["time_ratio_vs_gelu"]),
        (axes[1], memory_ratios, "peak memory / GELU", TARGETS["memory_ratio_vs_gelu"]),
    ):
        ax.barh(names, values, color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.axvline(
            target, color="tab:red", linestyle="--", label=f"target for K=8 shared: {target}x"
        )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(title)
        ax.invert_yaxis()
        ax.legend(loc="upper right")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center")
    shape = "x".join(map(str, result["shape"]))
    fig.suptitle(f"GMNMActivation vs nn.GELU, [{shape}] float32, {result['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 197, 3072])
    parser.add_argument(
        "--no-context", dest="context", action="store_false", help="skip recompute and compile"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "activation.json")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the PNG from an existing --out JSON"
    )
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory_here(args.memory_child, args)))
        return 0
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))

    header = f"{'variant':24} {'backend':10} {'time':>9} {'x GELU':>8} {'cpu x GELU':>11}"
    print(f"\n{header} {'peak MB':>9} {'x GELU':>8}")
    for name, v in result["variants"].items():
        print(
            f"{name:24} {v['backend'] or '-':10} {v['median_ms']:7.1f}ms "
            f"{v['time_ratio_vs_gelu']:7.2f}x {v['cpu_time_ratio_vs_gelu']:10.2f}x "
            f"{v['peak_bytes'] / 2**20:8.1f} {v['memory_ratio_vs_gelu']:7.2f}x"
        )
    targets = result["targets"]
    print(
        f"\ntarget K=8 shared: time <= {targets['time_ratio_vs_gelu']}x "
        f"({'met' if targets['time_met'] else 'MISSED'}), memory <= "
        f"{targets['memory_ratio_vs_gelu']}x ({'met' if targets['memory_met'] else 'MISSED'})"
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
