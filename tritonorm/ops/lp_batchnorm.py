"""``tritonorm::lp_batch_norm`` and its backward as custom ops.

The op computes out = act(y + residual) with y the normalized input (``residual`` None
and ``activation`` "none" give y itself; names: ``tritonorm.kernels.activation``,
``activation_param`` is leaky_relu's negative slope).  Forward outputs: out, and per
channel (accumulator dtype) mean, dev = sigma, wbar = the channel mean of d sigma / d a,
the indices (reduction index r = n*S + s) and the signs of a of the elements that define
sigma for L-inf / Top-k, (C, k) tensors ((C, 0) for L1 or when the running statistics are
used), and the affine coefficients (2, C) (scale = gamma / (sigma + eps), shift = beta),
from which the backward rebuilds the pre-activation.  Only out is differentiable; the
others are what the backward needs.  ``running_mean`` / ``running_dev`` are read only
when ``batch_stats`` is False; their update is ``ops.running_stats.update_running_stats``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import lp_batchnorm as kernels
from ..kernels.channel_reduce import accumulator_dtype, output_like
from ..reference.lp_batchnorm import selected_count
from . import refuse_double_backward


@torch.library.custom_op("tritonorm::lp_batch_norm", mutates_args=())
def lp_batch_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_dev: Optional[Tensor],
    batch_stats: bool,
    eps: float,
    norm: str,
    k: int,
    normalized: bool,
    residual: Optional[Tensor] = None,
    activation: str = "none",
    activation_param: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels.lp_batch_norm_forward(
        x, weight=weight, bias=bias, running_mean=running_mean, running_dev=running_dev, batch_stats=batch_stats,
        eps=eps, norm=norm, k=k, normalized=normalized, residual=residual, activation=activation,
        activation_param=activation_param,
    )


@lp_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_dev, batch_stats, eps, norm, k, normalized, residual=None,
      activation="none", activation_param=0.0):
    c, acc = x.shape[1], accumulator_dtype(x.dtype)
    count = selected_count(norm, k) if batch_stats else 0
    return (
        output_like(x),
        *(x.new_empty(c, dtype=acc) for _ in range(3)),
        x.new_empty((c, count), dtype=torch.int64),
        x.new_empty((c, count), dtype=acc),
        x.new_empty((2, c), dtype=acc),
    )


@torch.library.custom_op("tritonorm::lp_batch_norm_backward", mutates_args=())
def lp_batch_norm_backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    dev: Tensor,
    wbar: Tensor,
    sel_index: Tensor,
    sel_sign: Tensor,
    affine: Tensor,
    batch_stats: bool,
    param_grads: bool,
    eps: float,
    norm: str,
    k: int,
    normalized: bool,
    residual: Optional[Tensor] = None,
    activation: str = "none",
    activation_param: float = 0.0,
    residual_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels.lp_batch_norm_backward(
        grad_y, x=x, weight=weight, mean=mean, dev=dev, wbar=wbar, sel_i=sel_index, sel_sign=sel_sign, affine=affine,
        batch_stats=batch_stats, param_grads=param_grads, eps=eps, norm=norm, k=k, normalized=normalized,
        residual=residual, activation=activation, activation_param=activation_param, residual_grad=residual_grad,
    )


@lp_batch_norm_backward.register_fake
def _(grad_y, x, weight, mean, dev, wbar, sel_index, sel_sign, affine, batch_stats, param_grads, eps, norm, k,
      normalized, residual=None, activation="none", activation_param=0.0, residual_grad=False):
    c = x.shape[1] if param_grads else 0
    dtype = mean.dtype if weight is None else weight.dtype
    dres = output_like(x) if residual_grad and activation != "none" else x.new_empty(0)
    return output_like(x), mean.new_empty(c, dtype=dtype), mean.new_empty(c, dtype=dtype), dres


def _setup_context(ctx, inputs, output):
    x, weight, bias, _running_mean, _running_dev, batch_stats, eps, norm, k, normalized, residual, activation, \
        activation_param = inputs
    _y, mean, dev, wbar, sel_index, sel_sign, affine = output
    ctx.mark_non_differentiable(mean, dev, wbar, sel_index, sel_sign, affine)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
    # the residual is read again only to rebuild the pre-activation
    ctx.save_for_backward(x, weight, mean, dev, wbar, sel_index, sel_sign, affine,
                          residual if activation != "none" else None)
    ctx.options = dict(batch_stats=batch_stats, eps=eps, norm=norm, k=k, normalized=normalized, activation=activation,
                       activation_param=activation_param)
    ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, grad_y, *_unused):
    x, weight, mean, dev, wbar, sel_index, sel_sign, affine, residual = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    given = len(ctx.needs_input_grad)  # the arguments passed, without the defaults
    need_res = given > 10 and ctx.needs_input_grad[10]
    if grad_y is None:  # y does not reach the loss: nothing does
        return (None,) * given
    dx, dw, db, dres = lp_batch_norm_backward(
        grad_y, x=x, weight=weight, mean=mean, dev=dev, wbar=wbar, sel_index=sel_index, sel_sign=sel_sign,
        affine=affine, param_grads=need_w or need_b, residual=residual, residual_grad=need_res, **ctx.options,
    )
    if ctx.options["activation"] == "none":
        dres = grad_y  # out = y + residual: the residual's gradient is out's
    w_dtype, b_dtype = ctx.param_dtypes
    return (
        dx if need_x else None,
        dw.to(w_dtype) if need_w else None,
        db.to(b_dtype) if need_b else None,
        *(None,) * 7,
        dres if need_res else None,
        None,
        None,
    )[:given]


lp_batch_norm.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(lp_batch_norm_backward, "tritonorm::lp_batch_norm")
