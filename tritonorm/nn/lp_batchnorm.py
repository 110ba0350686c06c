"""L1, L-inf and Top-k batch normalization layers ("Norm matters", Hoffer et al. 2018),
drop-in for nn.BatchNorm*d.

Each behaves like the ``nn.BatchNorm`` of the same dimension: training uses the batch
statistics and updates ``running_mean`` / ``running_dev`` (torch's momentum convention,
momentum=None for a cumulative average), eval uses the running statistics, and
``track_running_stats=False`` always uses the batch.  The difference is the dispersion:
``running_dev`` holds sigma (not a variance), and sigma is the scaled mean absolute
deviation (L1), maximum absolute deviation (L-inf) or mean of the k largest absolute
deviations (Top-k); see ``tritonorm.reference.lp_batchnorm`` for the math.

Each layer can also fuse what follows a batch norm in a network: ``activation=`` (one of
``tritonorm.ACTIVATIONS``) and, at the call, ``layer(x, residual=identity)``, computing
act(bn(x) + residual) in the same pass (``tritonorm.reference.activation`` has the math).

The layers load an ``nn.BatchNorm`` state_dict (a pretrained model's, through
``model.load_state_dict``): ``running_var`` becomes ``running_dev`` by
``running_dev_from_var``, the map ``tritonorm.convert`` uses, with a UserWarning.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import (
    check_activation,
    check_bool,
    check_eps,
    check_int,
    check_layer_input,
    check_momentum,
    check_process_group,
)
from .._dispatch import check_backend
from ..sync_batchnorm import active_group

__all__ = [
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "TopkBatchNorm1d", "TopkBatchNorm2d", "TopkBatchNorm3d",
    "SyncL1BatchNorm", "SyncLinfBatchNorm", "SyncTopkBatchNorm",
]


@torch.no_grad()
def running_dev_from_var(running_var: Tensor, eps: float) -> Tensor:
    """The ``running_dev`` that gives an Lp layer nn.BatchNorm's eval output:

        running_dev = sqrt(running_var + eps) - eps

    so that gamma (x - mu) / (running_dev + eps) + beta is the BatchNorm's
    gamma (x - mu) / sqrt(running_var + eps) + beta.  The Lp dispersions are scaled to
    estimate the standard deviation of Gaussian data, so sqrt(running_var) is their
    consistent estimate.  Computed in float64, returned in ``running_var``'s dtype and
    device; ``tritonorm.convert`` and the layers' state_dict loading both use it.
    """
    return ((running_var.double() + eps).sqrt() - eps).to(running_var.dtype)


class _LpBatchNorm(nn.Module):
    """Shared implementation over an (N, C, *) view; subclasses set the norm and ndim."""

    _norm: str
    _ndims: tuple[int, ...]
    # the synchronized layers' (``_Synchronized``): statistics over a process group in training
    _synchronized = False
    process_group = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        normalized: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
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
        check_activation(activation, negative_slope)
        check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.normalized = normalized
        self.activation = activation
        self.negative_slope = negative_slope
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """Load this layer's own state_dict as nn.Module does, and an nn.BatchNorm's too.

        A checkpoint holding ``running_var`` and no ``running_dev`` for this layer (an
        nn.BatchNorm's, e.g. a pretrained model's loaded into the same architecture built
        with ``norm_layer=L1BatchNorm2d``) has its ``running_var`` loaded as

            running_dev = sqrt(running_var + eps) - eps        (``running_dev_from_var``)

        with this layer's eps, so that the eval output is the BatchNorm's (to rounding) when
        the eps is the BatchNorm's, and a UserWarning (one message for every layer: Python's
        default filter shows it once).  As nn.BatchNorm does for checkpoints of torch < 0.4.1, such a checkpoint
        without ``num_batches_tracked`` (metadata version None or < 2) keeps the layer's
        count.  Everything else is nn.Module's strict loading: a missing key, a wrong shape
        (of ``running_var``: reported for ``running_dev``, which it becomes), an unexpected
        key; a checkpoint with both ``running_var`` and ``running_dev`` loads
        ``running_dev`` and reports ``running_var`` as unexpected.
        """
        var_key, dev_key = prefix + "running_var", prefix + "running_dev"
        running_var = state_dict.get(var_key)
        if self.track_running_stats and isinstance(running_var, Tensor) and dev_key not in state_dict:
            state_dict[dev_key] = running_dev_from_var(state_dict.pop(var_key), self.eps)
            count_key = prefix + "num_batches_tracked"
            version = local_metadata.get("version")
            if (version is None or version < 2) and count_key not in state_dict:
                count = self.num_batches_tracked
                state_dict[count_key] = count if count.device.type != "meta" else torch.tensor(0, dtype=torch.long)
            warnings.warn(_BATCHNORM_LOAD_WARNING, UserWarning, stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        return _lp_batch_norm_layer(
            input, self.weight, self.bias, self.running_mean, self.running_dev, self.num_batches_tracked,
            layer=type(self).__name__, ndims=self._ndims, num_features=self.num_features, training=self.training,
            track_running_stats=self.track_running_stats, momentum=self.momentum, eps=self.eps, norm=self._norm,
            normalized=self.normalized, residual=residual, activation=self.activation,
            negative_slope=self.negative_slope, backend=self.backend, synchronized=self._synchronized,
            process_group=self.process_group, **self._extra_args(),
        )

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self._extra_args().items())
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}{extra}"
        )
        if not self.normalized:
            s += ", normalized=False"
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        if self.negative_slope != 0.01:
            s += f", negative_slope={self.negative_slope}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


# One message for every layer, so that Python's default filter shows it once for a whole
# model (once per process and location, as any warning).
_BATCHNORM_LOAD_WARNING = (
    "load_state_dict: an nn.BatchNorm checkpoint's running_var was loaded into an Lp batch norm as running_dev = "
    "sqrt(running_var + eps) - eps: the eval output is the BatchNorm's, and running_dev is the BatchNorm's estimate "
    "of the dispersion, not the layer's own (train, or run tritonorm.recalibrate(model, data), to get the layer's)"
)


def _lp_batch_norm_layer(
    input, weight, bias, running_mean, running_dev, num_batches_tracked, *, layer: str, ndims: tuple[int, ...],
    num_features: int, training: bool, track_running_stats: bool, k: int = 0, synchronized: bool = False,
    process_group=None, **options,
) -> Tensor:
    """The forward of every Lp layer: its own input checks, then nn.BatchNorm's use of the
    buffers (batch statistics in training or without running statistics; the running ones
    updated in training, num_batches_tracked counted once every check has passed), and
    nn.SyncBatchNorm's synchronization (in training, over a group of more than one
    process).  A ``torch.fx.wrap`` leaf, so that torch.fx records the layer's call, not
    its checks."""
    check_layer_input(input, layer, ndims, num_features)
    tracked = not training or track_running_stats
    return F._lp_batch_norm(
        input, running_mean=running_mean if tracked else None, running_dev=running_dev if tracked else None,
        weight=weight, bias=bias, training=training or not track_running_stats, k=k,
        num_batches_tracked=num_batches_tracked, count_batch=training and track_running_stats,
        sync_group=active_group(process_group) if synchronized and training else None, **options,
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


_DOC = """{title} batch norm over {shape} input, nn.BatchNorm{nd}'s drop-in: it divides by

        sigma = {sigma}

    instead of the standard deviation, and can fuse an activation and a residual add:
    out = act(gamma * (x - mu) / (sigma + eps) + beta + residual).

    Args:
        num_features: C, the number of channels (dim 1).
        eps: added to sigma (not to a variance), as nn.BatchNorm adds it to the variance.
        momentum: running = (1 - momentum) * running + momentum * batch; None for the
            cumulative average.
        affine: learnable gamma (``weight``, ones) and beta (``bias``, zeros).
        track_running_stats: keep ``running_mean`` / ``running_dev`` (sigma) and use them in
            eval; False always uses the batch.{k_arg}
        normalized: keep the constant that makes sigma the standard deviation of Gaussian
            data (False: sigma = {plain}).
        activation: None, or the activation applied after the (residual add and the)
            normalization, in the same pass: one of ``tritonorm.ACTIVATIONS``, "relu",
            "leaky_relu", "silu", "gelu", "gelu_tanh" (nn.GELU(approximate="tanh")),
            "hardswish".
        negative_slope: the slope of "leaky_relu" for z < 0 (nn.LeakyReLU's, 0.01).
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".
        device, dtype: of the parameters and buffers.

    Forward: ``layer(input, residual=None)``; ``residual``, if given, is added to the
    normalized value before the activation and receives a gradient: in the same pass when
    it has input's shape, dtype and device (any memory layout), else after it, as torch
    adds it (broadcasting and type promotion included).

    Shape:
        input, residual and output: {shape}, all three the same.

    Example::

        >>> bn = tritonorm.{name}({example})
        >>> x = torch.randn({example_shape})
        >>> y = bn(x)                                  # relu(bn(x))
        >>> y = bn(x, residual=torch.randn_like(x))    # relu(bn(x) + residual), in one pass
    """

_SIGMAS = {
    "L1": "sqrt(pi/2) * mean|x - mu|",
    "L-inf": "Cinf(n) * max|x - mu|",
    "Top-k": "Cinf(n) * (mean of the k largest |x - mu|)",
}
_SHAPES = {
    1: ("(N, C) or (N, C, L)", "1d", "4, 3"),
    2: ("(N, C, H, W)", "2d", "4, 16, 8, 8"),
    3: ("(N, C, D, H, W)", "3d", "2, 16, 4, 4, 4"),
}


def _document(cls: type, title: str, nd: int) -> type:
    shape, suffix, example_shape = _SHAPES[nd]
    topk = title == "Top-k"
    channels = example_shape.split(", ")[1]
    cls.__doc__ = _DOC.format(
        title=title, shape=shape, nd=suffix, sigma=_SIGMAS[title], name=cls.__name__,
        k_arg="\n        k: how many of the largest |x - mu| define sigma (10; the Triton path takes k <= 64;\n"
              "            training needs k values or more per channel)." if topk else "",
        plain={"L1": "mean|x - mu|", "L-inf": "max|x - mu|", "Top-k": "the mean of the k largest |x - mu|"}[title],
        example=f"{channels}, {'k=3, ' if topk else ''}activation=\"relu\"", example_shape=example_shape,
    )
    return cls


class L1BatchNorm1d(_L1):
    _ndims = _1D


class L1BatchNorm2d(_L1):
    _ndims = _2D


class L1BatchNorm3d(_L1):
    _ndims = _3D


class LinfBatchNorm1d(_Linf):
    _ndims = _1D


class LinfBatchNorm2d(_Linf):
    _ndims = _2D


class LinfBatchNorm3d(_Linf):
    _ndims = _3D


class TopkBatchNorm1d(_Topk):
    _ndims = _1D


class TopkBatchNorm2d(_Topk):
    _ndims = _2D


class TopkBatchNorm3d(_Topk):
    _ndims = _3D


for _title, _classes in (("L1", (L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d)),
                         ("L-inf", (LinfBatchNorm1d, LinfBatchNorm2d, LinfBatchNorm3d)),
                         ("Top-k", (TopkBatchNorm1d, TopkBatchNorm2d, TopkBatchNorm3d))):
    for _nd, _cls in enumerate(_classes, 1):
        _document(_cls, _title, _nd)
del _title, _classes, _nd, _cls


class _Synchronized(_LpBatchNorm):
    """The synchronized layers: statistics over ``process_group`` in training."""

    _synchronized = True
    _ndims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, **kwargs):
        check_process_group(process_group, none="the default group")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.process_group = process_group

    @classmethod
    def like(cls, layer: _LpBatchNorm, process_group=None) -> _Synchronized:
        """The synchronized form of ``layer``: its settings and training mode, and its very
        parameters and buffers (shared, not copied), as
        nn.SyncBatchNorm.convert_sync_batchnorm makes it."""
        options = dict(normalized=layer.normalized, activation=layer.activation, negative_slope=layer.negative_slope,
                       backend=layer.backend, **layer._extra_args())
        sync = cls(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                   process_group, device="meta", **options)
        sync._parameters.update(layer._parameters)
        sync._buffers.update(layer._buffers)
        return sync.train(layer.training)


class SyncL1BatchNorm(_Synchronized, _L1):
    pass


class SyncLinfBatchNorm(_Synchronized, _Linf):
    pass


class SyncTopkBatchNorm(_Synchronized, _Topk):
    pass


# the synchronized class of each norm, for convert_sync_batchnorm
SYNC_CLASSES = {"l1": SyncL1BatchNorm, "linf": SyncLinfBatchNorm, "topk": SyncTopkBatchNorm}

_SYNC_DOC = """{title} batch norm synchronized over processes, nn.SyncBatchNorm's counterpart: in
    training the statistics are those of the whole batch across ``process_group`` (every
    process's batch, concatenated in rank order), so each process's output, gradients and
    running statistics are those of one process running {plain} on the whole batch.

        sigma = {sigma}

    Takes (N, C, *) input of 2 to 5 dimensions, as nn.SyncBatchNorm.  In eval, or when
    torch.distributed is not initialized or the group holds one process, it is {plain}
    without communication.  Batch sizes may differ between processes, and a process may
    have an empty batch.  Cost (``tritonorm.sync_batchnorm``): {collectives} per forward and
    one all_reduce of 2C values per backward (W processes, C channels; gathered values are
    8-byte words, reduced ones in the accumulator dtype); under torch.compile the layer
    runs eagerly (a graph break), as its collectives sit between its kernels.

    Args:
        num_features, eps, momentum, affine, track_running_stats: as {plain}.
        process_group: the group to synchronize over; None for the default group.{k_arg}
        normalized, activation, negative_slope, backend, device, dtype: as {plain}.

    Forward: ``layer(input, residual=None)``, as {plain}.

    Shape:
        input, residual and output: (N, C, *), 2 to 5 dimensions, all three the same.

    Example::

        >>> model = tritonorm.convert_sync_batchnorm(model)   # every {plain} -> {name}
        >>> model = nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    """

for _cls, _title, _plain, _collectives in (
    (SyncL1BatchNorm, "L1", "L1BatchNorm2d", "an all_gather of W x (1 + C) values and an all_reduce of 2C"),
    (SyncLinfBatchNorm, "L-inf", "LinfBatchNorm2d", "one all_gather of W x (1 + 5C) values"),
    (SyncTopkBatchNorm, "Top-k", "TopkBatchNorm2d", "one all_gather of W x (1 + C + 4Ck) values"),
):
    _cls.__doc__ = _SYNC_DOC.format(
        title=_title, plain=_plain.replace("2d", "1d/2d/3d"), sigma=_SIGMAS[_title], name=_cls.__name__,
        collectives=_collectives, k_arg="\n        k: how many of the largest |x - mu| define sigma (10), over the "
        "whole batch." if _title == "Top-k" else "",
    )
del _cls, _title, _plain, _collectives
