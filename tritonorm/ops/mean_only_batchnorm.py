"""``tritonorm::mean_only_batch_norm`` and its backward as custom ops.

Forward outputs: y = x - mu + beta, and mu (C,) in the accumulator dtype (the batch mean
with ``batch_stats``, else ``running_mean``, which is then the only statistic read); only y
is differentiable.  ``running_mean``'s update is ``ops.running_stats.update_running_mean``.
The backward reads only the gradient: dx = dy - mean(dy) with ``batch_stats``, else dy;
dbias = sum(dy).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels import mean_only_batchnorm as kernels
from ..kernels.channel_reduce import accumulator_dtype, output_like
from . import refuse_double_backward


@torch.library.custom_op("tritonorm::mean_only_batch_norm", mutates_args=())
def mean_only_batch_norm(
    x: Tensor, bias: Optional[Tensor], running_mean: Optional[Tensor], batch_stats: bool,
) -> tuple[Tensor, Tensor]:
    return kernels.mean_only_batch_norm_forward(x, bias=bias, running_mean=running_mean, batch_stats=batch_stats)


@mean_only_batch_norm.register_fake
def _(x, bias, running_mean, batch_stats):
    return output_like(x), x.new_empty(x.shape[1], dtype=accumulator_dtype(x.dtype))


@torch.library.custom_op("tritonorm::mean_only_batch_norm_backward", mutates_args=())
def mean_only_batch_norm_backward(grad_y: Tensor, batch_stats: bool, bias_grad: bool) -> tuple[Tensor, Tensor]:
    return kernels.mean_only_batch_norm_backward(grad_y, batch_stats=batch_stats, bias_grad=bias_grad)


@mean_only_batch_norm_backward.register_fake
def _(grad_y, batch_stats, bias_grad):
    c = grad_y.shape[1] if bias_grad else 0
    return output_like(grad_y), grad_y.new_empty(c, dtype=accumulator_dtype(grad_y.dtype))


def _setup_context(ctx, inputs, output):
    _x, bias, _running_mean, batch_stats = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.batch_stats = batch_stats
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y, _grad_mean):
    need_x, need_b = ctx.needs_input_grad[:2]
    if grad_y is None:
        return None, None, None, None
    dx, db = mean_only_batch_norm_backward(grad_y, batch_stats=ctx.batch_stats, bias_grad=need_b)
    return dx if need_x else None, db.to(ctx.bias_dtype) if need_b else None, None, None


mean_only_batch_norm.register_autograd(_backward, setup_context=_setup_context)
refuse_double_backward(mean_only_batch_norm_backward, "tritonorm::mean_only_batch_norm")
