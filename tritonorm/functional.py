"""One public function per operation: validates its arguments, then dispatches to the
Triton kernels (``tritonorm.ops``) or the PyTorch reference (``tritonorm.reference``).

Every function takes ``backend="auto" | "triton" | "torch"``; see ``tritonorm._dispatch``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._dispatch import TRITON_AVAILABLE, resolve_backend
from .reference import lp_batchnorm as _lp_ref

if TRITON_AVAILABLE:
    from .kernels.lp_batchnorm import MAX_K as _TRITON_MAX_K
    from .ops import lp_batchnorm as _lp_ops
    from .ops import running_stats as _running_ops

__all__ = ["l1_batch_norm", "linf_batch_norm", "topk_batch_norm"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_input(input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *), got a {input.dim()}-d tensor of shape {tuple(input.shape)}")


def _check_channel_tensor(name: str, t, input: Tensor) -> None:
    if t is None:
        return
    c = input.shape[1]
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) for input with {c} channels, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != input.device:
        raise ValueError(f"{name} is on {t.device} but input is on {input.device}")


def _lp_batch_norm(
    input, running_mean, running_dev, weight, bias, training, momentum, eps, norm, k, normalized,
    num_batches_tracked, backend,
) -> Tensor:
    _check_input(input)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_dev", running_dev)):
        _check_channel_tensor(name, t, input)
    if (running_mean is None) != (running_dev is None):
        raise ValueError("running_mean and running_dev must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_dev are required when training=False")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    n = input.numel() // input.shape[1] if input.shape[1] else 0
    update = training and running_mean is not None
    if update and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    if norm == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if training:
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}"
            )
        if norm == "topk" and k > n:
            raise ValueError(f"k={k} is larger than the {n} values per channel of input {tuple(input.shape)}")

    chosen = resolve_backend(backend, input)
    if chosen == "triton" and norm == "topk" and k > _TRITON_MAX_K:
        if backend == "triton":
            raise ValueError(f"backend='triton' takes k <= {_TRITON_MAX_K}, got k={k}; use backend='torch'")
        chosen = "torch"  # "auto": the kernels keep k candidates in registers
    if chosen == "torch" or input.numel() == 0:
        return _lp_ref.lp_batch_norm(
            input, running_mean, running_dev, weight, bias, training, momentum, float(eps), norm, k, normalized,
            num_batches_tracked,
        )
    y, mean, dev, *_ = _lp_ops.lp_batch_norm(
        input, weight, bias, running_mean, running_dev, training, float(eps), norm, k, normalized,
    )
    if update:
        _running_ops.update_running_stats(
            running_mean, running_dev, mean, dev, num_batches_tracked if momentum is None else None,
            None if momentum is None else float(momentum),
        )
    return y


def l1_batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_dev: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    normalized: bool = True,
    num_batches_tracked: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """L1 batch norm: y = gamma * (x - mu) / (sigma + eps) + beta, sigma = sqrt(pi/2) * mean|x - mu|.

    Arguments follow ``torch.nn.functional.batch_norm`` (``running_dev`` holds sigma where
    batch norm holds the variance).  In training the batch statistics are used and the
    running buffers, if given, are updated in place:
    running = (1 - momentum) * running + momentum * batch, or with momentum=None the
    cumulative average over ``num_batches_tracked`` (the caller increments it first).
    ``normalized=False`` drops the constant sqrt(pi/2)."""
    return _lp_batch_norm(
        input, running_mean, running_dev, weight, bias, training, momentum, eps, "l1", 0, normalized,
        num_batches_tracked, backend,
    )


def linf_batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_dev: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    normalized: bool = True,
    num_batches_tracked: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """L-inf batch norm: sigma = Cinf(n) * max|x - mu| over the n values of a channel,
    Cinf(n) = (1 + sqrt(pi ln 4)) / (2 sqrt(2 ln n)).  Otherwise as ``l1_batch_norm``."""
    return _lp_batch_norm(
        input, running_mean, running_dev, weight, bias, training, momentum, eps, "linf", 1, normalized,
        num_batches_tracked, backend,
    )


def topk_batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_dev: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    k: int = 10,
    normalized: bool = True,
    num_batches_tracked: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Top-k batch norm: sigma = Cinf(n) * (mean of the k largest |x - mu|), ties broken
    by the lowest index.  The Triton path takes k <= 64.  Otherwise as ``l1_batch_norm``."""
    return _lp_batch_norm(
        input, running_mean, running_dev, weight, bias, training, momentum, eps, "topk", k, normalized,
        num_batches_tracked, backend,
    )
