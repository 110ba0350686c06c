"""Bounded weight normalization ("Norm matters", Hoffer et al. 2018, section 5), in plain PyTorch.

A weight v is cut into slices along ``dim`` (the output channels for ``dim=0``); slice i
becomes

    w_i = rho_i * v_i / max(||v_i||_p, eps)

for the norm order p = 2 (the default), 1 or inf (``P_VALUES``): ||v_i||_1 = sum |v_ij|,
||v_i||_inf = max |v_ij| (the authors' code takes p as an option),

with rho_i = rho, one fixed scalar per layer (the paper), or rho_i = g_i * rho_g / ||g||_2
for a learnable per-slice gain g whose overall norm is held at rho_g (the authors' code); the
gain's part is plain autograd on S numbers (``tritonorm.nn.bounded_weight_norm``), so
everything here takes the per-slice scale rho as a tensor, () or (S,).

Backward, with G = dL/dw, n_i = ||v_i||_p and t_i = <v_i, G_i> / n_i:

    dL/dv_i   = rho_i / n_i * (G_i - t_i dn_i/dv_i)
    dL/drho_i = t_i

    dn_i/dv_i = v_i / n_i                       p = 2 (G projected off the direction)
              = sign(v_i)                       p = 1 (sign(0) = 0, as autograd's abs)
              = sign(v_ik) e_k                  p = inf: the max element k alone, ties to
                                                the lowest index k within the slice

where a slice's index runs over its elements in row-major order of the other axes (that of
``v.movedim(dim, 0)[i].flatten()``); the Triton kernel breaks ties the same way.

Guard: eps (default 1e-12, as ``torch.nn.functional.normalize``) floors the norm, so an
all-zero slice gives w_i = 0, never NaN; below eps the norm is a constant and dL/dv_i =
rho_i / eps * G_i.  ``bounded_weight_norm`` refuses zero slices when it registers, so only
a slice driven to zero by training meets the guard.
"""

from __future__ import annotations

import math

import torch

from . import accumulator_dtype

EPS = 1e-12
def slice_norms(v: torch.Tensor, dim: int = 0, p: float = 2.0) -> torch.Tensor:
    """||v_i||_p (S,) in the accumulator dtype, over every axis but ``dim``; for p = inf
    differentiable to the first max element of each slice alone (``_max_norms``)."""
    v = v.to(accumulator_dtype(v.dtype))
    if v.dim() == 1:  # one element per slice (vector_norm over no dims would take them all)
        return v.abs()
    if p == math.inf:
        return _max_norms(v, dim)
    return torch.linalg.vector_norm(v, ord=p, dim=[d for d in range(v.dim()) if d != dim % v.dim()])


def _max_norms(v: torch.Tensor, dim: int) -> torch.Tensor:
    """max_j |v_ij| per slice, as |v_ik| at k, the lowest index of a maximum (argmax returns
    the first), so that autograd sends the gradient to that element alone (amax would share
    it among ties)."""
    rows = v.movedim(dim, 0).reshape(v.shape[dim], -1)
    first = rows.abs().argmax(1, keepdim=True)
    return rows.gather(1, first).squeeze(1).abs()


def slice_shape(v: torch.Tensor, dim: int) -> tuple[int, ...]:
    """The shape that broadcasts a (S,) per-slice vector against ``v``."""
    return tuple(n if d == dim % v.dim() else 1 for d, n in enumerate(v.shape))


def bounded_weight(v: torch.Tensor, *, rho: torch.Tensor, dim: int = 0, eps: float = EPS,
                   p: float = 2.0) -> torch.Tensor:
    """w = rho * v / max(||v_i||_p, eps) per slice along ``dim``, in v's dtype, computed in
    the accumulator dtype; ``rho`` is () or (S,).  Differentiable in v and rho."""
    acc = accumulator_dtype(v.dtype)
    scale = rho.to(acc) / slice_norms(v, dim, p).clamp_min(eps)
    return (v.to(acc) * scale.reshape(slice_shape(v, dim))).to(v.dtype)
