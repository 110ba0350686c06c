"""The per-process stages of the synchronized L1 / L-inf / Top-k batch norm on the Triton
path: the split passes of ``kernels.lp_batchnorm`` with the combine of their statistics
left to ``tritonorm.sync_batchnorm`` (collectives, then ``reference.sync_lp_batchnorm``'s
math on (C,)-sized tensors).  Same functions and results as the PyTorch stages of
``reference.sync_lp_batchnorm``; the math is there.

    moments        _partial_sums_kernel("sum"), _mean_kernel        read x
    candidates     _extremes_kernel, _candidates_kernel              read x
    abs_dev_sums   _partial_sums_kernel("abs_dev")                   read x
    normalize      _normalize_kernel                                 read x, write out
    grad_sums      _partial_sums_kernel("grad")                      read x, dout
    grad_input     _grad_input_kernel                                read dout (x), write dx

So a synchronized forward reads x three times (L1) or twice (L-inf, Top-k), as the split
path does, and a backward reads x and dout twice; the on-chip path's single pass cannot
hold a collective between its statistics and its normalization.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import CODES
from .channel_reduce import (
    ELEMENTWISE_WAVES,
    accumulator_dtype,
    channel_block,
    channel_view,
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
    _extremes_kernel,
    _finalize_grid,
    _grad_input_kernel,
    _k_pad,
    _like,
    _mean_kernel,
    _normalize,
)


@triton.jit
def _store_list(v_ptr, i_ptr, out_v_ptr, out_i_ptr, c, splits, S, tiles_per_program, K: tl.constexpr,
                K_PAD: tl.constexpr, BLOCK_S: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr):
    """Fold channel c's per-split lists into its K best (value, absolute index) pairs and
    store them at out[c, :K], in no particular order; an empty slot is (-inf, >= 2^62 - K)."""
    best_v, best_i = _combine_candidates(v_ptr, i_ptr, c, splits, S, tiles_per_program, K, K_PAD, BLOCK_S, GROUP,
                                         CHUNK)
    slot = tl.arange(0, K_PAD)[None, :]
    mask = slot < K
    tl.store(out_v_ptr + c[:, None] * K + slot, best_v, mask=mask)
    tl.store(out_i_ptr + c[:, None] * K + slot, tl.where(best_v > float("-inf"), best_i, NO_INDEX64), mask=mask)


@triton.jit
def _candidates_kernel(
    x_ptr, stride_c, sum_ptr, hi_v_ptr, hi_i_ptr, lo_v_ptr, lo_i_ptr, splits, C, S, tiles_per_program, inv_n,
    mean_ptr, out_hi_v_ptr, out_hi_i_ptr, out_lo_v_ptr, out_lo_i_ptr,
    K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    GROUP: tl.constexpr,
):
    """One channel per program: the local mean and the K largest x and -x with absolute
    indices, from ``_extremes_kernel``'s per-split partials (its plan: S, BLOCK_S, GROUP)."""
    c, c_mask = channel_block(1, C)
    tl.store(mean_ptr + c, shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC), mask=c_mask)
    _store_list(hi_v_ptr, hi_i_ptr, out_hi_v_ptr, out_hi_i_ptr, c, splits, S, tiles_per_program, K, K_PAD, BLOCK_S,
                GROUP, CHUNK)
    _store_list(lo_v_ptr, lo_i_ptr, out_lo_v_ptr, out_lo_i_ptr, c, splits, S, tiles_per_program, K, K_PAD, BLOCK_S,
                GROUP, CHUNK)


def moments(x: torch.Tensor) -> torch.Tensor:
    """Each channel's mean (C,), accumulator dtype, about its first element."""
    view = channel_view(x)
    c = view.c
    pl = plan(view, grouped=True)
    sums, _ = partial_sums(view, "sum", shifted=True, pl=pl)
    mean = torch.empty(c, device=x.device, dtype=sums.dtype)
    grid, block_c = _finalize_grid(c, x.device)
    _mean_kernel[grid](view.tensor, view.stride_c, sums, pl.splits, c, 1.0 / view.numel_per_channel, mean,
                       ACC=triton_dtype(sums.dtype), BLOCK_C=block_c)
    return mean


def candidates(x: torch.Tensor, k: int):
    """(mean, hi_v, hi_i, lo_v, lo_i): the mean and, per channel, the k largest x and the
    k largest -x with their local indices r, (C, k) each in no particular order."""
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
    mean = torch.empty(c, device=x.device, dtype=acc)
    out = [torch.empty((c, k), device=x.device, dtype=dtype) for dtype in (acc, torch.int64) * 2]
    _candidates_kernel[(c,)](
        view.tensor, view.stride_c, sums, hi_v, hi_i, lo_v, lo_i, pl.splits, c, pl.args(view)[2],
        pl.tiles_per_program, 1.0 / view.numel_per_channel, mean, *out,
        K=k, K_PAD=_k_pad(k), CHUNK=CANDIDATE_CHUNK, ACC=triton_dtype(acc), BLOCK_S=pl.block_s, GROUP=pl.group,
        num_warps=NUM_WARPS,
    )
    return (mean, *out)


def abs_dev_sums(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """(2, C): per channel, sum |x - mu| and sum sign(x - mu) over the local elements."""
    view = channel_view(x)
    abs_dev, signs = partial_sums(view, "abs_dev", center=mean, pl=plan(view, grouped=True))
    return torch.stack([abs_dev.sum(0), signs.sum(0)])


def normalize(x, mean, affine, residual, activation, negative_slope):
    """out = act((x - mu) * scale + shift [+ residual])."""
    view = channel_view(x)
    y = torch.empty_like(view.tensor)
    _normalize(view, y, _like(view, residual), mean, affine, negative_slope, dict(ACT=CODES[activation or "none"]))
    return y


def grad_sums(grad_out, x, mean, affine, residual, activation, negative_slope):
    """((2, C) local sums of dz and dz * a, None), dz = dout * act'(z) rebuilt from x
    (``grad_input`` rebuilds it again: no dz is kept)."""
    view = channel_view(x)
    act = CODES[activation or "none"]
    fused = (_like(view, residual), affine, negative_slope, act) if activation is not None else None
    dz_sum, dza_sum = partial_sums(view, "grad", other=view.like(grad_out), center=mean, pl=plan(view, grouped=True),
                                   activation=fused)
    return torch.stack([dz_sum.sum(0), dza_sum.sum(0)]), None


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
        view.like(grad_out).tensor, view.tensor, _like(view, residual), dx, dres, mean, affine, coefs.contiguous(),
        sel_index.contiguous(), sel_sign.contiguous(), negative_slope, *pl.args(view), pl.tiles_per_program,
        SIGN_TERM=norm == "l1", SELECTED=selected, SELECTED_PAD=_k_pad(selected), ACC=triton_dtype(mean.dtype),
        ACT=CODES[activation or "none"], **pl.meta(),
    )
    return dx, dres
