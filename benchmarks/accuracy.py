"""Does GMNM help? Accuracy and convergence against fixed activations on real data, CPU only.

    python benchmarks/accuracy.py              # the full run (5 seeds, learning-rate sweeps)
    python benchmarks/accuracy.py --quick      # one seed, one learning rate, far fewer steps
    python benchmarks/accuracy.py --only digits,charlm
    python benchmarks/accuracy.py --tables     # print the Markdown tables of the saved JSON
    python benchmarks/accuracy.py --plots      # redraw the PNGs from the saved JSON

Experiments (see `accuracy_lib/experiments.py` for the exact variants and budgets):
1. mnist1d: MLPs and CNNs with ReLU, with GMNM activations, and an MLP of GMNMLayers.
2. digits: scikit-learn's 8x8 digits, a small CNN with ReLU against GMNM activations.
3. functions: three functions on [-1, 1]^2; MLPs (ReLU, SiLU), a GMNMLayer, a Gaussian RBF net.
4. charlm: a 4-layer byte-level Transformer on standard-library source; GELU against GMNM
   activations against GMNM activations plus GMNM softmax.
5. conversion: all-MiniLM-L6-v2 converted (residual and fit init), cosine similarity of its
   sentence embeddings to the original's on sentences from installed packages' docstrings.

Every comparison has equal parameter counts (checked), the same optimiser budget, a learning rate
chosen per variant on a validation split, and reports test metrics over seeds (mean ± std). The
protocol is spelled out in `accuracy_lib/protocol.py`. Writes `results/accuracy.json` and
`results/accuracy_*.png`; one torch thread throughout, since the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from accuracy_lib import experiments, report
from accuracy_lib.protocol import (
    VariantResult,
    interleaved_step_times,
    run_variant,
    summarise,
)

import gmnm
from gmnm import backends

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("mnist1d", "digits", "functions", "charlm", "conversion")


def log(message: str) -> None:
    print(message, flush=True)


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "gmnm_backend": backends.select(torch.zeros(8)).name,
        "gmnm_backend_setting": gmnm.get_backend(),
    }


def run_training_group(name: str, quick: bool) -> dict[str, Any]:
    """Experiments 1-4: train every variant and summarise it; one JSON entry per experiment."""
    out = {}
    for experiment in experiments.build(name, quick):
        task = experiment.task
        log(f"[{experiment.name}] {experiment.title}")
        start = time.perf_counter()
        results: dict[str, VariantResult] = {}
        for variant in experiment.variants:
            results[variant.name] = run_variant(task, variant, experiment.budget, log)
        step_times = interleaved_step_times(
            task,
            experiment.variants,
            experiment.budget,
            rounds=2 if quick else 7,
            steps=3 if quick else 10,
        )
        log(
            "  seconds per step, interleaved: "
            + ", ".join(f"{k} {v:.4f}" for k, v in step_times.items())
        )
        out[experiment.name] = {
            "title": experiment.title,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "data": task.describe(),
            "budget": experiment.budget.to_dict(),
            "figure": experiment.figure,
            "panels": experiment.panels,
            "variants": summarise(task, results, step_times),
            "wall_seconds": time.perf_counter() - start,
        }
    return out


def run_conversion_group(quick: bool) -> dict[str, Any]:
    from accuracy_lib import conversion

    log("[conversion] all-MiniLM-L6-v2, residual and fit init")
    start = time.perf_counter()
    entry = conversion.run(quick, log)
    entry["wall_seconds"] = time.perf_counter() - start
    return {"conversion": entry}


def draw_figures(result: dict[str, Any], out: Path) -> None:
    """One PNG per figure name, drawn once every experiment that feeds it has finished."""
    figures: dict[str, list[tuple[str, str, dict[str, Any], float]]] = {}
    for experiment in result["experiments"].values():
        if "figure" not in experiment:
            continue
        panels = figures.setdefault(experiment["figure"], [])
        for title, names, start in experiment["panels"]:
            variants = {n: experiment["variants"][n] for n in names}
            panels.append((title, experiment["metric"], variants, start))
    for name, panels in figures.items():
        report.plot_figure(out / name, panels)
    conversion = result["experiments"].get("conversion")
    if conversion is not None:
        report.plot_conversion(out / "accuracy_conversion.png", conversion)


def write(result: dict[str, Any], out: Path) -> None:
    path = out / "accuracy.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    draw_figures(result, out)
    log(f"wrote {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, no sweep, fewer steps")
    parser.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated experiments to run, of {', '.join(GROUPS)} (others in an existing "
        "JSON are kept)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default: benchmarks/results; "
        "a new temporary directory with --quick)",
    )
    parser.add_argument("--tables", action="store_true", help="print the saved JSON's tables")
    parser.add_argument("--plots", action="store_true", help="redraw the saved JSON's figures")
    args = parser.parse_args(argv)
    args.only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(args.only) - set(GROUPS))
    if unknown:
        parser.error(
            f"--only: unknown experiment(s) {', '.join(unknown)}; valid: {', '.join(GROUPS)}"
        )
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="accuracy-quick-")) if args.quick else RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    if args.plots:
        draw_figures(json.loads((out / "accuracy.json").read_text()), out)
        return 0
    if args.tables:
        log(report.markdown(json.loads((out / "accuracy.json").read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)

    # keep experiments of an earlier run that this one does not repeat
    previous = out / "accuracy.json"
    result: dict[str, Any] = {"experiments": {}}
    if previous.exists() and set(args.only) != set(GROUPS):
        result = json.loads(previous.read_text())
    result.update(
        benchmark="accuracy",
        quick=args.quick,
        command=" ".join(["python", "benchmarks/accuracy.py", *(argv or sys.argv[1:])]),
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        environment=environment(),
    )
    log(f"gmnm backend: {result['environment']['gmnm_backend']}, torch threads: 1")

    start = time.perf_counter()
    for group in args.only:
        if group == "conversion":
            result["experiments"].update(run_conversion_group(args.quick))
        else:
            result["experiments"].update(run_training_group(group, args.quick))
        write(result, out)
    result["wall_seconds"] = time.perf_counter() - start
    result["experiments_run"] = args.only
    write(result, out)

    log(report.markdown(result))
    log(f"total {result['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
