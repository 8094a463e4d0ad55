"""The experiments: which task, which variants (with their parameter counts matched), which
budget. `--quick` shrinks every budget to one seed, one learning rate and a few hundred steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from accuracy_lib import tasks
from accuracy_lib.models import (
    MLP,
    CharTransformer,
    CNN1d,
    CNN2d,
    GaussianRBF,
    GMNMLayerNet,
    count_parameters,
    gmnm_from_scratch,
    gmnm_on_gelu,
    gmnm_on_relu,
    match_width,
)
from accuracy_lib.protocol import Budget, Variant
from gmnm import GMNMLayer

SEEDS = (0, 1, 2, 3, 4)
# Parameter counts of compared variants must agree within this fraction of the baseline's.
PARAMETER_TOLERANCE = 0.03


@dataclass
class Experiment:
    name: str
    title: str
    task: tasks.Task
    variants: list[Variant]
    budget: Budget
    # plot panels: (title, variant names, fraction of training where the x axis starts)
    panels: list[tuple[str, list[str], float]]
    figure: str  # the PNG this experiment draws into (several experiments may share one)


def _budget(
    quick: bool,
    steps: int,
    batch: int,
    grid: tuple[float, ...],
    eval_points: int,
    quick_steps: int | None = None,
    max_extensions: int = 2,
) -> Budget:
    if quick:
        middle = grid[len(grid) // 2]
        short = quick_steps or max(steps // 10, 20)
        return Budget(short, batch, (middle,), SEEDS[:1], eval_points=min(5, eval_points))
    return Budget(steps, batch, grid, SEEDS, eval_points=eval_points, max_extensions=max_extensions)


def _check_budget(experiment: Experiment) -> None:
    """Refuse to run a comparison whose parameter counts drifted apart."""
    counts = {v.name: count_parameters(v.build()) for v in experiment.variants}
    for v in experiment.variants:
        base = counts[v.baseline]
        if abs(counts[v.name] - base) > PARAMETER_TOLERANCE * base:
            raise ValueError(
                f"{experiment.name}: {v.name} has {counts[v.name]} parameters but its baseline "
                f"{v.baseline} has {base}; adjust its width so the counts agree within "
                f"{PARAMETER_TOLERANCE:.0%}"
            )


def mnist1d(quick: bool) -> Experiment:
    hidden, channels = 100, 25
    relu_mlp = partial(MLP, 40, hidden, 10, nn.ReLU)
    target = count_parameters(relu_mlp())

    def layer_net(m: int) -> nn.Module:
        return GMNMLayerNet(40, hidden, 10, components=m, projections=1)

    m = match_width(layer_net, target, high=400)
    variants = [
        Variant("mlp_relu", f"MLP 40-{hidden}-{hidden}-10, ReLU", relu_mlp, "mlp_relu"),
        Variant(
            "mlp_gmnm",
            "the same MLP, GMNMActivation(K=8, base='linear', init='random'), one per layer",
            partial(MLP, 40, hidden, 10, gmnm_from_scratch),
            "mlp_relu",
        ),
        Variant(
            "mlp_gmnm_layer",
            f"GMNMLayer(40, {hidden}, {m}) -> GMNMLayer({hidden}, 10, {m}), rank-1 projections",
            partial(layer_net, m),
            "mlp_relu",
        ),
        Variant(
            "cnn_relu",
            f"CNN: 3 strided Conv1d ({channels} channels) + linear, ReLU",
            partial(CNN1d, channels, nn.ReLU),
            "cnn_relu",
        ),
        Variant(
            "cnn_gmnm",
            "the same CNN, GMNMActivation(K=8, base='linear', init='random')",
            partial(CNN1d, channels, gmnm_from_scratch),
            "cnn_relu",
        ),
        Variant(
            "cnn_gmnm_on_relu",
            "the same CNN, GMNMActivation(K=8, base='relu', init='residual')",
            partial(CNN1d, channels, gmnm_on_relu),
            "cnn_relu",
        ),
    ]
    return Experiment(
        "mnist1d",
        "MNIST-1D (4,000 train / 1,000 test)",
        tasks.mnist1d_task(),
        variants,
        _budget(quick, 3000, 100, (1e-3, 3e-3, 1e-2), eval_points=30),
        [
            ("MLPs", ["mlp_relu", "mlp_gmnm", "mlp_gmnm_layer"], 0.0),
            ("CNNs", ["cnn_relu", "cnn_gmnm", "cnn_gmnm_on_relu"], 0.0),
        ],
        "accuracy_mnist1d.png",
    )


def digits(quick: bool) -> Experiment:
    channels = 16
    variants = [
        Variant(
            "cnn_relu",
            f"CNN: Conv2d 1-{channels}-{2 * channels} + linear, ReLU",
            partial(CNN2d, channels, nn.ReLU),
            "cnn_relu",
        ),
        Variant(
            "cnn_gmnm",
            "the same CNN, GMNMActivation(K=8, base='linear', init='random')",
            partial(CNN2d, channels, gmnm_from_scratch),
            "cnn_relu",
        ),
        Variant(
            "cnn_gmnm_on_relu",
            "the same CNN, GMNMActivation(K=8, base='relu', init='residual')",
            partial(CNN2d, channels, gmnm_on_relu),
            "cnn_relu",
        ),
    ]
    return Experiment(
        "digits",
        "scikit-learn digits (8x8, 1,437 train / 360 test)",
        tasks.digits_task(),
        variants,
        _budget(quick, 1000, 64, (3e-3, 1e-2, 3e-2), eval_points=20),
        [("CNNs", [v.name for v in variants], 0.0)],
        "accuracy_digits.png",
    )


def functions(quick: bool) -> list[Experiment]:
    hidden = 30
    target = count_parameters(MLP(2, hidden, 1, nn.ReLU))

    def gmnm_layer(m: int) -> nn.Module:
        return GMNMLayer(2, 1, m, num_projections=2)

    def rbf(n: int) -> nn.Module:
        return GaussianRBF(2, n)

    m = match_width(gmnm_layer, target, high=1000)
    n = match_width(rbf, target, high=1000)
    builders: list[tuple[str, str, Callable[[], nn.Module]]] = [
        ("mlp_relu", f"MLP 2-{hidden}-{hidden}-1, ReLU", partial(MLP, 2, hidden, 1, nn.ReLU)),
        ("mlp_silu", f"MLP 2-{hidden}-{hidden}-1, SiLU", partial(MLP, 2, hidden, 1, nn.SiLU)),
        ("gmnm_layer", f"GMNMLayer(2, 1, {m}, num_projections=2)", partial(gmnm_layer, m)),
        ("rbf", f"Gaussian RBF network, {n} isotropic units", partial(rbf, n)),
    ]
    experiments = []
    for key, (formula, _) in tasks.FUNCTIONS.items():
        variants = [Variant(name, desc, build, "mlp_relu") for name, desc, build in builders]
        experiments.append(
            Experiment(
                f"function_{key}",
                formula,
                tasks.function_task(key),
                variants,
                # runs are cheap here, and GMNMLayer's best rate lies far above the others'
                _budget(
                    quick,
                    3000,
                    256,
                    (3e-3, 1e-2, 3e-2),
                    eval_points=30,
                    quick_steps=1000,
                    max_extensions=4,
                ),
                [(key, [v.name for v in variants], 0.0)],
                "accuracy_functions.png",
            )
        )
    return experiments


def charlm(quick: bool) -> Experiment:
    context = 64
    variants = [
        Variant(
            "gelu",
            "4-layer pre-LN Transformer, width 128, 4 heads, GELU, softmax attention",
            partial(CharTransformer, context, nn.GELU, False),
            "gelu",
        ),
        Variant(
            "gmnm_act",
            "the same, GMNMActivation(K=8, base='gelu', init='residual') in every MLP",
            partial(CharTransformer, context, gmnm_on_gelu, False),
            "gelu",
        ),
        Variant(
            "gmnm_act_softmax",
            "the same plus GMNMSoftmax(K=8, one mixture per head) in every attention layer",
            partial(CharTransformer, context, gmnm_on_gelu, True),
            "gelu",
        ),
    ]
    # The most expensive experiment by far, hence two learning rates instead of three and at most
    # one extension of the grid.
    budget = _budget(
        quick,
        500,
        16,
        (1e-3, 3e-3),
        eval_points=2 if quick else 10,
        quick_steps=20,
        max_extensions=1,
    )
    return Experiment(
        "charlm",
        "character language model on Python standard-library source",
        tasks.charlm_task(
            context, curve_windows=32 if quick else 128, final_windows=64 if quick else 512
        ),
        variants,
        budget,
        [
            ("whole run", [v.name for v in variants], 0.0),
            ("second half, enlarged", [v.name for v in variants], 0.5),
        ],
        "accuracy_charlm.png",
    )


BUILDERS: dict[str, Callable[[bool], list[Experiment]]] = {
    "mnist1d": lambda quick: [mnist1d(quick)],
    "digits": lambda quick: [digits(quick)],
    "functions": functions,
    "charlm": lambda quick: [charlm(quick)],
}


def build(name: str, quick: bool) -> list[Experiment]:
    experiments = BUILDERS[name](quick)
    for experiment in experiments:
        _check_budget(experiment)
    return experiments
