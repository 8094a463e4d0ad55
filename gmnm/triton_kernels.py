"""The mixture as Triton kernels: a forward kernel and an explicit backward kernel.

Same conventions as `gmnm.cpu_kernel` (x contiguous, seen as [outer, C, inner]; parameters
(G, K) in the compute dtype; modes write / accumulate / linear), so `gmnm.backends` drives both
through one autograd function. The backward never stores a [..., K] tensor: each program
recomputes the Gaussians of its tile, writes the input gradient, and writes its partial
parameter sums to a small buffer that PyTorch then reduces per group:

- one group (G == 1): flat blocks, one partial row per block;
- several groups: tiles of [rows, channels] over x seen as [outer * inner, C], reduced over the
  rows inside the program, one partial row per (row range, channel).

Runs on CUDA; with `TRITON_INTERPRET=1` Triton's interpreter runs the same kernels on CPU
tensors, which is how the tests check them on a machine without a GPU.
"""

# Triton's convention writes compile-time constants (tl.constexpr) in capitals, and kernel
# arguments carry no Python type annotations; both checks are turned off for this file only.
# ruff: noqa: N803
# mypy: disable-error-code="no-untyped-def"

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from gmnm.functional import Z_CLAMP

logger = logging.getLogger(__name__)

MODE_WRITE, MODE_ACCUMULATE, MODE_LINEAR = 0, 1, 2

# Rows of [rows, channels] tiles that one backward program reduces before writing partials;
# bounds the partial buffer at (rows / _ROWS_PER_PROGRAM) * C * (3K + 2) values.
_ROWS_PER_PROGRAM = 512


@triton.jit
def _forward_kernel(
    x_ptr,
    out_ptr,
    pi_ptr,
    mu_ptr,
    scale_ptr,
    a_ptr,
    c_ptr,
    n,
    C,
    inner,
    per_group,
    K,
    Z: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    GROUPED: tl.constexpr,
    MODE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ks = tl.arange(0, KP)
    kmask = ks < K
    compute = pi_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(compute)

    # parameters of each element's group, [BLOCK, KP]
    if GROUPED:  # noqa: SIM108 (Triton compiles an if statement on a constexpr away)
        group = ((offs // inner) % C) // per_group
    else:
        group = tl.zeros([BLOCK], dtype=tl.int64)
    poffs = group[:, None] * K + ks[None, :]
    pmask = mask[:, None] & kmask[None, :]
    pi = tl.load(pi_ptr + poffs, mask=pmask, other=0.0)
    mu = tl.load(mu_ptr + poffs, mask=pmask, other=0.0)
    scale = tl.load(scale_ptr + poffs, mask=pmask, other=1.0)

    z = (x[:, None] - mu) * scale
    z = tl.minimum(tl.maximum(z, -Z), Z)
    y = tl.sum(pi * tl.exp(-0.5 * z * z), axis=1)

    if MODE == 1:
        y += tl.load(out_ptr + offs, mask=mask, other=0.0).to(compute)
    elif MODE == 2:
        a = tl.load(a_ptr + group, mask=mask, other=0.0)
        c = tl.load(c_ptr + group, mask=mask, other=0.0)
        y += a * x + c
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_flat_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    pi_ptr,
    mu_ptr,
    scale_ptr,
    a_ptr,
    part_ptr,
    n,
    K,
    Z: tl.constexpr,
    KP: tl.constexpr,
    BLOCK: tl.constexpr,
    MODE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ks = tl.arange(0, KP)
    kmask = ks < K
    compute = pi_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(compute)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(compute)
    pi = tl.load(pi_ptr + ks, mask=kmask, other=0.0)
    mu = tl.load(mu_ptr + ks, mask=kmask, other=0.0)
    scale = tl.load(scale_ptr + ks, mask=kmask, other=1.0)

    # [BLOCK, KP]; masked elements have g = 0 and add nothing to the sums
    z = (x[:, None] - mu[None, :]) * scale[None, :]
    z = tl.minimum(tl.maximum(z, -Z), Z)
    e = tl.exp(-0.5 * z * z)
    ge = g[:, None] * e
    gez = ge * z
    d = tl.sum(e * z * (pi * scale)[None, :], axis=1)

    if MODE == 1:
        dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(compute) - g * d
    elif MODE == 2:
        dx = tl.load(a_ptr) * g - g * d
    else:
        dx = -g * d
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)

    # partial sums of this block: A_k, B_k, C_k, then D, E for the linear base
    row = part_ptr + pid * (3 * K + 2)
    tl.store(row + ks, tl.sum(ge, axis=0), mask=kmask)
    tl.store(row + K + ks, tl.sum(gez, axis=0), mask=kmask)
    tl.store(row + 2 * K + ks, tl.sum(gez * z, axis=0), mask=kmask)
    if MODE == 2:
        tl.store(row + 3 * K, tl.sum(g * x, axis=0))
        tl.store(row + 3 * K + 1, tl.sum(g, axis=0))


@triton.jit
def _backward_grouped_kernel(
    x_ptr,
    g_ptr,
    dx_ptr,
    pi_ptr,
    mu_ptr,
    scale_ptr,
    a_ptr,
    part_ptr,
    rows,
    C,
    inner,
    per_group,
    K,
    rows_per_program,
    Z: tl.constexpr,
    KP: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
    MODE: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    cols = pid_c * BC + tl.arange(0, BC)
    cmask = cols < C
    ks = tl.arange(0, KP)
    kmask = ks < K
    compute = pi_ptr.dtype.element_ty

    # parameters per (component, channel), [KP, BC]
    group = cols // per_group
    poffs = group[None, :] * K + ks[:, None]
    pmask = kmask[:, None] & cmask[None, :]
    pi = tl.load(pi_ptr + poffs, mask=pmask, other=0.0)
    mu = tl.load(mu_ptr + poffs, mask=pmask, other=0.0)
    scale = tl.load(scale_ptr + poffs, mask=pmask, other=1.0)
    weight = pi * scale
    if MODE == 2:
        a = tl.load(a_ptr + group, mask=cmask, other=0.0)

    acc_a = tl.zeros([KP, BC], dtype=compute)
    acc_b = tl.zeros([KP, BC], dtype=compute)
    acc_c = tl.zeros([KP, BC], dtype=compute)
    acc_d = tl.zeros([BC], dtype=compute)
    acc_e = tl.zeros([BC], dtype=compute)

    first = pid_r * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for start in range(first, last, BR):
        # rows of x seen as [outer * inner, C]: element (r, c) lives at
        # (r // inner) * C * inner + c * inner + r % inner
        r = start + tl.arange(0, BR)
        rmask = r < last
        addr = (r // inner)[:, None] * C * inner + cols[None, :] * inner + (r % inner)[:, None]
        emask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + addr, mask=emask, other=0.0).to(compute)
        g = tl.load(g_ptr + addr, mask=emask, other=0.0).to(compute)

        # [BR, KP, BC]
        z = (x[:, None, :] - mu[None, :, :]) * scale[None, :, :]
        z = tl.minimum(tl.maximum(z, -Z), Z)
        e = tl.exp(-0.5 * z * z)
        ge = g[:, None, :] * e
        gez = ge * z
        acc_a += tl.sum(ge, axis=0)
        acc_b += tl.sum(gez, axis=0)
        acc_c += tl.sum(gez * z, axis=0)
        d = tl.sum(e * z * weight[None, :, :], axis=1)

        if MODE == 1:
            dx = tl.load(dx_ptr + addr, mask=emask, other=0.0).to(compute) - g * d
        elif MODE == 2:
            dx = a[None, :] * g - g * d
            acc_d += tl.sum(g * x, axis=0)
            acc_e += tl.sum(g, axis=0)
        else:
            dx = -g * d
        tl.store(dx_ptr + addr, dx.to(dx_ptr.dtype.element_ty), mask=emask)

    # partials for (row range, channel): [3K + 2] values each
    q = 3 * K + 2
    base = part_ptr + (pid_r * C + cols) * q
    tl.store(base[None, :] + ks[:, None], acc_a, mask=pmask)
    tl.store(base[None, :] + K + ks[:, None], acc_b, mask=pmask)
    tl.store(base[None, :] + 2 * K + ks[:, None], acc_c, mask=pmask)
    if MODE == 2:
        tl.store(base + 3 * K, acc_d, mask=cmask)
        tl.store(base + 3 * K + 1, acc_e, mask=cmask)


def _padded(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def _flat_block(kp: int) -> int:
    # keep BLOCK * KP (the widest tile) at 4096 values
    return max(16, 4096 // kp)


def forward(
    x: Tensor,
    out: Tensor,
    layout: tuple[int, int, int],
    pi: Tensor,
    mu: Tensor,
    scale: Tensor,
    mode: int,
    a: Tensor | None = None,
    c: Tensor | None = None,
) -> None:
    """Write `init + mixture(x)` into `out`; same contract as `gmnm.cpu_kernel.forward`."""
    channels, inner, groups = layout
    n, k = x.numel(), pi.shape[1]
    kp = _padded(k)
    block = _flat_block(kp)
    dummy = pi  # stands in for a and c when the mode does not read them
    _forward_kernel[(triton.cdiv(n, block),)](
        x,
        out,
        pi,
        mu,
        scale,
        a if a is not None else dummy,
        c if c is not None else dummy,
        n,
        channels,
        inner,
        max(channels // groups, 1),
        k,
        Z=Z_CLAMP,
        KP=kp,
        BLOCK=block,
        GROUPED=groups > 1,
        MODE=mode,
    )


def backward(
    x: Tensor,
    grad: Tensor,
    grad_x: Tensor,
    layout: tuple[int, int, int],
    pi: Tensor,
    mu: Tensor,
    scale: Tensor,
    mode: int,
    a: Tensor | None = None,
) -> Tensor:
    """Write the input gradient into `grad_x`; return the raw per-group sums (G, 3K + 2)."""
    channels, inner, groups = layout
    n, k = x.numel(), pi.shape[1]
    kp = _padded(k)
    q = 3 * k + 2
    a_arg = a if a is not None else pi
    if groups == 1:
        block = _flat_block(kp)
        programs = triton.cdiv(n, block)
        partial = torch.zeros(programs, q, dtype=pi.dtype, device=x.device)
        _backward_flat_kernel[(programs,)](
            x, grad, grad_x, pi, mu, scale, a_arg, partial, n, k,
            Z=Z_CLAMP, KP=kp, BLOCK=block, MODE=mode,
        )  # fmt: skip
        return partial.double().sum(0, keepdim=True)

    rows = n // channels
    block_cols = min(64, triton.next_power_of_2(channels))
    block_rows = max(1, 2048 // (kp * block_cols))
    row_programs = triton.cdiv(rows, _ROWS_PER_PROGRAM)
    partial = torch.zeros(row_programs, channels, q, dtype=pi.dtype, device=x.device)
    grid = (row_programs, triton.cdiv(channels, block_cols))
    _backward_grouped_kernel[grid](
        x, grad, grad_x, pi, mu, scale, a_arg, partial,
        rows, channels, inner, channels // groups, k, _ROWS_PER_PROGRAM,
        Z=Z_CLAMP, KP=kp, BR=block_rows, BC=block_cols, MODE=mode,
    )  # fmt: skip
    per_channel = partial.double().sum(0)  # (C, Q)
    return per_channel.reshape(groups, channels // groups, q).sum(1)
