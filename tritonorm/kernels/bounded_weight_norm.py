"""Triton kernels of bounded weight normalization (math and guard:
``tritonorm.reference.bounded_weight_norm``).

A weight of any rank, cut along ``dim``, is seen as (A, S, B) = (prod(shape[:dim]),
shape[dim], prod(shape[dim + 1:])): the ``ChannelView`` of ``channel_reduce`` with the S
slices as its channels.  For ``dim=0`` a slice is one contiguous row (tiles [BLOCK_C rows,
BLOCK_S]); for the last dim (B = 1) the view folds A into the row axis with the slices
contiguous, so a tile row reads BLOCK_C neighbouring slices.  Each program owns BLOCK_C
slices and walks all of their tiles twice, so each direction is one launch:

    _forward_kernel    pass 1: n_i = ||v_i||                               (stored)
                       pass 2: w = rho_i / max(n_i, eps) * v
    _backward_kernel   pass 1: t_i = <v_i, G_i>
                       pass 2: dL/dv = rho_i / max(n_i, eps) * (G - v t_i / n_i^2)
                               dL/drho_i = t_i / max(n_i, eps)             (stored, (S,))

The second pass re-reads what its program read in the first, mostly from L2.  A program
needs its slices whole, so the parallelism is the number of slice blocks: the planner
shrinks BLOCK_C until there are two programs per SM, or one slice per program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import channel_reduce, num_warps_for
from .channel_reduce import (
    MAX_TILE,
    NUM_WARPS,
    ChannelView,
    accumulator_dtype,
    channel_block,
    channel_view,
    plan,
    tile,
    triton_dtype,
)

# Programs per SM the slice blocks aim for.
WAVES = 2
# Fewest neighbouring slices per tile row when the slices are the contiguous axis (B = 1):
# 16 fp32 values, two 32-byte sectors.
MIN_BLOCK_C_CONTIGUOUS = 16


@triton.jit
def _forward_kernel(
    v_ptr, rho_ptr, w_ptr, norm_ptr,
    N, C, S, stride_n, stride_c, stride_s, rho_stride, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c, c_mask = channel_block(BLOCK_C, C)
    tiles = N * tl.cdiv(S, BLOCK_S)
    squares = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        squares += v * v
    norm = tl.sqrt(tl.sum(squares, 1))
    tl.store(norm_ptr + c, norm, mask=c_mask)
    rho = tl.load(rho_ptr + c * rho_stride, mask=c_mask, other=0.0).to(ACC)
    scale = (rho / tl.maximum(norm, eps))[:, None]
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(w_ptr + offs, (scale * v).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_ptr, v_ptr, rho_ptr, norm_ptr, dv_ptr, drho_ptr,
    N, C, S, stride_n, stride_c, stride_s, rho_stride, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    c, c_mask = channel_block(BLOCK_C, C)
    tiles = N * tl.cdiv(S, BLOCK_S)
    products = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        products += v * g
    dot = tl.sum(products, 1)
    norm = tl.load(norm_ptr + c, mask=c_mask, other=1.0).to(ACC)
    rho = tl.load(rho_ptr + c * rho_stride, mask=c_mask, other=0.0).to(ACC)
    floored = tl.maximum(norm, eps)
    tl.store(drho_ptr + c, (dot / floored).to(drho_ptr.dtype.element_ty), mask=c_mask)
    # Below eps the norm is the constant eps: no projection (reference docstring).
    projection = tl.where(norm >= eps, dot / (floored * floored), 0.0)[:, None]
    scale = (rho / floored)[:, None]
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dv_ptr + offs, (scale * (g - v * projection)).to(dv_ptr.dtype.element_ty), mask=mask)


def slice_view(v: torch.Tensor, dim: int) -> ChannelView:
    """The (A, S, B) channel view of ``v`` cut along ``dim`` (a contiguous copy if ``v`` is
    not contiguous: one extra read and write)."""
    dim %= v.dim()
    shape = (math.prod(v.shape[:dim]), v.shape[dim], math.prod(v.shape[dim + 1:]))
    return channel_view(v.contiguous().view(shape))


def _launch_meta(view: ChannelView) -> tuple[tuple[int], dict]:
    """Grid and tile shape: ``channel_reduce.plan``'s BLOCK_C, halved while there are fewer
    than WAVES programs per SM, and a tile of about MAX_TILE elements whatever BLOCK_C
    became: BLOCK_S = MAX_TILE / BLOCK_C, at most the slice length rounded up to a power of
    two.  A program walks its slices' tiles one after the other, each pass a chain of
    dependent loads, so fewer, wider tiles (a 4608-element 3x3 slice in 3 tiles of 2048,
    not 9 of 512) beat unmasked lanes.  A small tile gets fewer warps (``num_warps_for``:
    a 1x64 slice one warp), so that its loads stay vectors."""
    block_c = plan(view).block_c
    target = WAVES * channel_reduce._num_programs_per_wave(view.tensor.device)
    floor = MIN_BLOCK_C_CONTIGUOUS if view.channels_last else 1
    while block_c > floor and triton.cdiv(view.c, block_c) < target:
        block_c //= 2
    block_s = min(MAX_TILE // block_c, triton.next_power_of_2(view.s))
    meta = dict(ACC=triton_dtype(accumulator_dtype(view.tensor.dtype)), BLOCK_C=block_c, BLOCK_S=block_s,
                num_warps=num_warps_for(block_c * block_s, NUM_WARPS))
    return (triton.cdiv(view.c, block_c),), meta


def _rho_stride(rho: torch.Tensor) -> int:
    """rho_i is rho_ptr[i * stride]: 0 for one rho, the tensor's own stride for (S,)."""
    return rho.stride(0) if rho.dim() else 0


def drho_dtype(rho: torch.Tensor) -> torch.dtype:
    """The dtype of the backward's per-slice dL/drho: rho's own for a (S,) rho (no cast
    after the kernel), the accumulator's for a () rho (summed over the slices first)."""
    return rho.dtype if rho.dim() else accumulator_dtype(rho.dtype)


def forward(v: torch.Tensor, rho: torch.Tensor, dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, n): the bounded weight (contiguous, v's dtype) and the slice norms n (S,), in
    the accumulator dtype.  ``rho`` is () or (S,)."""
    view = slice_view(v, dim)
    w = torch.empty_like(view.tensor)
    norm = torch.empty(view.c, device=v.device, dtype=accumulator_dtype(v.dtype))
    grid, meta = _launch_meta(view)
    _forward_kernel[grid](view.tensor, rho, w, norm, *view.args(), _rho_stride(rho), eps, **meta)
    return w.view(v.shape), norm


def backward(grad: torch.Tensor, v: torch.Tensor, rho: torch.Tensor, norm: torch.Tensor, dim: int,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dv, t) for dL/dw = ``grad``: t (S,) the per-slice dL/drho_i, in rho's dtype for a
    per-slice rho, else in the accumulator dtype (summed by the caller when one rho serves
    every slice)."""
    view = slice_view(v, dim)
    grad = grad.contiguous().view(view.tensor.shape)
    dv = torch.empty_like(view.tensor)
    drho = torch.empty_like(norm, dtype=drho_dtype(rho))
    grid, meta = _launch_meta(view)
    _backward_kernel[grid](
        grad, view.tensor, rho, norm.contiguous(), dv, drho, *view.args(), _rho_stride(rho), eps, **meta
    )
    return dv.view(v.shape), drho
