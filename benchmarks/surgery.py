"""How long does a conversion take on full-size models? Plan + convert (+ audit), CPU only.

    python benchmarks/surgery.py              # ViT-B/16, ConvNeXt-T, ResNet-50, BERT-base, GPT-2
    python benchmarks/surgery.py --repeats 3  # the median of three conversions per model
    python benchmarks/surgery.py --threads 2  # torch intra-op threads (default 1)

Models are full-size configurations with random weights (building them is not timed). Each run
times `surgery.plan` and `surgery.convert` separately; `convert` includes the reference forward
pass, every swap, the converted forward pass and the audit's forward pass, all on the default
probe batch (`surgery.example_inputs`, batch 2: 224x224 images for the ViT, 64x64 for the
convolutional models that take any size, 8 tokens for the text models). The target is under 2 s
per model; `forward_seconds` is one forward pass of the unconverted model on the same probe, for
scale (a conversion runs two: the plan's trace, whose output is the reference, and the converted
model's audited pass). Writes `results/surgery.json` and `results/surgery.png`. One torch
thread by default, since the development machines are shared and two competing intra-op threads
make small convolutions many times slower.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
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


def measure(build: Callable[[], nn.Module]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build().eval()
    probe = surgery.example_inputs(model)
    with torch.no_grad():
        surgery.trace.run_model(model, probe)  # warm-up, then one timed forward pass
        forward_start = time.perf_counter()
        surgery.trace.run_model(model, probe)
        forward = time.perf_counter() - forward_start
    start = time.perf_counter()
    plan = surgery.plan(model, probe_inputs=probe)
    planned = time.perf_counter()
    report = surgery.convert(model, plan, probe_inputs=probe)
    done = time.perf_counter()
    return {
        "seconds": done - start,
        "plan_seconds": planned - start,
        "convert_seconds": done - planned,
        "forward_seconds": forward,
        "sites": len(plan.replaced),
        "sites_found": len(plan.sites),
        "sites_replaced": report.sites_replaced,
        "params_added": report.params_added,
        "max_abs_diff": report.max_abs_diff,
        "audit_findings": len(report.audit),
    }


def run(repeats: int) -> dict[str, dict[str, Any]]:
    results = {}
    for name, build in MODELS.items():
        runs = [measure(build) for _ in range(repeats)]
        best = dict(runs[0])
        for key in ("seconds", "plan_seconds", "convert_seconds", "forward_seconds"):
            best[key] = statistics.median(run[key] for run in runs)
            best[f"{key}_all"] = [round(run[key], 3) for run in runs]
        best["under_target"] = best["seconds"] < TARGET_SECONDS
        results[name] = best
        print(
            f"{name:26s} {best['seconds']:6.2f}s (plan {best['plan_seconds']:.2f}s, convert "
            f"{best['convert_seconds']:.2f}s; one plain forward {best['forward_seconds']:.2f}s)  "
            f"sites {best['sites']:3d}  params {best['params_added']:6d}  max|diff| "
            f"{best['max_abs_diff']:.1e}  audit "
            f"{best['audit_findings']}"
        )
    return results


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    plans = [results[n]["plan_seconds"] for n in names]
    converts = [results[n]["convert_seconds"] for n in names]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.barh(names, plans, label="plan")
    axis.barh(names, converts, left=plans, label="convert (incl. audit)")
    forwards = [results[n]["forward_seconds"] for n in names]
    axis.scatter(forwards, names, color="black", marker="|", s=400, zorder=3, label="one forward")
    axis.axvline(TARGET_SECONDS, color="black", linestyle="--", label="target")
    axis.set_xlabel("seconds (CPU, median)")
    axis.invert_yaxis()
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = run(args.repeats)
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "benchmark": "surgery",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "target_seconds": TARGET_SECONDS,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "models": results,
    }
    (RESULTS / "surgery.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(results, RESULTS / "surgery.png")
    slow = [name for name, result in results.items() if not result["under_target"]]
    target = f"{TARGET_SECONDS:.0f} s"
    print(f"wrote {RESULTS / 'surgery.json'}; over the {target} target: {slow or 'none'}")


if __name__ == "__main__":
    main()
