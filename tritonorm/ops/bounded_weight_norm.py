"""Bounded weight norm custom ops: ``tritonorm::bounded_weight`` and its backward, with fake
implementations and autograd.

``bounded_weight(v, rho, dim, eps, p=2.0)`` returns w = rho_i v_i / max(||v_i||_p, eps)
(contiguous, v's dtype; p is 2, 1 or inf, last in the schema with its default so that
calls without it keep working) and the slice norms (S,) in the accumulator dtype, which the backward reuses; it
is differentiable in v and rho (() or (S,)).  The backward op returns dL/dv and the
per-slice dL/drho_i (S,), in rho's dtype for a (S,) rho and in the accumulator dtype for a
() rho, whose sum over the slices is left to autograd's wrapper, which skips it when rho (a
fixed buffer) needs no gradient.  The autograd formula runs with
``set_materialize_grads(False)``: the norm, never differentiated, costs no zero-filled
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import bounded_weight_norm as kernels
from ..kernels.channel_reduce import accumulator_dtype
from . import refuse_double_backward


@torch.library.custom_op("tritonorm::bounded_weight", mutates_args=())
def bounded_weight(v: Tensor, rho: Tensor, dim: int, eps: float, p: float = 2.0) -> tuple[Tensor, Tensor]:
    return kernels.forward(v, rho=rho, dim=dim, eps=eps, p=p)


@bounded_weight.register_fake
def _(v, rho, dim, eps, p=2.0):
    norm = v.new_empty(v.shape[dim], dtype=accumulator_dtype(v.dtype))
    return torch.empty_like(v, memory_format=torch.contiguous_format), norm


@torch.library.custom_op("tritonorm::bounded_weight_backward", mutates_args=())
def bounded_weight_backward(
    grad: Tensor, v: Tensor, rho: Tensor, norm: Tensor, dim: int, eps: float, p: float = 2.0
) -> tuple[Tensor, Tensor]:
    return kernels.backward(grad, v=v, rho=rho, norm=norm, dim=dim, eps=eps, p=p)


@bounded_weight_backward.register_fake
def _(grad, v, rho, norm, dim, eps, p=2.0):
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    return dv, torch.empty_like(norm, dtype=kernels.drho_dtype(rho))


def _setup(ctx, inputs, output):
    v, rho, dim, eps, *p = inputs  # p: absent in calls that leave it at its default
    _, norm = output
    ctx.set_materialize_grads(False)  # the norm never has a gradient: None, not zeros
    ctx.mark_non_differentiable(norm)
    ctx.save_for_backward(v, rho, norm)
    ctx.options = dict(dim=dim, eps=eps, p=p[0] if p else 2.0)
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad, _grad_norm):
    if grad is None:
        return (None,) * ctx.n_inputs
    v, rho, norm = ctx.saved_tensors
    dv, drho = bounded_weight_backward(grad, v=v, rho=rho, norm=norm, **ctx.options)
    need_v, need_rho = ctx.needs_input_grad[:2]
    if need_rho:
        drho = drho if rho.dim() else drho.sum().to(rho.dtype)
    return dv if need_v else None, drho if need_rho else None, *(None,) * (ctx.n_inputs - 2)


bounded_weight.register_autograd(_backward, setup_context=_setup)
refuse_double_backward(bounded_weight_backward, "tritonorm::bounded_weight")
