"""L1, L-inf and Top-k batch normalization layers (seed 001), drop-in for nn.BatchNorm*d.

Each behaves like the ``nn.BatchNorm`` of the same dimension: training uses the batch
statistics and updates ``running_mean`` / ``running_dev`` (torch's momentum convention,
momentum=None for a cumulative average), eval uses the running statistics, and
``track_running_stats=False`` always uses the batch.  The difference is the dispersion:
``running_dev`` holds sigma (not a variance), and sigma is the scaled mean absolute
deviation (L1), maximum absolute deviation (L-inf) or mean of the k largest absolute
deviations (Top-k); see ``tritonorm.reference.lp_batchnorm`` for the math.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F

__all__ = [
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "TopkBatchNorm1d", "TopkBatchNorm2d", "TopkBatchNorm3d",
]


class _LpBatchNorm(nn.Module):
    """Shared implementation over an (N, C, *) view; subclasses set the norm and ndim."""

    _norm: str
    _ndims: tuple[int, ...]
    _functional = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        normalized: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.normalized = normalized
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_dev", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_dev", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_dev.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._ndims:
            expected = " or ".join(f"{d}-d" for d in self._ndims)
            raise ValueError(f"{type(self).__name__} expects {expected} input, got {input.dim()}-d input")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels "
                f"(dim 1), got input of shape {tuple(input.shape)}"
            )

    def _extra_args(self) -> dict:
        return {}

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        batch_stats = self.training or not self.track_running_stats
        tracked = not self.training or self.track_running_stats
        return type(self)._functional(
            input,
            self.running_mean if tracked else None,
            self.running_dev if tracked else None,
            self.weight,
            self.bias,
            batch_stats,
            self.momentum,
            self.eps,
            normalized=self.normalized,
            num_batches_tracked=self.num_batches_tracked,
            backend=self.backend,
            **self._extra_args(),
        )

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self._extra_args().items())
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}{extra}"
        )
        if not self.normalized:
            s += ", normalized=False"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


class _L1(_LpBatchNorm):
    _functional = staticmethod(F.l1_batch_norm)


class _Linf(_LpBatchNorm):
    _functional = staticmethod(F.linf_batch_norm)


class _Topk(_LpBatchNorm):
    _functional = staticmethod(F.topk_batch_norm)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, k: int = 10, **kwargs):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = k
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)

    def _extra_args(self) -> dict:
        return {"k": self.k}


_1D, _2D, _3D = (2, 3), (4,), (5,)


class L1BatchNorm1d(_L1):
    """L1 batch norm over (N, C) or (N, C, L) input; see the module docstring."""
    _ndims = _1D


class L1BatchNorm2d(_L1):
    """L1 batch norm over (N, C, H, W) input; see the module docstring."""
    _ndims = _2D


class L1BatchNorm3d(_L1):
    """L1 batch norm over (N, C, D, H, W) input; see the module docstring."""
    _ndims = _3D


class LinfBatchNorm1d(_Linf):
    """L-inf batch norm over (N, C) or (N, C, L) input; see the module docstring."""
    _ndims = _1D


class LinfBatchNorm2d(_Linf):
    """L-inf batch norm over (N, C, H, W) input; see the module docstring."""
    _ndims = _2D


class LinfBatchNorm3d(_Linf):
    """L-inf batch norm over (N, C, D, H, W) input; see the module docstring."""
    _ndims = _3D


class TopkBatchNorm1d(_Topk):
    """Top-k batch norm over (N, C) or (N, C, L) input (k=10 by default)."""
    _ndims = _1D


class TopkBatchNorm2d(_Topk):
    """Top-k batch norm over (N, C, H, W) input (k=10 by default)."""
    _ndims = _2D


class TopkBatchNorm3d(_Topk):
    """Top-k batch norm over (N, C, D, H, W) input (k=10 by default)."""
    _ndims = _3D
