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
shrinks BLOCK_C until there are two programs per SM, or one slice per program.  Slices
whose length is not a multiple of 16 bytes are read through ``channel_reduce``'s grouped
view (GROUP slices to a tile row, per-slice sums over its segments: ``row_sums``,
``channel_reduce.spread``), so that every access is a 128-bit vector.
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
    row_sums,
    spread,
    tile,
    triton_dtype,
)

# Programs per SM the slice blocks aim for.
WAVES = 2
# Fewest neighbouring slices per tile row when the slices are the contiguous axis (B = 1):
# 16 fp32 values, two 32-byte sectors.
MIN_BLOCK_C_CONTIGUOUS = 16
# Fewest bytes in a tile: a warp's 32 threads with one 16-byte vector each.
MIN_TILE_BYTES = 32 * 16


@triton.jit
def _forward_kernel(
    v_ptr, rho_ptr, w_ptr, norm_ptr,
    N, C, S, stride_n, stride_c, stride_s, rho_stride, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    c, c_mask = channel_block(BLOCK_C, C)
    i, i_mask = channel_block(BLOCK_C * GROUP, C * GROUP)  # the program's slices
    tiles = N * tl.cdiv(S, BLOCK_S)
    squares = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        squares += v * v
    norm = tl.sqrt(row_sums(squares, S, GROUP))
    tl.store(norm_ptr + i, norm, mask=i_mask)
    rho = tl.load(rho_ptr + i * rho_stride, mask=i_mask, other=0.0).to(ACC)
    scale = spread(rho / tl.maximum(norm, eps), S, GROUP, BLOCK_S)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(w_ptr + offs, (scale * v).to(w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_ptr, v_ptr, rho_ptr, norm_ptr, dv_ptr, drho_ptr,
    N, C, S, stride_n, stride_c, stride_s, rho_stride, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    c, c_mask = channel_block(BLOCK_C, C)
    i, i_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    tiles = N * tl.cdiv(S, BLOCK_S)
    products = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        products += v * g
    dot = row_sums(products, S, GROUP)
    norm = tl.load(norm_ptr + i, mask=i_mask, other=1.0).to(ACC)
    rho = tl.load(rho_ptr + i * rho_stride, mask=i_mask, other=0.0).to(ACC)
    floored = tl.maximum(norm, eps)
    tl.store(drho_ptr + i, (dot / floored).to(drho_ptr.dtype.element_ty), mask=i_mask)
    # Below eps the norm is the constant eps: no projection (reference docstring).
    projection = spread(tl.where(norm >= eps, dot / (floored * floored), 0.0), S, GROUP, BLOCK_S)
    scale = spread(rho / floored, S, GROUP, BLOCK_S)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dv_ptr + offs, (scale * (g - v * projection)).to(dv_ptr.dtype.element_ty), mask=mask)


def slice_view(v: torch.Tensor, dim: int) -> ChannelView:
    """The (A, S, B) channel view of ``v`` cut along ``dim`` (a contiguous copy if ``v`` is
    not contiguous: one extra read and write)."""
    dim %= v.dim()
    shape = (math.prod(v.shape[:dim]), v.shape[dim], math.prod(v.shape[dim + 1:]))
    return channel_view(v.contiguous().view(shape))


def _launch(view: ChannelView) -> tuple[tuple[int], tuple, dict]:
    """Grid, the (N, C, S, strides) the kernels walk and the tile: ``channel_reduce.plan``'s
    grouped plan, whose BLOCK_C is halved while there are fewer than WAVES programs per SM,
    and a tile of about MAX_TILE elements whatever BLOCK_C became: BLOCK_S = MAX_TILE /
    BLOCK_C, at most the slice length rounded up to a power of two.  A program walks its
    slices' tiles one after the other, each pass a chain of dependent loads, so fewer,
    wider tiles (a 4608-element 3x3 slice in 3 tiles of 2048, not 9 of 512) beat unmasked
    lanes.

    128-bit accesses: slices whose length is not a multiple of 16 bytes (a stem conv's 147
    weights) are read GROUP to a tile row (the grouped view, its row of GROUP slices in one
    tile); a tile is never smaller than one warp's 16-byte vectors (MIN_TILE_BYTES: two 1x64
    fp32 rows, not one over half the lanes), and a small one gets fewer warps
    (``num_warps_for``)."""
    pl = plan(view, grouped=True)
    args = pl.args(view)
    rows, row = args[1], args[2]
    block_c = pl.block_c
    target = WAVES * channel_reduce._num_programs_per_wave(view.tensor.device)
    floor = MIN_BLOCK_C_CONTIGUOUS if view.channels_last else 1
    floor = max(floor, MIN_TILE_BYTES // view.tensor.element_size() // triton.next_power_of_2(row))
    while block_c > floor and triton.cdiv(rows, block_c) < target:
        block_c //= 2
    block_s = min(MAX_TILE // block_c, triton.next_power_of_2(row))
    meta = dict(ACC=triton_dtype(accumulator_dtype(view.tensor.dtype)), BLOCK_C=block_c, BLOCK_S=block_s,
                ALIGN=pl.align, GROUP=pl.group, num_warps=num_warps_for(block_c * block_s, NUM_WARPS))
    return (triton.cdiv(rows, block_c),), args, meta


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
    grid, args, meta = _launch(view)
    _forward_kernel[grid](view.tensor, rho, w, norm, *args, _rho_stride(rho), eps, **meta)
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
    grid, args, meta = _launch(view)
    _backward_kernel[grid](grad, view.tensor, rho, norm.contiguous(), dv, drho, *args, _rho_stride(rho), eps, **meta)
    return dv.view(v.shape), drho
