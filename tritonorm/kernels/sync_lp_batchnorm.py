"""The synchronized L1 / L-inf / Top-k batch norm on the Triton path: the per-process stages
and the combine of what the processes send, function by function as the PyTorch path
(``reference.sync_lp_batchnorm``, which has the math and the packed layout), with the
collectives between them in ``tritonorm.sync_batchnorm``.

    L1 forward     pack_moments     _partial_sums_kernel("sum"), _pack_moments_kernel   read x
                   (all_gather)
                   combine_moments  _combine_moments_kernel
                   abs_dev_sums     _partial_sums_kernel("abs_dev"), _sums_kernel         read x
                   (all_reduce)
                   l1_statistics    _l1_statistics_kernel
                   normalize        _normalize_kernel                            read x, write out
    L-inf/Top-k    pack_candidates  _extremes_kernel, _pack_candidates_kernel          read x
                   (all_gather)
                   select           _select_kernel
                   normalize        _normalize_kernel                            read x, write out
    backward       grad_sums        _partial_sums_kernel("grad"), _sums_kernel      read x, dout
                   (all_reduce)
                   grad_coefficients _grad_coefficients_kernel
                   grad_input       _grad_input_kernel                read dout (x), write dx

Every combine is one launch over (C,)-sized data, so a synchronized layer costs the split
path's passes over x (three reads forward for L1, two for L-inf / Top-k, two of x and dout
backward; the on-chip path's single pass cannot hold a collective between its statistics
and its normalization) plus a launch per collective, and no host synchronization: the
total count n stays on the device, and the dispersion coefficient is computed from it in
the kernels (``_coefficient``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.lp_batchnorm import C_L1, selected_count
from .activation import CODES
from .channel_reduce import (
    ELEMENTWISE_WAVES,
    accumulator_dtype,
    channel_block,
    channel_view,
    combine_splits,
    partial_sums,
    plan,
    shifted_mean,
    triton_dtype,
)
from .lp_batchnorm import (
    CANDIDATE_CHUNK,
    MAX_K,
    NO_INDEX64,
    NUM_WARPS,
    TOPK_TILE,
    _combine_candidates,
    _empty_top,
    _extremes_kernel,
    _finalize_grid,
    _finish_statistics,
    _fold_top,
    _grad_coefficients,
    _grad_input_kernel,
    _in_list,
    _k_pad,
    _like,
    _normalize,
)

# The forms of the dispersion coefficient (sigma = coef * sum of the selected |a|) of n
# values per channel, with the host's ``scale`` (``_coefficient_args``).
PER_VALUE = tl.constexpr(0)  # L1: scale / n
PER_LOG = tl.constexpr(1)  # L-inf / Top-k: scale / sqrt(2 ln n)
CONSTANT = tl.constexpr(2)  # without normalization: scale


def _coefficient_args(norm: str, k: int, normalized: bool) -> tuple[float, int]:
    """(scale, FORM) of ``_coefficient``: the constants of
    ``reference.lp_batchnorm.dispersion_coefficient``."""
    if norm == "l1":
        return (C_L1 if normalized else 1.0), PER_VALUE.value
    count = selected_count(norm, k)
    if not normalized:
        return 1.0 / count, CONSTANT.value
    return (1 + math.sqrt(math.pi * math.log(4))) / (2 * count), PER_LOG.value


@triton.jit
def _coefficient(n, scale, FORM: tl.constexpr):
    """The dispersion coefficient of n values per channel (a device value)."""
    if FORM == PER_VALUE:
        return scale / n
    elif FORM == PER_LOG:
        return scale / tl.sqrt(2 * tl.log(n))
    else:
        return scale + 0 * n


@triton.jit
def _combined_mean(buf_ptr, W, ROW, c, c_mask):
    """(mu, n) from every process's [count, mean (C), ...] rows of ROW float64 words:
    mu = m_0 + sum_p n_p (m_p - m_0) / n, m_0 the first non-empty process's mean."""
    n = tl.load(buf_ptr) * 0.0
    ref = tl.zeros(c.shape, tl.float64)
    for w in range(W):
        count = tl.load(buf_ptr + w * ROW)
        mean = tl.load(buf_ptr + w * ROW + 1 + c, mask=c_mask, other=0.0)
        ref = tl.where((n == 0) & (count > 0), mean, ref)
        n += count
    total = tl.zeros(c.shape, tl.float64)
    for w in range(W):
        count = tl.load(buf_ptr + w * ROW)
        total += count * (tl.load(buf_ptr + w * ROW + 1 + c, mask=c_mask, other=0.0) - ref)
    return ref + total / n, n


@triton.jit(do_not_specialize=["count"])
def _pack_moments_kernel(x_ptr, stride_c, sum_ptr, splits, C, inv_n, count, buf_ptr, ACC: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """buf = float64 [count, mean (C)], the mean x_0 + sum(x - x_0) / n from the partials."""
    c, c_mask = channel_block(BLOCK_C, C)
    mean = shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC)
    tl.store(buf_ptr + 1 + c, mean.to(tl.float64), mask=c_mask)
    if tl.program_id(0) == 0:
        tl.store(buf_ptr, count.to(tl.float64))


@triton.jit
def _combine_moments_kernel(buf_ptr, W, C, mean_ptr, n_ptr, BLOCK_C: tl.constexpr):
    """mu and n of the whole batch from the gathered ``pack_moments`` (W, 1 + C)."""
    c, c_mask = channel_block(BLOCK_C, C)
    mean, n = _combined_mean(buf_ptr, W, 1 + C, c, c_mask)
    tl.store(mean_ptr + c, mean.to(mean_ptr.dtype.element_ty), mask=c_mask)
    if tl.program_id(0) == 0:
        tl.store(n_ptr, n.to(n_ptr.dtype.element_ty))


@triton.jit
def _sums_kernel(part0_ptr, part1_ptr, splits, C, out_ptr, dev_ptr, eps, dw_ptr, db_ptr, ACC: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """out = (2, C) [sum of part0, sum of part1] over the splits; with dw_ptr, this
    process's parameter gradients dgamma = sum(dz * a) / (sigma + eps), dbeta = sum(dz)."""
    c, c_mask = channel_block(BLOCK_C, C)
    s0 = combine_splits(part0_ptr, splits, C, c, c_mask, ACC)
    s1 = combine_splits(part1_ptr, splits, C, c, c_mask, ACC)
    tl.store(out_ptr + c, s0, mask=c_mask)
    tl.store(out_ptr + C + c, s1, mask=c_mask)
    if dw_ptr is not None:
        dev = tl.load(dev_ptr + c, mask=c_mask, other=1.0)
        tl.store(dw_ptr + c, (s1 / (dev + eps)).to(dw_ptr.dtype.element_ty), mask=c_mask)
        tl.store(db_ptr + c, s0.to(db_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _l1_statistics_kernel(sums_ptr, n_ptr, C, eps, scale, mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
                          FORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """sigma = coef * sum |a| and wbar = coef * sum sign(a) / n from the all-reduced sums."""
    c, c_mask = channel_block(BLOCK_C, C)
    n = tl.load(n_ptr)
    _finish_statistics(
        c, c_mask, tl.load(mean_ptr + c, mask=c_mask, other=0.0), tl.load(sums_ptr + c, mask=c_mask, other=0.0),
        tl.load(sums_ptr + C + c, mask=c_mask, other=0.0), _coefficient(n, scale, FORM), 1.0 / n, eps, C,
        mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    )


@triton.jit
def _store_list(v_ptr, i_ptr, out_v_ptr, out_i_ptr, c, splits, S, tiles_per_program, K: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_S: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr):
    """Fold channel c's per-split lists into its K best (value, absolute index) pairs and
    store them at out[c * K:(c + 1) * K] (float64, int64), in no particular order; an
    empty slot is (-inf, NO_INDEX64)."""
    best_v, best_i = _combine_candidates(v_ptr, i_ptr, c, splits, S, tiles_per_program, K, K_PAD, BLOCK_S, GROUP,
                                         CHUNK)
    slot = tl.arange(0, K_PAD)[None, :]
    offs = c[:, None].to(tl.int64) * K + slot
    tl.store(out_v_ptr + offs, best_v.to(tl.float64), mask=slot < K)
    tl.store(out_i_ptr + offs, tl.where(best_v > float("-inf"), best_i, NO_INDEX64), mask=slot < K)


@triton.jit(do_not_specialize=["count"])
def _pack_candidates_kernel(
    x_ptr, stride_c, sum_ptr, hi_v_ptr, hi_i_ptr, lo_v_ptr, lo_i_ptr, splits, C, S, tiles_per_program, inv_n, count,
    buf_f_ptr, buf_i_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One channel per program: its mean and its K largest x and -x with their absolute
    indices, from ``_extremes_kernel``'s partials (its plan: S, BLOCK_S, GROUP), packed at
    their places (buf_f_ptr / buf_i_ptr: the float64 / int64 views of one buffer)."""
    c, c_mask = channel_block(1, C)
    tl.store(buf_f_ptr + 1 + c, shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC).to(tl.float64),
             mask=c_mask)
    if tl.program_id(0) == 0:
        tl.store(buf_f_ptr, count.to(tl.float64))
    values, indices = 1 + C, 1 + C + 2 * C * K
    _store_list(hi_v_ptr, hi_i_ptr, buf_f_ptr + values, buf_i_ptr + indices, c, splits, S, tiles_per_program,
                K, K_PAD, BLOCK_S, GROUP, CHUNK)
    _store_list(lo_v_ptr, lo_i_ptr, buf_f_ptr + values + C * K, buf_i_ptr + indices + C * K, c, splits, S,
                tiles_per_program, K, K_PAD, BLOCK_S, GROUP, CHUNK)


@triton.jit
def _select_kernel(
    buf_f_ptr, buf_i_ptr, W, C, rank, eps, scale, n_ptr, sel_i_ptr, sel_sign_ptr,
    mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, FORM: tl.constexpr, ACC: tl.constexpr,
):
    """One channel per program: mu, then the K largest |x - mu| of the whole batch from
    every process's 2K candidates (ties: the lowest global index offset_p + r; a lo entry
    also in its process's hi list is left out), sigma, wbar and this process's part of the
    selection (local indices, -1 and sign 0 for other processes' elements).

    Entries rank by |a|, then by code = 2 g + (a < 0) ascending, which orders like the
    global index g and carries the sign (g < 2^60)."""
    c, c_mask = channel_block(1, C)
    ROW = 1 + C + 4 * C * K
    mean64, n = _combined_mean(buf_f_ptr, W, ROW, c, c_mask)
    mean = mean64.to(ACC)
    slot = tl.arange(0, K_PAD)[None, :]
    listed = slot < K
    top_v, top_code = _empty_top(1, K, K_PAD, ACC, NO_INDEX64, tl.int64)
    offset = tl.zeros([], tl.int64)
    mine_lo = offset
    mine_hi = offset
    for w in range(W):
        row = w * ROW
        count = tl.load(buf_f_ptr + row).to(tl.int64)
        offs = c[:, None].to(tl.int64) * K + slot
        hi_v = tl.load(buf_f_ptr + row + 1 + C + offs, mask=listed, other=float("-inf")).to(ACC)
        lo_v = tl.load(buf_f_ptr + row + 1 + C + C * K + offs, mask=listed, other=float("-inf")).to(ACC)
        hi_i = tl.load(buf_i_ptr + row + 1 + C + 2 * C * K + offs, mask=listed, other=NO_INDEX64)
        lo_i = tl.load(buf_i_ptr + row + 1 + C + 3 * C * K + offs, mask=listed, other=NO_INDEX64)
        hi_ok = hi_v > float("-inf")
        lo_ok = (lo_v > float("-inf")) & ~_in_list(lo_i, tl.where(hi_ok, hi_i, -1))
        a_hi = hi_v - mean[:, None]
        a_lo = -lo_v - mean[:, None]
        top_v, top_code = _fold_top(
            top_v, top_code, tl.where(hi_ok, tl.abs(a_hi), float("-inf")),
            tl.where(hi_ok, 2 * (offset + hi_i) + (a_hi < 0).to(tl.int64), NO_INDEX64), NO_INDEX64)
        top_v, top_code = _fold_top(
            top_v, top_code, tl.where(lo_ok, tl.abs(a_lo), float("-inf")),
            tl.where(lo_ok, 2 * (offset + lo_i) + (a_lo < 0).to(tl.int64), NO_INDEX64), NO_INDEX64)
        mine_lo = tl.where(w == rank, offset, mine_lo)
        mine_hi = tl.where(w == rank, offset + count, mine_hi)
        offset += count
    valid = c_mask[:, None] & listed
    signs = tl.where(valid & (top_v > 0), 1.0 - 2.0 * (top_code & 1).to(ACC), 0.0)
    g = top_code >> 1
    mine = valid & (g >= mine_lo) & (g < mine_hi)
    out = c[:, None] * K + slot
    tl.store(sel_i_ptr + out, tl.where(mine, g - mine_lo, -1), mask=valid)
    tl.store(sel_sign_ptr + out, tl.where(mine, signs, 0.0), mask=valid)
    n_acc = n.to(ACC)
    if tl.program_id(0) == 0:
        tl.store(n_ptr, n_acc)
    _finish_statistics(
        c, c_mask, mean, tl.sum(tl.where(valid, top_v, 0.0), 1), tl.sum(signs, 1), _coefficient(n_acc, scale, FORM),
        1.0 / n_acc, eps, C, mean_ptr, dev_ptr, wbar_ptr, w_ptr, b_ptr, affine_ptr,
    )


@triton.jit
def _grad_coefficients_kernel(sums_ptr, n_ptr, dev_ptr, wbar_ptr, w_ptr, coef_ptr, C, eps, scale,
                              FORM: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx's coefficients (``_grad_coefficients``) from the all-reduced sums of dz and dz * a,
    stored at coef_ptr[c], [C + c], [2C + c]."""
    c, c_mask = channel_block(BLOCK_C, C)
    n = tl.load(n_ptr)
    factor, shift, gain = _grad_coefficients(
        c, c_mask, tl.load(sums_ptr + c, mask=c_mask, other=0.0), tl.load(sums_ptr + C + c, mask=c_mask, other=0.0),
        dev_ptr, wbar_ptr, w_ptr, None, None, 1.0 / n, _coefficient(n, scale, FORM), eps, True, ACC,
    )
    tl.store(coef_ptr + c, factor, mask=c_mask)
    tl.store(coef_ptr + C + c, shift, mask=c_mask)
    tl.store(coef_ptr + 2 * C + c, gain, mask=c_mask)


# ----------------------------------------------------------------------------- launchers


def _stats(c: int, device, acc):
    """Empty mean, sigma, wbar (C,) and affine (2, C) in the accumulator dtype."""
    vectors = (torch.empty(c, device=device, dtype=acc) for _ in range(3))
    return (*vectors, torch.empty((2, c), device=device, dtype=acc))


def pack_moments(x: torch.Tensor) -> torch.Tensor:
    """What a process sends for L1: float64 [count, mean (C)]."""
    view = channel_view(x)
    c, acc = view.c, accumulator_dtype(x.dtype)
    pl = plan(view, grouped=True)
    sums, _ = partial_sums(view, "sum", shifted=True, pl=pl)
    buf = torch.empty(1 + c, device=x.device, dtype=torch.float64)
    grid, block_c = _finalize_grid(c, x.device)
    _pack_moments_kernel[grid](view.tensor, view.stride_c, sums, pl.splits, c, 1.0 / view.numel_per_channel,
                               view.numel_per_channel, buf, ACC=triton_dtype(acc), BLOCK_C=block_c)
    return buf


def combine_moments(gathered: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (C,), n (1,)) in the accumulator dtype from the gathered ``pack_moments``."""
    w, c = gathered.shape[0], gathered.shape[1] - 1
    mean = torch.empty(c, device=gathered.device, dtype=acc)
    n = torch.empty(1, device=gathered.device, dtype=acc)
    grid, block_c = _finalize_grid(c, gathered.device)
    _combine_moments_kernel[grid](gathered, w, c, mean, n, BLOCK_C=block_c)
    return mean, n


def _sums(part0, part1, splits, dev=None, eps=0.0, param_grads=None):
    c = part0.shape[1]
    out = torch.empty((2, c), device=part0.device, dtype=part0.dtype)
    grid, block_c = _finalize_grid(c, part0.device)
    dw, db = param_grads or (None, None)
    _sums_kernel[grid](part0, part1, splits, c, out, dev, eps, dw, db, ACC=triton_dtype(part0.dtype),
                       BLOCK_C=block_c)
    return out


def abs_dev_sums(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(2, C): per channel, sum |x - mu| and sum sign(x - mu) over the local elements."""
    view = channel_view(x)
    pl = plan(view, grouped=True)
    abs_dev, signs = partial_sums(view, "abs_dev", center=mean, pl=pl)
    return _sums(abs_dev, signs, pl.splits)


def l1_statistics(sums, mean, n, weight, bias, eps: float, normalized: bool):
    """(sigma, wbar, affine (2, C)) of L1 from the all-reduced ``abs_dev_sums``."""
    c = sums.shape[1]
    _, dev, wbar, affine = _stats(c, sums.device, sums.dtype)
    scale, form = _coefficient_args("l1", 0, normalized)
    grid, block_c = _finalize_grid(c, sums.device)
    _l1_statistics_kernel[grid](sums, n, c, eps, scale, mean, dev, wbar, weight, bias, affine, FORM=form,
                                BLOCK_C=block_c)
    return dev, wbar, affine


def pack_candidates(x: torch.Tensor, k: int) -> torch.Tensor:
    """What a process sends for L-inf / Top-k: [count, mean, hi_v, lo_v, hi_i, lo_i] in
    8-byte words (``reference.sync_lp_batchnorm``), the lists in no particular order."""
    if k > MAX_K:
        raise ValueError(f"the Triton path takes k <= {MAX_K}, got k={k}")
    view = channel_view(x)
    c, acc = view.c, accumulator_dtype(x.dtype)
    pl = plan(view, grouped=True) if k == 1 else plan(view, max_tile=TOPK_TILE)
    sums = torch.empty((pl.splits, c), device=x.device, dtype=acc)
    hi_v, lo_v = (torch.empty((c, pl.splits, k), device=x.device, dtype=acc) for _ in range(2))
    hi_i, lo_i = (torch.empty((c, pl.splits, k), device=x.device, dtype=torch.int32) for _ in range(2))
    _extremes_kernel[pl.grid](
        view.tensor, sums, hi_v, hi_i, lo_v, lo_i, *pl.args(view), pl.tiles_per_program,
        K=k, K_PAD=_k_pad(k), ACC=triton_dtype(acc), **pl.meta(),
    )
    buf = torch.empty(1 + c + 4 * c * k, device=x.device, dtype=torch.int64)
    _pack_candidates_kernel[(c,)](
        view.tensor, view.stride_c, sums, hi_v, hi_i, lo_v, lo_i, pl.splits, c, pl.args(view)[2],
        pl.tiles_per_program, 1.0 / view.numel_per_channel, view.numel_per_channel, buf.view(torch.float64), buf,
        K=k, K_PAD=_k_pad(k), CHUNK=CANDIDATE_CHUNK, ACC=triton_dtype(acc), BLOCK_S=pl.block_s, GROUP=pl.group,
        num_warps=NUM_WARPS,
    )
    return buf


def select(gathered, rank: int, norm: str, k: int, weight, bias, eps: float, normalized: bool, acc):
    """(mu, sigma, wbar, affine, selection, signs, n) from the gathered
    ``pack_candidates`` (W, 1 + C + 4CK); see the PyTorch path's ``select``."""
    K = selected_count(norm, k)
    w, c = gathered.shape[0], (gathered.shape[1] - 1) // (1 + 4 * K)
    mean, dev, wbar, affine = _stats(c, gathered.device, acc)
    sel_i = torch.empty((c, K), device=gathered.device, dtype=torch.int64)
    sel_sign = torch.empty((c, K), device=gathered.device, dtype=acc)
    n = torch.empty(1, device=gathered.device, dtype=acc)
    scale, form = _coefficient_args(norm, k, normalized)
    _select_kernel[(c,)](
        gathered.view(torch.float64), gathered, w, c, rank, eps, scale, n, sel_i, sel_sign,
        mean, dev, wbar, weight, bias, affine, K=K, K_PAD=_k_pad(K), FORM=form, ACC=triton_dtype(acc),
    )
    return mean, dev, wbar, affine, sel_i, sel_sign, n


def normalize(x, mean, affine, residual, activation, negative_slope):
    """out = act((x - mu) * scale + shift [+ residual])."""
    view = channel_view(x)
    y = torch.empty_like(view.tensor)
    _normalize(view, y, _like(view, residual), mean, affine, negative_slope, dict(ACT=CODES[activation or "none"]))
    return y


def grad_sums(grad_out, x, mean, affine, residual, activation, negative_slope, dev, eps: float):
    """(sums, None, dgamma, dbeta): the (2, C) local sums of dz and dz * a, dz = dout *
    act'(z) rebuilt from x (``grad_input`` rebuilds it again: no dz is kept), and this
    process's parameter gradients, in the accumulator dtype."""
    view = channel_view(x)
    act = CODES[activation or "none"]
    fused = (_like(view, residual), affine, negative_slope, act) if activation is not None else None
    pl = plan(view, grouped=True)
    dz_sum, dza_sum = partial_sums(view, "grad", other=view.like(grad_out), center=mean, pl=pl, activation=fused)
    dw, db = torch.empty_like(dev), torch.empty_like(dev)
    return _sums(dz_sum, dza_sum, pl.splits, dev, eps, (dw, db)), None, dw, db


def grad_coefficients(sums, dev, wbar, weight, n, norm: str, k: int, normalized: bool, eps: float):
    """(3, C): dx = scale * dz + shift + gain * w_i from the all-reduced sums."""
    c = sums.shape[1]
    coefs = torch.empty((3, c), device=sums.device, dtype=sums.dtype)
    scale, form = _coefficient_args(norm, k, normalized)
    grid, block_c = _finalize_grid(c, sums.device)
    _grad_coefficients_kernel[grid](sums, n, dev, wbar, weight, coefs, c, eps, scale, FORM=form,
                                    ACC=triton_dtype(sums.dtype), BLOCK_C=block_c)
    return coefs


def grad_input(grad_out, dz, x, mean, affine, coefs, norm, sel_index, sel_sign, residual, activation, negative_slope,
               residual_grad: bool):
    """(dx, dresidual): dx = scale * dz + shift + gain * w_i (``_grad_input_kernel``, dz
    rebuilt from dout: the ``dz`` argument is the PyTorch stage's, None here) and, with an
    activation and ``residual_grad``, dz (else None)."""
    view = channel_view(x)
    fused = activation is not None
    dx = torch.empty_like(view.tensor)
    dres = torch.empty_like(view.tensor) if fused and residual_grad else None
    selected = 0 if norm == "l1" else sel_index.shape[1]
    pl = plan(view, ELEMENTWISE_WAVES, grouped=True)
    _grad_input_kernel[pl.grid](
        view.like(grad_out).tensor, view.tensor, _like(view, residual), dx, dres, mean, affine, coefs,
        sel_index, sel_sign, negative_slope, *pl.args(view), pl.tiles_per_program,
        SIGN_TERM=norm == "l1", SELECTED=selected, SELECTED_PAD=_k_pad(selected), ACC=triton_dtype(mean.dtype),
        ACT=CODES[activation or "none"], **pl.meta(),
    )
    return dx, dres
