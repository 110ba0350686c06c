"""Triton kernels of the L1 / L-inf / Top-k batch norm (math: ``tritonorm.reference.lp_batchnorm``).

Forward, training (statistics, then normalize; a synced variant would all-reduce the
per-split partials between the two).  Sums of x are taken about each channel's x_0
(``channel_reduce``), so a constant channel has mu = x_0 and y = beta exactly, and the
normalize pass computes (x - mu) * scale + beta, not x * scale + shift: the latter loses
the digits of x - mu when |mu| >> sigma.

    L1           _partial_sums_kernel("sum")      read x     partial sum(x - x_0)
                 _partial_sums_kernel("abs_dev")  read x     partial sum|a|, sum sign(a)
                 _l1_finalize_kernel                         mean, sigma, wbar
                 _channel_affine_kernel           read x, write y
    L-inf/Top-k  _extremes_kernel                 read x     partial sum(x - x_0), K largest and
                                                             K smallest x with indices
                 _extremes_finalize_kernel                   mean, the K largest |a|, sigma
                 _channel_affine_kernel           read x, write y

then, with running statistics, ``running_stats.update_running`` (a separate op: an op that
mutates its inputs cannot carry an autograd formula).  Eval: _running_coeffs_kernel and
_channel_affine_kernel.

The second read of L1 cannot be avoided: mean |x - mu| needs mu first.  L-inf and Top-k
need one read because the K largest |x - mu| are among the K largest and the K smallest x.

Backward, with g = dy * gamma, d = sigma + eps, w_i = d sigma / d a_i and wbar = mean(w):

    dx_i = gamma/d * (dy_i - mean(dy)) - gamma/d * sum(dy * xhat) * (w_i - wbar)

    _partial_sums_kernel("grad")   read x, dy   partial sum(dy), sum(dy * a)
    _grad_finalize_kernel                       dgamma, dbeta, per-channel coefficients
    _channel_affine_kernel         read dy (and x for L1: w_i = C1/n sign(a_i)), write dx
    _selected_grad_kernel          L-inf/Top-k: w_i = Cinf/k sign(a_i) at the k selected
                                   elements, a scatter of C*k values
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.lp_batchnorm import dispersion_coefficient, selected_count
from .channel_reduce import (
    ELEMENTWISE_WAVES,
    NUM_WARPS,
    accumulator_dtype,
    channel_block,
    channel_shift,
    channel_view,
    combine_splits,
    contiguous,
    partial_sums,
    plan,
    shifted_mean,
    tile,
    tile_range,
    triton_dtype,
)
from .channel_reduce import NO_INDEX as _NO_INDEX

NO_INDEX = tl.constexpr(_NO_INDEX)
# Largest k the Triton path takes: the kernels keep k candidates per channel in registers.
MAX_K = 64
# Channels per program in the per-channel (finalize) kernels.
FINALIZE_BLOCK_C = 128
# Candidates merged at once when the extremes finalize walks the splits.
CANDIDATES_PER_MERGE = 256


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sign(a, ACC: tl.constexpr):
    return (a > 0).to(ACC) - (a < 0).to(ACC)


@triton.jit
def _merge_topk(v1, i1, v2, i2, K: tl.constexpr, K_PAD: tl.constexpr):
    """The K largest (value, index) pairs of the union of two candidate sets, per row.

    Order: value descending, then index ascending.  An index present in both sets counts
    once.  Returns [BLOCK_C, K_PAD] tensors; slots past K hold (-inf, NO_INDEX)."""
    slot = tl.arange(0, K_PAD)[None, :]
    out_v = tl.full([v1.shape[0], K_PAD], float("-inf"), v1.dtype)
    out_i = tl.full([v1.shape[0], K_PAD], NO_INDEX, tl.int64)
    for j in range(K):
        m = tl.maximum(tl.max(v1, 1), tl.max(v2, 1))[:, None]
        i = tl.minimum(
            tl.min(tl.where(v1 == m, i1, NO_INDEX), 1), tl.min(tl.where(v2 == m, i2, NO_INDEX), 1)
        )[:, None]
        out_v = tl.where(slot == j, m, out_v)
        out_i = tl.where(slot == j, i, out_i)
        v1 = tl.where(i1 == i, float("-inf"), v1)
        v2 = tl.where(i2 == i, float("-inf"), v2)
    return out_v, out_i


@triton.jit
def _track_top(top_v, top_i, v, r, K: tl.constexpr, K_PAD: tl.constexpr):
    """Fold a tile of candidates (v, r) into the running top-K state.

    K == 1: the state is one running max per lane, [BLOCK_C, BLOCK_S], no reduction per
    tile.  K > 1: the state is a sorted list per channel, [BLOCK_C, K_PAD], and a tile
    is merged only when it holds a value above the list's K-th (rare after the first
    tiles; an equal value comes later in index order, so it ranks below)."""
    if K == 1:
        better = v > top_v
        top_v = tl.where(better, v, top_v)
        top_i = tl.where(better, r, top_i)
    else:
        slot = tl.arange(0, K_PAD)[None, :]
        kth = tl.min(tl.where(slot < K, top_v, float("inf")), 1)
        if tl.max((tl.max(v, 1) > kth).to(tl.int32), 0) > 0:
            top_v, top_i = _merge_topk(top_v, top_i, v, r, K, K_PAD)
    return top_v, top_i


@triton.jit
def _store_affine(c, c_mask, dev, eps, w_ptr, b_ptr, scale_ptr, shift_ptr):
    """y = (x - mu) * scale + shift with scale = gamma / (sigma + eps), shift = beta."""
    scale = 1.0 / (tl.where(c_mask, dev, 1.0) + eps)  # no 1/0 in the masked lanes
    if w_ptr is not None:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=1.0).to(scale.dtype)
    shift = tl.zeros_like(scale)
    if b_ptr is not None:
        shift += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(scale.dtype)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    tl.store(shift_ptr + c, shift, mask=c_mask)


@triton.jit
def _finish_statistics(
    c, c_mask, mean, abs_sum, sign_sum, coef, inv_n, eps,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
):
    """sigma = coef * sum|a| and wbar = mean over the channel of d sigma / d a; store
    them with the affine coefficients."""
    dev = coef * abs_sum
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(dev_ptr + c, dev, mask=c_mask)
    tl.store(wbar_ptr + c, coef * sign_sum * inv_n, mask=c_mask)
    _store_affine(c, c_mask, dev, eps, w_ptr, b_ptr, scale_ptr, shift_ptr)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _extremes_kernel(
    x_ptr, sum_ptr, hi_v_ptr, hi_i_ptr, lo_v_ptr, lo_i_ptr,
    N, C, S, stride_n, stride_c, stride_s, tiles_per_program,
    K: tl.constexpr, K_PAD: tl.constexpr, STATE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Stage 1 of L-inf / Top-k, one read of x: per (split, channel) the sum of x - x_0
    and the K largest x ("hi") and the K largest -x ("lo"), each with its reduction index."""
    c, c_mask = channel_block(BLOCK_C, C)
    first, last = tile_range(N, S, tiles_per_program, BLOCK_S)
    x0 = channel_shift(x_ptr, c, c_mask, stride_c, ACC)[:, None]
    acc = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    hi_v = tl.full([BLOCK_C, STATE], float("-inf"), ACC)
    hi_i = tl.full([BLOCK_C, STATE], NO_INDEX, tl.int64)
    lo_v = tl.full([BLOCK_C, STATE], float("-inf"), ACC)
    lo_i = tl.full([BLOCK_C, STATE], NO_INDEX, tl.int64)
    for t in range(first, last):
        offs, mask, r = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        acc += tl.where(mask, x - x0, 0.0)
        r = tl.where(mask, r, NO_INDEX)
        hi_v, hi_i = _track_top(hi_v, hi_i, tl.where(mask, x, float("-inf")), r, K, K_PAD)
        lo_v, lo_i = _track_top(lo_v, lo_i, tl.where(mask, -x, float("-inf")), r, K, K_PAD)
    if K == 1:  # reduce the per-lane maxima to one per channel
        none_v = tl.full([BLOCK_C, K_PAD], float("-inf"), ACC)
        none_i = tl.full([BLOCK_C, K_PAD], NO_INDEX, tl.int64)
        hi_v, hi_i = _merge_topk(hi_v, hi_i, none_v, none_i, K, K_PAD)
        lo_v, lo_i = _merge_topk(lo_v, lo_i, none_v, none_i, K, K_PAD)
    row = tl.program_id(1) * C + c
    tl.store(sum_ptr + row, tl.sum(acc, 1), mask=c_mask)
    offs = row[:, None] * K_PAD + tl.arange(0, K_PAD)[None, :]
    tl.store(hi_v_ptr + offs, hi_v, mask=c_mask[:, None])
    tl.store(hi_i_ptr + offs, hi_i, mask=c_mask[:, None])
    tl.store(lo_v_ptr + offs, lo_v, mask=c_mask[:, None])
    tl.store(lo_i_ptr + offs, lo_i, mask=c_mask[:, None])


@triton.jit
def _combine_candidates(v_ptr, i_ptr, splits, C, c, c_mask, K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Stage 2 of a top-K: merge the per-split lists [splits, C, K_PAD], CHUNK splits at a time."""
    best_v = tl.full([c.shape[0], K_PAD], float("-inf"), v_ptr.dtype.element_ty)
    best_i = tl.full([c.shape[0], K_PAD], NO_INDEX, tl.int64)
    j = tl.arange(0, CHUNK * K_PAD)
    for first in range(0, splits, CHUNK):
        split = first + j // K_PAD
        offs = (split[None, :] * C + c[:, None]) * K_PAD + (j % K_PAD)[None, :]
        mask = c_mask[:, None] & (split < splits)[None, :]
        v = tl.load(v_ptr + offs, mask=mask, other=float("-inf"))
        i = tl.load(i_ptr + offs, mask=mask, other=NO_INDEX)
        best_v, best_i = _merge_topk(best_v, best_i, v, i, K, K_PAD)
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
    x_ptr, stride_c, sum_ptr, hi_v_ptr, hi_i_ptr, lo_v_ptr, lo_i_ptr, splits, C, inv_n, coef, eps,
    sel_i_ptr, sel_sign_ptr,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """mu, then the K largest |x - mu| among the 2K candidates (ties: lowest index), sigma."""
    c, c_mask = channel_block(BLOCK_C, C)
    mean = shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC)
    hi_v, hi_i = _combine_candidates(hi_v_ptr, hi_i_ptr, splits, C, c, c_mask, K, K_PAD, CHUNK)
    lo_v, lo_i = _combine_candidates(lo_v_ptr, lo_i_ptr, splits, C, c, c_mask, K, K_PAD, CHUNK)
    hi_abs = tl.where(hi_i != NO_INDEX, tl.abs(hi_v - mean[:, None]), float("-inf"))
    lo_abs = tl.where(lo_i != NO_INDEX, tl.abs(lo_v + mean[:, None]), float("-inf"))
    sel_abs, sel_i = _merge_topk(hi_abs, hi_i, lo_abs, lo_i, K, K_PAD)
    # sign(a) of each selected element, from its x in whichever list holds it
    x_sel = tl.where(_in_list(sel_i, hi_i), _lookup(sel_i, hi_i, hi_v), -_lookup(sel_i, lo_i, lo_v))
    sign = _sign(x_sel - mean[:, None], ACC)
    slot = tl.arange(0, K_PAD)[None, :]
    valid = c_mask[:, None] & (slot < K)
    sign = tl.where(valid, sign, 0.0)
    tl.store(sel_i_ptr + c[:, None] * K + slot, sel_i, mask=valid)
    tl.store(sel_sign_ptr + c[:, None] * K + slot, sign, mask=valid)
    abs_sum = tl.sum(tl.where(valid, sel_abs, 0.0), 1)
    _finish_statistics(
        c, c_mask, mean, abs_sum, tl.sum(sign, 1), coef, inv_n, eps,
        mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    )


@triton.jit
def _l1_finalize_kernel(
    x_ptr, stride_c, sum_ptr, abs_ptr, sign_ptr, splits, C, inv_n, coef, eps,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """mu = x_0 + sum(x - x_0) / n, sigma = C1 / n * sum|a| from the partials of the two passes."""
    c, c_mask = channel_block(BLOCK_C, C)
    _finish_statistics(
        c, c_mask,
        shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC),
        combine_splits(abs_ptr, splits, C, c, c_mask, ACC),
        combine_splits(sign_ptr, splits, C, c, c_mask, ACC),
        coef, inv_n, eps,
        mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,
    )


@triton.jit
def _running_coeffs_kernel(
    rmean_ptr, rdev_ptr, w_ptr, b_ptr, mean_ptr, dev_ptr, scale_ptr, shift_ptr, C, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Eval: affine coefficients from the running statistics (and fp32 copies of them)."""
    c, c_mask = channel_block(BLOCK_C, C)
    mean = tl.load(rmean_ptr + c, mask=c_mask, other=0.0).to(ACC)
    dev = tl.load(rdev_ptr + c, mask=c_mask, other=1.0).to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(dev_ptr + c, dev, mask=c_mask)
    _store_affine(c, c_mask, dev, eps, w_ptr, b_ptr, scale_ptr, shift_ptr)


@triton.jit
def _channel_affine_kernel(
    x_ptr, out_ptr, center_ptr, scale_ptr, shift_ptr, src_ptr, gain_ptr,
    N, C, S, stride_n, stride_c, stride_s, tiles_per_program,
    CENTER_X: tl.constexpr, SIGN_TERM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """out = (x [- center_c]) * scale_c + shift_c [+ gain_c * sign(src - center_c)].

    Forward: x is the input, centred (CENTER_X) by mu, out is y.  Backward: x is dy, out
    is dx, and for L1 the sign term carries d sigma / d a_i = C1/n sign(a_i) (src is the
    input)."""
    c, c_mask = channel_block(BLOCK_C, C)
    first, last = tile_range(N, S, tiles_per_program, BLOCK_S)
    scale = tl.load(scale_ptr + c, mask=c_mask, other=0.0)[:, None]
    shift = tl.load(shift_ptr + c, mask=c_mask, other=0.0)[:, None]
    if CENTER_X or SIGN_TERM:
        center = tl.load(center_ptr + c, mask=c_mask, other=0.0)[:, None]
    if SIGN_TERM:
        gain = tl.load(gain_ptr + c, mask=c_mask, other=0.0)[:, None]
    for t in range(first, last):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if CENTER_X:
            x -= center
        out = x * scale + shift
        if SIGN_TERM:
            a = tl.load(src_ptr + offs, mask=mask, other=0.0).to(ACC) - center
            out += gain * _sign(a, ACC)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _grad_finalize_kernel(
    dy_sum_ptr, dya_sum_ptr, splits, dev_ptr, wbar_ptr, w_ptr, dw_ptr, db_ptr,
    scale_ptr, shift_ptr, gain_ptr, C, inv_n, coef, eps,
    BATCH_STATS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dgamma = sum(dy * xhat), dbeta = sum(dy), and dx = scale * dy + shift + gain * w'_i
    with w'_i = sign(a_i) (L1, in the elementwise pass) or the scatter (L-inf, Top-k)."""
    c, c_mask = channel_block(BLOCK_C, C)
    sum_dy = combine_splits(dy_sum_ptr, splits, C, c, c_mask, ACC)
    inv = 1.0 / (tl.load(dev_ptr + c, mask=c_mask, other=1.0) + eps)
    sum_dy_xhat = combine_splits(dya_sum_ptr, splits, C, c, c_mask, ACC) * inv
    if dw_ptr is not None:
        tl.store(dw_ptr + c, sum_dy_xhat, mask=c_mask)
        tl.store(db_ptr + c, sum_dy, mask=c_mask)
    scale = inv
    if w_ptr is not None:
        scale *= tl.load(w_ptr + c, mask=c_mask, other=1.0).to(ACC)
    tl.store(scale_ptr + c, scale, mask=c_mask)
    if BATCH_STATS:
        grad_dev = -scale * sum_dy_xhat
        wbar = tl.load(wbar_ptr + c, mask=c_mask, other=0.0)
        tl.store(shift_ptr + c, -scale * sum_dy * inv_n - grad_dev * wbar, mask=c_mask)
        tl.store(gain_ptr + c, grad_dev * coef, mask=c_mask)
    else:
        tl.store(shift_ptr + c, tl.zeros_like(scale), mask=c_mask)


@triton.jit
def _selected_grad_kernel(
    dx_ptr, sel_i_ptr, sel_sign_ptr, gain_ptr, C, S, stride_n, stride_c, stride_s,
    K: tl.constexpr, K_PAD: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx[selected] += gain_c * sign(a): sigma's gradient reaches only the K selected."""
    c, c_mask = channel_block(BLOCK_C, C)
    slot = tl.arange(0, K_PAD)[None, :]
    mask = c_mask[:, None] & (slot < K)
    r = tl.load(sel_i_ptr + c[:, None] * K + slot, mask=mask, other=0)
    sign = tl.load(sel_sign_ptr + c[:, None] * K + slot, mask=mask, other=0.0)
    gain = tl.load(gain_ptr + c, mask=c_mask, other=0.0)[:, None]
    n = r // S
    offs = n * stride_n + c[:, None].to(tl.int64) * stride_c + (r - n * S) * stride_s
    dx = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(dx_ptr + offs, (dx + gain * sign).to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _k_pad(count: int) -> int:
    return max(2, triton.next_power_of_2(count))


def _channel_grid(c: int, block_c: int = FINALIZE_BLOCK_C):
    return (triton.cdiv(c, block_c),)


def _affine(view, out, center, scale, shift, *, center_x: bool, sign_term=None):
    """Launch _channel_affine_kernel over ``view`` into ``out`` (same layout)."""
    pl = plan(view, ELEMENTWISE_WAVES)
    src, gain = sign_term or (None, None)
    _channel_affine_kernel[pl.grid](
        view.tensor, out, center, scale, shift, src, gain, *view.args(), pl.tiles_per_program,
        CENTER_X=center_x, SIGN_TERM=sign_term is not None, ACC=triton_dtype(scale.dtype), **pl.meta(),
    )


def lp_batch_norm_forward(
    x, weight, bias, running_mean, running_dev, batch_stats: bool, eps: float, norm: str, k: int, normalized: bool,
):
    """Returns (y, mean, dev, wbar, sel_index, sel_sign); see ``ops.lp_batchnorm``."""
    weight, bias, running_mean, running_dev = contiguous(weight, bias, running_mean, running_dev)
    view = channel_view(x)
    c, n = view.c, view.numel_per_channel
    acc = accumulator_dtype(x.dtype)
    y = torch.empty_like(view.tensor)
    mean, dev, wbar, scale, shift = (torch.empty(c, device=x.device, dtype=acc) for _ in range(5))
    count = selected_count(norm, k) if batch_stats else 0
    sel_i = torch.empty((c, count), device=x.device, dtype=torch.int64)
    sel_sign = torch.empty((c, count), device=x.device, dtype=acc)
    if not batch_stats:
        _running_coeffs_kernel[_channel_grid(c)](
            running_mean, running_dev, weight, bias, mean, dev, scale, shift, c, eps,
            ACC=triton_dtype(acc), BLOCK_C=FINALIZE_BLOCK_C,
        )
        _affine(view, y, mean, scale, shift, center_x=True)
        return y, mean, dev, wbar.zero_(), sel_i, sel_sign

    coef = dispersion_coefficient(norm, n, k, normalized)
    stats = (mean, dev, wbar, weight, bias, scale, shift)
    pl = plan(view)
    if norm == "l1":
        sums, _ = partial_sums(view, "sum", shifted=True, pl=pl)
        abs_dev, signs = partial_sums(view, "abs_dev", center=sums, center_scale=1.0 / n, shifted=True, pl=pl)
        _l1_finalize_kernel[_channel_grid(c)](
            view.tensor, view.stride_c, sums, abs_dev, signs, pl.splits, c, 1.0 / n, coef, eps, *stats,
            ACC=triton_dtype(acc), BLOCK_C=FINALIZE_BLOCK_C,
        )
    else:
        k_pad = _k_pad(count)
        sums = torch.empty((pl.splits, c), device=x.device, dtype=acc)
        hi_v, lo_v = (torch.empty((pl.splits, c, k_pad), device=x.device, dtype=acc) for _ in range(2))
        hi_i, lo_i = (torch.empty((pl.splits, c, k_pad), device=x.device, dtype=torch.int64) for _ in range(2))
        _extremes_kernel[pl.grid](
            view.tensor, sums, hi_v, hi_i, lo_v, lo_i, *view.args(), pl.tiles_per_program,
            K=count, K_PAD=k_pad, STATE=pl.block_s if count == 1 else k_pad,
            ACC=triton_dtype(acc), **pl.meta(),
        )
        _extremes_finalize_kernel[(c,)](
            view.tensor, view.stride_c, sums, hi_v, hi_i, lo_v, lo_i, pl.splits, c, 1.0 / n, coef, eps, sel_i,
            sel_sign, *stats,
            K=count, K_PAD=k_pad, CHUNK=max(1, CANDIDATES_PER_MERGE // k_pad),
            ACC=triton_dtype(acc), BLOCK_C=1, num_warps=NUM_WARPS,
        )
    _affine(view, y, mean, scale, shift, center_x=True)
    return y, mean, dev, wbar, sel_i, sel_sign


def lp_batch_norm_backward(
    dy, x, weight, mean, dev, wbar, sel_i, sel_sign,
    batch_stats: bool, param_grads: bool, eps: float, norm: str, k: int, normalized: bool,
):
    """Returns (dx, dweight, dbias); the last two are (C,) accumulator-dtype tensors when
    ``param_grads``, else empty."""
    weight, mean, dev, wbar, sel_i, sel_sign = contiguous(weight, mean, dev, wbar, sel_i, sel_sign)
    view = channel_view(x)
    dy_view = view.like(dy)
    c, n = view.c, view.numel_per_channel
    acc = mean.dtype
    dx = torch.empty_like(view.tensor)
    scale, shift, gain = (torch.empty(c, device=x.device, dtype=acc) for _ in range(3))
    dw = torch.empty(c if param_grads else 0, device=x.device, dtype=acc)
    db = torch.empty_like(dw)
    if batch_stats or param_grads:
        pl = plan(view)
        dy_sum, dya_sum = partial_sums(view, "grad", other=dy_view, center=mean, pl=pl)
        splits = pl.splits
    else:  # eval without affine parameters: dx = dy / (sigma + eps), nothing to reduce
        dy_sum = dya_sum = mean
        splits = 0
    _grad_finalize_kernel[_channel_grid(c)](
        dy_sum, dya_sum, splits, dev, wbar, weight, dw if param_grads else None, db, scale, shift, gain,
        c, 1.0 / n, dispersion_coefficient(norm, n, k, normalized), eps,
        BATCH_STATS=batch_stats, ACC=triton_dtype(acc), BLOCK_C=FINALIZE_BLOCK_C,
    )
    sign_term = (view.tensor, gain) if batch_stats and norm == "l1" else None
    _affine(dy_view, dx, mean, scale, shift, center_x=False, sign_term=sign_term)
    if batch_stats and norm != "l1":
        count, k_pad = sel_i.shape[1], _k_pad(sel_i.shape[1])
        block_c = max(1, FINALIZE_BLOCK_C // k_pad)
        _selected_grad_kernel[_channel_grid(c, block_c)](
            dx, sel_i, sel_sign, gain, c, view.s, view.stride_n, view.stride_c, view.stride_s,
            K=count, K_PAD=k_pad, ACC=triton_dtype(acc), BLOCK_C=block_c,
        )
    return dx, dw, db
