"""Mean-only batch normalization in plain PyTorch ("Weight Normalization", Salimans &
Kingma 2016, section 3; paired with (bounded) weight norm in "Norm matters", Hoffer et al.
2018): subtract each channel's mean, add a bias, divide by nothing.

    y = x - mu + beta,    mu = the batch mean of the channel (training) or running_mean

Backward: dx = dy - mean(dy) over the channel in training (dx = dy with the running mean),
dbeta = sum(dy).  The mean is taken about each channel's x_0 as the Lp batch norms take it
(``tritonorm.reference.lp_batchnorm.centred``), so a constant channel gives y = beta
exactly; the arithmetic is in the accumulator dtype and y is rounded once to x's dtype, as
in the kernels.  Autograd differentiates this function.
"""

from __future__ import annotations

import torch

from . import update_running
from .lp_batchnorm import centred, channel_view


def mean_only_batch_norm(
    x: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    batch_stats: bool,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x - mu + beta; arguments are validated by the caller.  With ``batch_stats`` mu is
    the batch's and ``running_mean`` (if given) is updated in place, else mu is
    ``running_mean``."""
    view = channel_view(x)
    beta = None if bias is None else bias.to(view.dtype).view(1, -1, 1)
    if batch_stats:
        mean, y = centred(view, beta)  # one pass for x - mu + beta
        if running_mean is not None:
            update_running(running_mean, mean.view(-1), momentum=momentum, num_batches_tracked=num_batches_tracked)
    else:
        mean = running_mean.to(view.dtype).view(1, -1, 1)
        y = view - (mean if beta is None else mean - beta)
    return y.view(x.shape).to(x.dtype)
