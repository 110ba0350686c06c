"""Triton kernels of the mean-only batch norm (math: ``tritonorm.reference.mean_only_batchnorm``),
on the shared split reduction (``channel_reduce``) and the Lp layers' normalize pass.

Forward, training:

    _partial_sums_kernel("sum")   read x            partial sum(x - x_0)
    _mean_finalize_kernel                           mu = x_0 + sum / n, coefficients (1, beta)
    _normalize_kernel             read x, write y   y = (x - mu) * 1 + beta

eval: the running mean (as the accumulator dtype), the coefficients by torch ops, and the
normalize pass.  Then, with running statistics, ``running_stats.update_running`` (a
separate op).

Backward:

    _partial_sums_kernel("sum")   read dy           partial sum(dy)
    _grad_finalize_kernel                           dbeta = sum(dy), mean(dy), coefficients (1, 0)
    _normalize_kernel             read dy, write dx dx = (dy - mean(dy)) * 1 + 0

with the running mean (eval) dx = dy, a copy: nothing else is launched but dbeta's reduction.
The finalize kernels store the normalize pass's (2, C) coefficients, so a training step
makes no torch op on them (tests/test_traffic.py, test_mean_only_batch_norm_budgets).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .activation import NONE
from .channel_reduce import (
    accumulator_dtype,
    channel_block,
    channel_view,
    combine_splits,
    partial_sums,
    plan,
    shifted_mean,
    triton_dtype,
)
from .lp_batchnorm import _finalize_grid, _normalize


@triton.jit
def _store_unit_affine(affine_ptr, C, c, c_mask, b_ptr, ACC: tl.constexpr):
    """The normalize pass's coefficients at affine_ptr (2, C): scale 1, shift beta (0 without b_ptr)."""
    shift = tl.zeros([c.shape[0]], dtype=ACC)
    if b_ptr is not None:
        shift += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(ACC)
    tl.store(affine_ptr + c, tl.zeros_like(shift) + 1.0, mask=c_mask)
    tl.store(affine_ptr + C + c, shift, mask=c_mask)


@triton.jit
def _mean_finalize_kernel(x_ptr, stride_c, sum_ptr, splits, C, inv_n, b_ptr, mean_ptr, affine_ptr, ACC: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """mu = x_0 + sum(x - x_0) / n per channel, and the coefficients (1, beta)."""
    c, c_mask = channel_block(BLOCK_C, C)
    tl.store(mean_ptr + c, shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC), mask=c_mask)
    _store_unit_affine(affine_ptr, C, c, c_mask, b_ptr, ACC)


@triton.jit
def _grad_finalize_kernel(sum_ptr, splits, C, inv_n, db_ptr, mean_ptr, affine_ptr, ACC: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    """dbeta = sum(dy) and mean(dy) per channel from the partial sums, and the coefficients (1, 0)."""
    c, c_mask = channel_block(BLOCK_C, C)
    total = combine_splits(sum_ptr, splits, C, c, c_mask, ACC)
    tl.store(db_ptr + c, total.to(db_ptr.dtype.element_ty), mask=c_mask)
    tl.store(mean_ptr + c, total * inv_n, mask=c_mask)
    _store_unit_affine(affine_ptr, C, c, c_mask, None, ACC)


def _unit_affine(c: int, bias, like: torch.Tensor) -> torch.Tensor:
    """The normalize pass's (2, C) coefficients by torch ops (eval): scale 1, shift beta (or 0)."""
    affine = like.new_empty((2, c))
    affine[0].fill_(1.0)
    if bias is None:
        affine[1].zero_()
    else:
        affine[1].copy_(bias)
    return affine


def mean_only_batch_norm_forward(x, bias, running_mean, batch_stats: bool):
    """Returns (y, mean): y in the layout of ``channel_view(x)``, mean (C,) in the
    accumulator dtype (the batch's in training, else running_mean's)."""
    view = channel_view(x)
    c, n = view.c, view.numel_per_channel
    acc = accumulator_dtype(x.dtype)
    y = torch.empty_like(view.tensor)
    if batch_stats:
        mean = torch.empty(c, device=x.device, dtype=acc)
        affine = mean.new_empty((2, c))
        pl = plan(view, grouped=True)
        sums, _ = partial_sums(view, "sum", shifted=True, pl=pl)
        grid, block_c = _finalize_grid(c, x.device)
        _mean_finalize_kernel[grid](view.tensor, view.stride_c, sums, pl.splits, c, 1.0 / n, bias, mean, affine,
                                    ACC=triton_dtype(acc), BLOCK_C=block_c)
    else:
        mean = running_mean.to(acc, copy=True)
        affine = _unit_affine(c, bias, mean)
    _normalize(view, y, None, mean, affine, 0.0, dict(ACT=NONE))
    return y, mean


def mean_only_batch_norm_backward(dy, batch_stats: bool, bias_grad: bool):
    """Returns (dx, dbias): dx = dy - mean(dy) (training) or dy (eval), in the layout of
    ``channel_view(dy)``; dbias = sum(dy) (C,) in the accumulator dtype when ``bias_grad``,
    else empty."""
    view = channel_view(dy)
    c, n = view.c, view.numel_per_channel
    acc = accumulator_dtype(dy.dtype)
    db = torch.empty(c if bias_grad else 0, device=dy.device, dtype=acc)
    if not (batch_stats or bias_grad):
        return view.tensor.clone(), db
    pl = plan(view, grouped=True)
    sums, _ = partial_sums(view, "sum", pl=pl)
    mean = torch.empty(c, device=dy.device, dtype=acc)
    affine = mean.new_empty((2, c))
    grid, block_c = _finalize_grid(c, dy.device)
    _grad_finalize_kernel[grid](sums, pl.splits, c, 1.0 / n, db if bias_grad else mean, mean, affine,
                                ACC=triton_dtype(acc), BLOCK_C=block_c)
    if not batch_stats:
        return view.tensor.clone(), db
    dx = torch.empty_like(view.tensor)
    _normalize(view, dx, None, mean, affine, 0.0, dict(ACT=NONE))
    return dx, db
