"""Synchronized L1 / L-inf / Top-k batch norm over torch.distributed, and
``tritonorm.convert_sync_batchnorm``.

In training, each process computes the statistics of its own batch and packs them (stage
1), the collectives bring every process's pack to every process, each combines them into
the statistics of the whole batch, and normalizes its own batch by them (stage 2).  The
stages are the Triton kernels of ``kernels.sync_lp_batchnorm`` or the PyTorch code of
``reference.sync_lp_batchnorm`` (which has the math and the packed layout), function by
function; ``_statistics`` and ``_SyncLpBatchNorm`` run them in this order:

    L1           forward   pack_moments -> all_gather -> combine_moments -> abs_dev_sums
                           -> all_reduce -> l1_statistics -> normalize
    L-inf/Top-k  forward   pack_candidates -> all_gather -> select -> normalize
    backward               grad_sums -> all_reduce -> grad_coefficients -> grad_input

Collectives per layer and step, C channels, W processes, K = 1 (L-inf) or k (Top-k):

    L1           forward   all_gather  W x (1 + C)              count, mean
                           all_reduce  2C                       sum |x - mu|, sum sign(x - mu)
                 backward  all_reduce  2C                       sum dz, sum dz * (x - mu)
    L-inf/Top-k  forward   all_gather  W x (1 + C + 4CK)        count, mean, 2K candidates
                 backward  all_reduce  2C

(The gathers move 8-byte words, float64 counts and means, float64 values and int64
indices of the candidates; the all-reduces the accumulator dtype.)  nn.SyncBatchNorm moves
one all_gather of W x (2C + 1) forward and one all_reduce of 2C backward: L-inf and Top-k
synchronize as often, L1 once more (the mean must be known before sum |x - mu|).  Nothing
waits on the host: the counts of the other processes stay on the device, so uneven
batches, and a process with an empty batch, cost no sync; on the Triton path each combine
is one launch.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._checks import check_process_group
from .reference import accumulator_dtype
from .reference import sync_lp_batchnorm as _torch_stages
from .reference.lp_batchnorm import selected_count

try:
    from .kernels import sync_lp_batchnorm as _triton_stages
except ImportError:  # no triton: the PyTorch stages still work
    _triton_stages = None

__all__ = ["convert_sync_batchnorm"]


def active_group(process_group):
    """The process group to synchronize over (``process_group``, None for the default
    one), or None where there is nothing to synchronize: torch.distributed not
    initialized, or a group of one process (nn.SyncBatchNorm's rule)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its modules' process groups (``process_group``,
    of nn.SyncBatchNorm and tritonorm's layers): a ProcessGroup is a handle, which cannot
    be copied."""
    groups = [getattr(m, "process_group", None) for m in model.modules()]
    return copy.deepcopy(model, {id(g): g for g in groups if g is not None})


def _all_gather(t: Tensor, group) -> Tensor:
    """(W, *t.shape): every process's ``t``, in rank order (one collective)."""
    size = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)
    out = t.new_empty((size, *t.shape))
    dist.all_gather_into_tensor(out, t, group=group)
    return out


def _check_global(n: Tensor, count: int, norm: str, k: int) -> None:
    """nn.BatchNorm's training check, on the whole batch of n values per channel: more than
    one (and k for Top-k), else a ValueError.  Only a process with fewer than that itself
    (``count``) reads n on the host: the whole batch can only fall short where every
    process does, so every process raises the same error, and none waits on the device
    in the usual case."""
    need = max(2, k if norm == "topk" else 1)
    if count >= need or int(n.item()) >= need:
        return
    what = f"k={k} or more values per channel" if norm == "topk" else "more than 1 value per channel"
    raise ValueError(f"Expected {what} over the synchronized batch when training, got {int(n.item())}")


def _statistics(x: Tensor, weight, bias, eps: float, stages, group, norm: str, k: int, normalized: bool):
    """Stage 1, the collectives and the combine: (mean, sigma, wbar, affine, this process's
    selection (C, K) and its signs, n) of the whole batch, in the accumulator dtype.  A
    process with an empty batch packs and sums with the PyTorch stages, and combines as
    the others do (the same results, bit for bit, on every process)."""
    acc = accumulator_dtype(x.dtype)
    local = stages if x.numel() else _torch_stages
    count = x.numel() // x.shape[1]
    if norm == "l1":
        mean, n = stages.combine_moments(_all_gather(local.pack_moments(x), group), acc)
        _check_global(n, count, norm, k)
        sums = local.abs_dev_sums(x, mean)
        dist.all_reduce(sums, group=group)
        dev, wbar, affine = stages.l1_statistics(sums, mean, n, weight, bias, eps, normalized)
        sel_index = torch.empty((x.shape[1], 0), device=x.device, dtype=torch.int64)
        return mean, dev, wbar, affine, sel_index, torch.empty((x.shape[1], 0), device=x.device, dtype=acc), n
    gathered = _all_gather(local.pack_candidates(x, selected_count(norm, k)), group)
    statistics = stages.select(gathered, dist.get_rank(group), norm, k, weight, bias, eps, normalized, acc)
    _check_global(statistics[-1], count, norm, k)
    return statistics


class _SyncLpBatchNorm(torch.autograd.Function):
    """out = act(gamma * (x - mu) / (sigma + eps) + beta [+ residual]) with mu and sigma
    over the process group; returns (out, mean, sigma), the last two for the running
    statistics (not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, group, triton, norm, k, eps, normalized, activation, slope):
        stages = _triton_stages if triton else _torch_stages
        mean, dev, wbar, affine, sel_index, sel_sign, n = _statistics(x, weight, bias, eps, stages, group, norm, k,
                                                                      normalized)
        local = stages if x.numel() else _torch_stages
        out = local.normalize(x, mean, affine, residual, activation, slope)
        ctx.save_for_backward(x, weight, residual if activation is not None else None, mean, dev, wbar, affine,
                              sel_index, sel_sign, n)
        ctx.stages, ctx.group = stages, group
        ctx.options = dict(norm=norm, k=k, normalized=normalized, eps=eps, activation=activation, negative_slope=slope)
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(mean, dev)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
        return out, mean, dev

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_dev):
        x, weight, residual, mean, dev, wbar, affine, sel_index, sel_sign, n = ctx.saved_tensors
        o = ctx.options
        if grad_out is None:  # out reaches no loss here: the collective still runs, as on the other processes
            grad_out = torch.zeros_like(x)
        stages = ctx.stages
        local = stages if x.numel() else _torch_stages
        sums, dz, grad_weight, grad_bias = local.grad_sums(grad_out, x, mean, affine, residual, o["activation"],
                                                           o["negative_slope"], dev, o["eps"])
        dist.all_reduce(sums, group=ctx.group)
        coefs = stages.grad_coefficients(sums, dev, wbar, weight, n, o["norm"], o["k"], o["normalized"], o["eps"])
        need_res = ctx.needs_input_grad[3]
        dx, dres = local.grad_input(grad_out, dz, x, mean, affine, coefs, o["norm"], sel_index, sel_sign, residual,
                                    o["activation"], o["negative_slope"], need_res)
        if o["activation"] is None:
            dres = grad_out  # out = y + residual
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (
            dx if ctx.needs_input_grad[0] else None,
            grad_weight.to(weight_dtype) if ctx.needs_input_grad[1] else None,
            grad_bias.to(bias_dtype) if ctx.needs_input_grad[2] else None,
            dres if need_res else None,
            *(None,) * 8,
        )


@torch.compiler.disable  # collectives: torch.compile runs the layer eagerly (a graph break)
def sync_lp_batch_norm(x, weight, bias, residual, *, group, triton: bool, norm: str, k: int, eps: float,
                       normalized: bool, activation: str | None, negative_slope: float):
    """(out, mean, sigma) of a training step synchronized over ``group``; arguments are
    checked by the caller (``functional._lp_batch_norm``)."""
    return _SyncLpBatchNorm.apply(x, weight, bias, residual, group, triton, norm, k, eps, normalized, activation,
                                  negative_slope)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every L1 / L-inf / Top-k batch norm of ``module`` becomes its synchronized form
    (``SyncL1BatchNorm``, ``SyncLinfBatchNorm``, ``SyncTopkBatchNorm``) and every
    nn.BatchNorm1d/2d/3d an nn.SyncBatchNorm, as torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` does: in place, the new layers sharing the
    old ones' parameters and buffers, with their settings and training mode.  Returns the
    module (a new one if ``module`` itself is a batch norm).

    A BatchNorm subclass that adds to a batch norm's function (its own ``forward``, or
    submodules, as timm's BatchNormAct2d) is refused with an error naming it, rather than
    losing what it adds.  Layers already synchronized are left as they are.

    Args:
        module: the model.
        process_group: the group to synchronize over; None for the default group.

    Example::

        >>> model = tritonorm.convert(torchvision_model, "l1")
        >>> model = tritonorm.convert_sync_batchnorm(model)
        >>> model = nn.parallel.DistributedDataParallel(model.cuda(), device_ids=[rank])
    """
    from .convert import _changes_function
    from .nn.lp_batchnorm import SYNC_CLASSES, _LpBatchNorm

    check_process_group(process_group, none="the default group")
    for name, child in module.named_modules():
        if isinstance(child, _LpBatchNorm) and not isinstance(child, tuple(SYNC_CLASSES.values())):
            changes = "overrides forward" if type(child).forward is not _LpBatchNorm.forward else None
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            changes = _changes_function(child)
        else:
            continue
        if changes:
            raise TypeError(
                f"convert_sync_batchnorm: module.{name or '<root>'} ({type(child).__name__}) {changes}: its "
                "synchronized form is not known (map it with tritonorm.convert first, or convert it by hand)"
            )
    return _convert(module, process_group)


def _convert(module: nn.Module, process_group) -> nn.Module:
    from .nn.lp_batchnorm import SYNC_CLASSES, _LpBatchNorm

    if isinstance(module, (nn.SyncBatchNorm, *SYNC_CLASSES.values())):
        return module
    if isinstance(module, _LpBatchNorm):
        return SYNC_CLASSES[module._norm].like(module, process_group)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        module.add_module(name, _convert(child, process_group))
    return module
