"""Plain-PyTorch L1 / L-inf / Top-k batch normalization ("Norm matters", Hoffer et al. 2018).

Per channel c, over its n = N * prod(spatial) elements x_i:

    mu    = mean(x)
    a_i   = x_i - mu
    sigma = C1 * mean(|a|)                           L1,    C1 = sqrt(pi / 2)
          = Cinf(n) * max(|a|)                        L-inf
          = Cinf(n) * mean of the k largest |a|       Top-k
    y_i   = gamma * a_i / (sigma + eps) + beta

    Cinf(n) = (1 + sqrt(pi * ln 4)) / (2 * sqrt(2 * ln n))

C1 makes sigma the standard deviation of Gaussian data (E|a| = sigma * sqrt(2 / pi));
Cinf(n) is the constant of the authors' code (the expected maximum of n Gaussians is about
sigma * sqrt(2 ln n)).  ``normalized=False`` drops the constant (it is 1).

The mean is taken about a shift, any element x_0 of the channel: mu = x_0 + mean(x - x_0).
Then a constant channel, whatever its offset (1e4 + 0.1 in float32), has mu = x_0 and
a = 0 exactly, so y = beta, as in exact arithmetic; without the shift the rounding error of
mean(x) becomes a and sigma both, and y is noise of magnitude 1.  The Triton kernels take
the same shift.

Which elements are "the k largest": ties in |a| are broken by the lowest reduction index
r = n * S + s (batch-major, then space), the same rule the Triton kernels use, so the
gradient of sigma reaches the same k elements on both paths.  L-inf is Top-k with k = 1.

Running statistics follow torch's convention: running = (1 - m) * running + m * batch,
momentum=None is the cumulative average 1 / num_batches_tracked.  ``running_dev`` stores
sigma, constant included (no unbiased correction: there is none for these dispersions).

This module is the CPU path and the oracle of the tests; it is differentiable by
autograd, double backward included, and passes gradcheck in float64.
"""

from __future__ import annotations

import math

import torch

from . import accumulator_dtype, update_running

C_L1 = math.sqrt(math.pi / 2)


def c_linf(n):
    """The L-inf / Top-k constant (1 + sqrt(pi ln 4)) / (2 sqrt(2 ln n)), n >= 2, for an int
    n or a 0-d tensor (a symbolic size under torch.compile stays symbolic that way)."""
    log, sqrt = (torch.log, torch.sqrt) if isinstance(n, torch.Tensor) else (math.log, math.sqrt)
    return (1 + math.sqrt(math.pi * math.log(4))) / (2 * sqrt(2 * log(n)))


def selected_count(norm: str, k: int) -> int:
    """How many elements per channel define sigma: all (0 stands for that) for L1, 1, or k."""
    return {"l1": 0, "linf": 1, "topk": k}[norm]


def dispersion_coefficient(norm: str, n, k: int, normalized: bool):
    """sigma = coefficient * (sum of |a| over the selected elements); n an int or a 0-d
    tensor (see ``c_linf``)."""
    if norm == "l1":
        return (C_L1 if normalized else 1.0) / n
    count = selected_count(norm, k)
    return (c_linf(n) if normalized else 1.0) / count


def top_abs_mask(abs_a: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of each row, ties to the lowest index."""
    kth = torch.topk(abs_a, k, dim=1).values[:, -1:]
    above = abs_a > kth
    tied = abs_a == kth
    room = k - above.sum(1, keepdim=True)
    return above | (tied & (tied.cumsum(1) <= room))


def batch_statistics(x: torch.Tensor, norm: str, k: int, normalized: bool):
    """(mean, sigma) per channel of an (N, C, *) tensor, in the accumulator dtype."""
    acc = accumulator_dtype(x.dtype)
    c = x.shape[1]
    rows = x.transpose(0, 1).reshape(c, -1).to(acc)  # row c, column r = n * S + s
    n = rows.shape[1]
    shift = rows[:, :1].detach()
    mean = shift[:, 0] + (rows - shift).mean(1)
    abs_a = (rows - mean[:, None]).abs()
    if norm != "l1":
        abs_a = abs_a * top_abs_mask(abs_a.detach(), selected_count(norm, k))
    # n as a tensor: c_linf(n) of a symbolic n would specialize the batch size
    count = n if norm == "l1" else rows.new_ones(()) * n
    return mean, dispersion_coefficient(norm, count, k, normalized) * abs_a.sum(1)


def lp_batch_norm(
    x: torch.Tensor,
    *,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_dev: torch.Tensor | None,
    batch_stats: bool,
    momentum: float | None,
    eps: float,
    norm: str,
    k: int,
    normalized: bool,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = gamma * (x - mu) / (sigma + eps) + beta; arguments are validated by the caller.

    With ``batch_stats`` the statistics come from the batch and the running buffers (if
    given) are updated in place; otherwise the running buffers are used."""
    if batch_stats:
        mean, dev = batch_statistics(x, norm, k, normalized)
        if running_mean is not None:
            for running, batch in ((running_mean, mean), (running_dev, dev)):
                update_running(running, batch, momentum=momentum, num_batches_tracked=num_batches_tracked)
    else:
        acc = accumulator_dtype(x.dtype)
        mean, dev = running_mean.to(acc), running_dev.to(acc)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = 1.0 / (dev + eps)
    if weight is not None:
        scale = scale * weight
    y = (x.to(mean.dtype) - mean.view(shape)) * scale.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)
