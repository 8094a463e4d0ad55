"""The accuracy benchmark's `--quick` run: it writes every experiment, every variant trains, and
the comparisons it reports are between models of equal size. Whether GMNM wins is not asserted:
that is what the full run measures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"
TRAINING_EXPERIMENTS = {
    "mnist1d": {"mlp_relu", "mlp_gmnm", "mlp_gmnm_layer", "cnn_relu", "cnn_gmnm"},
    "digits": {"cnn_relu", "cnn_gmnm"},
    "function_sin_cos": {"mlp_relu", "mlp_silu", "gmnm_layer", "rbf"},
    "function_exp_sin": {"mlp_relu", "mlp_silu", "gmnm_layer", "rbf"},
    "function_ridge": {"mlp_relu", "mlp_silu", "gmnm_layer", "rbf"},
    "charlm": {"gelu", "gmnm_act", "gmnm_act_softmax"},
}
FIGURES = ("mnist1d", "digits", "functions", "charlm", "conversion")

# benchmarks/ also holds scripts named like the project's packages (surgery.py, service.py): it
# may be on the import path only while accuracy_lib is imported, or later tests would import
# those scripts instead of the packages.
sys.path.insert(0, str(SCRIPT.parent))
try:
    from accuracy_lib import conversion, protocol
finally:
    sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("accuracy")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,  # the run takes about 1.5 min alone; the machine is shared
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads((out / "accuracy.json").read_text()), out


def training_experiments(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result["experiments"].items() if k in TRAINING_EXPERIMENTS}


@pytest.mark.slow
def test_quick_run_writes_every_experiment_variant_and_figure(quick: tuple[dict, Path]) -> None:
    result, out = quick
    assert result["quick"] is True
    assert result["environment"]["torch_threads"] == 1
    assert result["environment"]["gmnm_backend"]
    for name, variants in TRAINING_EXPERIMENTS.items():
        assert set(result["experiments"][name]["variants"]) >= variants
    assert "conversion" in result["experiments"]
    for figure in FIGURES:
        assert (out / f"accuracy_{figure}.png").stat().st_size > 0


@pytest.mark.slow
def test_every_variant_trained_and_its_loss_fell(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    for name, experiment in training_experiments(result).items():
        for variant, entry in experiment["variants"].items():
            assert entry["diverged_runs"] == 0, (name, variant)
            for first, last in zip(entry["loss_first"], entry["loss_last"], strict=True):
                assert last < first, (name, variant, first, last)


@pytest.mark.slow
def test_test_metrics_are_reported_per_seed_with_curves(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    for name, experiment in training_experiments(result).items():
        for variant, entry in experiment["variants"].items():
            test = entry["test"]
            assert len(test["per_seed"]) == len(experiment["budget"]["seeds"]) == 1
            assert math.isfinite(test["mean"]) and test["std"] == 0.0
            if experiment["metric"] == "accuracy":
                assert 0.0 <= test["mean"] <= 1.0, (name, variant)
            else:
                assert test["mean"] > 0.0, (name, variant)
            curve = entry["curve"]
            assert len(curve["steps"]) == len(curve["mean"]) == len(curve["std"]) >= 2
            assert curve["steps"][-1] == experiment["budget"]["steps"]
            assert entry["train_seconds"]["mean"] > 0


@pytest.mark.slow
def test_compared_variants_have_equal_parameter_budgets(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    for experiment in training_experiments(result).values():
        for entry in experiment["variants"].values():
            assert abs(entry["parameters_vs_baseline"] - 1.0) <= 0.03


@pytest.mark.slow
def test_conversion_compares_both_inits_on_the_same_sentences(quick: tuple[dict, Path]) -> None:
    result, _ = quick
    entry = result["experiments"]["conversion"]
    count = entry["sentences"]["count"]
    assert count == 32
    assert entry["pooling_check_max_abs_diff_vs_sentence_transformers"] < 1e-4
    for init in ("residual", "fit"):
        cosine = entry["modes"][init]["cosine"]
        assert len(cosine["per_sentence"]) == count
        assert -1.0 <= cosine["min"] <= cosine["mean"] <= 1.0 + 1e-6
        assert entry["modes"][init]["sites_replaced"]


def test_learning_rate_choice_never_prefers_a_diverged_run() -> None:
    class Lower:
        higher_is_better = False

    task: Any = Lower()
    assert protocol._better(task, 1.0, float("nan"))
    assert not protocol._better(task, float("nan"), 1.0)
    assert protocol._better(task, 0.5, 1.0)


def test_steps_to_reach_finds_the_first_step_at_the_target() -> None:
    class Higher:
        higher_is_better = True

    task: Any = Higher()
    curve = protocol.np.array([0.1, 0.5, 0.8, 0.9])
    assert protocol.steps_to_reach(task, [0, 10, 20, 30], curve, 0.8) == 20
    assert protocol.steps_to_reach(task, [0, 10, 20, 30], curve, 0.95) is None


def test_sentences_are_distinct_prose_from_the_named_docstring_files() -> None:
    texts, files = conversion.sentences(40)
    assert len(texts) == len(set(texts)) == 40
    assert sum(f["sentences_used"] for f in files) == 40
    assert all(t[0].isupper() and t.endswith(".") and len(t.split()) >= 6 for t in texts)


def _fake_sweep(
    monkeypatch: pytest.MonkeyPatch, best: float, grid: tuple[float, ...]
) -> protocol.VariantResult:
    """Run the sweep with training replaced by a validation loss that is lowest at `best`."""

    def fake_train(task: Any, variant: Any, lr: float, seed: int, split: str, budget: Any) -> Any:
        val = abs(math.log(lr / best))
        return protocol.Run(lr, seed, split, [0], [val], val, val, 1.0, 0.5, 0.1)

    class Task:
        metric = "loss"
        higher_is_better = False
        data: dict[str, Any] = {"train": 1, "train_full": 1}

    monkeypatch.setattr(protocol, "train", fake_train)
    monkeypatch.setattr(protocol, "count_parameters", lambda model: 1)
    budget = protocol.Budget(10, 4, grid, (0, 1), max_extensions=2)
    variant = protocol.Variant("v", "", lambda: None, "v")  # type: ignore[arg-type,return-value]
    return protocol.run_variant(Task(), variant, budget, lambda message: None)  # type: ignore[arg-type]


def test_sweep_extends_the_grid_past_an_edge_that_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _fake_sweep(monkeypatch, best=0.09, grid=(1e-3, 1e-2))
    # 0.1 wins at the new edge, so 1.0 is tried as well, loses, and the sweep stops
    assert sorted(result.sweep) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    assert result.lr == pytest.approx(0.1)


def test_sweep_extends_at_most_max_extensions_times(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _fake_sweep(monkeypatch, best=1e-9, grid=(1e-3, 1e-2))
    assert sorted(result.sweep) == pytest.approx([1e-5, 1e-4, 1e-3, 1e-2])
    assert result.lr == pytest.approx(1e-5)


def test_sweep_keeps_an_interior_best_without_extending(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _fake_sweep(monkeypatch, best=3e-3, grid=(1e-3, 3e-3, 1e-2))
    assert sorted(result.sweep) == pytest.approx([1e-3, 3e-3, 1e-2])
    assert result.lr == pytest.approx(3e-3)
    assert result.runs[0] is result.sweep[result.lr]  # the same split: seed 0 is not retrained
