"""Synchronized L1 / L-inf / Top-k batch norm in plain PyTorch: the per-process stages and
the combine of their results (``tritonorm.sync_batchnorm`` runs the collectives between).

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

The k largest |x - mu| of a process lie among its k largest and its k smallest x
(``candidates``; ties to the lowest index), whatever mu turns out to be, so one gather of
(count, mean, candidates) gives every process the whole of sigma: ``select`` merges them
by |x - mu|, then the lowest global index, as one process would on the whole batch.

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
from .lp_batchnorm import centred, channel_view

# Index of an empty candidate slot (a process with fewer than k elements): above every
# real global index, so that it ranks last among equal values.
NO_INDEX = 2**62


def moments(x: Tensor) -> Tensor:
    """Each channel's mean of an (N, C, *) tensor in the accumulator dtype, taken about its
    first element (``centred``); zeros for an empty tensor."""
    view = channel_view(x)
    if view.numel() == 0:
        return view.new_zeros(view.shape[1])
    return centred(view)[0].view(-1)


def candidates(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(mean, hi_v, hi_i, lo_v, lo_i) of an (N, C, *) tensor: per channel, its mean
    (``moments``), its k largest x and its k largest -x, each (C, k) with local indices
    r (int64), ties to the lowest r (here in rank order; the Triton stage's are in no
    particular order); empty slots hold (-inf, NO_INDEX)."""
    view = channel_view(x)
    c, n = view.shape[1], view.shape[0] * view.shape[2]
    rows = view.transpose(0, 1).reshape(c, n)  # r = n * S + s along a row
    lists = []
    for values in (rows, -rows):
        top, index = values.sort(dim=1, descending=True, stable=True)
        top, index = top[:, :k], index[:, :k]
        if n < k:
            top = torch.cat([top, top.new_full((c, k - n), float("-inf"))], 1)
            index = torch.cat([index, index.new_full((c, k - n), NO_INDEX)], 1)
        lists += [top, index]
    return (moments(x), *lists)


def abs_dev_sums(x: Tensor, mean: Tensor) -> Tensor:
    """(2, C): per channel, sum |x - mu| and sum sign(x - mu) over the local elements."""
    a = channel_view(x) - mean.view(1, -1, 1)
    return torch.stack([a.abs().sum((0, 2)), a.sign().sum((0, 2))])


def global_mean(counts: Tensor, means: Tensor) -> Tensor:
    """mu (C,) of the whole batch from each process's count (W,) and mean (W, C):
    m_0 + sum_p n_p (m_p - m_0) / n, m_0 the first non-empty process's mean."""
    first = (counts > 0).to(torch.int8).argmax().view(1)
    ref = means.index_select(0, first)[0]  # not means[first]: no host read of the index
    return ref + (counts[:, None] * (means - ref)).sum(0) / counts.sum()


def select(mean: Tensor, hi_v: Tensor, hi_i: Tensor, lo_v: Tensor, lo_i: Tensor, offsets: Tensor, k: int):
    """The k largest |x - mu| of the whole batch from every process's candidates (W, C, k)
    (``candidates``) and global index offsets (W,): (sum of their |x - mu| (C,), their
    global indices (C, k), the signs of their x - mu (C, k)), ranked by |x - mu|, then the
    lowest global index; a candidate listed twice (in a process's hi and lo lists, when it
    has fewer than 2k elements) counts once."""
    c = mean.shape[0]
    mu = mean.view(1, c, 1)
    x = torch.cat([hi_v, -lo_v], 2)  # the candidates' x, -inf / +inf in empty slots
    valid = torch.cat([hi_v, lo_v], 2) > float("-inf")
    index = torch.cat([hi_i, lo_i], 2) + offsets.view(-1, 1, 1)
    index = torch.where(valid, index, NO_INDEX).transpose(0, 1).reshape(c, -1)
    a = torch.where(valid, x - mu, 0.0).transpose(0, 1).reshape(c, -1)
    index, order = index.sort(dim=1, stable=True)
    a = a.gather(1, order)
    repeat = torch.cat([index.new_zeros(c, 1, dtype=torch.bool), index[:, 1:] == index[:, :-1]], 1)
    value = torch.where((index == NO_INDEX) | repeat, float("-inf"), a.abs())
    value, order = value.sort(dim=1, descending=True, stable=True)  # ties keep the index order
    value, order = value[:, :k], order[:, :k]
    return value.sum(1), index.gather(1, order), a.gather(1, order).sign()


def local_selection(sel_index: Tensor, sel_sign: Tensor, offset: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The selected elements of this process: global indices made local, -1 (and sign 0)
    for those of other processes."""
    local = sel_index - offset
    mine = (local >= 0) & (local < count)
    return torch.where(mine, local, -1), torch.where(mine, sel_sign, 0.0)


def affine_coefficients(dev: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """(2, C): scale = gamma / (sigma + eps) and shift = beta, y = (x - mu) * scale + shift."""
    scale = (dev + eps).reciprocal()
    if weight is not None:
        scale = scale * weight.to(dev.dtype)
    shift = torch.zeros_like(scale) if bias is None else bias.to(dev.dtype)
    return torch.stack([scale, shift])


def grad_coefficients(sums: Tensor, dev: Tensor, wbar: Tensor, weight: Tensor | None, count: Tensor, coef: Tensor,
                      eps: float) -> Tensor:
    """(3, C): dx = scale * dz + shift + gain * w_i from the global sums (2, C) of dz and
    dz * a (the math of ``kernels.lp_batchnorm._grad_coefficients``):

        scale = gamma / d,  d = sigma + eps
        shift = -scale * sum(dz) / n + scale * sum(dz * a) / d * wbar
        gain  = -scale * sum(dz * a) / d * coef"""
    inv = (dev + eps).reciprocal()
    scale = inv if weight is None else inv * weight.to(dev.dtype)
    grad_dev = -scale * sums[1] * inv
    return torch.stack([scale, -scale * sums[0] / count - grad_dev * wbar, grad_dev * coef])


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
              activation: str | None, negative_slope: float) -> tuple[Tensor, Tensor]:
    """((2, C) local sums of dz and dz * a, dz as (N, C, S)), dz = dout * act'(z) with z
    rebuilt from x (dout itself without an activation), in the accumulator dtype."""
    a = channel_view(x) - mean.view(1, -1, 1)
    dz = grad_out.to(a.dtype)
    if activation is not None:
        with torch.enable_grad():
            z = _pre_activation(x, mean, affine, residual).requires_grad_()
            (dz,) = torch.autograd.grad(activate(z, activation, negative_slope), z, dz)
    dz = channel_view(dz)
    return torch.stack([dz.sum((0, 2)), (dz * a).sum((0, 2))]), dz


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
