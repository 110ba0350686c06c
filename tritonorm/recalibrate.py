"""``tritonorm.recalibrate``: recompute a model's running statistics from data, and
``tritonorm.NORM_CLASSES``, the tritonorm layers that weight-decay and freeze code treats
as norm layers.

``torch.optim.swa_utils.update_bn`` and the precise-BN helpers recompute only
``nn.BatchNorm``'s statistics (they look for ``_BatchNorm``); ``recalibrate`` does the same
for every layer with running statistics, tritonorm's and torch's.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from ._checks import check_int
from .nn.equinorm import _EquiNorm
from .nn.lp_batchnorm import (
    L1BatchNorm1d,
    L1BatchNorm2d,
    L1BatchNorm3d,
    LinfBatchNorm1d,
    LinfBatchNorm2d,
    LinfBatchNorm3d,
    SyncL1BatchNorm,
    SyncLinfBatchNorm,
    SyncTopkBatchNorm,
    TopkBatchNorm1d,
    TopkBatchNorm2d,
    TopkBatchNorm3d,
    _LpBatchNorm,
)
from .nn.mean_only_batchnorm import MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d, _MeanOnlyBatchNorm

__all__ = ["NORM_CLASSES", "recalibrate"]

NORM_CLASSES: tuple[type[nn.Module], ...] = (
    L1BatchNorm1d, L1BatchNorm2d, L1BatchNorm3d,
    LinfBatchNorm1d, LinfBatchNorm2d, LinfBatchNorm3d,
    TopkBatchNorm1d, TopkBatchNorm2d, TopkBatchNorm3d,
    SyncL1BatchNorm, SyncLinfBatchNorm, SyncTopkBatchNorm,
    MeanOnlyBatchNorm1d, MeanOnlyBatchNorm2d, MeanOnlyBatchNorm3d,
)
"""The tritonorm layers that are norm layers in the sense of weight-decay and freeze code:
the L1 / L-inf / Top-k batch norms and their synchronized forms, and the mean-only batch norms, whose parameters
(gamma, beta; beta only for mean-only) and buffers play the roles of nn.BatchNorm's.  Add them where such code
lists torch's norm classes, e.g.
``torchvision.ops._utils.split_normalization_params(model, norm_classes=[...,
*tritonorm.NORM_CLASSES])`` to exempt them from weight decay, or ``isinstance(m,
(nn.modules.batchnorm._BatchNorm, *tritonorm.NORM_CLASSES))`` in freeze code.

The EquiNorm layers are not in it: they are convolutions (linear maps) with a normalized
weight, and code that exempts a norm layer's every parameter from weight decay would
exempt their convolution weight, which the conv + BatchNorm they replace decays.  Their
``gain`` and ``bias`` are 1-d, like a BatchNorm's, so rules by dimension (timm's
``param_groups_weight_decay``: no decay for 1-d parameters) treat them right; they freeze
by ``fold_equinorm``."""


def _has_running_stats(module: nn.Module) -> bool:
    if isinstance(module, (_LpBatchNorm, _MeanOnlyBatchNorm, _BatchNorm)):
        return module.track_running_stats
    return isinstance(module, _EquiNorm)


def recalibrate(model: nn.Module, data: Iterable, num_batches: int | None = None, *, device=None) -> None:
    """Recompute, in place, the running statistics of every layer of ``model`` that keeps
    them, as the cumulative average over the batches of ``data``:

        running = (1 / B) * sum over the batches b = 1..B of stat_b

    for the batch statistics stat_b each layer computes in training (mean and sigma for
    the L1 / L-inf / Top-k batch norms, the mean for the mean-only ones, the input mean for EquiNorm, mean and unbiased
    variance for torch's), ``num_batches_tracked`` = B; what
    ``torch.optim.swa_utils.update_bn`` does for nn.BatchNorm, for these layers too: after
    weight averaging (SWA, EMA), pruning, or loading weights whose statistics do not fit
    (``running_dev`` loaded from an nn.BatchNorm checkpoint is the BatchNorm's estimate).

    The layers: the L1 / L-inf / Top-k and mean-only batch norms with ``track_running_stats=True``, the
    EquiNorm layers (their running input mean), and, as in update_bn, torch's batch norms
    with ``track_running_stats=True`` (nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm, the lazy
    ones: the subclasses of ``nn.modules.batchnorm._BatchNorm``).  Each has its statistics
    reset and its ``momentum`` set to None (the cumulative average).  Then, as update_bn
    does, the whole model runs on each batch in training mode under ``torch.no_grad()``:
    dropout is active, so the statistics are those that training gathers, and other state
    that a training forward updates is updated (nn.InstanceNorm's running statistics,
    which are left out: its ``momentum=None`` freezes them rather than averaging).
    Afterwards every ``momentum`` and every module's ``training`` flag are restored as they
    were, also when a batch raises (the statistics are then those of the batches run).

    Args:
        model: the nn.Module whose layers to recalibrate.
        data: an iterable of batches (a DataLoader, a list): each the model's input (a
            Tensor), or a tuple or list whose first element is, such as a DataLoader's
            (input, target).  A dict batch is a TypeError: pass the inputs, e.g.
            ``(batch["pixel_values"] for batch in loader)``.
        num_batches: stop after this many batches (a positive int); None runs all of
            ``data``.  A ``data`` shorter than ``num_batches`` gives a UserWarning.
        device: if given, each input tensor is moved there (``input.to(device)``) first.

    A ``model`` with no such layer is left alone, with a UserWarning, and ``data`` is not
    read.  An empty ``data`` is a ValueError raised before anything is changed.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), tritonorm.L1BatchNorm2d(8), nn.ReLU())
        >>> loader = [(torch.randn(16, 3, 8, 8), torch.zeros(16)) for _ in range(4)]
        >>> tritonorm.recalibrate(model, loader)
        >>> model[1].num_batches_tracked
        tensor(4)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches (a DataLoader, a list), got {type(data).__name__}")
    if num_batches is not None:
        check_int("num_batches", num_batches)
    layers = [m for m in model.modules() if _has_running_stats(m)]
    if not layers:
        warnings.warn(
            f"recalibrate: {type(model).__name__} has no layer with running statistics (tritonorm's batch norms "
            "and EquiNorm layers, torch's batch norms with track_running_stats=True); left as it was",
            UserWarning, stacklevel=2,
        )
        return
    batches = iter(data)
    first = next(batches, _END)
    if first is _END:
        raise ValueError(f"data: {type(data).__name__} gave no batch; recalibrate needs at least one")
    first = _model_input(first, device)  # a bad first batch raises before anything changes

    momenta = {layer: layer.momentum for layer in layers}
    flags = {module: module.training for module in model.modules()}
    inputs = itertools.chain([first], (_model_input(batch, device) for batch in batches))
    seen = 0
    try:
        for layer in layers:
            if not (isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params()):  # else reset when built
                layer.reset_running_stats()
            layer.momentum = None
        model.train()
        with torch.no_grad():
            for x in itertools.islice(inputs, num_batches):
                model(x)
                seen += 1
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, training in flags.items():
            module.training = training
    if num_batches is not None and seen < num_batches:
        warnings.warn(f"recalibrate: data gave {seen} batch(es), fewer than num_batches={num_batches}",
                      UserWarning, stacklevel=2)


_END = object()


def _model_input(batch, device):
    """The model's input in ``batch`` (its first element if a tuple or list), on ``device``."""
    if isinstance(batch, Mapping):
        raise TypeError(
            f"data: a batch is a {type(batch).__name__} (keys {', '.join(map(repr, list(batch)[:4]))}), and "
            "recalibrate cannot tell which entry is the model's input: pass the inputs, e.g. "
            "(batch['input'] for batch in loader)"
        )
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(f"data: a batch is an empty {type(batch).__name__}; expected (input, ...)")
        batch = batch[0]
    if device is not None:
        if not isinstance(batch, Tensor):
            raise TypeError(f"device: only a Tensor input can be moved to {device}, got {type(batch).__name__}")
        batch = batch.to(device)
    return batch
