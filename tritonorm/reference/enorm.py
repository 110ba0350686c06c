"""The ENorm cycle (Equi-normalization, Stock et al. 2019), in plain PyTorch.

A chain of L weights W_0 .. W_{L-1} joined by positively homogeneous maps (ReLU, pooling,
flatten) is seen as (O_k, I_k, K_k) tensors with I_{k+1} = O_k: a linear weight is
(out, in, 1), a convolution's (C_out, C_in, kernel volume), and a linear layer after a
flatten of C channels of S positions each is (out, C, S).  Hidden unit j between W_q and
W_{q+1} (pair q) gets the coefficient

    r_j = || [W_q[j, :, :], b_q[j]] ||_p        (the bias only with balance_biases)
    s_j = || W_{q+1}[:, j, :] ||_p
    d_j = sqrt(max(s_j, eps) / (c max(r_j, eps)))

and the cycle multiplies row j of W_q (and b_q[j]) by d_j and divides column j of W_{q+1}
by d_j.  Each pair's d minimises sum_k c^(-p k) ||W_k||_p^p over that pair's scaling with
the rest fixed, and the network computes the same function (rows and bias of a ReLU unit
scaled by d > 0, its outgoing weights by 1 / d).  The eps floor keeps a zero row or column
finite: it is the scale below which a norm counts as zero.

Norms and coefficients are float64 whatever the weights' dtype (a weight of 1e20 squares to
1e40, past float32), and a unit whose d_j is not a finite number > 0 (a NaN or inf in its
row or column, an overflow) is left alone: d_j = 1.  The cycle then never spreads a
non-finite entry to other entries, and finite weights give finite coefficients.

Modes.  *Parallel* takes every r and s from the weights at the start of the cycle (the
authors' code: one reduction over all layers, then one rescale).  *Sequential* is the
paper's algorithm: pair q sees W_q after its columns were divided by d_{q-1}.

Every tensor the cycle touches scales as t[o, i, :] *= d_row[o]^a d_col[i]^-a, with d_row the
coefficients of its layer's outputs and d_col of its inputs (either absent at the ends of
the balanced pairs): a = 1 for weights and biases, -1 for tensors that move like their
gradient (momentum, Adam's first moment), -2 for those that move like its square (Adam's
second moment).  The rescale commutes, so both modes first compute every d, then scale
each tensor once.

``per_layer_cycle`` restates the authors' published per-layer loop, the yardstick the
parallel mode is tested and benchmarked against.
"""

from __future__ import annotations

import torch


def row_norms(weight: torch.Tensor, p: float, bias: torch.Tensor | None = None,
              col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """r (O,) in float64: the p-norm of each row of an (O, I, K) weight, its columns divided
    by ``col_scale`` (I,) first, its bias entry appended."""
    w = weight.to(torch.float64)
    if col_scale is not None:
        w = w / col_scale[None, :, None]
    rows = w.flatten(1)
    if bias is not None:
        rows = torch.cat([rows, bias.to(rows.dtype)[:, None]], 1)
    return torch.linalg.vector_norm(rows, ord=p, dim=1)


def col_norms(weight: torch.Tensor, p: float) -> torch.Tensor:
    """s (I,) in float64: the p-norm of each input channel's (O, K) slice of an (O, I, K)
    weight."""
    return torch.linalg.vector_norm(weight.to(torch.float64), ord=p, dim=(0, 2))


def pair_coefficients(r: torch.Tensor, s: torch.Tensor, c: float, eps: float) -> torch.Tensor:
    """d = sqrt(max(s, eps) / (c max(r, eps))), or 1 where that is not a finite number > 0."""
    d = torch.sqrt(s.clamp_min(eps) / (c * r.clamp_min(eps)))
    return torch.where(d.isfinite() & (d > 0), d, 1.0)


def coefficients(weights: list[torch.Tensor], biases: list[torch.Tensor | None], *, pairs: int,
                 c: float, p: float, eps: float, sequential: bool) -> list[torch.Tensor]:
    """[d_0 .. d_{pairs-1}] of one cycle over (O, I, K) weights.

    ``biases[q]`` (O_q,) or None enters r of pair q (pass Nones to leave biases out of the
    norms).  Parallel: one batched coefficient op over the concatenated norms."""
    if sequential:
        ds: list[torch.Tensor] = []
        for q in range(pairs):
            r = row_norms(weights[q], p, biases[q], ds[-1] if ds else None)
            ds.append(pair_coefficients(r, col_norms(weights[q + 1], p), c, eps))
        return ds
    r = torch.cat([row_norms(weights[q], p, biases[q]) for q in range(pairs)])
    s = torch.cat([col_norms(weights[q + 1], p) for q in range(pairs)])
    return list(pair_coefficients(r, s, c, eps).split([w.shape[0] for w in weights[:pairs]]))


def rescale_(tensors: list[torch.Tensor], rows: list[torch.Tensor | None], cols: list[torch.Tensor | None],
             powers: list[int]) -> None:
    """In place, t *= d_row^a d_col^-a for every (t, d_row, d_col, a), with d_row or d_col
    None where t has no such coefficient: one foreach op over the rows, one over the
    columns.  Each t is an (O,) bias-like or (O, I, K) weight-like view."""
    for side, ds, sign in (("rows", rows, 1), ("cols", cols, -1)):
        items = [(t, d.pow(sign * a)) for t, d, a in zip(tensors, ds, powers, strict=True) if d is not None]
        if items:
            shaped = [f.view(-1, *(1,) * (t.dim() - 1)) if side == "rows" else f[None, :, None] for t, f in items]
            torch._foreach_mul_([t for t, _ in items], shaped)


def objective(weights: list[torch.Tensor], biases: list[torch.Tensor | None], c: float, p: float) -> torch.Tensor:
    """sum_k c^(-p k) ||[W_k, b_k]||_p^p: what each pair's coefficient minimises (biases that
    are not balanced passed as None)."""
    total = 0.0
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        total = total + c ** (-p * k) * row_norms(w, p, b).pow(p).sum()
    return total


def per_layer_cycle(weights: list[torch.Tensor], buffers: list[torch.Tensor] | None, c: float) -> None:
    """The published ENorm step (facebookresearch/enorm, ``_step_conv``), restated: a Python
    loop over the pairs of (O, I, K) weights, every coefficient from the norms at the start
    of the cycle, the last pair left alone, no biases, p = 2, momentum buffers rescaled
    rows by 1/d and columns by d.  Not the library's cycle: the per-layer baseline of the
    benchmarks (``tritonorm.bench.enorm_cases``) and the tests' oracle of the parallel mode."""
    left = weights[0].flatten(1).norm(dim=1)
    right = weights[1].transpose(0, 1).flatten(1).norm(dim=1)
    for i in range(1, len(weights) - 1):
        balancer = (right / (left * c)).pow(0.5)
        left = weights[i].flatten(1).norm(dim=1)
        right = weights[i + 1].transpose(0, 1).flatten(1).norm(dim=1)
        weights[i - 1].mul_(balancer[:, None, None])
        weights[i].mul_(1 / balancer[None, :, None])
        if buffers is not None:
            buffers[i - 1].mul_(1 / balancer[:, None, None])
            buffers[i].mul_(balancer[None, :, None])
