"""Triton kernels of the ENorm cycle (math, modes and names: ``tritonorm.reference.enorm``).

Every tensor the cycle touches (weights, biases, optimizer buffers) is one row of an int64
*entry table*: its address, the sizes and strides of its (O, I, K) view (a bias is (O, 1, 1)
with zero inner strides), the offsets of its row and column coefficients in the flat
coefficient vector d (-1: none) and its power a, so that

    t[o, i, k] *= d[ROW + o]^a * d[COL + i]^-a

Kernels cast the addresses back to pointers (as Triton's grouped GEMM does), so one launch
walks any number of tensors of any shapes, and the cycle's launch count does not grow with
the depth.  A *pair table* row (W_q's entry, b_q's entry or -1, W_{q+1}'s entry) names the
tensors of pair q's norms.

Parallel cycle, 2 launches:
    _coefficients_kernel  program = (pair, BLOCK_J hidden units): r from [BLOCK_J, BLOCK_R]
                          row tiles of W_q, s from [BLOCK_R, BLOCK_J] column tiles of W_{q+1}
                          (hidden units along the contiguous axis of a linear weight), d
    _rescale_kernel       program = (tensor, BLOCK_J rows, ROW_CHUNK of their elements):
                          every tensor by its d's (chunks keep a wide first layer from
                          making a few long programs)

Sequential cycle, one launch per pair and one for the last columns:
    _pair_kernel          pair q, PAIR_BLOCK_J hidden units a program: r of W_q with its
                          columns divided by d_{q-1} on the fly, s, d_q; then every tensor
                          of layer q by d_q (rows) and d_{q-1} (columns), in the same program
                          (its rows are its own)
    _rescale_kernel       the tensors of the layer after the last pair (columns only)

Norms, coefficients and the rescale's products are float64 whatever the tensors' dtype, a
coefficient that is not a finite number > 0 is 1 (the reference's rule), and every max
keeps a NaN, as torch's does.

Indexing.  A row position r = i K + k is split by an int32 division (``_position``); when
no tensor of the plan has a kernel axis (an MLP's weights, biases and state: ``Plan.linear``)
the kernels are compiled with LINEAR and r is i.  The loads stay scalar: addresses, sizes
and strides are runtime values from the table, and a vector load needs the compiler to
know that every tensor of the launch is aligned and row-contiguous, which a bias (rows of
one element) or an odd width breaks; a hint that does not hold for one tensor would be a
misaligned access, so none is given.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .channel_reduce import triton_dtype

# Columns of the entry table (read by _entry) and of the pair table (read by _pair).
ENTRY_FIELDS = ("ptr", "O", "I", "K", "SO", "SI", "SK", "ROW", "COL", "POWER")
PAIR_FIELDS = ("row_entry", "bias_entry", "col_entry")
# Hidden units (rows) per program and elements per tile along a row or column; a sequential
# pair launch takes fewer units per program (its grid is one pair's units: 500 units make
# 125 programs, not 63, on 132 SMs).
BLOCK_J = 8
PAIR_BLOCK_J = 4
BLOCK_R = 256
# Row elements per program of the rescale.
ROW_CHUNK = 2048
NUM_WARPS = 4


def norm_kind(p: float) -> str:
    """How the p-norm accumulates: "l1" sum |x|, "l2" sum x^2, "linf" max |x|, "lp" sum |x|^p."""
    return {1.0: "l1", 2.0: "l2", float("inf"): "linf"}.get(float(p), "lp")


@triton.jit
def _entry(entries, e, DTYPE: tl.constexpr, LINEAR: tl.constexpr):
    """The ENTRY_FIELDS of entry e, its address as a pointer to DTYPE.  LINEAR (every entry
    of the launch has K = 1: matrices and biases) makes K the constant 1."""
    row = entries + e * 10
    ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    n_k = 1 if LINEAR else tl.load(row + 3)
    return (ptr, tl.load(row + 1), tl.load(row + 2), n_k, tl.load(row + 4),
            tl.load(row + 5), tl.load(row + 6), tl.load(row + 7), tl.load(row + 8), tl.load(row + 9))


@triton.jit
def _position(r, n_k, LINEAR: tl.constexpr):
    """(i, k) of the row position r = i K + k, int32 (a row has far fewer than 2^31
    positions, and an int64 division is a long software sequence per element): r itself
    and 0 without a kernel axis (LINEAR)."""
    i, k = r.to(tl.int32), 0
    if not LINEAR:
        i, k = i // n_k.to(tl.int32), i % n_k.to(tl.int32)
    return i, k


@triton.jit
def _pair(pairs, q):
    """The PAIR_FIELDS of pair q."""
    return tl.load(pairs + q * 3), tl.load(pairs + q * 3 + 1), tl.load(pairs + q * 3 + 2)


@triton.jit
def _max(a, b):
    """max(a, b), NaN if either is (tl.maximum and tl.max drop a NaN by default)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _accumulate(acc, x, p, NORM: tl.constexpr):
    a = tl.abs(x)
    if NORM == "l1":
        return acc + a
    elif NORM == "l2":
        return acc + a * a
    elif NORM == "linf":
        return _max(acc, a)
    else:
        return acc + tl.exp2(p * tl.log2(a))


@triton.jit
def _reduce(acc, axis: tl.constexpr, NORM: tl.constexpr):
    """What _accumulate gathered along ``axis``, combined."""
    if NORM == "linf":
        return tl.reduce(acc, axis, _max)
    return tl.sum(acc, axis)


@triton.jit
def _finish(total, p, NORM: tl.constexpr):
    """The p-norm from what _accumulate summed."""
    if NORM == "l2":
        return tl.sqrt(total)
    elif NORM == "lp":
        return tl.exp2(tl.log2(total) / p)
    return total


@triton.jit
def _power(d, a):
    """d^a for a in {1, 2, -1, -2}."""
    base = tl.where(a > 0, d, 1.0 / d)
    return tl.where((a == 2) | (a == -2), base * base, base)


@triton.jit
def _row_sums(entries, e, bias_e, d_ptr, j, p, DIVIDE_COLUMNS: tl.constexpr, NORM: tl.constexpr,
              DTYPE: tl.constexpr, LINEAR: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """Accumulated |W[j, :, :] / d_col|^p (BLOCK_J,) of rows j, plus the bias entry's."""
    ptr, n_o, n_i, n_k, so, si, sk, _, col, _ = _entry(entries, e, DTYPE, LINEAR)
    j_mask = j < n_o
    acc = tl.zeros([BLOCK_J, BLOCK_R], tl.float64)
    for r0 in range(0, n_i * n_k, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        i, k = _position(r, n_k, LINEAR)
        mask = j_mask[:, None] & (r < n_i * n_k)[None, :]
        x = tl.load(ptr + j[:, None] * so + (i * si + k * sk)[None, :], mask=mask, other=0.0).to(tl.float64)
        if DIVIDE_COLUMNS:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if col >= 0:
                x = x / tl.load(d_ptr + col + i, mask=r < n_i * n_k, other=1.0)[None, :]
        acc = _accumulate(acc, x, p, NORM)
    total = _reduce(acc, 1, NORM)
    if bias_e >= 0:
        b_ptr, _, _, _, b_so, _, _, _, _, _ = _entry(entries, bias_e, DTYPE, LINEAR)
        b = tl.load(b_ptr + j * b_so, mask=j_mask, other=0.0).to(tl.float64)
        total = _accumulate(total, b, p, NORM)
    return total


@triton.jit
def _col_sums(entries, e, j, p, NORM: tl.constexpr, DTYPE: tl.constexpr, LINEAR: tl.constexpr,
              BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """Accumulated |W[:, j, :]|^p (BLOCK_J,) of input channels j."""
    ptr, n_o, n_i, n_k, so, si, sk, _, _, _ = _entry(entries, e, DTYPE, LINEAR)
    acc = tl.zeros([BLOCK_R, BLOCK_J], tl.float64)
    for r0 in range(0, n_o * n_k, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        o, k = _position(r, n_k, LINEAR)
        mask = (r < n_o * n_k)[:, None] & (j < n_i)[None, :]
        offs = (o * so + k * sk)[:, None] + j[None, :] * si
        acc = _accumulate(acc, tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float64), p, NORM)
    return _reduce(acc, 0, NORM)


@triton.jit
def _pair_coefficients(entries, pairs, pair, d_ptr, j, p, c, eps, DIVIDE_COLUMNS: tl.constexpr,
                       NORM: tl.constexpr, DTYPE: tl.constexpr, LINEAR: tl.constexpr, BLOCK_J: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    """d (BLOCK_J,) of hidden units j of pair ``pair``, 1 where it is not a finite number > 0,
    stored at W_q's row offset in d; returned with ones past the last unit."""
    row_e, bias_e, col_e = _pair(pairs, pair)
    r = _row_sums(entries, row_e, bias_e, d_ptr, j, p, DIVIDE_COLUMNS, NORM, DTYPE, LINEAR, BLOCK_J, BLOCK_R)
    s = _col_sums(entries, col_e, j, p, NORM, DTYPE, LINEAR, BLOCK_J, BLOCK_R)
    d = tl.sqrt(_max(_finish(s, p, NORM), eps) / (c * _max(_finish(r, p, NORM), eps)))
    d = tl.where((d > 0) & (d < float("inf")), d, 1.0)
    _, n_o, _, _, _, _, _, row, _, _ = _entry(entries, row_e, DTYPE, LINEAR)
    tl.store(d_ptr + row + j, d, mask=j < n_o)
    return tl.where(j < n_o, d, 1.0)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """float64 x as DTYPE, through float32 for the narrower types, as torch converts a double
    (the interpreter's direct float64 -> bfloat16 cast is wrong)."""
    if DTYPE == tl.float64:  # noqa: SIM300 (DTYPE is the kernel's constexpr argument)
        return x
    return x.to(tl.float32).to(DTYPE)


@triton.jit
def _scale_rows(entries, e, j, row_d, d_ptr, r_start, r_end, DTYPE: tl.constexpr, LINEAR: tl.constexpr,
                BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """t[j, i, k] *= row_d[j]^a * d[COL + i]^-a for the rows j of entry e, row elements
    r = i K + k from r_start up to r_end (clipped to the row).

    ``row_d`` (BLOCK_J,) holds the rows' coefficients (ones where the entry has none)."""
    ptr, n_o, n_i, n_k, so, si, sk, _, col, a = _entry(entries, e, DTYPE, LINEAR)
    j_mask = j < n_o
    row_factor = _power(row_d, a)
    r_end = tl.minimum(r_end, n_i * n_k)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        i, k = _position(r, n_k, LINEAR)
        r_mask = r < r_end
        mask = j_mask[:, None] & r_mask[None, :]
        offs = j[:, None] * so + (i * si + k * sk)[None, :]
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float64)
        col_factor = tl.full([BLOCK_R], 1.0, tl.float64)
        if col >= 0:
            col_factor = _power(tl.load(d_ptr + col + i, mask=r_mask, other=1.0), -a)
        tl.store(ptr + offs, _cast(x * row_factor[:, None] * col_factor[None, :], DTYPE), mask=mask)


@triton.jit
def _coefficients_kernel(entries, pairs, tiles, d_ptr, p, c, eps, NORM: tl.constexpr, DTYPE: tl.constexpr,
                         LINEAR: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    j = tl.load(tiles + 3 * t + 1) + tl.arange(0, BLOCK_J)
    _pair_coefficients(entries, pairs, tl.load(tiles + 3 * t), d_ptr, j, p, c, eps, False, NORM, DTYPE, LINEAR,
                       BLOCK_J, BLOCK_R)


@triton.jit
def _rescale_kernel(entries, tiles, d_ptr, DTYPE: tl.constexpr, LINEAR: tl.constexpr, BLOCK_J: tl.constexpr,
                    BLOCK_R: tl.constexpr, ROW_CHUNK: tl.constexpr):
    t = tl.program_id(0)
    e = tl.load(tiles + 3 * t)
    j = tl.load(tiles + 3 * t + 1) + tl.arange(0, BLOCK_J)
    r_start = tl.load(tiles + 3 * t + 2)
    _, n_o, _, _, _, _, _, row, _, _ = _entry(entries, e, DTYPE, LINEAR)
    row_d = tl.full([BLOCK_J], 1.0, tl.float64)
    if row >= 0:
        row_d = tl.load(d_ptr + row + j, mask=j < n_o, other=1.0)
    _scale_rows(entries, e, j, row_d, d_ptr, r_start, r_start + ROW_CHUNK, DTYPE, LINEAR, BLOCK_J, BLOCK_R)


@triton.jit
def _pair_kernel(entries, pairs, pair, first_entry, last_entry, d_ptr, p, c, eps, NORM: tl.constexpr,
                 DTYPE: tl.constexpr, LINEAR: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    d = _pair_coefficients(entries, pairs, pair, d_ptr, j, p, c, eps, True, NORM, DTYPE, LINEAR, BLOCK_J, BLOCK_R)
    for e in range(first_entry, last_entry):
        _, _, n_i, n_k, _, _, _, _, _, _ = _entry(entries, e, DTYPE, LINEAR)
        _scale_rows(entries, e, j, d, d_ptr, 0, n_i * n_k, DTYPE, LINEAR, BLOCK_J, BLOCK_R)


class Plan:
    """The tables of one cycle over a fixed set of tensors, on their device.

    ``layers[k]`` lists layer k's tensors as (O,) or (O, I, K) views with their powers, its
    weight first; ``bias_in_norm[q]`` says that the second one, b_q, enters r of pair q.
    Layers after the last pair's are left out (untouched)."""

    def __init__(self, layers: list[list[tuple[torch.Tensor, int]]], bias_in_norm: list[bool]):
        pairs = len(bias_in_norm)
        device = layers[0][0][0].device
        sizes = [layers[q][0][0].shape[0] for q in range(pairs)]
        offsets = [sum(sizes[:q]) for q in range(pairs)]
        rows, self.layer_entries = [], []
        for k, tensors in enumerate(layers[: pairs + 1]):
            start = len(rows)
            for t, a in tensors:
                o, i, kk = (t.shape + (1, 1))[:3]
                so, si, sk = (t.stride() + (0, 0))[:3]
                row = offsets[k] if k < pairs else -1
                col = offsets[k - 1] if k > 0 and t.dim() == 3 else -1
                if row >= 0 or col >= 0:
                    rows.append([t.data_ptr(), o, i, kk, so, si, sk, row, col, a])
            self.layer_entries.append((start, len(rows)))
        self.entries = torch.tensor(rows, dtype=torch.int64, device=device)
        weight = [start for start, _ in self.layer_entries]
        self.pairs = torch.tensor(
            [[weight[q], weight[q] + 1 if bias_in_norm[q] else -1, weight[q + 1]] for q in range(pairs)],
            dtype=torch.int64, device=device).view(-1, len(PAIR_FIELDS))
        self.sizes = sizes
        self.coefficient_tiles = _tiles([(q, n, 1) for q, n in enumerate(sizes)], device)
        # (entry, rows O, row length I K) of each entry
        shapes = [(e, r[1], r[2] * r[3]) for e, r in enumerate(rows)]
        self.all_tiles = _tiles(shapes, device, ROW_CHUNK)
        self.last_tiles = _tiles(shapes[slice(*self.layer_entries[pairs])], device, ROW_CHUNK)
        self.d = torch.empty(sum(sizes), dtype=torch.float64, device=device)
        self.dtype = layers[0][0][0].dtype
        # No tensor has a kernel axis (K = 1: an MLP's weights, biases and state): the kernels
        # skip the split of row positions into (input, kernel position).
        self.linear = all(row[3] == 1 for row in rows)


def _tiles(items: list[tuple[int, int, int]], device, chunk: int | None = None) -> torch.Tensor:
    """(index, first row, first row element) of every BLOCK_J rows and ``chunk`` row
    elements (default: the whole row) of every (index, rows, row length) item."""
    tiles = [(index, j0, r0) for index, n, length in items for j0 in range(0, n, BLOCK_J)
             for r0 in range(0, length, chunk or length)]
    return torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 3)


def cycle(plan: Plan, *, c: float, p: float, eps: float, sequential: bool) -> torch.Tensor:
    """One cycle over the plan's tensors, in place; returns the coefficients d (flat)."""
    common = dict(DTYPE=triton_dtype(plan.dtype), LINEAR=plan.linear, BLOCK_J=BLOCK_J, BLOCK_R=BLOCK_R,
                  num_warps=NUM_WARPS)
    norm = dict(p=float(p), c=float(c), eps=float(eps), NORM=norm_kind(p))
    if sequential:
        for q, n in enumerate(plan.sizes):
            first, last = plan.layer_entries[q]
            _pair_kernel[(triton.cdiv(n, PAIR_BLOCK_J),)](
                plan.entries, plan.pairs, q, first, last, plan.d, **norm, **{**common, "BLOCK_J": PAIR_BLOCK_J})
        _rescale_kernel[(plan.last_tiles.shape[0],)](plan.entries, plan.last_tiles, plan.d, ROW_CHUNK=ROW_CHUNK,
                                                     **common)
    else:
        _coefficients_kernel[(plan.coefficient_tiles.shape[0],)](
            plan.entries, plan.pairs, plan.coefficient_tiles, plan.d, **norm, **common)
        _rescale_kernel[(plan.all_tiles.shape[0],)](plan.entries, plan.all_tiles, plan.d, ROW_CHUNK=ROW_CHUNK,
                                                    **common)
    return plan.d
