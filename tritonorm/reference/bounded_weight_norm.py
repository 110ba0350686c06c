"""Bounded weight normalization ("Norm matters", Hoffer et al. 2018, section 5), in plain PyTorch.

A weight v is cut into slices along ``dim`` (the output channels for ``dim=0``); slice i
becomes

    w_i = rho_i * v_i / max(||v_i||_2, eps)

with rho_i = rho, one fixed scalar per layer (the paper), or rho_i = g_i * rho_g / ||g||_2
for a learnable per-slice gain g whose overall norm is held at rho_g (the authors' code); the
gain's part is plain autograd on S numbers (``tritonorm.nn.bounded_weight_norm``), so
everything here takes the per-slice scale rho as a tensor, () or (S,).

Backward, with G = dL/dw, u_i = v_i / ||v_i|| and t_i = <u_i, G_i>:

    dL/dv_i   = rho_i / ||v_i|| * (G_i - u_i t_i)        (G projected off the direction)
    dL/drho_i = t_i

Guard: eps (default 1e-12, as ``torch.nn.functional.normalize``) floors the norm, so an
all-zero slice gives w_i = 0, never NaN; below eps the norm is a constant and dL/dv_i =
rho_i / eps * G_i.  ``bounded_weight_norm`` refuses zero slices when it registers, so only
a slice driven to zero by training meets the guard.
"""

from __future__ import annotations

import torch

from . import accumulator_dtype

EPS = 1e-12


def slice_norms(v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """||v_i||_2 (S,) in the accumulator dtype, over every axis but ``dim``."""
    v = v.to(accumulator_dtype(v.dtype))
    if v.dim() == 1:  # one element per slice (vector_norm over no dims would take them all)
        return v.abs()
    return torch.linalg.vector_norm(v, dim=[d for d in range(v.dim()) if d != dim % v.dim()])


def slice_shape(v: torch.Tensor, dim: int) -> tuple[int, ...]:
    """The shape that broadcasts a (S,) per-slice vector against ``v``."""
    return tuple(n if d == dim % v.dim() else 1 for d, n in enumerate(v.shape))


def bounded_weight(v: torch.Tensor, *, rho: torch.Tensor, dim: int = 0, eps: float = EPS) -> torch.Tensor:
    """w = rho * v / max(||v_i||, eps) per slice along ``dim``, in v's dtype, computed in
    the accumulator dtype; ``rho`` is () or (S,).  Differentiable in v and rho."""
    acc = accumulator_dtype(v.dtype)
    scale = rho.to(acc) / slice_norms(v, dim).clamp_min(eps)
    return (v.to(acc) * scale.reshape(slice_shape(v, dim))).to(v.dtype)
