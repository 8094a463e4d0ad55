"""The networks compared in the accuracy benchmark, and the width matching that keeps their
parameter counts equal.

Every model is small enough to train in seconds on one CPU thread. Activation variants are passed
as factories (`ActFactory`) so that the ReLU network and its GMNM twin share one definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmnm import GMNMActivation, GMNMLayer, GMNMSoftmax

ActFactory = Callable[[], nn.Module]

NUM_COMPONENTS = 8


def gmnm_from_scratch() -> nn.Module:
    """The residual-free activation: learned `a*x + c` plus a randomly initialised mixture."""
    return GMNMActivation(NUM_COMPONENTS, base="linear", init="random")


def gmnm_on_relu() -> nn.Module:
    """The residual form on top of ReLU: exactly ReLU at step 0, the mixture learns a correction."""
    return GMNMActivation(NUM_COMPONENTS, base="relu", init="residual")


def gmnm_on_gelu() -> nn.Module:
    return GMNMActivation(NUM_COMPONENTS, base="gelu", init="residual")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def match_width(
    build: Callable[[int], nn.Module], target: int, low: int = 1, high: int = 4096
) -> int:
    """The width whose model's parameter count is closest to `target` (counts grow with width)."""
    best = min(range(low, high + 1), key=lambda w: abs(count_parameters(build(w)) - target))
    return best


# --- classifiers (MNIST-1D, digits) --------------------------------------------------------------


class MLP(nn.Module):
    """`in -> hidden -> hidden -> out` with one activation after each hidden layer."""

    def __init__(self, in_features: int, hidden: int, out_features: int, act: ActFactory) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GMNMLayerNet(nn.Module):
    """Two stacked `GMNMLayer`s: `in -> hidden` and `hidden -> out`, each with `components`
    Gaussians of rank `projections`; no other nonlinearity."""

    def __init__(
        self, in_features: int, hidden: int, out_features: int, components: int, projections: int
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            GMNMLayer(in_features, hidden, components, projections),
            GMNMLayer(hidden, out_features, components, projections),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """Three strided convolutions and a linear read-out over a 40-sample signal, (B, 40) in."""

    def __init__(self, channels: int, act: ActFactory, length: int = 40, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            act(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            act(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            act(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, length)).numel()
        self.head = nn.Linear(flat, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.unsqueeze(1))  # (B, C, L')
        return self.head(h.flatten(1))


class CNN2d(nn.Module):
    """Two convolutions (the second strided) and a linear read-out over an 8x8 image, (B, 64) in."""

    def __init__(self, channels: int, act: ActFactory, side: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            act(),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1),
            act(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, side, side)).numel()
        self.head = nn.Linear(flat, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x.view(-1, 1, self.side, self.side))  # (B, 2C, side/2, side/2)
        return self.head(h.flatten(1))


# --- regressors (function approximation) ---------------------------------------------------------


class GaussianRBF(nn.Module):
    """`f(x) = b + sum_j w_j exp(-||x - c_j||^2 / (2 s_j^2))` with trainable centres, widths and
    weights: the classical radial-basis network the GMNM layer generalises (its Gaussians are
    isotropic; GMNMLayer's have a learned covariance)."""

    def __init__(self, in_features: int, units: int, low: float = -1.0, high: float = 1.0) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.empty(units, in_features).uniform_(low, high))
        # neighbouring centres about one width apart on a regular grid of `units` points
        spacing = (high - low) / units ** (1.0 / in_features)
        self.log_width = nn.Parameter(torch.full((units,), math.log(spacing)))
        self.weight = nn.Parameter(torch.randn(units) / math.sqrt(units))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        # ||x - c||^2 expanded, which trains faster on the CPU than cdist's backward
        squared = (
            x.pow(2).sum(-1, keepdim=True) - 2.0 * x @ self.centres.T + self.centres.pow(2).sum(-1)
        ).clamp_min(0.0)  # (B, units)
        phi = torch.exp(-0.5 * squared * torch.exp(-2.0 * self.log_width))
        return (phi @ self.weight + self.bias).unsqueeze(-1)


# --- character language model --------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention written out (no fused kernel) so the softmax can be swapped."""

    def __init__(self, width: int, heads: int, softmax: nn.Module | None) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.softmax = softmax

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.heads)  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(causal, float("-inf"))
        p = self.softmax(scores) if self.softmax is not None else F.softmax(scores, dim=-1)
        out = (p @ v).transpose(1, 2).reshape(B, T, C)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, act: ActFactory, softmax: nn.Module | None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, softmax)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), act(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A pre-LayerNorm decoder over bytes: `layers` blocks of `width`, `heads` heads, 4x MLP."""

    def __init__(
        self,
        context: int,
        act: ActFactory,
        gmnm_softmax: bool,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        vocab: int = 256,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(
                width,
                heads,
                act,
                GMNMSoftmax(num_components=NUM_COMPONENTS, heads=heads, head_dim=1)
                if gmnm_softmax
                else None,
            )
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx) + self.position[: idx.shape[1]]  # (B, T, width)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, vocab)
