"""The learning rate that stands in for weight decay ("Norm matters", Hoffer et al. 2018, eq. 4).

Under batch norm a channel's output does not depend on the norm of its weight w, and a step
of size eta moves its direction by about eta / ||w||^2.  Weight decay acts only by keeping
||w|| small.  A run without weight decay, whose norms grow, takes the same effective steps
as a run with it, whose norms are ||w_WD||, when its learning rate is

    eta_corrected = eta * ||w||^2 / ||w_WD||^2

per channel, or per layer with the layer's norms (the root sum of squares of its channels').
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_norm_order, check_number, check_slice_dim
from .reference.bounded_weight_norm import slice_norms as _slice_norms

__all__ = ["slice_norms", "corrected_lr"]


def slice_norms(weight: Tensor, dim: int = 0, *, p: float = 2.0) -> Tensor:
    """||w_i||_p per slice along ``dim`` (per output channel for ``dim=0``), detached, in
    fp32 (fp64 for fp64): with p = 2, what to record from a run with weight decay, for
    ``corrected_lr``; with the p of a ``bounded_weight_norm(p=...)``, the norms it holds at rho.

    Args:
        weight: a floating-point tensor with one dim or more.
        dim: the axis whose slices are measured.
        p: the norm order, 2 (default), 1 or float("inf").

    Shape:
        output: (weight.shape[dim],).

    Example::

        >>> conv = nn.Conv2d(3, 16, 3)
        >>> tritonorm.slice_norms(conv.weight).shape
        torch.Size([16])
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() == 0:
        raise TypeError(f"weight must be a floating-point tensor with one dim or more, got {weight!r:.80}")
    return _slice_norms(weight.detach(), check_slice_dim(dim, weight), check_norm_order(p))


def corrected_lr(lr: float, norms: Tensor, wd_norms: Tensor, *, per_channel: bool = True) -> Tensor:
    """eta * ||w||^2 / ||w_WD||^2: the learning rate that mimics weight decay ("Norm matters",
    Hoffer et al. 2018, eq. 4).

    ``norms`` are the current channel norms of a layer trained without weight decay,
    ``wd_norms`` the same channels' norms at the same point of a run with weight decay
    (both from ``slice_norms``, same shape).  Returns a tensor of ``norms``' shape with
    ``per_channel=True``, or a 0-d tensor, eta * sum ||w_i||^2 / sum ||w_WD,i||^2, for one
    learning rate per layer (an optimizer's param group).

    Args:
        lr: eta, the base learning rate (>= 0).
        norms: the channel norms now, finite and >= 0.
        wd_norms: the channel norms of the weight-decay run, finite and > 0.
        per_channel: one rate per channel (True) or one for the layer (False).

    Example::

        >>> wd_norms = tritonorm.slice_norms(wd_model[0].weight)      # recorded from the run with weight decay
        >>> lr = tritonorm.corrected_lr(0.1, tritonorm.slice_norms(model[0].weight), wd_norms,
        ...                             per_channel=False)
        >>> optimizer.param_groups[0]["lr"] = lr.item()
    """
    check_number("lr", lr, low=0)
    for name, t in (("norms", norms), ("wd_norms", wd_norms)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t!r:.80}")
    if norms.shape != wd_norms.shape:
        raise ValueError(f"norms and wd_norms must have the same shape, got {tuple(norms.shape)} and "
                         f"{tuple(wd_norms.shape)}")
    if not bool(torch.isfinite(norms).all()) or not bool((norms >= 0).all()):
        raise ValueError("norms must be finite and >= 0")
    if not bool(torch.isfinite(wd_norms).all()) or not bool((wd_norms > 0).all()):
        raise ValueError("wd_norms must be finite and > 0: a channel of norm 0 in the weight-decay run has no "
                         "effective step to match")
    squares, wd_squares = norms.double().square(), wd_norms.double().square()
    if per_channel:
        return (lr * squares / wd_squares).to(norms.dtype)
    return (lr * squares.sum() / wd_squares.sum()).to(norms.dtype)
