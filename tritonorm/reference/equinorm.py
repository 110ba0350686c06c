"""Equilibrium Normalization of weights (EquiNorm, Defazio & Bottou 2019), in plain PyTorch.

A convolution (or linear map) with weight w of shape (C_out, C_in/groups, *kernel) whose
weight is transformed, per output channel d, before use:

    v_c    = sum of the input x over batch and space, per input channel c
    W_dc   = sum_k w[d, c, k]                       (K = kernel volume)
    b_d    = - sum_c v_c W_dc / (K sum_c v_c)       (the output has mean zero)
    s_d    = r / sum_c v_c P_dc                     (the positive weights contribute r)
    w''    = s_d (w + b_d)

with r = N * prod(output size) * prod(stride) and, for the exact (two-pass) form,
P_dc = sum_k (w[d,c,k] + b_d)^+, or for the single-pass form (the paper's default: it
assumes no weight changes sign when b is added) P_dc = sum_k (w[d,c,k] + b_d) [w[d,c,k] > 0].
The sums c run over the channels of d's group.

Everything here takes the *input mass* m_c = v_c / r instead of v and r: b does not change
when v is scaled and s scales like 1 / v, so w'' depends on v and r only through m.  The
mass has a meaning of its own (the input's sum per output element), and with it no op needs
the output size.  With m, s_d = 1 / sum_c m_c P_dc.

Guard.  The math divides by sum_c m_c (zero or negative only if the inputs are not
positive, the paper's first assumption) and by D_d = sum_c m_c P_dc (zero when every weight
of a row is equal, or, single-pass, when no weight of a row is negative).  Computed, those
zeros come out as rounding noise of either sign, so the test is relative: a row is
*degenerate* when sum_c m_c <= rtol * sum_c |m_c| or D_d <= rtol * sum |m w| (sums over
the row), with rtol = 1024 eps of the accumulator dtype (1.2e-4 in fp32; a healthy row has
D_d near half of sum |m (w + b)|).  A degenerate row gets s_d = 0 and b_d = 0: its
normalized weight is zero, the channel outputs its bias alone and its weights get no
gradient, instead of a NaN or a weight blown up by 1 / rounding noise.  A NaN in the
weight or the input is not degenerate: it propagates, as in any torch op.
"""

from __future__ import annotations

import torch

from . import accumulator_dtype


def input_sums(x: torch.Tensor) -> torch.Tensor:
    """v_c: the sum of an (N, C, *) tensor over all but dim 1, in the accumulator dtype."""
    dims = [0, *range(2, x.dim())]
    return x.sum(dims, dtype=accumulator_dtype(x.dtype))


def degenerate_rtol(dtype: torch.dtype) -> float:
    """The relative threshold of the guard (see the module docstring)."""
    return 1024 * torch.finfo(dtype).eps


def transform_dtype(weight: torch.Tensor, mass: torch.Tensor) -> torch.dtype:
    """The dtype the transform computes in, and of s and b."""
    return accumulator_dtype(torch.promote_types(weight.dtype, mass.dtype))


def _row_mass(mass: torch.Tensor, c_out: int, groups: int) -> torch.Tensor:
    """m as a (C_out, C_in/groups, 1) tensor: row d holds the masses of d's group."""
    cpg = mass.shape[0] // groups
    return mass.view(groups, 1, cpg).expand(groups, c_out // groups, cpg).reshape(c_out, cpg, 1)


def equinorm_transform(
    weight: torch.Tensor, mass: torch.Tensor, groups: int, single_pass: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w'', s, b) for weight (C_out, C_in/groups, *kernel) and mass m (C_in,).

    w'' has the weight's shape and is in the accumulator dtype; s and b are (C_out,).
    Differentiable in weight and mass."""
    acc = transform_dtype(weight, mass)
    rtol = degenerate_rtol(acc)
    c_out = weight.shape[0]
    w = weight.reshape(c_out, weight.shape[1], -1).to(acc)
    m = _row_mass(mass.to(acc), c_out, groups)
    mass_total = m.sum((1, 2)) * w.shape[2]  # K sum_c m_c
    mass_ok = ~(mass_total <= rtol * m.abs().sum((1, 2)) * w.shape[2])
    b = -(m * w).sum((1, 2)) / torch.where(mass_total != 0, mass_total, 1.0)
    u = w + b[:, None, None]
    positive = (w > 0) if single_pass else (u > 0)
    denom = (m * u * positive).sum((1, 2))
    valid = mass_ok & ~(denom <= rtol * (m * w).abs().sum((1, 2)))
    s = torch.where(valid, 1.0 / torch.where(valid, denom, 1.0), 0.0)
    b = torch.where(valid, b, 0.0)
    w2 = s[:, None, None] * (w + b[:, None, None])
    return w2.reshape(weight.shape), s, b


def equinorm_weight(
    weight: torch.Tensor,
    mass: torch.Tensor,
    gain: torch.Tensor | None,
    *,
    groups: int,
    single_pass: bool,
) -> torch.Tensor:
    """gain_d * w''_d in the weight's dtype: the weight a plain convolution then uses."""
    w2, _, _ = equinorm_transform(weight, mass, groups, single_pass)
    if gain is not None:
        w2 = w2 * gain.to(w2.dtype).view(-1, *(1,) * (weight.dim() - 1))
    return w2.to(weight.dtype)


