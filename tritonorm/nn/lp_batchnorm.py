"""L1, L-inf and Top-k batch normalization layers ("Norm matters", Hoffer et al. 2018),
drop-in for nn.BatchNorm*d.

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
from .._checks import check_bool, check_eps, check_int, check_momentum
from .._dispatch import check_backend

__all__ = [
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "TopkBatchNorm1d", "TopkBatchNorm2d", "TopkBatchNorm3d",
]


class _LpBatchNorm(nn.Module):
    """Shared implementation over an (N, C, *) view; subclasses set the norm and ndim."""

    _norm: str
    _ndims: tuple[int, ...]

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
        check_int("num_features", num_features)
        check_eps(eps, positive=False)
        check_momentum(momentum)
        for name, flag in (("affine", affine), ("track_running_stats", track_running_stats),
                           ("normalized", normalized)):
            check_bool(name, flag)
        check_backend(backend)
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

    def _extra_args(self) -> dict:
        return {}

    def forward(self, input: Tensor) -> Tensor:
        return _lp_batch_norm_layer(
            input, self.weight, self.bias, self.running_mean, self.running_dev, self.num_batches_tracked,
            layer=type(self).__name__, ndims=self._ndims, num_features=self.num_features, training=self.training,
            track_running_stats=self.track_running_stats, momentum=self.momentum, eps=self.eps, norm=self._norm,
            normalized=self.normalized, backend=self.backend, **self._extra_args(),
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


def _lp_batch_norm_layer(
    input, weight, bias, running_mean, running_dev, num_batches_tracked, *, layer: str, ndims: tuple[int, ...],
    num_features: int, training: bool, track_running_stats: bool, k: int = 0, **options,
) -> Tensor:
    """The forward of every Lp layer: its own input checks, then nn.BatchNorm's use of the
    buffers (batch statistics in training or without running statistics; the running ones
    updated in training, num_batches_tracked counted once every check has passed).  A
    ``torch.fx.wrap`` leaf, so that torch.fx records the layer's call, not its checks."""
    if isinstance(input, Tensor):  # anything else: F._lp_batch_norm's TypeError
        if input.dim() not in ndims:
            expected = " or ".join(f"{d}-d" for d in ndims)
            raise ValueError(f"{layer} expects {expected} input, got {input.dim()}-d input")
        if input.shape[1] != num_features:
            raise ValueError(
                f"{layer}({num_features}) expects {num_features} channels (dim 1), got input of shape "
                f"{tuple(input.shape)}"
            )
    tracked = not training or track_running_stats
    return F._lp_batch_norm(
        input, running_mean=running_mean if tracked else None, running_dev=running_dev if tracked else None,
        weight=weight, bias=bias, training=training or not track_running_stats, k=k,
        num_batches_tracked=num_batches_tracked, count_batch=training and track_running_stats, **options,
    )


torch.fx.wrap("_lp_batch_norm_layer")


class _L1(_LpBatchNorm):
    _norm = "l1"


class _Linf(_LpBatchNorm):
    _norm = "linf"


class _Topk(_LpBatchNorm):
    _norm = "topk"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, k: int = 10, **kwargs):
        self.k = check_int("k", k)
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
