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

The mean is taken about a shift, any element x_0 of the channel: mu = x_0 + mean(x - x_0),
and a = (x - x_0) - mean(x - x_0).  Then a constant channel, whatever its offset (1e4 + 0.1
in float32), has mu = x_0 and a = 0 exactly, so y = beta, as in exact arithmetic; without
the shift the rounding error of mean(x) becomes a and sigma both, and y is noise of
magnitude 1.  The Triton kernels take the same shift (and form a as x - mu: the two
differ by a rounding).

Which elements are "the k largest": ties in |a| are broken by the lowest reduction index
r = n * S + s (batch-major, then space), the same rule the Triton kernels use, so the
gradient of sigma reaches the same k elements on both paths.  L-inf is Top-k with k = 1.

Speed, as the CPU path: x is read through an (N, C, S) view, a view of a contiguous or
channels_last x (no channel-major copy), and y reuses a = x - mu.  No pass breaks ties:
L-inf takes the first maximum from an amax over a and an argmax over one row per channel;
Top-k runs one topk over int64 keys that order by |a|, then by lowest r, first over the
rows that can hold the k largest when there are many rows (``top_indices``).

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
from .activation import NEGATIVE_SLOPE, activate

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


def channel_view(x: torch.Tensor) -> torch.Tensor:
    """x as (N, C, S) in the accumulator dtype, S = prod(spatial), so that r = n * S + s: a
    view of a contiguous or channels_last x (no channel-major copy)."""
    return x.reshape(*x.shape[:2], math.prod(x.shape[2:])).to(accumulator_dtype(x.dtype))


def centred(view: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, a = x - mu) of an (N, C, S) view, mu of shape (1, C, 1) taken about x_0, the x
    at r = 0: a = (x - x_0) - mean(x - x_0), in the memory of x - x_0.  With ``offset``
    (broadcast to (1, C, 1)) the second is a + offset, as (x - x_0) - (mean(x - x_0) -
    offset): the same pass."""
    shift = view[:1, :, :1].detach()
    shifted = view - shift
    mean = shifted.mean((0, 2), keepdim=True)
    return shift + mean, shifted.sub_(mean if offset is None else mean - offset)


def max_abs(a: torch.Tensor) -> torch.Tensor:
    """max |a| per channel of an (N, C, S) tensor, differentiable at its lowest-r maximum.

    Two first occurrences (torch's max / argmax rule): the first n whose row a[n, c, :]
    holds the maximum, then the first s in that row; the first is found from an amax over
    all of a, the second from an argmax over one row per channel."""
    abs_a = a.detach().abs()
    c = torch.arange(a.shape[1], device=a.device)
    n = abs_a.amax(2).max(0).indices
    s = abs_a[n, c].argmax(1)
    return a[n, c, s].abs()


# A float32 value converted to float64 leaves the 29 low mantissa bits at zero; the signs
# -1, 0, 1 as float64 leave 52.
_FLOAT32_FREE_BITS, _SIGN_FREE_BITS = 29, 52


def top_columns(values: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the k largest entries of each row of ``values`` (C, m), entries >= 0, ties
    to the lowest column: one topk of int64 keys that order by value, then by column.

    A key is the float64 bit pattern of the value (as an int64 it orders like the value,
    which is >= 0) with its b free low mantissa bits holding 2^b - 1 - column.  A float32
    value leaves b = 29.  A float64 value leaves none, and a row of more than 2^29 columns
    does not fit: there the value part is the sign of (value - the k-th largest value),
    which selects the same entries (all above it, then the lowest columns at it)."""
    m = values.shape[1]
    if values.dtype != torch.float64 and m <= 2**_FLOAT32_FREE_BITS:
        value, bits = values.double(), _FLOAT32_FREE_BITS
    else:
        value, bits = (values - values.topk(k, 1).values[:, -1:]).sign().double(), _SIGN_FREE_BITS
    key = value.view(torch.int64)
    key |= torch.arange(2**bits - 1, 2**bits - 1 - m, -1, device=values.device)
    return key.topk(k, 1).indices


# The two levels of ``top_indices`` pay off once they spare a topk this many entries (a
# CPU measurement: their dozen small ops cost about what a topk over 2^16 entries does).
_TWO_LEVEL_MIN_SPARED = 1 << 16


def top_indices(abs_a: torch.Tensor, k: int) -> torch.Tensor:
    """r = n * S + s of the k largest entries of each channel of an (N, C, S) tensor
    (entries >= 0), ties to the lowest r: a (C, k) tensor.

    With many more than k rows a[n, c, :], two levels pick the same entries:
    rank the rows of a channel by their maximum, ties to the lowest n, and keep the first
    k; the k largest entries lie in them (an entry of a row ranked below k comes after the
    k kept maxima in the order by value, then lowest r); their k largest, taken in r order,
    are the answer.  Cost: an amax over the tensor and a topk over (C, k S) keys instead
    of one over (C, N S).  Under torch.compile the one-level form is traced: no size
    decision, so no guard on the batch size."""
    n, c, s = abs_a.shape
    if torch.compiler.is_compiling() or (n - k) * c * s < _TWO_LEVEL_MIN_SPARED:
        return top_columns(abs_a.transpose(0, 1).reshape(c, n * s), k)
    kept = top_columns(abs_a.amax(2).t(), k).sort(1).values  # (C, k): rows n, ascending
    candidates = abs_a[kept, torch.arange(c, device=abs_a.device).view(c, 1)].view(c, k * s)
    column = top_columns(candidates, k)
    return kept.gather(1, column // s) * s + column % s


def abs_sum(a: torch.Tensor, norm: str, k: int) -> torch.Tensor:
    """Per channel of an (N, C, S) tensor, the sum of |a| over the elements that define sigma:
    all of them (L1), the maximum (L-inf) or the k largest (Top-k), ties to the lowest
    r = n * S + s."""
    if norm == "l1":
        return a.abs().sum((0, 2))
    if norm == "linf":
        return max_abs(a)
    r = top_indices(a.detach().abs(), k)
    s = a.shape[2]
    return a[r // s, torch.arange(a.shape[1], device=a.device).view(-1, 1), r % s].abs().sum(1)


def statistics(x: torch.Tensor, norm: str, k: int, normalized: bool):
    """(mu, sigma, a) of an (N, C, *) tensor: mu of shape (1, C, 1), sigma (C,) and
    a = x - mu as (N, C, S), in the accumulator dtype."""
    view = channel_view(x)
    mean, a = centred(view)
    n = view.shape[0] * view.shape[2]
    # n may be symbolic under torch.compile / export: a tensor there, as c_linf of a
    # symbolic int would specialize the batch size
    count = n if norm == "l1" or not torch.compiler.is_compiling() else view.new_ones(()) * n
    return mean, dispersion_coefficient(norm, count, k, normalized) * abs_sum(a, norm, k), a


def batch_statistics(x: torch.Tensor, norm: str, k: int, normalized: bool):
    """(mean, sigma) per channel of an (N, C, *) tensor, in the accumulator dtype."""
    mean, dev, _ = statistics(x, norm, k, normalized)
    return mean.view(-1), dev


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
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = NEGATIVE_SLOPE,
) -> torch.Tensor:
    """out = act(gamma * (x - mu) / (sigma + eps) + beta + residual); arguments are
    validated by the caller.

    With ``batch_stats`` the statistics come from the batch and the running buffers (if
    given) are updated in place; otherwise the running buffers are used.  The normalized
    value, the residual (converted to it) and the activation (``reference.activation``)
    are computed in the accumulator dtype, and rounded once to x's dtype at the end, as the
    kernels do; no residual / activation=None leave those steps out."""
    if batch_stats:
        mean, dev, a = statistics(x, norm, k, normalized)
        if running_mean is not None:
            for running, batch in ((running_mean, mean.view(-1)), (running_dev, dev)):
                update_running(running, batch, momentum=momentum, num_batches_tracked=num_batches_tracked)
    else:
        view = channel_view(x)
        mean, dev = running_mean.to(view.dtype).view(1, -1, 1), running_dev.to(view.dtype)
        a = view - mean
    scale = (dev + eps).reciprocal()
    if weight is not None:
        scale = scale * weight
    y = a * scale.view(1, -1, 1)
    if bias is not None:
        y += bias.to(y.dtype).view(1, -1, 1)  # in place: one tensor fewer; beta in y's dtype, as in the kernels
    y = y.view(x.shape)
    if residual is not None:
        y += residual.to(y.dtype)  # in place: y keeps x's memory format whatever the residual's
    return activate(y, activation, negative_slope).to(x.dtype)
