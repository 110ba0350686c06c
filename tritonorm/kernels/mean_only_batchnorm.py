"""Triton kernels of the mean-only batch norm (math: ``tritonorm.reference.mean_only_batchnorm``),
on the shared split reduction (``channel_reduce``) and the Lp layers' normalize pass.

Forward, training:

    _partial_sums_kernel("sum")   read x            partial sum(x - x_0)
    _mean_kernel (lp_batchnorm)                     mu = x_0 + sum / n
    _normalize_kernel             read x, write y   y = (x - mu) * 1 + beta

eval: the running mean (as the accumulator dtype) and the normalize pass.  Then, with
running statistics, ``running_stats.update_running`` (a separate op).

Backward:

    _partial_sums_kernel("sum")   read dy           partial sum(dy)
    _grad_finalize_kernel                           dbeta = sum(dy), mean(dy)
    _normalize_kernel             read dy, write dx dx = (dy - mean(dy)) * 1 + 0

with the running mean (eval) dx = dy: nothing is launched for it but dbeta's reduction.
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
    triton_dtype,
)
from .lp_batchnorm import _finalize_grid, _mean_kernel, _normalize


@triton.jit
def _grad_finalize_kernel(sum_ptr, splits, C, inv_n, db_ptr, mean_ptr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """dbeta = sum(dy) and mean(dy) per channel from the partial sums."""
    c, c_mask = channel_block(BLOCK_C, C)
    total = combine_splits(sum_ptr, splits, C, c, c_mask, ACC)
    tl.store(db_ptr + c, total.to(db_ptr.dtype.element_ty), mask=c_mask)
    tl.store(mean_ptr + c, total * inv_n, mask=c_mask)


def _unit_affine(c: int, bias, like: torch.Tensor) -> torch.Tensor:
    """The normalize pass's (2, C) coefficients: scale 1, shift beta (or 0)."""
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
        pl = plan(view, grouped=True)
        sums, _ = partial_sums(view, "sum", shifted=True, pl=pl)
        grid, block_c = _finalize_grid(c, x.device)
        _mean_kernel[grid](view.tensor, view.stride_c, sums, pl.splits, c, 1.0 / n, mean, ACC=triton_dtype(acc),
                           BLOCK_C=block_c)
    else:
        mean = running_mean.to(acc, copy=True)
    _normalize(view, y, None, mean, _unit_affine(c, bias, mean), 0.0, dict(ACT=NONE))
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
    grid, block_c = _finalize_grid(c, dy.device)
    _grad_finalize_kernel[grid](sums, pl.splits, c, 1.0 / n, db if bias_grad else mean, mean, ACC=triton_dtype(acc),
                                BLOCK_C=block_c)
    if not batch_stats:
        return view.tensor.clone(), db
    dx = torch.empty_like(view.tensor)
    _normalize(view, dx, None, mean, _unit_affine(c, None, mean), 0.0, dict(ACT=NONE))
    return dx, db
