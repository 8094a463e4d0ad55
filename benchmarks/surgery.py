"""How long does a conversion take on full-size models? Plan + convert (+ audit), CPU only.

    python benchmarks/surgery.py              # ViT-B/16, ConvNeXt-T, ResNet-50, BERT-base, GPT-2
    python benchmarks/surgery.py --repeats 5  # the median of five conversions per model
    python benchmarks/surgery.py --threads 2  # torch intra-op threads (default 1)

Models are full-size configurations with random weights (building them is not timed). Each run
times `surgery.plan` and `surgery.convert` separately on the default probe batch
(`surgery.example_inputs`: one 224x224 image for the ViT, one 64x64 image for the convolutional
models that take any size, two rows of 8 tokens for the text models, the second padded).
`convert` includes every swap and the converted model's audited forward pass; the plan's traced
pass is the reference output. The target is under 2 s per model.

For scale, each model's plain forward pass (no grad, fused attention) is timed at batch 1 and 2,
and image models are converted once more with a probe batch of 2 (the earlier default). Times are
wall-clock and, beside them, the CPU time of this process: on the shared development machine
other jobs stretch wall-clock time while the CPU time of a one-thread run stays close to what an
idle machine would show. The load average is recorded with each model. `--profile` adds the
functions where a ViT-B/16 conversion spends its time. Writes `results/surgery.json` and
`results/surgery.png`. One torch thread by default, since the development machines are shared and
two competing intra-op threads make small convolutions many times slower.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model


def _import_package(name: str) -> Any:
    """This script shares its name with the package it measures: import the package."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != here]
    sys.modules.pop(name, None)
    return importlib.import_module(name)


surgery = _import_package("surgery")

RESULTS = Path(__file__).parent / "results"
TARGET_SECONDS = 2.0

MODELS: dict[str, Callable[[], nn.Module]] = {
    "ViT-B/16 (timm)": lambda: timm.create_model("vit_base_patch16_224", pretrained=False),
    "ConvNeXt-T (timm)": lambda: timm.create_model("convnext_tiny", pretrained=False),
    "ResNet-50 (timm)": lambda: timm.create_model("resnet50", pretrained=False),
    "BERT-base (transformers)": lambda: BertModel(BertConfig()),
    "GPT-2 (transformers)": lambda: GPT2Model(GPT2Config()),
}


class Clock:
    """Wall-clock and process CPU seconds since it was made."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def forward_seconds(model: nn.Module, batch_size: int) -> dict[str, float]:
    """One plain forward pass (after a warm-up) at `batch_size`."""
    probe = surgery.example_inputs(model, batch_size=batch_size)
    with torch.no_grad():
        surgery.trace.run_model(model, probe)
        clock = Clock()
        surgery.trace.run_model(model, probe)
        wall, cpu = clock.read()
    return {"wall": wall, "cpu": cpu}


def convert_once(build: Callable[[], nn.Module], batch_size: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().eval()
    probe = surgery.example_inputs(model, batch_size=batch_size)
    load = os.getloadavg()[0]
    clock = Clock()
    plan = surgery.plan(model, probe_inputs=probe)
    plan_wall, plan_cpu = clock.read()
    report = surgery.convert(model, plan, probe_inputs=probe)
    wall, cpu = clock.read()
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "plan_seconds": plan_wall,
        "plan_cpu_seconds": plan_cpu,
        "convert_seconds": wall - plan_wall,
        "convert_cpu_seconds": cpu - plan_cpu,
        "load_average": load,
        "probe_batch": _rows(probe),
        "sites": len(plan.replaced),
        "sites_found": len(plan.sites),
        "sites_replaced": report.sites_replaced,
        "params_added": report.params_added,
        "max_abs_diff": report.max_abs_diff,
        "audit_findings": len(report.audit),
    }


def _rows(probe: Any) -> int:
    tensor = probe if isinstance(probe, torch.Tensor) else next(iter(probe.values()))
    return int(tensor.shape[0])


def measure(name: str, build: Callable[[], nn.Module], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    plain = build().eval()
    forward = {str(batch): forward_seconds(plain, batch) for batch in (1, 2)}
    image_model = not isinstance(surgery.example_inputs(plain), dict)
    del plain

    runs = [convert_once(build, None) for _ in range(repeats)]
    result = dict(runs[0])
    timed = ("seconds", "cpu_seconds", "plan_seconds", "plan_cpu_seconds", "convert_seconds")
    for key in (*timed, "convert_cpu_seconds", "load_average"):
        result[key] = statistics.median(run[key] for run in runs)
        result[f"{key}_all"] = [round(run[key], 3) for run in runs]
    result["forward_seconds"] = forward
    probe_forward = forward[str(result["probe_batch"])]
    # how many plain forward passes of the probe a conversion costs
    result["forward_passes"] = round(result["cpu_seconds"] / probe_forward["cpu"], 2)
    result["under_target"] = result["seconds"] < TARGET_SECONDS
    result["cpu_under_target"] = result["cpu_seconds"] < TARGET_SECONDS
    if image_model:
        batch2 = convert_once(build, 2)
        result["probe_batch_2"] = {
            key: batch2[key] for key in ("seconds", "cpu_seconds", "max_abs_diff", "load_average")
        }
    print(
        f"{name:26s} {result['seconds']:6.2f}s wall {result['cpu_seconds']:5.2f}s cpu "
        f"(probe batch {result['probe_batch']}, load {result['load_average']:.1f}; plain forward "
        f"b1 {forward['1']['cpu']:.2f}s b2 {forward['2']['cpu']:.2f}s cpu)  sites "
        f"{result['sites']:3d}  params {result['params_added']:6d}  max|diff| "
        f"{result['max_abs_diff']:.1e}  audit {result['audit_findings']}"
    )
    return result


def run(repeats: int) -> dict[str, dict[str, Any]]:
    return {name: measure(name, build, repeats) for name, build in MODELS.items()}


def profile(name: str, top: int = 8) -> dict[str, Any]:
    """Where one conversion of `name` spends its time (cProfile, by own time)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    probe = surgery.example_inputs(model)
    profiler = cProfile.Profile()
    profiler.enable()
    surgery.convert(model, surgery.plan(model, probe_inputs=probe), probe_inputs=probe)
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(own for _, _, own, _, _ in rows.values())
    ranked = sorted(rows.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return {
        "model": name,
        "total_seconds": round(total, 3),
        "top": [
            {
                "function": f"{function[2]} ({Path(function[0]).name}:{function[1]})",
                "seconds": round(own, 3),
                "share": round(own / total, 3),
            }
            for function, (_, _, own, _, _) in ranked
        ],
    }


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    plans = [results[n]["plan_seconds"] for n in names]
    converts = [results[n]["convert_seconds"] for n in names]
    figure, axis = plt.subplots(figsize=(8, 3.8))
    axis.barh(names, plans, label="plan (wall)")
    axis.barh(names, converts, left=plans, label="convert incl. audit (wall)")
    cpu = [results[n]["cpu_seconds"] for n in names]
    axis.scatter(cpu, names, color="red", marker="x", s=60, zorder=3, label="plan + convert (CPU)")
    forwards = [results[n]["forward_seconds"][str(results[n]["probe_batch"])]["cpu"] for n in names]
    axis.scatter(
        forwards, names, color="black", marker="|", s=400, zorder=3, label="one plain forward (CPU)"
    )
    axis.axvline(TARGET_SECONDS, color="black", linestyle="--", label="target")
    axis.set_xlabel("seconds (one CPU thread, median; default probe batch)")
    axis.invert_yaxis()
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def verdict(results: dict[str, dict[str, Any]]) -> str:
    """Whether the target is met, in words, from the measured figures."""
    over_wall = [n for n, r in results.items() if not r["under_target"]]
    over_cpu = [n for n, r in results.items() if not r["cpu_under_target"]]
    if not over_wall:
        return f"every model under {TARGET_SECONDS:.0f} s wall-clock"
    text = f"over {TARGET_SECONDS:.0f} s wall-clock: {', '.join(over_wall)}"
    if over_cpu:
        return text + f"; over it in CPU time too: {', '.join(over_cpu)}"
    return text + " (under it in CPU time: other jobs on the machine stretched the wall-clock)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="profile a ViT-B/16 conversion")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = run(args.repeats)
    RESULTS.mkdir(exist_ok=True)
    payload: dict[str, Any] = {
        "benchmark": "surgery",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target_seconds": TARGET_SECONDS,
        "verdict": verdict(results),
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "models": results,
    }
    if args.profile:
        payload["profile"] = profile("ViT-B/16 (timm)")
        for row in payload["profile"]["top"]:
            print(f"  {row['share']:6.1%} {row['seconds']:6.2f}s  {row['function']}")
    (RESULTS / "surgery.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, RESULTS / "surgery.png")
    print(f"wrote {RESULTS / 'surgery.json'}; {payload['verdict']}")


if __name__ == "__main__":
    main()
