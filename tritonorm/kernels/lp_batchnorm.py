"""Triton kernels of the L1 / L-inf / Top-k batch norm (math: ``tritonorm.reference.lp_batchnorm``).

Every pass ends in an epilogue: out = act(y + residual) with y the normalized input
(``tritonorm.kernels.activation``; "none" and no residual give y), and its backward
starts from dz = dout * act'(z), z rebuilt from x, the statistics and the residual.

Forward, training.  Where a channel fits in registers (``channel_resident.plan``), one
launch does it all:

    _resident_forward_kernel        read x (and the residual), write out: mu, a = x - mu and
                                    sigma from registers (sum |a|; the largest |a|; the K
                                    largest |a| in K extraction steps)

else the split passes (statistics, then normalize; a synced variant would all-reduce the
per-split partials between the two):

    L1           _partial_sums_kernel("sum")      read x     partial sum(x - x_0)
                 [_mean_kernel]                              mu, once (see below)
                 _partial_sums_kernel("abs_dev")  read x     partial sum|a|, sum sign(a)
                 _l1_finalize_kernel                         mean, sigma, wbar
                 _normalize_kernel                read x, write out
    L-inf/Top-k  _extremes_kernel                 read x     partial sum(x - x_0), K largest and
                                                             K smallest x with indices
                 _extremes_finalize_kernel                   mean, the K largest |a|, sigma
                 _normalize_kernel                read x, write out

then, with running statistics, ``running_stats.update_running`` (a separate op: an op that
mutates its inputs cannot carry an autograd formula).  Eval: _running_coeffs_kernel and
_normalize_kernel.  Sums of x are taken about each channel's x_0 (``channel_reduce``), so
a constant channel has mu = x_0 and y = beta exactly, and y is (x - mu) * scale + beta,
not x * scale + shift: the latter loses the digits of x - mu when |mu| >> sigma.

The split L1's second read cannot be avoided: mean |x - mu| needs mu first.  Its programs
recombine mu from the partial sums (splits x BLOCK_C values each) unless that re-read, over
all programs, costs more than a launch (channels_last with few channels: 526 splits at
C=64); then _mean_kernel computes it once, at the price of a fifth launch.  L-inf and Top-k
need one read because the K largest |x - mu| are among the K largest and the K smallest x.

Top-K state (split).  Each program keeps, per channel, the K best (value, index) pairs it
has seen (K=1: one per lane).  A tile costs one tile-wide max when nothing in it outranks
the state's worst entry, and otherwise one step (two tile-wide reductions) per entry it
replaces, at most K: O(n) work whatever the order of the data.  Indices are int32 and
relative to the split's first element; the K slots of every (channel, split) list are
stored at [c, split, :K], so a channel's lists are contiguous for the finalize, which turns
them into absolute int64 indices (``tile_first_index``) as it folds them.

Backward, with dz the gradient of y, d = sigma + eps, w_i = d sigma / d a_i and
wbar = mean(w):

    dx_i = gamma/d * (dz_i - mean(dz)) - gamma/d * sum(dz * xhat) * (w_i - wbar)

    on chip: _resident_backward_kernel  read x, dout (and the residual), write dx (and
                                        d residual = dz)
    split:   _partial_sums_kernel("grad")  read x, dout   partial sum(dz), sum(dz * a)
             _grad_finalize_kernel                        dgamma, dbeta, dx's coefficients
             _grad_input_kernel            read dout (and x for L1, w_i = C1/n sign(a_i),
                                           or for an activation), write dx

For L-inf / Top-k, w_i = Cinf/k sign(a_i) at the k selected elements only: each program
adds that term to the selected elements in its own range, after its stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.lp_batchnorm import dispersion_coefficient, selected_count
from . import channel_reduce, channel_resident
from .activation import CODES, NONE, activate, activation_grad, pre_activation
from .channel_reduce import (
    ELEMENTWISE_WAVES,
    NUM_WARPS,
    accumulator_dtype,
    channel_block,
    channel_shift,
    channel_view,
    combine_splits,
    contiguous,
    lane_values,
    partial_sums,
    plan,
    row_sums,
    shifted_mean,
    tile,
    tile_first_index,
    tile_range,
    triton_dtype,
)
from .channel_resident import channel_sums, lanes, resident_tile

# Largest k the Triton path takes: the kernels keep k candidates per channel in registers.
MAX_K = 64
# Most channels per program in the per-channel (finalize) kernels; fewer when C is small,
# so that the grid has a program per SM where there are channels for it.
FINALIZE_BLOCK_C = 128
# Elements of a Top-k (K > 1) extremes tile: the fold's state and its reductions hold
# registers besides the tile, and at 2048 some configurations spill.
TOPK_TILE = 1024
# Candidates the extremes finalize folds per step (a channel's lists are contiguous).
CANDIDATE_CHUNK = 256
# Split-relative candidate indices are int32; "no element" is the largest, and the empty
# slots of a top-K state hold NO_INDEX - slot (distinct, so that one is replaced at a time).
NO_INDEX = tl.constexpr(2**31 - 1)
# The same for absolute (int64) reduction indices, in the finalize.
NO_INDEX64 = tl.constexpr(2**62)
# DRAM bytes that cost as much as one launch in the H100 model of the benchmarks (4 us at
# 0.85 x 3.35 TB/s): the L1 abs-dev pass recombines the mean in every program while that
# re-read costs less, else a kernel computes it once.
LAUNCH_BYTES = 11_000_000


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sign(a, ACC: tl.constexpr):
    return (a > 0).to(ACC) - (a < 0).to(ACC)


@triton.jit
def _outranks(v, r, wv, wi):
    """Whether (v, r) ranks above (wv, wi): value descending, then index ascending."""
    return (v > wv) | ((v == wv) & (r < wi))


@triton.jit
def _worst(top_v, top_i):
    """Each row's lowest-ranked entry of a top-K state: (value, index)."""
    wv = tl.min(top_v, 1)
    wi = tl.max(tl.where(top_v == wv[:, None], top_i, -1), 1)
    return wv, wi


@triton.jit
def _empty_top(BLOCK_C: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr,
               NONE: tl.constexpr, INDEX: tl.constexpr):
    """A top-K state [BLOCK_C, K_PAD] with nothing in it: slots < K empty (-inf, NONE - slot),
    the padding slots (+inf, -1), which outrank everything and so are never replaced."""
    slot = tl.zeros([BLOCK_C, K_PAD], INDEX) + tl.arange(0, K_PAD)[None, :]
    return tl.where(slot < K, float("-inf"), float("inf")).to(ACC), tl.where(slot < K, NONE - slot, -1)


@triton.jit
def _fold_top(top_v, top_i, v, r, NONE: tl.constexpr):
    """Fold the candidates (v, r) of each row into its top-K state (unsorted; ranked by
    ``_outranks``).  A candidate counts only if it outranks the row's worst entry; each
    step moves every row's best remaining candidate in, in place of its worst entry.  So
    a tile costs one tile-wide max when nothing in it outranks the state (the common case
    once the state holds the largest values seen), and at most K steps of two tile-wide
    reductions whatever the order of the data: O(n) work for a fixed K."""
    wv, wi = _worst(top_v, top_i)
    v = tl.where(_outranks(v, r, wv[:, None], wi[:, None]), v, float("-inf"))
    best = tl.max(v, 1)
    while tl.max(best, 0) > float("-inf"):
        i = tl.min(tl.where(v == best[:, None], r, NONE), 1)
        found = (best > float("-inf"))[:, None]
        replace = found & (top_v == wv[:, None]) & (top_i == wi[:, None])
        top_v = tl.where(replace, best[:, None], top_v)
        top_i = tl.where(replace, i[:, None], top_i)
        wv, wi = _worst(top_v, top_i)
        keep = (r != i[:, None]) & _outranks(v, r, wv[:, None], wi[:, None])
        v = tl.where(keep, v, float("-inf"))
        best = tl.max(v, 1)
    return top_v, top_i


@triton.jit
def _merge_topk(v1, i1, v2, i2, K: tl.constexpr, K_PAD: tl.constexpr, NONE: tl.constexpr):
    """The K best (value, index) pairs of the union of two small candidate sets, per row,
    in rank order (value descending, then index ascending); an index present in both sets
    counts once.  Returns [BLOCK_C, K_PAD] tensors; slots past K hold (-inf, NONE)."""
    slot = tl.arange(0, K_PAD)[None, :]
    out_v = tl.full([v1.shape[0], K_PAD], float("-inf"), v1.dtype)
    out_i = tl.full([v1.shape[0], K_PAD], NONE, i1.dtype)
    for j in range(K):
        m = tl.maximum(tl.max(v1, 1), tl.max(v2, 1))[:, None]
        i = tl.minimum(tl.min(tl.where(v1 == m, i1, NONE), 1), tl.min(tl.where(v2 == m, i2, NONE), 1))[:, None]
        out_v = tl.where(slot == j, m, out_v)
        out_i = tl.where(slot == j, i, out_i)
        v1 = tl.where(i1 == i, float("-inf"), v1)
        v2 = tl.where(i2 == i, float("-inf"), v2)
    return out_v, out_i


@triton.jit
def _affine_coefficients(c, c_mask, dev, eps, w_ptr, b_ptr):
    """y = (x - mu) * scale + shift with scale = gamma / (sigma + eps), shift = beta."""
    scale = 1.0 / (tl.where(c_mask, dev, 1.0) + eps)  # no 1/0 in the masked lanes
    if w_ptr is not None:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=1.0).to(scale.dtype)
    shift = tl.zeros_like(scale)
    if b_ptr is not None:
        shift += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(scale.dtype)
    return scale, shift


@triton.jit
def _store_affine(c, c_mask, dev, eps, w_ptr, b_ptr, affine_ptr, C):
    """Store (and return) the affine coefficients: scale at affine_ptr[c], shift at
    affine_ptr[C + c]."""
    scale, shift = _affine_coefficients(c, c_mask, dev, eps, w_ptr, b_ptr)
    tl.store(affine_ptr + c, scale, mask=c_mask)
    tl.store(affine_ptr + C + c, shift, mask=c_mask)
    return scale, shift


@triton.jit
def _finish_statistics(
    c, c_mask, mean, abs_sum, sign_sum, coef, inv_n, eps, C,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
):
    """sigma = coef * sum|a| and wbar = mean over the channel of d sigma / d a; store
    them with the affine coefficients, and return those (scale, shift)."""
    dev = coef * abs_sum
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(dev_ptr + c, dev, mask=c_mask)
    tl.store(wbar_ptr + c, coef * sign_sum * inv_n, mask=c_mask)
    return _store_affine(c, c_mask, dev, eps, w_ptr, b_ptr, affine_ptr, C)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _extremes_kernel(
    x_ptr, sum_ptr, hi_v_ptr, hi_i_ptr, lo_v_ptr, lo_i_ptr,
    N, C, S, stride_n, stride_c, stride_s, tiles_per_program,
    K: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """Stage 1 of L-inf / Top-k, one read of x: per (split, channel) the sum of x - x_0
    and the K largest x ("hi") and the K largest -x ("lo"), each with its index relative
    to the split's first element (int32), stored at [c, split, :K].

    K == 1 keeps one running best per lane (no reduction per tile; a later index never
    wins a tie since a lane's indices grow), also on a grouped plan; K > 1 folds each
    tile into a top-K state per channel (``_fold_top``; one channel per row)."""
    tl.static_assert(K == 1 or GROUP == 1, "Top-k (K > 1) folds tiles of one channel per row")
    c, c_mask = channel_block(BLOCK_C, C)
    first, last = tile_range(N, S, tiles_per_program, BLOCK_S)
    base = tile_first_index(first, S, BLOCK_S) // GROUP
    x0 = lane_values(x_ptr, C, stride_c // GROUP, S, GROUP, BLOCK_C, BLOCK_S).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    if K == 1:
        hi_v = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)
        lo_v = tl.full([BLOCK_C, BLOCK_S], float("-inf"), ACC)
        hi_i = tl.full([BLOCK_C, BLOCK_S], NO_INDEX, tl.int32)
        lo_i = tl.full([BLOCK_C, BLOCK_S], NO_INDEX, tl.int32)
    else:
        hi_v, hi_i = _empty_top(BLOCK_C, K, K_PAD, ACC, NO_INDEX, tl.int32)
        lo_v, lo_i = _empty_top(BLOCK_C, K, K_PAD, ACC, NO_INDEX, tl.int32)
    for t in range(first, last):
        offs, mask, r = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc += tl.where(mask, x - x0, 0.0)
        if GROUP > 1:  # r of the grouped row n * (GROUP * S') + s is n * S' + s % S'
            s = tl.arange(0, BLOCK_S)[None, :]
            r = (r - s) // GROUP + s % (S // GROUP)
        r = tl.where(mask, (r - base).to(tl.int32), NO_INDEX)
        up = tl.where(mask, x, float("-inf"))
        down = tl.where(mask, -x, float("-inf"))
        if K == 1:
            hi_i = tl.where(up > hi_v, r, hi_i)
            hi_v = tl.maximum(up, hi_v)
            lo_i = tl.where(down > lo_v, r, lo_i)
            lo_v = tl.maximum(down, lo_v)
        else:
            hi_v, hi_i = _fold_top(hi_v, hi_i, up, r, NO_INDEX)
            lo_v, lo_i = _fold_top(lo_v, lo_i, down, r, NO_INDEX)
    out_c, out_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    tl.store(sum_ptr + tl.program_id(1) * C * GROUP + out_c, row_sums(acc, S, GROUP), mask=out_mask)
    if K == 1:
        row = out_c * tl.num_programs(1) + tl.program_id(1)
        _store_best(hi_v_ptr, hi_i_ptr, hi_v, hi_i, row, out_mask, S, GROUP)
        _store_best(lo_v_ptr, lo_i_ptr, lo_v, lo_i, row, out_mask, S, GROUP)
    else:
        row = (c * tl.num_programs(1) + tl.program_id(1)) * K
        _store_top(hi_v_ptr, hi_i_ptr, hi_v, hi_i, row, c_mask, K, K_PAD)
        _store_top(lo_v_ptr, lo_i_ptr, lo_v, lo_i, row, c_mask, K, K_PAD)


@triton.jit
def _segment_best(lane_v, lane_i, S, GROUP: tl.constexpr, NONE: tl.constexpr):
    """Each channel's best of the per-lane (value, index) states [BLOCK_C, BLOCK_S] (the
    largest value, the lowest index among equals): over a row, or over each of a grouped
    row's GROUP segments; [BLOCK_C * GROUP] values and indices."""
    if GROUP == 1:
        best = tl.max(lane_v, 1)
        index = tl.min(tl.where(lane_v == best[:, None], lane_i, NONE), 1)
    else:
        segment = (tl.arange(0, lane_v.shape[1]) // (S // GROUP))[None, :]
        part = tl.arange(0, GROUP)[None, :]
        best = tl.full([lane_v.shape[0], GROUP], float("-inf"), lane_v.dtype)
        index = tl.full([lane_v.shape[0], GROUP], NONE, lane_i.dtype)
        for g in tl.static_range(GROUP):
            v = tl.where(segment == g, lane_v, float("-inf"))
            m = tl.max(v, 1)[:, None]
            i = tl.min(tl.where(v == m, lane_i, NONE), 1)[:, None]
            best = tl.where(part == g, m, best)
            index = tl.where(part == g, i, index)
        best = tl.reshape(best, [lane_v.shape[0] * GROUP])
        index = tl.reshape(index, [lane_v.shape[0] * GROUP])
    return best, index


@triton.jit
def _store_best(v_ptr, i_ptr, lane_v, lane_i, row, mask, S, GROUP: tl.constexpr):
    """Store each channel's best of the per-lane states (``_segment_best``) at row."""
    best, index = _segment_best(lane_v, lane_i, S, GROUP, NO_INDEX)
    tl.store(v_ptr + row, best, mask=mask)
    tl.store(i_ptr + row, index, mask=mask)


@triton.jit
def _store_top(v_ptr, i_ptr, top_v, top_i, row, c_mask, K: tl.constexpr, K_PAD: tl.constexpr):
    """Store a per-channel top-K state at v_ptr[row:row + K]."""
    slot = tl.arange(0, K_PAD)[None, :]
    mask = c_mask[:, None] & (slot < K)
    tl.store(v_ptr + row[:, None] + slot, top_v, mask=mask)
    tl.store(i_ptr + row[:, None] + slot, top_i, mask=mask)


@triton.jit
def _combine_candidates(v_ptr, i_ptr, c, splits, S, tiles_per_program, K: tl.constexpr, K_PAD: tl.constexpr,
                        BLOCK_S: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr):
    """Stage 2 of a top-K: fold channel c's per-split lists [splits, K] (contiguous) into
    one top-K state with absolute (int64) indices, CHUNK candidates per step.  (S,
    BLOCK_S, GROUP: the extremes pass's plan, which places each split's first element.)"""
    best_v, best_i = _empty_top(1, K, K_PAD, v_ptr.dtype.element_ty, NO_INDEX64, tl.int64)
    j = tl.arange(0, CHUNK)[None, :]
    for first in range(0, splits * K, CHUNK):
        flat = first + j
        mask = flat < splits * K
        offs = c.to(tl.int64) * splits * K + flat
        v = tl.load(v_ptr + offs, mask=mask, other=float("-inf"))
        rel = tl.load(i_ptr + offs, mask=mask, other=NO_INDEX)
        split_base = tile_first_index((flat // K) * tiles_per_program, S, BLOCK_S) // GROUP
        r = tl.where(rel != NO_INDEX, split_base + rel, NO_INDEX64)
        best_v, best_i = _fold_top(best_v, best_i, v, r, NO_INDEX64)
    return best_v, best_i


@triton.jit
def _in_list(sel_i, list_i):
    """[BLOCK_C, K_PAD]: whether each selected index appears in the list."""
    return tl.max((sel_i[:, :, None] == list_i[:, None, :]).to(tl.int32), 2) > 0


@triton.jit
def _lookup(sel_i, list_i, list_v):
    """[BLOCK_C, K_PAD]: the list's value at each selected index (-inf where absent)."""
    return tl.max(tl.where(sel_i[:, :, None] == list_i[:, None, :], list_v[:, None, :], float("-inf")), 2)


@triton.jit
def _extremes_finalize_kernel(
    x_ptr, stride_c, sum_ptr, hi_v_ptr, hi_i_ptr, lo_v_ptr, lo_i_ptr, splits, C, S, tiles_per_program,
    inv_n, coef, eps, sel_i_ptr, sel_sign_ptr,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One channel per program: mu, then the K largest |x - mu| among the 2K candidates
    (ties: lowest index), sigma.  (S, BLOCK_S, GROUP: the extremes pass's plan.)"""
    c, c_mask = channel_block(1, C)
    mean = shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC)
    hi_v, hi_i = _combine_candidates(
        hi_v_ptr, hi_i_ptr, c, splits, S, tiles_per_program, K, K_PAD, BLOCK_S, GROUP, CHUNK)
    lo_v, lo_i = _combine_candidates(
        lo_v_ptr, lo_i_ptr, c, splits, S, tiles_per_program, K, K_PAD, BLOCK_S, GROUP, CHUNK)
    slot = tl.arange(0, K_PAD)[None, :]
    hi_ok = (slot < K) & (hi_v > float("-inf"))
    lo_ok = (slot < K) & (lo_v > float("-inf"))
    hi_i = tl.where(hi_ok, hi_i, NO_INDEX64)
    lo_i = tl.where(lo_ok, lo_i, NO_INDEX64)
    hi_abs = tl.where(hi_ok, tl.abs(hi_v - mean[:, None]), float("-inf"))
    lo_abs = tl.where(lo_ok, tl.abs(lo_v + mean[:, None]), float("-inf"))
    sel_abs, sel_i = _merge_topk(hi_abs, hi_i, lo_abs, lo_i, K, K_PAD, NO_INDEX64)
    # sign(a) of each selected element, from its x in whichever list holds it
    x_sel = tl.where(_in_list(sel_i, hi_i), _lookup(sel_i, hi_i, hi_v), -_lookup(sel_i, lo_i, lo_v))
    valid = c_mask[:, None] & (slot < K)
    signs = tl.where(valid, _sign(x_sel - mean[:, None], ACC), 0.0)
    tl.store(sel_i_ptr + c[:, None] * K + slot, sel_i, mask=valid)
    tl.store(sel_sign_ptr + c[:, None] * K + slot, signs, mask=valid)
    abs_sum = tl.sum(tl.where(valid, sel_abs, 0.0), 1)
    _finish_statistics(
        c, c_mask, mean, abs_sum, tl.sum(signs, 1), coef, inv_n, eps, C,
        mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    )


@triton.jit
def _mean_kernel(x_ptr, stride_c, sum_ptr, splits, C, inv_n, mean_ptr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """mu = x_0 + sum(x - x_0) / n, once per channel, for the L1 abs-dev pass."""
    c, c_mask = channel_block(BLOCK_C, C)
    tl.store(mean_ptr + c, shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC), mask=c_mask)


@triton.jit
def _l1_finalize_kernel(
    x_ptr, stride_c, sum_ptr, abs_ptr, sign_ptr, splits, C, inv_n, coef, eps,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    MEAN_READY: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """mu = x_0 + sum(x - x_0) / n (or mean_ptr's, MEAN_READY), sigma = C1 / n * sum|a|
    from the partials of the two passes."""
    c, c_mask = channel_block(BLOCK_C, C)
    if MEAN_READY:
        mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    else:
        mean = shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC)
    _finish_statistics(
        c, c_mask, mean,
        combine_splits(abs_ptr, splits, C, c, c_mask, ACC),
        combine_splits(sign_ptr, splits, C, c, c_mask, ACC),
        coef, inv_n, eps, C,
        mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    )


@triton.jit
def _running_coeffs_kernel(
    rmean_ptr, rdev_ptr, w_ptr, b_ptr, mean_ptr, dev_ptr, affine_ptr, C, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Eval: affine coefficients from the running statistics (and fp32 copies of them)."""
    c, c_mask = channel_block(BLOCK_C, C)
    mean = tl.load(rmean_ptr + c, mask=c_mask, other=0.0).to(ACC)
    dev = tl.load(rdev_ptr + c, mask=c_mask, other=1.0).to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(dev_ptr + c, dev, mask=c_mask)
    _store_affine(c, c_mask, dev, eps, w_ptr, b_ptr, affine_ptr, C)


@triton.jit
def _add_selected(out_ptr, sel_i_ptr, sel_sign_ptr, gain, c, c_mask, r_lo, r_hi, S, stride_n, stride_c, stride_s,
                 K: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr):
    """out[selected] += gain_c * sign(a) for the selected elements with r in [r_lo, r_hi)
    (gain: [BLOCK_C], per channel c): sigma's gradient reaches only the K selected
    elements of a channel.  The caller's stores to out must be visible (a barrier)."""
    slot = tl.arange(0, K_PAD)[None, :]
    listed = c_mask[:, None] & (slot < K)
    r = tl.load(sel_i_ptr + c[:, None] * K + slot, mask=listed, other=-1)
    mine = listed & (r >= r_lo) & (r < r_hi)
    signs = tl.load(sel_sign_ptr + c[:, None] * K + slot, mask=mine, other=0.0)
    n = r // S
    offs = n * stride_n + c[:, None].to(tl.int64) * stride_c + (r - n * S) * stride_s
    out = tl.load(out_ptr + offs, mask=mine, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (out + gain[:, None] * signs).to(out_ptr.dtype.element_ty), mask=mine)


@triton.jit
def _normalize_kernel(
    x_ptr, y_ptr, res_ptr, mean_ptr, affine_ptr, slope,
    N, C, S, stride_n, stride_c, stride_s, tiles_per_program,
    ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """y = act((x - mu_c) * scale_c + shift_c [+ residual]), the affine coefficients at
    affine_ptr[c] and affine_ptr[C + c] (C: channels of the ungrouped view)."""
    c, c_mask = channel_block(BLOCK_C, C)
    first, last = tile_range(N, S, tiles_per_program, BLOCK_S)
    mean = lane_values(mean_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    scale = lane_values(affine_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    shift = lane_values(affine_ptr + C * GROUP, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    for t in range(first, last):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        z = pre_activation(x - mean, scale, shift, res_ptr, offs, mask, ACC)
        tl.store(y_ptr + offs, activate(z, ACT, slope).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_input_kernel(
    dy_ptr, x_ptr, res_ptr, dx_ptr, dres_ptr, mean_ptr, affine_ptr, coef_ptr, sel_i_ptr, sel_sign_ptr, slope,
    N, C, S, stride_n, stride_c, stride_s, tiles_per_program,
    SIGN_TERM: tl.constexpr, SELECTED: tl.constexpr, SELECTED_PAD: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """dz = dy * act'(z) (dy without an activation; stored as the residual's gradient
    when dres_ptr), then dx = dz * scale_c + shift_c + gain_c * w_i, with (scale, shift,
    gain) at coef_ptr[c], [C + c], [2C + c] (``_grad_coefficients``) and z rebuilt from x
    and the forward's affine coefficients (affine_ptr).  w_i = d sigma / d a_i / coef:
    sign(a_i) at every element for L1 (SIGN_TERM), at the SELECTED elements only for
    L-inf / Top-k, which each program adds into the dx it has just written."""
    c, c_mask = channel_block(BLOCK_C, C)
    first, last = tile_range(N, S, tiles_per_program, BLOCK_S)
    scale = lane_values(coef_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    shift = lane_values(coef_ptr + C * GROUP, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    if SIGN_TERM or ACT != NONE:
        mean = lane_values(mean_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    if SIGN_TERM:
        gain = lane_values(coef_ptr + 2 * C * GROUP, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    if ACT != NONE:
        fwd_scale = lane_values(affine_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
        fwd_shift = lane_values(affine_ptr + C * GROUP, C, 1, S, GROUP, BLOCK_C, BLOCK_S)
    for t in range(first, last):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        if SIGN_TERM or ACT != NONE:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if ACT != NONE:
            dz *= activation_grad(pre_activation(x - mean, fwd_scale, fwd_shift, res_ptr, offs, mask, ACC), ACT, slope)
            if dres_ptr is not None:
                tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        dx = dz * scale + shift
        if SIGN_TERM:
            dx += gain * _sign(x - mean, ACC)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if SELECTED > 0:
        tl.debug_barrier()  # this program's stores above are visible to all its threads
        out_c, out_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
        _add_selected(
            dx_ptr, sel_i_ptr, sel_sign_ptr, tl.load(coef_ptr + 2 * C * GROUP + out_c, mask=out_mask, other=0.0),
            out_c, out_mask,
            tile_first_index(first, S, BLOCK_S) // GROUP, tile_first_index(last, S, BLOCK_S) // GROUP,
            S // GROUP, stride_n, stride_c // GROUP, stride_s, SELECTED, SELECTED_PAD, ACC,
        )


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_coefficients(
    c, c_mask, sum_dy, sum_dya, dev_ptr, wbar_ptr, w_ptr, dw_ptr, db_ptr, inv_n, coef, eps,
    BATCH_STATS: tl.constexpr, ACC: tl.constexpr,
):
    """From sum(dz) and sum(dz * a): dgamma = sum(dz * xhat), dbeta = sum(dz), stored (in
    the parameters' dtype) when dw_ptr; returns dx's coefficients (scale, shift, gain):
    dx = scale * dz + shift + gain * w_i (w_i as in _grad_input_kernel)."""
    inv = 1.0 / (tl.load(dev_ptr + c, mask=c_mask, other=1.0) + eps)
    sum_dy_xhat = sum_dya * inv
    if dw_ptr is not None:
        tl.store(dw_ptr + c, sum_dy_xhat.to(dw_ptr.dtype.element_ty), mask=c_mask)
        tl.store(db_ptr + c, sum_dy.to(db_ptr.dtype.element_ty), mask=c_mask)
    scale = inv
    if w_ptr is not None:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=1.0).to(ACC)
    if BATCH_STATS:
        grad_dev = -scale * sum_dy_xhat
        wbar = tl.load(wbar_ptr + c, mask=c_mask, other=0.0)
        shift = -scale * sum_dy * inv_n - grad_dev * wbar
        gain = grad_dev * coef
    else:
        shift = tl.zeros_like(scale)
        gain = tl.zeros_like(scale)
    return scale, shift, gain


@triton.jit
def _grad_finalize_kernel(
    dy_sum_ptr, dya_sum_ptr, splits, dev_ptr, wbar_ptr, w_ptr, dw_ptr, db_ptr, coef_ptr, C, inv_n, coef, eps,
    BATCH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``_grad_coefficients`` from the per-split partials, stored at coef_ptr[c], [C + c],
    [2C + c] for _grad_input_kernel."""
    c, c_mask = channel_block(BLOCK_C, C)
    scale, shift, gain = _grad_coefficients(
        c, c_mask, combine_splits(dy_sum_ptr, splits, C, c, c_mask, ACC),
        combine_splits(dya_sum_ptr, splits, C, c, c_mask, ACC),
        dev_ptr, wbar_ptr, w_ptr, dw_ptr, db_ptr, inv_n, coef, eps, BATCH_STATS, ACC,
    )
    tl.store(coef_ptr + c, scale, mask=c_mask)
    tl.store(coef_ptr + C + c, shift, mask=c_mask)
    tl.store(coef_ptr + 2 * C + c, gain, mask=c_mask)


# ----------------------------------------------------------------------------- on chip


@triton.jit
def _resident_select(a, mask, r, c, c_mask, sel_i_ptr, sel_sign_ptr, S, K: tl.constexpr, K_PAD: tl.constexpr,
                     GROUP: tl.constexpr):
    """The K largest |a| of each channel of a resident tile, ties to the lowest r: store
    their indices (int64) and signs at sel_*[c, :K] and return (the sum of those |a|,
    the sum of their signs).  Entries rank by |a|, then by code = 2r + (a < 0)
    ascending, which orders like r and carries the sign.  K == 1: a max over N, then
    over each channel's lanes (``_segment_best``, grouped views too); K > 1: K steps,
    each taking every channel's best remaining entry out of the tile."""
    if GROUP > 1:  # r of the grouped row n * (GROUP * S') + s is n * S' + s % S'
        s = tl.arange(0, a.shape[2])[None, None, :]
        r = (r - s) // GROUP + s % (S // GROUP)
    v = tl.where(mask, tl.abs(a), float("-inf"))
    code = 2 * r.to(tl.int32) + (a < 0).to(tl.int32)
    if K == 1:
        lane_v = tl.max(v, 1)
        lane_code = tl.min(tl.where(v == lane_v[:, None, :], code, NO_INDEX), 1)
        best, pick = _segment_best(lane_v, lane_code, S, GROUP, NO_INDEX)
        values = best[:, None]
        codes = pick[:, None]
    else:
        slot = tl.arange(0, K_PAD)[None, :]
        values = tl.full([a.shape[0], K_PAD], float("-inf"), a.dtype)
        codes = tl.full([a.shape[0], K_PAD], NO_INDEX, tl.int32)
        for j in range(K):
            best = tl.max(tl.max(v, 2), 1)
            pick = tl.min(tl.min(tl.where(v == best[:, None, None], code, NO_INDEX), 2), 1)
            v = tl.where(code == pick[:, None, None], float("-inf"), v)
            values = tl.where(slot == j, best[:, None], values)
            codes = tl.where(slot == j, pick[:, None], codes)
    slot = tl.arange(0, values.shape[1])[None, :]
    valid = c_mask[:, None] & (slot < K)
    signs = tl.where(valid & (values > 0), 1.0 - 2.0 * (codes & 1).to(a.dtype), 0.0)
    tl.store(sel_i_ptr + c[:, None] * K + slot, (codes >> 1).to(tl.int64), mask=valid)
    tl.store(sel_sign_ptr + c[:, None] * K + slot, signs, mask=valid)
    return tl.sum(tl.where(valid, values, 0.0), 1), tl.sum(signs, 1)


@triton.jit
def _resident_forward_kernel(
    x_ptr, y_ptr, res_ptr, sel_i_ptr, sel_sign_ptr, mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    N, C, S, stride_n, stride_c, stride_s, inv_n, coef, eps, slope,
    K: tl.constexpr, K_PAD: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Training forward with whole channels on chip: one read of x (and the residual),
    one write of y.  mu = x_0 + sum(x - x_0) / n, a = x - mu, sigma from a in registers
    (sum |a| for L1, K == 0; the K largest |a| for L-inf / Top-k), then
    y = act(a * scale + shift [+ residual]).  (N, C, S, strides: ``ResidentPlan.args``.)"""
    offs, mask, r = resident_tile(N, C, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_N, BLOCK_S, ALIGN, WIDE)
    c, c_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    x0 = channel_shift(x_ptr, c, c_mask, stride_c // GROUP, ACC)
    mean = x0 + channel_sums(tl.where(mask, x - lanes(x0, S, GROUP, BLOCK_S), 0.0), S, GROUP) * inv_n
    a = tl.where(mask, x - lanes(mean, S, GROUP, BLOCK_S), 0.0)
    if K == 0:
        abs_sum = channel_sums(tl.abs(a), S, GROUP)
        sign_sum = channel_sums(_sign(a, ACC), S, GROUP)
    else:
        abs_sum, sign_sum = _resident_select(a, mask, r, c, c_mask, sel_i_ptr, sel_sign_ptr, S, K, K_PAD, GROUP)
    scale, shift = _finish_statistics(
        c, c_mask, mean, abs_sum, sign_sum, coef, inv_n, eps, C * GROUP,
        mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    )
    z = pre_activation(a, lanes(scale, S, GROUP, BLOCK_S), lanes(shift, S, GROUP, BLOCK_S), res_ptr, offs, mask, ACC)
    tl.store(y_ptr + offs, activate(z, ACT, slope).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resident_backward_kernel(
    dy_ptr, x_ptr, res_ptr, dx_ptr, dres_ptr, mean_ptr, dev_ptr, wbar_ptr, w_ptr, affine_ptr, dw_ptr, db_ptr,
    sel_i_ptr, sel_sign_ptr, N, C, S, stride_n, stride_c, stride_s, inv_n, coef, eps, slope,
    SELECTED: tl.constexpr, SELECTED_PAD: tl.constexpr, SIGN_TERM: tl.constexpr, BATCH_STATS: tl.constexpr,
    ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Backward with whole channels on chip: one read of dy and x (and the residual), one
    write of dx (and of dres = dz): dz = dy [* act'(z)], the sums of dz and dz * a in
    registers, then dx as in _grad_input_kernel."""
    offs, mask, _ = resident_tile(N, C, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_N, BLOCK_S, ALIGN, WIDE)
    c, c_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    a = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC) - lanes(mean, S, GROUP, BLOCK_S), 0.0)
    if ACT != NONE:
        fwd_scale = tl.load(affine_ptr + c, mask=c_mask, other=0.0)
        fwd_shift = tl.load(affine_ptr + C * GROUP + c, mask=c_mask, other=0.0)
        z = pre_activation(a, lanes(fwd_scale, S, GROUP, BLOCK_S), lanes(fwd_shift, S, GROUP, BLOCK_S), res_ptr, offs,
                           mask, ACC)
        dz *= activation_grad(z, ACT, slope)
        if dres_ptr is not None:
            tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    scale, shift, gain = _grad_coefficients(
        c, c_mask, channel_sums(dz, S, GROUP), channel_sums(dz * a, S, GROUP),
        dev_ptr, wbar_ptr, w_ptr, dw_ptr, db_ptr, inv_n, coef, eps, BATCH_STATS, ACC,
    )
    dx = dz * lanes(scale, S, GROUP, BLOCK_S) + lanes(shift, S, GROUP, BLOCK_S)
    if SIGN_TERM:
        dx += lanes(gain, S, GROUP, BLOCK_S) * _sign(a, ACC)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if SELECTED > 0:
        tl.debug_barrier()  # this program's stores above are visible to all its threads
        _add_selected(dx_ptr, sel_i_ptr, sel_sign_ptr, gain, c, c_mask, 0, N * (S // GROUP), S // GROUP,
                     stride_n, stride_c // GROUP, stride_s, SELECTED, SELECTED_PAD, ACC)


# ----------------------------------------------------------------------------- launchers


def _k_pad(count: int) -> int:
    return max(2, triton.next_power_of_2(count))


def _finalize_grid(c: int, device: torch.device) -> tuple[tuple[int], int]:
    """Grid and BLOCK_C of a per-channel kernel: a program per SM where there are channels
    for it (C=64 on 132 SMs: 64 programs of one channel), at most FINALIZE_BLOCK_C each."""
    sms = channel_reduce._num_programs_per_wave(device)
    block_c = min(FINALIZE_BLOCK_C, triton.next_power_of_2(triton.cdiv(c, sms)))
    return (triton.cdiv(c, block_c),), block_c


def _mean_once(pl, c: int) -> bool:
    """Whether a kernel computes the L1 mean once, rather than each program of the
    abs-dev pass from the partial sums (splits x BLOCK_C of them, 4 bytes each)."""
    return pl.grid[0] * pl.grid[1] * pl.splits * pl.block_c * pl.group * 4 > LAUNCH_BYTES


def _like(view, t):
    """``t`` (None, or a tensor of the input's shape) in the view's layout."""
    return None if t is None else view.like(t).tensor


def lp_batch_norm_forward(
    x, weight, bias, running_mean, running_dev, batch_stats: bool, eps: float, norm: str, k: int, normalized: bool,
    residual=None, activation: str = "none", activation_param: float = 0.0,
):
    """Returns (y, mean, dev, wbar, sel_index, sel_sign, affine); see ``ops.lp_batchnorm``.
    Training takes the on-chip path where ``channel_resident`` plans one, else the split
    passes below."""
    weight, bias, running_mean, running_dev = contiguous(weight, bias, running_mean, running_dev)
    view = channel_view(x)
    c, n = view.c, view.numel_per_channel
    acc = accumulator_dtype(x.dtype)
    acc_t = triton_dtype(acc)
    y = torch.empty_like(view.tensor)
    res = _like(view, residual)
    act = dict(ACT=CODES[activation])
    mean, dev, wbar = (torch.empty(c, device=x.device, dtype=acc) for _ in range(3))
    affine = torch.empty((2, c), device=x.device, dtype=acc)
    count = selected_count(norm, k) if batch_stats else 0
    sel_i = torch.empty((c, count), device=x.device, dtype=torch.int64)
    sel_sign = torch.empty((c, count), device=x.device, dtype=acc)
    grid, block_c = _finalize_grid(c, x.device)
    if not batch_stats:
        _running_coeffs_kernel[grid](
            running_mean, running_dev, weight, bias, mean, dev, affine, c, eps, ACC=acc_t, BLOCK_C=block_c,
        )
        _normalize(view, y, res, mean, affine, activation_param, act)
        return y, mean, dev, wbar.zero_(), sel_i, sel_sign, affine

    coef = dispersion_coefficient(norm, n, k, normalized)
    stats = (mean, dev, wbar, weight, bias, affine)
    resident = channel_resident.plan(view, count, backward=False)
    if resident is not None:
        _resident_forward_kernel[resident.grid](
            view.tensor, y, res, sel_i, sel_sign, *stats, *resident.args(view), 1.0 / n, coef, eps, activation_param,
            K=count, K_PAD=_k_pad(count), ACC=acc_t, **act, **resident.meta(),
        )
        return y, mean, dev, wbar, sel_i, sel_sign, affine
    # Top-k folds tiles of one channel per row, in smaller tiles
    pl = plan(view, grouped=True) if count <= 1 else plan(view, max_tile=TOPK_TILE)
    if norm == "l1":
        sums, _ = partial_sums(view, "sum", shifted=True, pl=pl)
        mean_once = pl.group > 1 or _mean_once(pl, c)  # a grouped plan centres on a (C,) mean
        if mean_once:
            _mean_kernel[grid](view.tensor, view.stride_c, sums, pl.splits, c, 1.0 / n, mean, ACC=acc_t,
                               BLOCK_C=block_c)
            center = dict(center=mean)
        else:
            center = dict(center=sums, center_scale=1.0 / n, shifted=True)
        abs_dev, signs = partial_sums(view, "abs_dev", pl=pl, **center)
        _l1_finalize_kernel[grid](
            view.tensor, view.stride_c, sums, abs_dev, signs, pl.splits, c, 1.0 / n, coef, eps, *stats,
            MEAN_READY=mean_once, ACC=acc_t, BLOCK_C=block_c,
        )
    else:
        if pl.tiles_per_program * pl.block_s >= 2**31 - 2 * MAX_K:
            raise ValueError(f"a split of {pl.tiles_per_program} tiles of {pl.block_s} overflows int32 indices")
        sums = torch.empty((pl.splits, c), device=x.device, dtype=acc)
        hi_v, lo_v = (torch.empty((c, pl.splits, count), device=x.device, dtype=acc) for _ in range(2))
        hi_i, lo_i = (torch.empty((c, pl.splits, count), device=x.device, dtype=torch.int32) for _ in range(2))
        _extremes_kernel[pl.grid](
            view.tensor, sums, hi_v, hi_i, lo_v, lo_i, *pl.args(view), pl.tiles_per_program,
            K=count, K_PAD=_k_pad(count), ACC=acc_t, **pl.meta(),
        )
        _extremes_finalize_kernel[(c,)](
            view.tensor, view.stride_c, sums, hi_v, hi_i, lo_v, lo_i, pl.splits, c, pl.args(view)[2],
            pl.tiles_per_program, 1.0 / n, coef, eps, sel_i, sel_sign, *stats,
            K=count, K_PAD=_k_pad(count), CHUNK=CANDIDATE_CHUNK, ACC=acc_t, BLOCK_S=pl.block_s, GROUP=pl.group,
            num_warps=NUM_WARPS,
        )
    _normalize(view, y, res, mean, affine, activation_param, act)
    return y, mean, dev, wbar, sel_i, sel_sign, affine


def _normalize(view, y, res, mean, affine, slope, act):
    pl = plan(view, ELEMENTWISE_WAVES, grouped=True)
    _normalize_kernel[pl.grid](
        view.tensor, y, res, mean, affine, slope, *pl.args(view), pl.tiles_per_program,
        ACC=triton_dtype(mean.dtype), **act, **pl.meta(),
    )


def lp_batch_norm_backward(
    dy, x, weight, mean, dev, wbar, sel_i, sel_sign, affine,
    batch_stats: bool, param_grads: bool, eps: float, norm: str, k: int, normalized: bool,
    residual=None, activation: str = "none", activation_param: float = 0.0, residual_grad: bool = False,
):
    """Returns (dx, dweight, dbias, dresidual); dweight and dbias are (C,) tensors in the
    weight's dtype (the accumulator dtype without one) when ``param_grads``, else empty;
    dresidual, the gradient of the pre-activation, when ``residual_grad`` and an
    activation, else empty (without one it is dy)."""
    weight, mean, dev, wbar, sel_i, sel_sign, affine = contiguous(weight, mean, dev, wbar, sel_i, sel_sign, affine)
    view = channel_view(x)
    dy_view = view.like(dy)
    res = _like(view, residual)
    c, n = view.c, view.numel_per_channel
    acc = mean.dtype
    act = dict(ACT=CODES[activation])
    fused = activation != "none"
    dx = torch.empty_like(view.tensor)
    dres = torch.empty_like(view.tensor) if fused and residual_grad else dx.new_empty(0)
    dw = torch.empty(c if param_grads else 0, device=x.device, dtype=acc if weight is None else weight.dtype)
    db = torch.empty_like(dw)
    coefs = torch.empty((3, c), device=x.device, dtype=acc)
    coef = dispersion_coefficient(norm, n, k, normalized)
    selected = sel_i.shape[1] if batch_stats and norm != "l1" else 0
    resident = channel_resident.plan(view, selected, backward=True) if batch_stats or param_grads else None
    if resident is not None:
        _resident_backward_kernel[resident.grid](
            dy_view.tensor, view.tensor, res, dx, dres if dres.numel() else None, mean, dev, wbar, weight, affine,
            dw if param_grads else None, db, sel_i, sel_sign, *resident.args(view), 1.0 / n, coef, eps,
            activation_param, SELECTED=selected, SELECTED_PAD=_k_pad(selected), SIGN_TERM=batch_stats and norm == "l1",
            BATCH_STATS=batch_stats, ACC=triton_dtype(acc), **act, **resident.meta(),
        )
        return dx, dw, db, dres
    if batch_stats or param_grads:
        pl = plan(view, grouped=True)
        dy_sum, dya_sum = partial_sums(
            view, "grad", other=dy_view, center=mean, pl=pl,
            activation=(res, affine, activation_param, act["ACT"]) if fused else None,
        )
        splits = pl.splits
    else:  # eval without affine parameters: dx = dz / (sigma + eps), nothing to reduce
        dy_sum = dya_sum = mean
        splits = 0
    grid, block_c = _finalize_grid(c, x.device)
    _grad_finalize_kernel[grid](
        dy_sum, dya_sum, splits, dev, wbar, weight, dw if param_grads else None, db, coefs,
        c, 1.0 / n, coef, eps, BATCH_STATS=batch_stats, ACC=triton_dtype(acc), BLOCK_C=block_c,
    )
    pl = plan(view, ELEMENTWISE_WAVES, grouped=True)
    _grad_input_kernel[pl.grid](
        dy_view.tensor, view.tensor, res, dx, dres if dres.numel() else None, mean, affine, coefs, sel_i, sel_sign,
        activation_param, *pl.args(view), pl.tiles_per_program,
        SIGN_TERM=batch_stats and norm == "l1", SELECTED=selected, SELECTED_PAD=_k_pad(selected),
        ACC=triton_dtype(acc), **act, **pl.meta(),
    )
    return dx, dw, db, dres
