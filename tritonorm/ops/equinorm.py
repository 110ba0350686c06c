"""EquiNorm custom ops: ``tritonorm::input_sums`` and ``tritonorm::equinorm_weight`` (with its
backward op), each with a fake implementation and autograd.

``input_sums(x, rows)`` is v (C,), the sum of x[:rows] (all of x for None) over all but
dim 1, in the accumulator dtype; its gradient broadcasts dL/dv back over those rows as a
stride-0 view of at most (N, C) values, so that autograd adds it into the convolution's
input gradient in one pass (an ``x[:rows]`` slice in the autograd graph would instead
allocate a zero gradient of x's size and copy into it).  ``equinorm_weight(weight, mass,
gain, groups, single_pass)`` returns gain * w'' in the weight's dtype, and s and b (not
differentiable) for the backward; it is differentiable in weight, mass and gain.

Both autograd formulas run with ``set_materialize_grads(False)``: a gradient autograd has
no value for (s and b never have one) arrives as None instead of a zero-filled tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import equinorm as kernels
from ..kernels.channel_reduce import accumulator_dtype
from ..reference.equinorm import transform_dtype
from . import refuse_double_backward


@torch.library.custom_op("tritonorm::input_sums", mutates_args=())
def input_sums(x: Tensor, rows: Optional[int] = None) -> Tensor:
    return kernels.input_sums(x, rows=rows)


@input_sums.register_fake
def _(x, rows=None):
    return x.new_empty(x.shape[1], dtype=accumulator_dtype(x.dtype))


def _input_sums_setup(ctx, inputs, output):
    x, rows = inputs
    ctx.set_materialize_grads(False)
    ctx.x_meta = (x.shape, x.dtype, rows)


def _input_sums_backward(ctx, grad):
    """dL/dx[n, c, ...] = dL/dv_c for n < rows, else 0: a broadcast of (1, C) or, with
    rows, of the (N, C) product of dL/dv and the row indicator."""
    shape, dtype, rows = ctx.x_meta
    if grad is None:
        return None, None
    grad = grad.to(dtype).view(1, -1, *(1,) * (len(shape) - 2))
    if rows is not None:
        in_stats = torch.arange(shape[0], device=grad.device) < rows
        grad = grad * in_stats.view(-1, *(1,) * (len(shape) - 1))
    return grad.expand(shape), None


input_sums.register_autograd(_input_sums_backward, setup_context=_input_sums_setup)


@torch.library.custom_op("tritonorm::equinorm_weight", mutates_args=())
def equinorm_weight(
    weight: Tensor, mass: Tensor, gain: Optional[Tensor], groups: int, single_pass: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.weight_forward(weight, mass=mass, gain=gain, groups=groups, single_pass=single_pass)


@equinorm_weight.register_fake
def _(weight, mass, gain, groups, single_pass):
    c_out, acc = weight.shape[0], transform_dtype(weight, mass)
    out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return out, weight.new_empty(c_out, dtype=acc), weight.new_empty(c_out, dtype=acc)


@torch.library.custom_op("tritonorm::equinorm_weight_backward", mutates_args=())
def equinorm_weight_backward(
    grad: Tensor, weight: Tensor, mass: Tensor, gain: Optional[Tensor], s: Tensor, b: Tensor,
    groups: int, single_pass: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.weight_backward(
        grad, weight=weight, mass=mass, gain=gain, s=s, b=b, groups=groups, single_pass=single_pass
    )


@equinorm_weight_backward.register_fake
def _(grad, weight, mass, gain, s, b, groups, single_pass):
    return (
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(mass),
        s.new_empty(0) if gain is None else gain.new_empty(weight.shape[0]),
    )


def _weight_setup(ctx, inputs, output):
    weight, mass, gain, groups, single_pass = inputs
    _, s, b = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(s, b)
    ctx.save_for_backward(weight, mass, gain, s, b)
    ctx.options = dict(groups=groups, single_pass=single_pass)


def _weight_backward(ctx, grad, _grad_s, _grad_b):
    if grad is None:
        return None, None, None, None, None
    weight, mass, gain, s, b = ctx.saved_tensors
    dw, dmass, dgain = equinorm_weight_backward(grad, weight=weight, mass=mass, gain=gain, s=s, b=b, **ctx.options)
    need_w, need_m, need_g = ctx.needs_input_grad[:3]
    return (
        dw if need_w else None,
        dmass if need_m else None,
        dgain if need_g else None,
        None,
        None,
    )


equinorm_weight.register_autograd(_weight_backward, setup_context=_weight_setup)
refuse_double_backward(equinorm_weight_backward, "tritonorm::equinorm_weight")
