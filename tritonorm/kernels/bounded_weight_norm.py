"""Triton kernels of bounded weight normalization (math and guard:
``tritonorm.reference.bounded_weight_norm``).

A weight of any rank, cut along ``dim``, is seen as (A, S, B) = (prod(shape[:dim]),
shape[dim], prod(shape[dim + 1:])): the ``ChannelView`` of ``channel_reduce`` with the S
slices as its channels.  For ``dim=0`` a slice is one contiguous row (tiles [BLOCK_C rows,
BLOCK_S]); for the last dim (B = 1) the view folds A into the row axis with the slices
contiguous, so a tile row reads BLOCK_C neighbouring slices.  Each program owns BLOCK_C
slices and walks all of their tiles twice, so each direction is one launch:

    _forward_kernel    pass 1: n_i = ||v_i||_p                             (stored)
                       pass 2: w = rho_i / max(n_i, eps) * v
    _backward_kernel   pass 1: t_i = <v_i, G_i>  (p = inf: also k_i, the lowest index of
                               a max |v_ij|, the one whose |v| equals the stored n_i)
                       pass 2: dL/dv = rho_i / max(n_i, eps) * (G - t_i / n_i * dn_i/dv_i)
                               dL/drho_i = t_i / max(n_i, eps)             (stored, (S,))

with dn_i/dv_i = v_i / n_i (p = 2), sign(v_i) (p = 1) or sign(v_ik) at k = k_i alone (p =
inf); the norm order is the constexpr P (2, 1, or 0 for inf).  Each pass-1 accumulator is a
tile of partials (squares, |v|, running max |v|, the max of -r over the hits, r the
reduction index, which runs over a slice's elements in their order) reduced per slice at
the end, over each row's segments in a grouped view (``row_sums``, ``_row_max``).

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
# Beyond every reduction index: the empty value of the L-inf backward's lowest-index search.
FAR: tl.constexpr = tl.constexpr(2**62)


@triton.jit
def _row_max(acc, S, GROUP: tl.constexpr, LOWEST: tl.constexpr):
    """Per-slice maxima, [BLOCK_C * GROUP], of a tile-shaped accumulator [BLOCK_C, BLOCK_S]
    (in a grouped view, over each row's GROUP segments; LOWEST fills the other lanes)."""
    if GROUP == 1:
        out = tl.max(acc, 1)
    else:
        segment = (tl.arange(0, acc.shape[1]) // (S // GROUP))[None, :]
        part = tl.arange(0, GROUP)[None, :]
        rows = tl.full([acc.shape[0], GROUP], LOWEST, acc.dtype)
        for g in tl.static_range(GROUP):
            rows = tl.where(part == g, tl.max(tl.where(segment == g, acc, LOWEST), 1)[:, None], rows)
        out = tl.reshape(rows, [acc.shape[0] * GROUP])
    return out


@triton.jit
def _forward_kernel(
    v_ptr, rho_ptr, w_ptr, norm_ptr,
    N, C, S, stride_n, stride_c, stride_s, rho_stride, eps,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
    P: tl.constexpr,
):
    c, c_mask = channel_block(BLOCK_C, C)
    i, i_mask = channel_block(BLOCK_C * GROUP, C * GROUP)  # the program's slices
    tiles = N * tl.cdiv(S, BLOCK_S)
    acc = tl.zeros([BLOCK_C, BLOCK_S], ACC)  # squares (p = 2), |v| (p = 1), running max |v| (inf)
    for t in range(tiles):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        if P == 2:
            acc += v * v
        elif P == 1:
            acc += tl.abs(v)
        else:
            acc = tl.maximum(acc, tl.abs(v))
    if P == 2:
        norm = tl.sqrt(row_sums(acc, S, GROUP))
    elif P == 1:
        norm = row_sums(acc, S, GROUP)
    else:
        norm = _row_max(acc, S, GROUP, 0.0)
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
    P: tl.constexpr,
):
    c, c_mask = channel_block(BLOCK_C, C)
    i, i_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    tiles = N * tl.cdiv(S, BLOCK_S)
    norm = tl.load(norm_ptr + i, mask=i_mask, other=1.0).to(ACC)
    products = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    # p = inf: the lowest reduction index r of each slice's max |v| (== its stored norm),
    # as the max of -r (r runs over a slice's elements in order, in a grouped view too).
    first = tl.full([BLOCK_C, BLOCK_S], -FAR, tl.int64)
    if P == 0:
        peak = spread(norm, S, GROUP, BLOCK_S)
    for t in range(tiles):
        offs, mask, r = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        products += v * g
        if P == 0:
            first = tl.maximum(first, tl.where(mask & (tl.abs(v) == peak), -r, -FAR))
    dot = row_sums(products, S, GROUP)
    rho = tl.load(rho_ptr + i * rho_stride, mask=i_mask, other=0.0).to(ACC)
    floored = tl.maximum(norm, eps)
    tl.store(drho_ptr + i, (dot / floored).to(drho_ptr.dtype.element_ty), mask=i_mask)
    # dL/dv = rho / n * (G - t dn/dv), t = dot / n; below eps the norm is the constant eps:
    # no projection (reference docstring).  p = 2: dn/dv = v / n, folded into t / n.
    divisor = floored * floored if P == 2 else floored
    projection = spread(tl.where(norm >= eps, dot / divisor, 0.0), S, GROUP, BLOCK_S)
    scale = spread(rho / floored, S, GROUP, BLOCK_S)
    if P == 0:
        k = -spread(_row_max(first, S, GROUP, -FAR), S, GROUP, BLOCK_S)
    for t in range(tiles):
        offs, mask, r = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        if P == 2:
            dn = v
        else:
            dn = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
            if P == 0:
                dn = tl.where(r == k, dn, 0.0)
        tl.store(dv_ptr + offs, (scale * (g - dn * projection)).to(dv_ptr.dtype.element_ty), mask=mask)


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


def norm_order(p: float) -> int:
    """The kernels' constexpr P of the norm order p: 2, 1, or 0 for inf."""
    return {2.0: 2, 1.0: 1, math.inf: 0}[p]


def forward(v: torch.Tensor, rho: torch.Tensor, dim: int, eps: float,
            p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, n): the bounded weight (contiguous, v's dtype) and the slice norms n = ||v_i||_p
    (S,), in the accumulator dtype.  ``rho`` is () or (S,); p is 2, 1 or inf."""
    view = slice_view(v, dim)
    w = torch.empty_like(view.tensor)
    norm = torch.empty(view.c, device=v.device, dtype=accumulator_dtype(v.dtype))
    grid, args, meta = _launch(view)
    _forward_kernel[grid](view.tensor, rho, w, norm, *args, _rho_stride(rho), eps, P=norm_order(p), **meta)
    return w.view(v.shape), norm


def backward(grad: torch.Tensor, v: torch.Tensor, rho: torch.Tensor, norm: torch.Tensor, dim: int,
             eps: float, p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dv, t) for dL/dw = ``grad``: t (S,) the per-slice dL/drho_i, in rho's dtype for a
    per-slice rho, else in the accumulator dtype (summed by the caller when one rho serves
    every slice).  ``norm`` is the forward's (for p = inf the max |v| of each slice exactly:
    the backward finds its element by equality)."""
    view = slice_view(v, dim)
    grad = grad.contiguous().view(view.tensor.shape)
    dv = torch.empty_like(view.tensor)
    drho = torch.empty_like(norm, dtype=drho_dtype(rho))
    grid, args, meta = _launch(view)
    _backward_kernel[grid](grad, view.tensor, rho, norm.contiguous(), dv, drho, *args, _rho_stride(rho), eps,
                           P=norm_order(p), **meta)
    return dv.view(v.shape), drho
