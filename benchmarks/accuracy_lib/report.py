"""What a person reads: one PNG per experiment (test metric against steps, a band over seeds)
and Markdown tables built from the JSON alone, so they can be regenerated without training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; the benchmark runs headless
import matplotlib.pyplot as plt

METRIC_LABELS = {
    "accuracy": "test accuracy",
    "mse": "test MSE (log scale)",
    "bpc": "test bits per character",
}


def plot_figure(path: Path, panels: list[tuple[str, str, dict[str, Any], float]]) -> None:
    """panels: (title, metric, {variant: its JSON entry}, fraction of training where the x axis
    starts). One line per variant (the mean over seeds) and a band from the lowest to the highest
    seed's curve."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, metric, variants, start) in zip(axes[0], panels, strict=True):
        for name, entry in variants.items():
            curve = entry["curve"]
            if not curve["steps"]:
                continue
            first = next(i for i, s in enumerate(curve["steps"]) if s >= start * curve["steps"][-1])
            steps, mean = curve["steps"][first:], curve["mean"][first:]
            seeds = [c[first:] for c in curve.get("per_seed") or [mean]]
            low = [min(values) for values in zip(*seeds, strict=True)]
            high = [max(values) for values in zip(*seeds, strict=True)]
            (line,) = ax.plot(steps, mean, label=f"{name} ({entry['parameters']:,} p.)")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        if metric == "mse":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_metric(metric: str, stats: dict[str, Any]) -> str:
    mean, std = stats["mean"], stats["std"]
    if mean is None:
        return "diverged"
    if metric == "accuracy":
        return f"{100 * mean:.1f} ± {100 * std:.1f} %"
    if metric == "mse":
        return f"{mean:.2e} ± {std:.1e}"
    return f"{mean:.3f} ± {std:.3f}"


def experiment_table(experiment: dict[str, Any]) -> str:
    metric = experiment["metric"]
    rows = [
        f"| variant | parameters | lr | test {metric} (mean ± std) | steps to baseline's final "
        "| train time per run | time per step vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in experiment["variants"].items():
        reached = entry["steps_to_baseline"]
        # a dagger marks a rate that was still the grid's end after every extension
        edge = " †" if entry.get("lr_at_sweep_edge") else ""
        rows.append(
            f"| {name} | {entry['parameters']:,} | {entry['lr']:.3g}{edge} | "
            f"{format_metric(metric, entry['test'])} | "
            f"{'not reached' if reached is None else f'{reached:,}'} | "
            f"{entry['train_seconds']['mean']:.1f} s | {entry['time_ratio_vs_baseline']:.2f}x |"
        )
    return "\n".join(rows)


def conversion_table(conversion: dict[str, Any]) -> str:
    rows = [
        "| init | sites replaced | parameters added | cosine mean | cosine min | 5th percentile |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for init, entry in conversion["modes"].items():
        cos = entry["cosine"]
        rows.append(
            f"| {init} | {entry['sites_replaced']} | {entry['parameters_added']:,} | "
            f"{cos['mean']:.6f} | {cos['min']:.6f} | {cos['p05']:.6f} |"
        )
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    parts = []
    for name, experiment in result["experiments"].items():
        parts.append(f"### {name}: {experiment['title']}\n")
        if name == "conversion":
            parts.append(conversion_table(experiment))
        else:
            parts.append(experiment_table(experiment))
        parts.append("")
    return "\n".join(parts)


def plot_conversion(path: Path, conversion: dict[str, Any]) -> None:
    """1 - cosine similarity per sentence, sorted, one line per init mode (log scale)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    floor = 1e-9  # exact agreement would vanish from a log axis
    for init, entry in conversion["modes"].items():
        gaps = sorted(max(1.0 - c, floor) for c in entry["cosine"]["per_sentence"])
        ax.plot(range(len(gaps)), gaps, label=f"{init} (mean cos {entry['cosine']['mean']:.5f})")
    ax.set_yscale("log")
    ax.set_xlabel("sentence (sorted)")
    ax.set_ylabel(f"1 - cosine similarity to the original (floor {floor:g})")
    ax.set_title("all-MiniLM-L6-v2 converted, before fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
