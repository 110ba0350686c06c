"""Per-channel reductions over ``(N, C, *spatial)`` tensors, split over many programs.

Every normalization in tritonorm reduces something over all elements of one channel
(n = N * prod(spatial) of them: 800k for N=256 at 56x56).  One program per channel loses
to cuDNN on low-channel, high-resolution layers, so a channel's reduction is split:

    stage 1: a (channel-block, split) grid; each program walks a contiguous range of
             [BLOCK_C, BLOCK_S] tiles and writes one fp32 partial per channel;
    stage 2: a small per-channel combine (``combine_splits``), fused into whatever
             consumes the result (the next pass or the finalize kernel).

Keeping the stages apart is what lets a synced (multi-GPU) variant all-reduce the
partials in between.

Layouts.  The tensor is seen as (N, C, S) with element strides (sn, sc, ss):

* NCS (contiguous): strides (C*S, S, 1);
* NSC (channels_last, or 2-d (N, C) input): N is folded into S, so the view is
  (1, C, N*S) with strides (0, 1, C).

* grouped NCS: when an NCS row of S elements is not a multiple of 16 bytes (7x7 = 49, or
  14x14 = 196 in bf16), a plan can read G consecutive channels as one row of G*S (a
  multiple of 16 bytes, so Triton loads it in 128-bit vectors), the view (N, C/G, G*S);
  each lane then belongs to channel row*G + s // S, and the per-channel results are sums
  over segments of a row (``Plan.group``, ``lane_values``, ``row_sums``).

In all, the element (n, c, s) has *reduction index* r = n*S + s, so a tie broken by the
lowest r is broken the same way whatever the memory format.  Anything else is copied to
the contiguous format first (one extra read and write of the input).

A mean can be taken about a shift, each channel's element x_0 at r = 0 (at offset
c * stride_c in both layouts): sum(x - x_0) then mu = x_0 + sum / n, exact for a constant
channel whatever its offset (``tritonorm.reference.lp_batchnorm``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import accumulator_dtype  # noqa: F401 (re-exported to the kernels)
from .activation import NONE, activation_grad, pre_activation

# Elements in one [BLOCK_C, BLOCK_S] tile: 16 per thread at num_warps=4.
MAX_TILE = 2048
# Channels per tile in the NSC layout (one 128-byte line of fp32 per tile row at 32).
MAX_BLOCK_C_NSC = 64
# Narrowest tile row in the NCS layout (256 bytes of fp32).
MIN_BLOCK_S = 64
NUM_WARPS = 4
# Programs per SM that a reduction (REDUCE) or an elementwise pass (ELEMENTWISE) aims for.
REDUCE_WAVES = 4
ELEMENTWISE_WAVES = 8
# Largest row alignment (elements) that tile() asserts: 16 bf16 or fp32 elements cover a
# 128-bit access.
MAX_ALIGN = 16
# Rows of partials [rows, BLOCK_C] that combine_splits sums per step: about 1024 elements.
COMBINE_ELEMENTS = tl.constexpr(1024)


def triton_dtype(dtype: torch.dtype):
    """The Triton type of a floating-point torch dtype."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


@functools.cache
def _num_programs_per_wave(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    # Interpreter: every program runs in turn on the host, so few large ones are fastest;
    # two still exercise the split path.
    return 2


@dataclass(frozen=True)
class ChannelView:
    """A dense tensor seen as (n, c, s) with element strides; see the module docstring."""

    tensor: torch.Tensor
    n: int
    c: int
    s: int
    stride_n: int
    stride_c: int
    stride_s: int

    @property
    def numel_per_channel(self) -> int:
        return self.n * self.s

    @property
    def channels_last(self) -> bool:
        return self.stride_c == 1

    def args(self):
        return (self.n, self.c, self.s, self.stride_n, self.stride_c, self.stride_s)

    def like(self, other: torch.Tensor) -> ChannelView:
        """The same view of another tensor of the same shape, made to share this layout."""
        if other.shape != self.tensor.shape:
            raise ValueError(f"expected a tensor of shape {tuple(self.tensor.shape)}, got {tuple(other.shape)}")
        if other.stride() != self.tensor.stride():
            other = torch.empty_like(self.tensor, dtype=other.dtype).copy_(other)
        return ChannelView(other, self.n, self.c, self.s, self.stride_n, self.stride_c, self.stride_s)


def _is_channels_last_dense(x: torch.Tensor) -> bool:
    perm = (0, *range(2, x.dim()), 1)
    return x.permute(perm).is_contiguous()


def dense_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it is NCS- or NSC-dense, else a contiguous copy."""
    if x.is_contiguous() or _is_channels_last_dense(x):
        return x
    return x.contiguous()


def contiguous(*tensors):
    """The tensors as the kernels index them, contiguous (a copy only for one that is not;
    for a per-channel vector that is C elements); None stays None."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def output_like(x: torch.Tensor) -> torch.Tensor:
    """An empty tensor with the layout ``channel_view`` gives ``x`` (used by fake impls too)."""
    return torch.empty_like(dense_layout(x), memory_format=torch.preserve_format)


def channel_view(x: torch.Tensor) -> ChannelView:
    x = dense_layout(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if x.is_contiguous() and s > 1:
        return ChannelView(x, n, c, s, c * s, s, 1)
    return ChannelView(x, 1, c, n * s, 0, 1, c)


@dataclass(frozen=True)
class Plan:
    """Tile shape and grid of one pass over a ChannelView; ``align``: see ``row_align``;
    ``group``: channels per tile row (see the module docstring), whose tiles and grid are
    those of the grouped view."""

    block_c: int
    block_s: int
    tiles_per_program: int
    grid: tuple[int, int]
    align: int = 1
    group: int = 1

    @property
    def splits(self) -> int:
        return self.grid[1]

    def meta(self):
        return dict(BLOCK_C=self.block_c, BLOCK_S=self.block_s, ALIGN=self.align, GROUP=self.group,
                    num_warps=NUM_WARPS)

    def args(self, view: ChannelView):
        """The (N, C, S, stride_n, stride_c, stride_s) the kernels walk: ``view``'s, or
        those of its grouped view."""
        return _grouped_args(view, self.group)


def _grouped_args(view: ChannelView, group: int):
    """(N, C, S, strides) of the (N, C / group, group * S) view of an NCS ``view``."""
    if group == 1:
        return view.args()
    row = group * view.s
    return (view.n, view.c // group, row, view.stride_n, row, 1)


def _row_block(s: int) -> int:
    """Tile width along a contiguous row of s elements (NCS layout): the widest power of
    two, MIN_BLOCK_S to MAX_TILE, that leaves at most 1/16 of the lanes masked (3136 =
    56*56 -> 256, not 2048, which masks 23%), else the one that masks least."""
    widths = [w for w in (2**i for i in range(16)) if MIN_BLOCK_S <= w <= MAX_TILE]
    if s <= MIN_BLOCK_S:
        return MIN_BLOCK_S if s > MIN_BLOCK_S // 2 else triton.next_power_of_2(s)
    waste = {w: triton.cdiv(s, w) * w - s for w in widths}
    good = [w for w in widths if 16 * waste[w] <= s]
    return max(good) if good else min(reversed(widths), key=waste.get)


def row_align(view: ChannelView) -> int:
    """The largest power of two, at most MAX_ALIGN, that divides the row length S of an NCS
    view (1 for NSC, whose rows run along C and need no hint).  Triton proves 16-byte
    alignment only for integer arguments divisible by 16, so rows of 196 (14x14) would
    load one element at a time without it; see ``tile``."""
    if view.channels_last:
        return 1
    return min(MAX_ALIGN, view.s & -view.s)


def row_group(view: ChannelView) -> int:
    """Channels per row of the grouped view (1: none): the fewest, a power of two, whose
    row of group * S elements is a multiple of 16 bytes, if they divide C and the row fits
    one tile; for NCS rows that are not already such a multiple."""
    row_bytes = view.s * view.tensor.element_size()
    if view.channels_last or view.s == 1 or row_bytes % 16 == 0:
        return 1
    group = 16 // math.gcd(row_bytes, 16)
    if view.c % group or triton.next_power_of_2(group * view.s) > MAX_TILE:
        return 1
    return group


def plan(view: ChannelView, waves: int = REDUCE_WAVES, *, grouped: bool = False, max_tile: int = MAX_TILE) -> Plan:
    """Tile so that loads run along the contiguous axis (at most ``max_tile`` elements),
    and split each channel's tiles over enough programs to fill ``waves`` programs per SM.
    ``grouped``: the kernel takes a grouped plan (see the module docstring), used where
    ``row_group`` finds one."""
    group = row_group(view) if grouped else 1
    if group > 1:  # one tile spans a whole row of the grouped view
        view = ChannelView(view.tensor, *_grouped_args(view, group))
        block_s = triton.next_power_of_2(view.s)
        block_c = min(max_tile // block_s, triton.next_power_of_2(view.c))
    elif view.channels_last:
        block_c = min(triton.next_power_of_2(view.c), MAX_BLOCK_C_NSC, max_tile)
        block_s = min(max_tile // block_c, triton.next_power_of_2(view.s))
    else:
        block_s = min(_row_block(view.s), max_tile)
        block_c = min(max_tile // block_s, triton.next_power_of_2(view.c))
    c_blocks = triton.cdiv(view.c, block_c)
    tiles = view.n * triton.cdiv(view.s, block_s)
    target = waves * _num_programs_per_wave(view.tensor.device)
    splits = max(1, min(tiles, triton.cdiv(target, c_blocks)))
    tiles_per_program = triton.cdiv(tiles, splits)
    grid = (c_blocks, triton.cdiv(tiles, tiles_per_program))
    return Plan(block_c, block_s, tiles_per_program, grid, row_align(view), group)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def channel_block(BLOCK_C: tl.constexpr, C):
    """Channel indices and mask of this program's channel block (grid axis 0)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def tile_range(N, S, tiles_per_program, BLOCK_S: tl.constexpr):
    """[first, last) tile of this program's split (grid axis 1)."""
    tiles = N * tl.cdiv(S, BLOCK_S)
    first = tl.program_id(1) * tiles_per_program
    return first, tl.minimum(first + tiles_per_program, tiles)


@triton.jit
def tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
         ALIGN: tl.constexpr = 1):
    """Offsets [BLOCK_C, BLOCK_S] of tile t, its mask and its reduction indices r = n*S + s.

    The tile's base offset is int64 (tensors may pass 2**31 elements); offsets inside a
    tile stay int32.  ALIGN (NCS only, from ``row_align``) divides S = stride_c: written
    as (S // ALIGN) * ALIGN, which is S, Triton can prove that rows start ALIGN-aligned
    and load them in 128-bit vectors."""
    if ALIGN > 1:
        S = S // ALIGN * ALIGN
        stride_c = stride_c // ALIGN * ALIGN
    s_tiles = tl.cdiv(S, BLOCK_S)
    n = t // s_tiles
    s0 = (t - n * s_tiles) * BLOCK_S
    s = tl.arange(0, BLOCK_S)
    c0 = tl.program_id(0) * BLOCK_C
    base = n.to(tl.int64) * stride_n + c0.to(tl.int64) * stride_c + s0.to(tl.int64) * stride_s
    offs = base + ((c - c0) * stride_c)[:, None] + (s * stride_s)[None, :]
    mask = c_mask[:, None] & ((s0 + s) < S)[None, :]
    r = n.to(tl.int64) * S + s0 + s
    return offs, mask, r[None, :]


@triton.jit
def tile_first_index(t, S, BLOCK_S: tl.constexpr):
    """The reduction index r (int64) of tile t's first element; tiles t, t+1, ... cover
    consecutive r, so [tile_first_index(first), tile_first_index(last)) is a split's range."""
    s_tiles = tl.cdiv(S, BLOCK_S)
    n = t // s_tiles
    return n.to(tl.int64) * S + (t - n * s_tiles) * BLOCK_S


@triton.jit
def spread(values, S, GROUP: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-channel values [BLOCK_C * GROUP] of a tile's rows, broadcastable to the
    [BLOCK_C, BLOCK_S] tile: a column for one channel per row; in a grouped view (rows of
    GROUP channels of S // GROUP elements) each row's GROUP values spread over their
    segments, in registers."""
    if GROUP == 1:
        lanes = values[:, None]
    else:
        rows = tl.reshape(values, [values.shape[0] // GROUP, GROUP])
        segment = (tl.arange(0, BLOCK_S) // (S // GROUP))[None, :]
        part = tl.arange(0, GROUP)[None, :]
        lanes = tl.zeros([rows.shape[0], BLOCK_S], values.dtype)
        for g in tl.static_range(GROUP):
            lanes = tl.where(segment == g, tl.sum(tl.where(part == g, rows, 0), 1)[:, None], lanes)
    return lanes


@triton.jit
def lane_values(ptr, C, stride, S, GROUP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """ptr[channel * stride] for the channels of this program's rows, one load per channel,
    ``spread`` over the tile."""
    channel, mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    return spread(tl.load(ptr + channel.to(tl.int64) * stride, mask=mask, other=0.0), S, GROUP, BLOCK_S)


@triton.jit
def row_sums(acc, S, GROUP: tl.constexpr):
    """Per-channel sums, [BLOCK_C * GROUP], of a tile-shaped accumulator [BLOCK_C, BLOCK_S]
    (in a grouped view, over each row's GROUP segments)."""
    if GROUP == 1:
        sums = tl.sum(acc, 1)
    else:
        segment = (tl.arange(0, acc.shape[1]) // (S // GROUP))[None, :]
        part = tl.arange(0, GROUP)[None, :]
        out = tl.zeros([acc.shape[0], GROUP], acc.dtype)
        for g in tl.static_range(GROUP):
            out = tl.where(part == g, tl.sum(tl.where(segment == g, acc, 0.0), 1)[:, None], out)
        sums = tl.reshape(out, [acc.shape[0] * GROUP])
    return sums


@triton.jit
def channel_shift(x_ptr, c, c_mask, stride_c, ACC: tl.constexpr):
    """x_0 of each channel of the block: its element at reduction index 0."""
    return tl.load(x_ptr + c.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(ACC)


@triton.jit
def combine_splits(ptr, splits, C, c, c_mask, ACC: tl.constexpr):
    """Stage 2: sum the per-split partials ptr[split, c] of a channel block, a
    [ROWS, BLOCK_C] block of splits per step (independent loads, one tree reduction each)."""
    ROWS: tl.constexpr = COMBINE_ELEMENTS // c.shape[0]
    rows = tl.arange(0, ROWS)[:, None]
    total = tl.zeros(c.shape, ACC)
    for first in range(0, splits, ROWS):
        split = first + rows
        part = tl.load(ptr + split * C + c[None, :], mask=(split < splits) & c_mask[None, :], other=0.0)
        total += tl.sum(part.to(ACC), 0)
    return total


@triton.jit
def shifted_mean(x_ptr, stride_c, sum_ptr, splits, C, c, c_mask, inv_n, ACC: tl.constexpr):
    """mu = x_0 + inv_n * (the per-split partial sums of x - x_0, combined)."""
    return channel_shift(x_ptr, c, c_mask, stride_c, ACC) + combine_splits(sum_ptr, splits, C, c, c_mask, ACC) * inv_n


# What _partial_sums_kernel reduces (its QUANTITY); the launcher takes the names.
SUM = tl.constexpr(0)  # out0 = sum(x), or sum(x - x_0) with SHIFTED
ABS_DEV = tl.constexpr(1)  # out0 = sum(|x - m|), out1 = sum(sign(x - m))
GRAD = tl.constexpr(2)  # out0 = sum(y), out1 = sum(y * (x - m))
_QUANTITIES = {"sum": SUM, "abs_dev": ABS_DEV, "grad": GRAD}


@triton.jit
def _partial_sums_kernel(
    x_ptr, y_ptr, center_ptr, out0_ptr, out1_ptr, res_ptr, affine_ptr, slope,
    N, C, S, stride_n, stride_c, stride_s,
    tiles_per_program, center_splits, center_scale,
    QUANTITY: tl.constexpr, SHIFTED: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, GROUP: tl.constexpr,
):
    """Stage 1 of a per-channel reduction: out[split, c] for the QUANTITY above.

    The centre m of a channel is center_scale * sum of center_ptr[i, c] over
    center_splits rows, so it can be a saved mean (1 row, scale 1) or the mean
    straight from the partial sums of an earlier SUM pass (splits rows, scale 1/n; not
    with a grouped plan, whose centres are loaded per channel and ``spread`` over the
    tile).  SHIFTED: the sums are about x_0 (SUM subtracts it, the centre adds it back).
    (N, C, S, strides) are those of the plan (``Plan.args``)."""
    c, c_mask = channel_block(BLOCK_C, C)
    first, last = tile_range(N, S, tiles_per_program, BLOCK_S)
    if QUANTITY == SUM:
        if SHIFTED:
            x0 = lane_values(x_ptr, C, stride_c // GROUP, S, GROUP, BLOCK_C, BLOCK_S).to(ACC)
    elif GROUP > 1:  # a (C,) centre (see partial_sums)
        center = lane_values(center_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S).to(ACC) * center_scale
    elif SHIFTED:
        center = shifted_mean(x_ptr, stride_c, center_ptr, center_splits, C, c, c_mask, center_scale, ACC)[:, None]
    else:
        center = (combine_splits(center_ptr, center_splits, C, c, c_mask, ACC) * center_scale)[:, None]
    if ACT != NONE:
        scale = lane_values(affine_ptr, C, 1, S, GROUP, BLOCK_C, BLOCK_S).to(ACC)
        shift = lane_values(affine_ptr + C * GROUP, C, 1, S, GROUP, BLOCK_C, BLOCK_S).to(ACC)
    acc0 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    acc1 = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for t in range(first, last):
        offs, mask, _ = tile(t, c, c_mask, S, stride_n, stride_c, stride_s, BLOCK_C, BLOCK_S, ALIGN)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        if QUANTITY == SUM:
            if SHIFTED:
                x = tl.where(mask, x - x0, 0.0)
            acc0 += x
        elif QUANTITY == ABS_DEV:
            a = tl.where(mask, x - center, 0.0)
            acc0 += tl.abs(a)
            acc1 += (a > 0).to(ACC) - (a < 0).to(ACC)
        else:
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
            if ACT != NONE:
                y *= activation_grad(pre_activation(x - center, scale, shift, res_ptr, offs, mask, ACC), ACT, slope)
            acc0 += y
            acc1 += y * (x - center)
    out_c, out_mask = channel_block(BLOCK_C * GROUP, C * GROUP)
    out = tl.program_id(1) * C * GROUP + out_c
    tl.store(out0_ptr + out, row_sums(acc0, S, GROUP), mask=out_mask)
    if QUANTITY != SUM:
        tl.store(out1_ptr + out, row_sums(acc1, S, GROUP), mask=out_mask)


def partial_sums(
    view: ChannelView,
    quantity: str = "sum",
    *,
    other: ChannelView | None = None,
    center: torch.Tensor | None = None,
    center_scale: float = 1.0,
    shifted: bool = False,
    pl: Plan | None = None,
    activation: tuple | None = None,
):
    """Launch stage 1 of ``quantity`` ("sum", "abs_dev" or "grad", with ``other`` the
    y of "grad") and return the partials ``(out0, out1)``, each (splits, C).

    ``center`` is either a (C,) tensor or (splits', C) partial sums (see the kernel);
    ``shifted``: sums about each channel's x_0 (see the module docstring);
    ``activation``: (residual or None, affine (2, C), slope, ACT code) of a "grad"
    through a fused activation (see the kernel)."""
    pl = pl or plan(view, grouped=quantity == "sum" or not shifted)
    acc = accumulator_dtype(view.tensor.dtype)
    out0 = torch.empty((pl.splits, view.c), device=view.tensor.device, dtype=acc)
    out1 = out0 if quantity == "sum" else torch.empty_like(out0)
    if center is None:
        center = out0
    center_rows = center.shape[0] if center.dim() == 2 else 1
    if quantity != "sum" and pl.group > 1 and center_rows > 1:
        raise ValueError("a grouped plan takes a (C,) centre, not partial sums")
    res, affine, slope, act = activation or (None, None, 0.0, NONE)
    _partial_sums_kernel[pl.grid](
        view.tensor, (other or view).tensor, center, out0, out1, res, affine, slope,
        *pl.args(view), pl.tiles_per_program, center_rows, center_scale,
        QUANTITY=_QUANTITIES[quantity], SHIFTED=shifted, ACT=act, ACC=triton_dtype(acc), **pl.meta(),
    )
    return out0, out1


# True when TRITON_INTERPRET=1 was set before this module was imported: the kernels then
# run on CPU tensors through Triton's interpreter.
INTERPRETED = type(_partial_sums_kernel).__name__ == "InterpretedFunction"
