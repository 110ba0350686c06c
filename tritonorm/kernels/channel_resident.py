"""Per-channel work with each channel's elements held on chip (in registers), for channels
small enough: one read of the input, the statistics from registers, one write.

The split reductions of ``channel_reduce`` read a channel once per statistic that needs
the one before it (the mean, then mean |x - mu|) and once more to normalize; a channel
of a few thousand elements (ResNet-50 at a batch of 32: 1,568 at 7x7, 6,272 at 14x14)
fits in a program's registers, so one program (per channel, or per few channels when
they are small) loads it once and does every pass over it on chip.  That is the traffic
floor of a batch norm: forward 1 read + 1 write, backward 2 reads + 1 write.

A program holds a [BLOCK_C, BLOCK_N, BLOCK_S] tile of the ``ChannelView`` (n, c, s):
its BLOCK_C channel rows whole, all N and all S.  NCS rows run along s (contiguous, with
the ``row_align`` hint and, where a row is not a multiple of 16 bytes, the grouped view
of ``channel_reduce``); NSC (channels_last) rows run along c, so BLOCK_N = 1, BLOCK_S
covers N * S and BLOCK_C channels cover at least 16 bytes of each row.

Limits (``plan``): a thread holds at most ``elements_per_thread`` elements of each
resident tensor (x forward; x and dy backward: 4 to 16, from the sm_90 compiles) at up to
MAX_WARPS warps, padding included (a row of 784 takes 1024 lanes); larger channels take
the split path.  A grid of one program per channel block can leave SMs idle only on small
tensors (64 channels of 16,384 fp32 elements are 4 MB), where the split path's launches
cost more than the idle bandwidth.  ``TRITONORM_LP_PATH=onchip|split`` forces a path (for
tests: "onchip" raises if a channel does not fit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton
import triton.language as tl

from .channel_reduce import (
    ChannelView,
    _grouped_args,
    _num_programs_per_wave,
    row_align,
    row_group,
    row_sums,
    spread,
)

# Resident elements per thread of each tensor held, at most: 16 where a thread holds one
# fp32 value per element (the L1 forward: a replaces x), fewer where it holds more, from the
# sm_90 compiles (tests/compile_kernels.py; at 32 warps a thread has 64 registers):
# L-inf / Top-k also rank and index every element (16 spilled, 8 does not), the backward
# holds x and dy, a grouped view spreads a set of statistics per channel of a row (16
# spilled: 104 bytes at 8 channels a row; 32 at 2 with triton 3.6), and Top-k's K steps
# over a channels_last tile spilled at 8.
ELEMENTS_PER_THREAD = 16
HEAVY_ELEMENTS_PER_THREAD = 8
TOPK_NSC_ELEMENTS_PER_THREAD = 4
MIN_WARPS = 4
# 1024 threads, at most 64 registers each.
MAX_WARPS = 32
# Elements a program aims at when channels are small enough to share one.
PROGRAM_ELEMENTS = 4096
# Fewest bytes of a channels_last row that a program's channels cover: one 128-bit vector
# (the rest of its 32-byte sector is the next program's, which runs beside it and finds it in L2).
SECTOR_BYTES = 16
PATH_VARIABLE = "TRITONORM_LP_PATH"
PATHS = ("auto", "onchip", "split")


@dataclass(frozen=True)
class ResidentPlan:
    """Tile and grid of an on-chip pass: ``block_c`` rows of the (grouped, ``group``
    channels per row) view per program; ``wide``: int64 offsets."""

    block_c: int
    block_n: int
    block_s: int
    group: int
    align: int
    num_warps: int
    programs: int
    wide: bool

    @property
    def grid(self) -> tuple[int]:
        return (self.programs,)

    def meta(self) -> dict:
        return dict(BLOCK_C=self.block_c, BLOCK_N=self.block_n, BLOCK_S=self.block_s, ALIGN=self.align,
                    GROUP=self.group, WIDE=self.wide, num_warps=self.num_warps)

    def args(self, view: ChannelView):
        return _grouped_args(view, self.group)


def path() -> str:
    """The path forced by TRITONORM_LP_PATH ("auto" when unset)."""
    value = os.environ.get(PATH_VARIABLE, "auto")
    if value not in PATHS:
        raise ValueError(f"{PATH_VARIABLE} must be one of {', '.join(PATHS)}, got {value!r}")
    return value


def elements_per_thread(view: ChannelView, group: int, selected: int, backward: bool) -> int:
    """The most resident elements a thread of this pass holds (see ELEMENTS_PER_THREAD)."""
    if selected > 1 and not backward and view.channels_last:
        return TOPK_NSC_ELEMENTS_PER_THREAD
    if backward or selected or group > 1:
        return HEAVY_ELEMENTS_PER_THREAD
    return ELEMENTS_PER_THREAD


def _smallest_tile(view: ChannelView) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_N, BLOCK_S) of the smallest on-chip tile of a (grouped) view: one
    channel row, or in channels_last the channels of 16 bytes of a row."""
    if view.channels_last:
        block_c = min(max(1, SECTOR_BYTES // view.tensor.element_size()), triton.next_power_of_2(view.c))
        return block_c, 1, triton.next_power_of_2(view.s)
    return 1, triton.next_power_of_2(view.n), triton.next_power_of_2(view.s)


def _fit(view: ChannelView, group: int, selected: int, backward: bool) -> ResidentPlan | None:
    per_thread = elements_per_thread(view, group, selected, backward)
    grouped = ChannelView(view.tensor, *_grouped_args(view, group))
    block_c, block_n, block_s = _smallest_tile(grouped)
    if block_c * block_n * block_s > per_thread * 32 * MAX_WARPS:
        return None
    sms = _num_programs_per_wave(view.tensor.device)
    c = grouped.c
    while (2 * block_c * block_n * block_s <= PROGRAM_ELEMENTS and 2 * block_c <= triton.next_power_of_2(c)
           and triton.cdiv(c, 2 * block_c) >= sms):
        block_c *= 2
    elements = block_c * block_n * block_s
    warps = min(MAX_WARPS, max(MIN_WARPS, triton.next_power_of_2(triton.cdiv(elements, 32 * per_thread))))
    return ResidentPlan(block_c, block_n, block_s, group, row_align(grouped), warps, triton.cdiv(c, block_c),
                        view.tensor.numel() >= 2**31)


def plan(view: ChannelView, selected: int, *, backward: bool) -> ResidentPlan | None:
    """The on-chip plan of a training pass over ``view``, or None for the split path.
    ``selected``: the K of L-inf / Top-k (0 for L1); Top-k's forward (K > 1) ranks one
    channel per row, so it takes no grouped view."""
    forced = path()
    if forced == "split" or view.numel_per_channel == 0:
        return None
    groups = (row_group(view), 1) if backward or selected <= 1 else (1,)
    fits = (_fit(view, g, selected, backward) for g in dict.fromkeys(groups))
    fit = next((p for p in fits if p is not None), None)
    if forced == "onchip":
        if fit is None:
            most = elements_per_thread(view, 1, selected, backward) * 32 * MAX_WARPS
            block_c, block_n, block_s = _smallest_tile(view)
            raise ValueError(
                f"{PATH_VARIABLE}=onchip: a channel of {view.numel_per_channel} elements does not fit on chip: its "
                f"tile takes {block_c * block_n * block_s} elements with padding ({block_c} channel(s) of "
                f"{block_n * block_s}), at most {most} fit; unset {PATH_VARIABLE} to take the split path")
        return fit
    return fit


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def resident_tile(N, C, S, stride_n, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_S: tl.constexpr, ALIGN: tl.constexpr, WIDE: tl.constexpr):
    """Offsets [BLOCK_C, BLOCK_N, BLOCK_S] of this program's rows, their mask and the
    reduction indices r = n * S + s (ALIGN: see ``channel_reduce.tile``)."""
    if ALIGN > 1:
        S = S // ALIGN * ALIGN
        stride_c = stride_c // ALIGN * ALIGN
    row = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_S)
    mask = (row < C)[:, None, None] & (n < N)[None, :, None] & (s < S)[None, None, :]
    if WIDE:
        row = row.to(tl.int64)
        n = n.to(tl.int64)
    offs = (row * stride_c)[:, None, None] + (n * stride_n)[None, :, None] + (s * stride_s)[None, None, :]
    r = (n * S)[None, :, None] + s[None, None, :]
    return offs, mask, r


@triton.jit
def channel_sums(t, S, GROUP: tl.constexpr):
    """Per-channel sums [BLOCK_C * GROUP] of a resident tile [BLOCK_C, BLOCK_N, BLOCK_S]."""
    return row_sums(tl.sum(t, 1), S, GROUP)


@triton.jit
def lanes(values, S, GROUP: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-channel values [BLOCK_C * GROUP] broadcastable to a resident tile."""
    return spread(values, S, GROUP, BLOCK_S)[:, None, :]
