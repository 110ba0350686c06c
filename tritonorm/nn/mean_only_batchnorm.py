"""Mean-only batch normalization layers: y = x - mu + beta ("Weight Normalization",
Salimans & Kingma 2016, section 3), the batch norm that "Norm matters" (Hoffer et al.
2018) pairs with (bounded) weight norm, which then carries the scale.

Each behaves like the ``nn.BatchNorm`` of the same dimension without the division and the
gamma: training uses the batch mean and updates ``running_mean`` (torch's momentum
convention, momentum=None for a cumulative average), eval uses ``running_mean``, and
``track_running_stats=False`` always uses the batch.  ``affine=True`` gives the learnable
beta (``bias``) only: a scale would duplicate the weight norm's gain in front of the layer
(``weight`` is None, as in an nn.BatchNorm with affine=False).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_bool, check_int, check_layer_input, check_momentum
from .._dispatch import check_backend

__all__ = ["MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d"]


class _MeanOnlyBatchNorm(nn.Module):
    """Shared implementation over an (N, C, *) view; subclasses set ndim."""

    _ndims: tuple[int, ...]

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_int("num_features", num_features)
        check_momentum(momentum)
        check_bool("affine", affine)
        check_bool("track_running_stats", track_running_stats)
        check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        self.register_parameter("weight", None)
        if affine:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return _mean_only_layer(
            input, self.bias, self.running_mean, self.num_batches_tracked, layer=type(self).__name__,
            ndims=self._ndims, num_features=self.num_features, training=self.training,
            track_running_stats=self.track_running_stats, momentum=self.momentum, backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, " \
            f"track_running_stats={self.track_running_stats}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def _mean_only_layer(
    input, bias, running_mean, num_batches_tracked, *, layer: str, ndims: tuple[int, ...], num_features: int,
    training: bool, track_running_stats: bool, momentum, backend: str,
) -> Tensor:
    """The layer's input checks, then nn.BatchNorm's use of the buffers; a ``torch.fx.wrap``
    leaf, as the Lp layers' forward."""
    check_layer_input(input, layer, ndims, num_features)
    tracked = not training or track_running_stats
    return F._mean_only_batch_norm(
        input, running_mean=running_mean if tracked else None, bias=bias, training=training or not track_running_stats,
        momentum=momentum, num_batches_tracked=num_batches_tracked, backend=backend,
        count_batch=training and track_running_stats,
    )


torch.fx.wrap("_mean_only_layer")


_DOC = """Mean-only batch norm over {shape} input: y = x - mu + beta, mu the channel's mean
    (the batch's in training, ``running_mean`` in eval); nn.BatchNorm{nd} without the
    division by the standard deviation and without gamma, meant to follow a layer with
    (bounded) weight norm ("Norm matters", Hoffer et al. 2018), whose gain sets the scale.

    Args:
        num_features: C, the number of channels (dim 1).
        momentum: running_mean = (1 - momentum) * running_mean + momentum * batch mean;
            None for the cumulative average.
        affine: a learnable beta (``bias``, zeros); there is no gamma (``weight`` is None).
        track_running_stats: keep ``running_mean`` and use it in eval; False always uses
            the batch.
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".
        device, dtype: of the parameter and buffers.

    Shape:
        input and output: {shape}, the same.

    Example::

        >>> bn = tritonorm.{name}({channels})
        >>> x = torch.randn({example_shape})
        >>> y = bn(x)          # x minus its per-channel batch mean, plus beta
    """

_SHAPES = {
    1: ("(N, C) or (N, C, L)", "1d", "4, 3"),
    2: ("(N, C, H, W)", "2d", "4, 16, 8, 8"),
    3: ("(N, C, D, H, W)", "3d", "2, 16, 4, 4, 4"),
}


def _document(cls: type, nd: int) -> type:
    shape, suffix, example_shape = _SHAPES[nd]
    cls.__doc__ = _DOC.format(shape=shape, nd=suffix, name=cls.__name__, channels=example_shape.split(", ")[1],
                              example_shape=example_shape)
    return cls


class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    _ndims = (2, 3)


class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    _ndims = (4,)


class MeanOnlyBatchNorm3d(_MeanOnlyBatchNorm):
    _ndims = (5,)


for _nd, _cls in enumerate((MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d), 1):
    _document(_cls, _nd)
