"""Triton kernels of EquiNorm (math, input mass and guard: ``tritonorm.reference.equinorm``).

Input sums v_c (a reduction of the whole activation, like the batch-norm statistics):

    _partial_sums_kernel("sum")   read x       (channel-block, split) partial sums
    _combine_kernel                            v_c = sum of the partials

Weight transform, one program per output channel d, walking its contiguous row of
C_in/groups x K weights in 1-D tiles of whole input channels (``_row_tile``: BLOCK_CI
channels, about WEIGHT_TILE positions; the mass of a position's channel is gathered at
c = r // K, K a constexpr):

    _weight_forward_kernel    pass 1: A = sum m w, M = sum m, and for the single-pass form
                                      sum m w [w>0], sum m [w>0]
                              (exact: pass 2: sum m (w+b)^+ once b = -A/M is known)
                              last pass: w_out = gain_d s_d (w + b_d); store s_d, b_d

Backward, with G = dL/dw_out, u = w + b, p the positive mask ([w>0] single-pass,
[u>0] exact) and M = sum_j m_j (so b = -A/M and s = 1/D, D = sum m u p):

    dL/dgain_d = s t,  t = sum G u
    dL/dD      = -s^2 gain t                         (gD)
    dL/db      = s gain sum G + gD sum m p           (gb)
    dL/dw_j    = s gain G_j + m_j (gD p_j - gb / M)
    dL/dm_c    = sum over d of d's group of sum_{j in (d, c)} u_j (gD p_j - gb / M)

    _weight_backward_kernel   pass 1: t, sum G, sum m p, M;  pass 2: dL/dw and the
                              per-(d, c) terms of dL/dm (a segmented scan of the tile
                              sums each channel's K lanes), summed over d by the launcher

Traffic: forward reads w twice (three times exact) and writes w_out; backward reads G and
w twice and writes dL/dw and the (C_out, C_in/groups) fp32 terms of dL/dm.  The rows are
short (C_in/groups x K: 4608 for a 3x3 conv with 512 inputs), so the later passes re-read
them from L1/L2.

Why dL/dm takes a second launch (the torch sum over d): its sum over d runs across
programs, and each program needs its whole row (its scalars t, gD and gb) before the first
term exists; without atomics (whose fp32 sum order, and so its rounding, changes from run
to run) or a grid-wide barrier, a cross-program sum is a second launch.  One program per
output channel gives C_out programs: 64 for the smallest ResNet layer, whose rows (576
weights) are one tile per pass, so splitting rows to fill more SMs would add a launch for
a cross-program row sum to save less than a launch's time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.equinorm import degenerate_rtol, transform_dtype
from . import num_warps_for
from .channel_reduce import (
    accumulator_dtype,
    channel_block,
    channel_view,
    combine_splits,
    contiguous,
    partial_sums,
    triton_dtype,
)

# Weight positions of one tile (8 per thread at NUM_WARPS), and the channel multiple of a
# tile that keeps every tile of a 16-aligned row 16-aligned (K odd: 16 channels).
WEIGHT_TILE = 1024
NUM_WARPS = 4
ALIGN_CI = 16
# Rows shorter than one warp's 16-byte vectors, or not a multiple of 16 bytes, are read
# several to a tile (``_row_group``) of at most MAX_GROUP_TILE positions.
MIN_TILE_BYTES = 32 * 16
MAX_GROUP_TILE = 2048
# Channels per program of the combine kernel.
COMBINE_BLOCK_C = 128


@triton.jit
def _combine_kernel(partial_ptr, out_ptr, splits, C, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 2 of the input sums: out[c] = sum over splits of partial[split, c]."""
    c, c_mask = channel_block(BLOCK_C, C)
    tl.store(out_ptr + c, combine_splits(partial_ptr, splits, C, c, c_mask, ACC), mask=c_mask)


def input_sums(x: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """v (C,) in the accumulator dtype: the sum of an (N, C, *) tensor's first ``rows``
    samples (all for None) over all but dim 1."""
    acc = accumulator_dtype(x.dtype)
    if x.numel() == 0:  # an empty batch (one process's share of a synchronized one): no launch
        return torch.zeros(x.shape[1], device=x.device, dtype=acc)
    view = channel_view(x if rows is None else x[:rows])
    partial, _ = partial_sums(view, "sum")
    out = torch.empty(view.c, device=x.device, dtype=acc)
    _combine_kernel[(triton.cdiv(view.c, COMBINE_BLOCK_C),)](
        partial, out, partial.shape[0], view.c, ACC=triton_dtype(acc), BLOCK_C=COMBINE_BLOCK_C,
    )
    return out


@triton.jit
def _lane_rows(K: tl.constexpr, GROUP: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK: tl.constexpr):
    """Lane j of a tile, and its row in the program's group of rows (0 for one row; with
    GROUP rows, each of BLOCK_CI K lanes)."""
    j = tl.arange(0, BLOCK)
    g = 0
    if GROUP > 1:
        g = j // (BLOCK_CI * K)
    return j, g


@triton.jit
def _row_tile(w_ptr, m_ptr, d0, c0, CPG, OUT_PER_GROUP, K: tl.constexpr, GROUP: tl.constexpr, ACC: tl.constexpr,
              BLOCK_CI: tl.constexpr, BLOCK: tl.constexpr):
    """Tile of the program's rows d0 .. d0 + GROUP - 1 that holds their input channels c0 ..
    c0 + BLOCK_CI - 1, all K kernel positions of each (with GROUP > 1, whole rows: BLOCK_CI
    is C_in/groups).  The rows are contiguous, so lane j is at offset (d0 CPG + c0) K + j,
    position r = c K + k of its row.  Returns the lanes, their rows in the group, their
    positions, offsets and mask, the weights and the mass of each weight's input channel
    (gathered at c = r // K, a multiply-shift as K is a constexpr).  Masked lanes hold
    w = 0 and m = 0.

    Every mask term holds over runs of 16 lanes when BLOCK_CI K and C_in/groups are
    multiples of 16, or, grouped, GROUP BLOCK_CI K lanes make a multiple of 16 bytes
    (``_tiles``): the loads and stores of a tile are 128-bit vectors."""
    j, g = _lane_rows(K, GROUP, BLOCK_CI, BLOCK)
    if GROUP == 1:
        r = c0 * K + j
        mask = (j < BLOCK_CI * K) & (r < CPG * K)
    else:
        r = j - g * (BLOCK_CI * K)
        mask = j < GROUP * BLOCK_CI * K
    offs = (d0.to(tl.int64) * CPG + c0) * K + j
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + ((d0 + g) // OUT_PER_GROUP) * CPG + r // K, mask=mask, other=0.0).to(ACC)
    return j, r, offs, mask, w, m


@triton.jit
def _row_sums(x, g, GROUP: tl.constexpr):
    """x summed over each of the tile's rows: a scalar for one row, else [GROUP]."""
    if GROUP == 1:
        sums = tl.sum(x, 0)
    else:
        rows = tl.arange(0, GROUP)
        sums = tl.zeros([GROUP], x.dtype)
        for i in tl.static_range(GROUP):
            sums = tl.where(rows == i, tl.sum(tl.where(g == i, x, 0.0), 0), sums)
    return sums


@triton.jit
def _row_values(v, g, GROUP: tl.constexpr):
    """Per-row values (a scalar for one row, else [GROUP]) at each lane of the tile."""
    if GROUP == 1:
        lanes = v
    else:
        rows = tl.arange(0, GROUP)
        lanes = tl.zeros(g.shape, v.dtype)
        for i in tl.static_range(GROUP):
            lanes = tl.where(g == i, tl.sum(tl.where(rows == i, v, 0.0), 0), lanes)
    return lanes


@triton.jit
def _row_load(ptr, d0, GROUP: tl.constexpr):
    """ptr[d0], or ptr[d0 .. d0 + GROUP - 1] for a group of rows."""
    return tl.load(ptr + d0) if GROUP == 1 else tl.load(ptr + d0 + tl.arange(0, GROUP))


@triton.jit
def _segment_sum(a, a_starts, b, b_starts):
    """Combine of a segmented inclusive scan: a sum that restarts where a segment starts."""
    return tl.where(b_starts, b, a + b), a_starts | b_starts


@triton.jit
def _channel_sums(x, r, K: tl.constexpr):
    """x summed over each channel's K lanes of a ``_row_tile`` tile (r: the lanes'
    positions in their rows), in the channel's last lane (r % K == K - 1); other lanes
    hold partial sums."""
    if K == 1:
        sums = x
    else:
        sums, _ = tl.associative_scan((x, r % K == 0), 0, _segment_sum)
    return sums


@triton.jit
def _positive(w, u, EXACT: tl.constexpr):
    """The mask p of the weights whose (w + b) counts as positive."""
    if EXACT:
        return u > 0
    return w > 0


@triton.jit
def _weight_forward_kernel(
    w_ptr, m_ptr, gain_ptr, out_ptr, s_ptr, b_ptr,
    CPG, OUT_PER_GROUP, degenerate,
    K: tl.constexpr, GROUP: tl.constexpr, EXACT: tl.constexpr, ACC: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK: tl.constexpr,
):
    d0 = tl.program_id(0) * GROUP
    g = _lane_rows(K, GROUP, BLOCK_CI, BLOCK)[1]
    channels = CPG if GROUP == 1 else BLOCK_CI  # grouped: one tile (a loop that folds away)
    mw = tl.zeros([BLOCK], ACC)
    mass = tl.zeros([BLOCK], ACC)
    abs_mw = tl.zeros([BLOCK], ACC)
    abs_m = tl.zeros([BLOCK], ACC)
    pos_mw = tl.zeros([BLOCK], ACC)
    pos_m = tl.zeros([BLOCK], ACC)
    for c0 in range(0, channels, BLOCK_CI):
        _, _, _, _, w, m = _row_tile(w_ptr, m_ptr, d0, c0, CPG, OUT_PER_GROUP, K, GROUP, ACC, BLOCK_CI, BLOCK)
        mw += m * w
        mass += m
        abs_mw += tl.abs(m * w)
        abs_m += tl.abs(m)
        if not EXACT:
            pos_mw += tl.where(w > 0, m * w, 0.0)
            pos_m += tl.where(w > 0, m, 0.0)
    total = _row_sums(mass, g, GROUP)
    b = -_row_sums(mw, g, GROUP) / tl.where(total != 0, total, 1.0)
    if EXACT:
        lane_b = _row_values(b, g, GROUP)
        for c0 in range(0, channels, BLOCK_CI):
            _, _, _, _, w, m = _row_tile(w_ptr, m_ptr, d0, c0, CPG, OUT_PER_GROUP, K, GROUP, ACC, BLOCK_CI, BLOCK)
            pos_mw += tl.where(w + lane_b > 0, m * (w + lane_b), 0.0)
    denom = _row_sums(pos_mw, g, GROUP) + b * _row_sums(pos_m, g, GROUP)
    # Written as "not degenerate" so that a NaN passes through, as in any torch op.
    valid = ~((total <= degenerate * _row_sums(abs_m, g, GROUP)) | (denom <= degenerate * _row_sums(abs_mw, g, GROUP)))
    s = tl.where(valid, 1.0 / tl.where(valid, denom, 1.0), 0.0)
    b = tl.where(valid, b, 0.0)
    scale = s
    if gain_ptr is not None:
        scale = s * _row_load(gain_ptr, d0, GROUP).to(ACC)
    lane_b = _row_values(b, g, GROUP)
    lane_scale = _row_values(scale, g, GROUP)
    for c0 in range(0, channels, BLOCK_CI):
        _, _, offs, mask, w, _ = _row_tile(w_ptr, m_ptr, d0, c0, CPG, OUT_PER_GROUP, K, GROUP, ACC, BLOCK_CI, BLOCK)
        tl.store(out_ptr + offs, ((w + lane_b) * lane_scale).to(out_ptr.dtype.element_ty), mask=mask)
    rows = d0 + tl.arange(0, GROUP)
    tl.store(s_ptr + rows, s)
    tl.store(b_ptr + rows, b)


@triton.jit
def _weight_backward_kernel(
    g_ptr, w_ptr, m_ptr, gain_ptr, s_ptr, b_ptr, dw_ptr, dm_ptr, dgain_ptr,
    CPG, OUT_PER_GROUP,
    K: tl.constexpr, GROUP: tl.constexpr, EXACT: tl.constexpr, ACC: tl.constexpr, BLOCK_CI: tl.constexpr,
    BLOCK: tl.constexpr,
):
    d0 = tl.program_id(0) * GROUP
    g = _lane_rows(K, GROUP, BLOCK_CI, BLOCK)[1]
    channels = CPG if GROUP == 1 else BLOCK_CI
    s = _row_load(s_ptr, d0, GROUP).to(ACC)
    b = _row_load(b_ptr, d0, GROUP).to(ACC)
    gain = 1.0
    if gain_ptr is not None:
        gain = _row_load(gain_ptr, d0, GROUP).to(ACC)
    lane_b = _row_values(b, g, GROUP)
    gu = tl.zeros([BLOCK], ACC)
    g_sum = tl.zeros([BLOCK], ACC)
    mass = tl.zeros([BLOCK], ACC)
    pos_m = tl.zeros([BLOCK], ACC)
    for c0 in range(0, channels, BLOCK_CI):
        _, _, offs, mask, w, m = _row_tile(w_ptr, m_ptr, d0, c0, CPG, OUT_PER_GROUP, K, GROUP, ACC, BLOCK_CI, BLOCK)
        grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        u = tl.where(mask, w + lane_b, 0.0)
        gu += grad * u
        g_sum += grad
        mass += m
        pos_m += tl.where(_positive(w, u, EXACT), m, 0.0)
    t = _row_sums(gu, g, GROUP)
    if dgain_ptr is not None:
        tl.store(dgain_ptr + d0 + tl.arange(0, GROUP), (s * t).to(dgain_ptr.dtype.element_ty))
    grad_denom = -s * s * gain * t
    grad_b = s * gain * _row_sums(g_sum, g, GROUP) + grad_denom * _row_sums(pos_m, g, GROUP)
    # s == 0 marks a guarded row (see the reference): no gradient, and M may be 0.
    grad_b_per_mass = tl.where(s != 0, grad_b / tl.where(s != 0, _row_sums(mass, g, GROUP), 1.0), 0.0)
    lane_grad_denom = _row_values(grad_denom, g, GROUP)
    lane_grad_b_per_mass = _row_values(grad_b_per_mass, g, GROUP)
    lane_scale = _row_values(s * gain, g, GROUP)
    for c0 in range(0, channels, BLOCK_CI):
        j, r, offs, mask, w, m = _row_tile(w_ptr, m_ptr, d0, c0, CPG, OUT_PER_GROUP, K, GROUP, ACC, BLOCK_CI, BLOCK)
        grad = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        u = tl.where(mask, w + lane_b, 0.0)
        coeff = tl.where(_positive(w, u, EXACT), lane_grad_denom, 0.0) - lane_grad_b_per_mass
        tl.store(dw_ptr + offs, (lane_scale * grad + m * coeff).to(dw_ptr.dtype.element_ty), mask=mask)
        # the (row, channel) of a lane is d0 CPG + (c0 K + j) // K among the group's
        dm = _channel_sums(u * coeff, r, K)
        tl.store(dm_ptr + d0.to(tl.int64) * CPG + (c0 * K + j) // K, dm, mask=mask & (r % K == K - 1))


def _row_group(weight: torch.Tensor) -> int:
    """Rows per program (1: one): the fewest, a power of two, whose contiguous span is a
    multiple of 16 bytes and fills one warp's 16-byte vectors (MIN_TILE_BYTES), when the
    row alone does not (a stem conv's row of 147 weights: 4 in fp32, 8 in bf16; a 1x1 row
    of 64: 2 in fp32), if they divide C_out and fit one tile of MAX_GROUP_TILE."""
    row_bytes = weight[0].numel() * weight.element_size()
    group = 1
    while group * row_bytes % 16 or group * row_bytes < MIN_TILE_BYTES:
        group *= 2
    if weight.shape[0] % group or triton.next_power_of_2(group * weight[0].numel()) > MAX_GROUP_TILE:
        return 1
    return group


def _tiles(weight: torch.Tensor) -> dict:
    """Tile of BLOCK_CI whole channels of a row, about WEIGHT_TILE positions: the largest
    multiple of ALIGN_CI channels that fits (so that every tile of a 16-aligned row starts
    16-aligned), or, when the row is shorter or not even ALIGN_CI channels fit, as many
    channels as fit, at least one; or GROUP whole rows (``_row_group``).  BLOCK is the
    power of two that holds the tile; a short one gets fewer warps (``num_warps_for``), so
    that its loads stay vectors."""
    cpg, k = weight.shape[1], weight[0, 0].numel()
    group = _row_group(weight)
    block_ci = WEIGHT_TILE // k // ALIGN_CI * ALIGN_CI
    if group > 1 or cpg <= block_ci or block_ci == 0:
        block_ci = cpg if group > 1 else min(cpg, max(WEIGHT_TILE // k, 1))
    block = triton.next_power_of_2(group * block_ci * k)
    return dict(K=k, GROUP=group, BLOCK_CI=block_ci, BLOCK=block, num_warps=num_warps_for(block, NUM_WARPS))


def _geometry(weight: torch.Tensor, groups: int):
    return weight.shape[1], weight.shape[0] // groups


def weight_forward(weight: torch.Tensor, mass: torch.Tensor, gain: torch.Tensor | None, groups: int, single_pass: bool):
    """(gain * w'', s, b): w'' in the weight's dtype, s and b (C_out,) in the accumulator dtype.
    Every tensor is read contiguous (a copy only when it is not)."""
    weight, mass, gain = contiguous(weight, mass, gain)
    acc = transform_dtype(weight, mass)
    c_out = weight.shape[0]
    out = torch.empty_like(weight)
    s = torch.empty(c_out, device=weight.device, dtype=acc)
    b = torch.empty_like(s)
    tiles = _tiles(weight)
    _weight_forward_kernel[(c_out // tiles["GROUP"],)](
        weight, mass, gain, out, s, b, *_geometry(weight, groups), degenerate_rtol(acc),
        EXACT=not single_pass, ACC=triton_dtype(acc), **tiles,
    )
    return out, s, b


def weight_backward(
    grad: torch.Tensor, weight: torch.Tensor, mass: torch.Tensor, gain: torch.Tensor | None,
    s: torch.Tensor, b: torch.Tensor, groups: int, single_pass: bool,
):
    """(dL/dweight, dL/dmass, dL/dgain in the gain's dtype or an empty tensor) from dL/dw_out."""
    grad, weight, mass, gain, s, b = contiguous(grad, weight, mass, gain, s, b)
    c_out, cpg = weight.shape[0], weight.shape[1]
    dw = torch.empty_like(weight)
    dm_terms = torch.empty((c_out, cpg), device=weight.device, dtype=s.dtype)
    dgain = torch.empty(c_out if gain is not None else 0, device=weight.device,
                        dtype=s.dtype if gain is None else gain.dtype)
    tiles = _tiles(weight)
    _weight_backward_kernel[(c_out // tiles["GROUP"],)](
        grad, weight, mass, gain, s, b, dw, dm_terms, dgain if gain is not None else None,
        *_geometry(weight, groups), EXACT=not single_pass, ACC=triton_dtype(s.dtype), **tiles,
    )
    dmass = dm_terms.view(groups, c_out // groups, cpg).sum(1).reshape(groups * cpg)
    return dw, dmass.to(mass.dtype), dgain
