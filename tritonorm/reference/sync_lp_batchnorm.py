"""Synchronized L1 / L-inf / Top-k batch norm in plain PyTorch: the per-process stages and
the combine of their results (``tritonorm.sync_batchnorm`` runs the collectives between;
``kernels.sync_lp_batchnorm`` is the same on the Triton path, function by function).

The global batch is the concatenation of every process's batch, in rank order, so the
element at local reduction index r (r = n * S + s, as in ``reference.lp_batchnorm``) of
the process with rank p has the global index offset_p + r, offset_p = sum of n_q over
q < p, n_q the elements per channel of process q.  Over it, per channel:

    mu     = m_0 + sum_p n_p (m_p - m_0) / n          m_p the local means, m_0 the first
                                                      non-empty process's (a constant
                                                      channel keeps mu = x exactly)
    sigma  = coef(n) * sum_p sum |x - mu|             L1: one all-reduce after mu
           = coef(n) * (the k largest |x - mu|)       L-inf / Top-k: among the 2k
                                                      candidates of every process

The k largest |x - mu| of a process lie among its k largest and its k smallest x, ties to
the lowest index, whatever mu turns out to be, so one gather of (count, mean, candidates)
gives every process the whole of sigma: ``select`` merges them by |x - mu|, then the
lowest global index, as one process would on the whole batch.

What a process sends is one tensor of 8-byte words (``pack_moments``, ``pack_candidates``):

    L1            float64  [count, mean (C)]
    L-inf/Top-k   int64    [count, mean (C), hi_v (C, K), lo_v (C, K) as float64 bits,
                            hi_i (C, K), lo_i (C, K)]

hi: the K largest x with their local indices, lo: the K largest -x; an empty slot (a
process with fewer than K elements) holds (-inf, NO_INDEX).

Backward, with the forward's global mu, sigma, wbar and selection: each process sums
dz and dz * a over its own elements, the sums are all-reduced, and ``grad_coefficients``
gives the dx = scale * dz + shift + gain * w_i of ``kernels.lp_batchnorm`` (w_i = sign(a_i)
at every element for L1, at the process's own selected elements for L-inf / Top-k).  The
parameter gradients are each process's own sums, as nn.SyncBatchNorm's (DDP averages them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .activation import activate
from .lp_batchnorm import centred, channel_view, dispersion_coefficient, selected_count

# Index of an empty candidate slot (a process with fewer than k elements): above every
# real global index, so that it ranks last among equal values.
NO_INDEX = 2**62


def _moments(x: Tensor) -> Tensor:
    """Each channel's mean of an (N, C, *) tensor in the accumulator dtype, taken about its
    first element (``centred``); zeros for an empty tensor."""
    view = channel_view(x)
    if view.numel() == 0:
        return view.new_zeros(view.shape[1])
    return centred(view)[0].view(-1)


def _count(x: Tensor) -> Tensor:
    """[elements per channel], float64, on x's device."""
    return x.new_full((1,), x.numel() // x.shape[1], dtype=torch.float64)


def pack_moments(x: Tensor) -> Tensor:
    """What a process sends for L1: float64 [count, mean (C)]."""
    return torch.cat([_count(x), _moments(x).double()])


def pack_candidates(x: Tensor, k: int) -> Tensor:
    """What a process sends for L-inf / Top-k (the module docstring's layout): its count,
    mean and, per channel, its k largest x and its k largest -x with their local indices
    r, ties to the lowest r."""
    view = channel_view(x)
    c, n = view.shape[1], view.shape[0] * view.shape[2]
    rows = view.transpose(0, 1).reshape(c, n) + 0.0  # r = n * S + s along a row; -0.0 as +0.0
    values, indices = [], []
    for side in (rows, -rows):
        index = _top_indices(side, min(k, n))
        pad = max(0, k - n)
        values.append(torch.cat([side.gather(1, index), side.new_full((c, pad), float("-inf"))], 1).double().flatten())
        indices.append(torch.cat([index, index.new_full((c, pad), NO_INDEX)], 1).flatten())
    floats = torch.cat([_count(x), _moments(x).double(), *values])
    return torch.cat([floats.view(torch.int64), *indices])


def _top_indices(rows: Tensor, k: int) -> Tensor:
    """Columns of the k largest entries of each row, ties to the lowest column.  float32:
    one topk of int64 keys, the value's bits made to order as integers (a negative float's
    flipped) above 2^32 - 1 - column; float64 values leave no room: a stable sort."""
    if rows.dtype != torch.float32 or rows.shape[1] > 2**32:
        return rows.sort(dim=1, descending=True, stable=True).indices[:, :k]
    bits = rows.view(torch.int32).long()
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) << 32
    key |= torch.arange(2**32 - 1, 2**32 - 1 - rows.shape[1], -1, device=rows.device)
    return key.topk(k, dim=1).indices


def _global_mean(counts: Tensor, means: Tensor) -> Tensor:
    """mu (C,) of the whole batch from each process's count (W,) and mean (W, C), float64:
    m_0 + sum_p n_p (m_p - m_0) / n, m_0 the first non-empty process's mean."""
    first = (counts > 0).to(torch.int8).argmax().view(1)
    ref = means.index_select(0, first)[0]  # not means[first]: no host read of the index
    return ref + (counts[:, None] * (means - ref)).sum(0) / counts.sum()


def combine_moments(gathered: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """(mu (C,), n (1,)) in the accumulator dtype ``acc`` from every process's
    ``pack_moments`` (W, 1 + C)."""
    counts = gathered[:, 0]
    return _global_mean(counts, gathered[:, 1:]).to(acc), counts.sum().view(1).to(acc)


def abs_dev_sums(x: Tensor, mean: Tensor) -> Tensor:
    """(2, C): per channel, sum |x - mu| and sum sign(x - mu) over the local elements."""
    a = channel_view(x) - mean.view(1, -1, 1)
    return torch.stack([a.abs().sum((0, 2)), a.sign().sum((0, 2))])


def _affine(dev: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """(2, C): scale = gamma / (sigma + eps) and shift = beta, y = (x - mu) * scale + shift."""
    scale = (dev + eps).reciprocal()
    if weight is not None:
        scale = scale * weight.to(dev.dtype)
    shift = torch.zeros_like(scale) if bias is None else bias.to(dev.dtype)
    return torch.stack([scale, shift])


def l1_statistics(sums: Tensor, mean: Tensor, n: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                  normalized: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(sigma, wbar, affine (2, C)) of L1 from the all-reduced ``abs_dev_sums``:
    sigma = coef * sum |a|, wbar = coef * sum sign(a) / n, coef = C1 / n.  (``mean``: the
    Triton stage's argument, not needed here.)"""
    coef = dispersion_coefficient("l1", n, 0, normalized)
    dev = coef * sums[0]
    return dev, coef * sums[1] / n, _affine(dev, weight, bias, eps)


def select(gathered: Tensor, rank: int, norm: str, k: int, weight: Tensor | None, bias: Tensor | None, eps: float,
           normalized: bool, acc: torch.dtype):
    """(mu, sigma, wbar, affine, selection, signs, n) of L-inf / Top-k from every
    process's ``pack_candidates`` (W, 1 + C + 4CK): the K largest |x - mu| of the whole
    batch, ranked by |x - mu|, then the lowest global index; a candidate listed twice (in
    a process's hi and lo lists, when it has fewer than 2K elements) counts once.  The
    selection and its signs (C, K) are this process's (``rank``): local indices, -1 (and
    sign 0) for the elements of other processes."""
    w = gathered.shape[0]
    K = selected_count(norm, k)
    c = (gathered.shape[1] - 1) // (1 + 4 * K)
    floats = gathered[:, :1 + c + 2 * c * K].view(torch.float64)
    counts, offsets = floats[:, 0], (floats[:, 0].cumsum(0) - floats[:, 0]).long()
    mean = _global_mean(counts, floats[:, 1:1 + c]).to(acc)
    n = counts.sum().view(1).to(acc)
    x = floats[:, 1 + c:].view(w, 2, c, K).to(acc)
    x[:, 1] = -x[:, 1]  # lo holds -x: the candidates' x, +inf in empty lo slots
    index = gathered[:, 1 + c + 2 * c * K:].view(w, 2, c, K) + offsets.view(w, 1, 1, 1)
    valid = x.abs() < float("inf")
    index = torch.where(valid, index, NO_INDEX).permute(2, 0, 1, 3).reshape(c, -1)
    a = torch.where(valid, x - mean.view(1, 1, c, 1), 0.0).permute(2, 0, 1, 3).reshape(c, -1)
    index, order = index.sort(dim=1, stable=True)
    a = a.gather(1, order)
    repeat = torch.cat([index.new_zeros(c, 1, dtype=torch.bool), index[:, 1:] == index[:, :-1]], 1)
    value = torch.where((index == NO_INDEX) | repeat, float("-inf"), a.abs())
    value, order = value.sort(dim=1, descending=True, stable=True)  # ties keep the index order
    value, order = value[:, :K], order[:, :K]
    sel_index, sel_sign = index.gather(1, order), a.gather(1, order).sign()
    coef = dispersion_coefficient(norm, n, k, normalized)
    dev = coef * value.sum(1)
    wbar = coef * sel_sign.sum(1) / n
    local = sel_index - offsets[rank]
    mine = (local >= 0) & (local < counts[rank])
    return (mean, dev, wbar, _affine(dev, weight, bias, eps), torch.where(mine, local, -1),
            torch.where(mine, sel_sign, 0.0), n)


def grad_coefficients(sums: Tensor, dev: Tensor, wbar: Tensor, weight: Tensor | None, n: Tensor, norm: str, k: int,
                      normalized: bool, eps: float) -> Tensor:
    """(3, C): dx = scale * dz + shift + gain * w_i from the global sums (2, C) of dz and
    dz * a (the math of ``kernels.lp_batchnorm._grad_coefficients``):

        scale = gamma / d,  d = sigma + eps
        shift = -scale * sum(dz) / n + scale * sum(dz * a) / d * wbar
        gain  = -scale * sum(dz * a) / d * coef"""
    inv = (dev + eps).reciprocal()
    scale = inv if weight is None else inv * weight.to(dev.dtype)
    grad_dev = -scale * sums[1] * inv
    coef = dispersion_coefficient(norm, n, k, normalized)
    return torch.stack([scale, -scale * sums[0] / n - grad_dev * wbar, grad_dev * coef])


def _pre_activation(x: Tensor, mean: Tensor, affine: Tensor, residual: Tensor | None) -> Tensor:
    """z = (x - mu) * scale + shift [+ residual] in the accumulator dtype, x's shape."""
    c = x.shape[1]
    z = ((channel_view(x) - mean.view(1, c, 1)) * affine[0].view(1, c, 1) + affine[1].view(1, c, 1)).view(x.shape)
    return z if residual is None else z.add_(residual.to(z.dtype))


def normalize(x: Tensor, mean: Tensor, affine: Tensor, residual: Tensor | None, activation: str | None,
              negative_slope: float) -> Tensor:
    """out = act((x - mu) * scale + shift [+ residual]) in the accumulator dtype, rounded
    once to x's dtype."""
    return activate(_pre_activation(x, mean, affine, residual), activation, negative_slope).to(x.dtype)


def grad_sums(grad_out: Tensor, x: Tensor, mean: Tensor, affine: Tensor, residual: Tensor | None,
              activation: str | None, negative_slope: float, dev: Tensor, eps: float):
    """(sums, dz, dgamma, dbeta): the (2, C) local sums of dz and dz * a (what the process
    sends), dz as (N, C, S), and this process's parameter gradients sum(dz * a) / d and
    sum(dz); dz = dout * act'(z) with z rebuilt from x (dout itself without an
    activation), in the accumulator dtype."""
    a = channel_view(x) - mean.view(1, -1, 1)
    dz = grad_out.to(a.dtype)
    if activation is not None:
        with torch.enable_grad():
            z = _pre_activation(x, mean, affine, residual).requires_grad_()
            (dz,) = torch.autograd.grad(activate(z, activation, negative_slope), z, dz)
    dz = channel_view(dz)
    sums = torch.stack([dz.sum((0, 2)), (dz * a).sum((0, 2))])
    return sums, dz, sums[1] / (dev + eps), sums[0].clone()


def grad_input(grad_out: Tensor, dz: Tensor, x: Tensor, mean: Tensor, affine: Tensor, coefs: Tensor, norm: str,
               sel_index: Tensor, sel_sign: Tensor, residual: Tensor | None, activation: str | None,
               negative_slope: float, residual_grad: bool) -> tuple[Tensor, Tensor | None]:
    """(dx, dresidual): dx = scale * dz + shift + gain * w_i in x's dtype and shape, dz the
    (N, C, S) of ``grad_sums``, w_i = sign(a_i) for L1, the sign at this process's selected
    elements (local indices, -1 for none) for L-inf / Top-k; dresidual = dz with an
    activation and ``residual_grad``, else None.  (grad_out, affine, residual and
    negative_slope: the Triton stage's arguments, not needed here.)"""
    c = x.shape[1]
    scale, shift, gain = (t.view(1, c, 1) for t in coefs)
    dx = dz * scale + shift
    if norm == "l1":
        dx += gain * (channel_view(x) - mean.view(1, c, 1)).sign()
    elif dx.numel():  # the selected elements of this process (index -1: another's, adds 0 at 0)
        r, s = sel_index.clamp_min(0), dx.shape[2]
        channel = torch.arange(c, device=x.device).view(c, 1).expand_as(r)
        term = torch.where(sel_index >= 0, gain.view(c, 1) * sel_sign, 0.0)
        dx = dx.index_put((r // s, channel, r % s), term, accumulate=True)
    dres = dz.reshape(x.shape).to(x.dtype) if activation is not None and residual_grad else None
    return dx.reshape(x.shape).to(x.dtype), dres
