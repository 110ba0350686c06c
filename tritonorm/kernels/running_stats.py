"""Running statistics: running = (1 - m) * running + m * batch, in place, per channel.

m is ``momentum``, or 1 / num_batches_tracked (a cumulative average) when momentum is
None; num_batches_tracked is read on the device, so the update never syncs with the host.
Counting the batch (``count``: num_batches_tracked += 1 first, as a BatchNorm layer does in
training) is done by the same launch when one program covers every channel (up to
SINGLE_PROGRAM of them), else by a torch add_ before it.
The arithmetic is fp32, or fp64 when a buffer or a batch statistic is fp64.  A float
argument reaches a kernel as fp32, so m arrives as two: its fp32 rounding and the fp32
rounding of the rest, m = hi + lo to about 48 bits (fp64 buffers then match the PyTorch
path's update to fp64 rounding; in fp32, hi + lo rounds to hi).  A running
buffer is read and written through its stride (a strided view of a larger tensor updates
that tensor's elements, as the PyTorch path does); the batch statistics are contiguous
outputs of the statistics kernels.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

BLOCK = 1024
# Most channels one program updates, so that it can count the batch without a race.
SINGLE_PROGRAM = 4096


@triton.jit
def _lerp(running_ptr, running_stride, batch_ptr, offs, mask, factor, ACC: tl.constexpr):
    old = tl.load(running_ptr + offs * running_stride, mask=mask, other=0.0).to(ACC)
    batch = tl.load(batch_ptr + offs, mask=mask, other=0.0).to(ACC)
    new = ((1.0 - factor) * old + factor * batch).to(running_ptr.dtype.element_ty)
    tl.store(running_ptr + offs * running_stride, new, mask=mask)


@triton.jit
def _update_running_kernel(
    r0_ptr, r0_stride, b0_ptr, r1_ptr, r1_stride, b1_ptr, nbt_ptr, momentum_hi, momentum_lo, numel,
    CUMULATIVE: tl.constexpr, COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Update one or two (running, batch) pairs of the same size, computing in ACC; COUNT
    (a single program): num_batches_tracked += 1 first."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if COUNT or CUMULATIVE:
        batches = tl.load(nbt_ptr) + COUNT
    if CUMULATIVE:  # noqa: SIM108 (a constexpr branch of a kernel: kept a statement)
        factor = 1.0 / batches.to(ACC)
    else:
        factor = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
    _lerp(r0_ptr, r0_stride, b0_ptr, offs, mask, factor, ACC)
    if r1_ptr is not None:
        _lerp(r1_ptr, r1_stride, b1_ptr, offs, mask, factor, ACC)
    if COUNT:
        tl.debug_barrier()  # every thread has read the old count
        tl.store(nbt_ptr, batches)


def update_running(
    pairs, num_batches_tracked: torch.Tensor | None, momentum: float | None, count: bool = False
) -> None:
    """In place, for each (running, batch) of ``pairs`` (one or two, of equal size); each
    running buffer is a (C,) tensor with any stride but 0.  ``count``: add 1 to
    ``num_batches_tracked`` first."""
    (r0, b0), (r1, b1) = pairs[0], (pairs[1] if len(pairs) > 1 else (None, None))
    numel = r0.numel()
    single = numel <= SINGLE_PROGRAM
    if count and not single:
        num_batches_tracked.add_(1)
    block = max(16, triton.next_power_of_2(numel)) if single else BLOCK
    cumulative = momentum is None
    wide = any(t is not None and t.dtype == torch.float64 for t in (r0, b0, r1, b1))
    momentum_hi = momentum_lo = 0.0
    if momentum is not None:
        momentum_hi = struct.unpack("f", struct.pack("f", momentum))[0]
        momentum_lo = momentum - momentum_hi
    _update_running_kernel[(triton.cdiv(numel, block),)](
        r0, r0.stride(0), b0.contiguous(), r1, r1.stride(0) if r1 is not None else 0,
        b1.contiguous() if b1 is not None else None, num_batches_tracked if cumulative or count else None,
        momentum_hi, momentum_lo, numel,
        CUMULATIVE=cumulative, COUNT=count and single, ACC=tl.float64 if wide else tl.float32, BLOCK=block,
    )
