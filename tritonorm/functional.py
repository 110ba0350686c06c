"""One public function per operation: validates its arguments, then dispatches to the
Triton kernels (``tritonorm.ops``) or the PyTorch reference (``tritonorm.reference``).

Every function takes ``backend="auto" | "triton" | "torch"``; see ``tritonorm._dispatch``.
Arguments are checked before anything is computed or modified (``tritonorm._checks``), and
the layers below are called by keyword.  Each public function is an ``torch.fx.wrap`` leaf:
``torch.fx.symbolic_trace`` records it as one call instead of tracing into the checks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as _F

from . import sync_batchnorm as _sync
from ._checks import (
    check_activation,
    check_bool,
    check_eps,
    check_int,
    check_momentum,
    check_norm_order,
    check_number,
    check_process_group,
    check_slice_dim,
    check_vector,
    check_writable,
    is_number,
)
from ._conv import ConvGeometry
from ._dispatch import TRITON_AVAILABLE, check_transforms, resolve_backend
from .reference import accumulator_dtype, update_running
from .reference import bounded_weight_norm as _bwn_ref
from .reference import equinorm as _equi_ref
from .reference import lp_batchnorm as _lp_ref
from .reference import mean_only_batchnorm as _mo_ref
from .reference.activation import NEGATIVE_SLOPE, activate

if TRITON_AVAILABLE:
    from .kernels.lp_batchnorm import MAX_K as _TRITON_MAX_K
    from .ops import bounded_weight_norm as _bwn_ops
    from .ops import equinorm as _equi_ops
    from .ops import lp_batchnorm as _lp_ops
    from .ops import mean_only_batchnorm as _mo_ops
    from .ops import running_stats as _running_ops

__all__ = [
    "bounded_weight", "equinorm_conv1d", "equinorm_conv2d", "equinorm_conv3d", "equinorm_linear", "equinorm_weight",
    "l1_batch_norm", "linf_batch_norm", "topk_batch_norm", "mean_only_batch_norm",
]

# The dtypes every op takes (fp32 accumulation for the first three).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_input(input) -> None:
    _check_tensor("input", input)
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *), got a {input.dim()}-d tensor of shape {tuple(input.shape)}")


def _check_update(names: tuple[str, ...], buffers: tuple[Tensor, ...], momentum, num_batches_tracked) -> None:
    """The running buffers a training call updates in place, and how."""
    for name, t in zip(names, buffers, strict=True):
        check_writable(name, t)
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")


# ----------------------------------------------------------------------------- Lp batch norm


def _fusable_residual(residual, input: Tensor) -> bool:
    """Whether ``residual`` (None, or a tensor) is added inside the norm's epilogue: None,
    or a tensor with input's shape, dtype and device (any memory layout).  Any other
    tensor is added after the norm as torch adds it (``_lp_batch_norm``); a residual on
    another device that torch could not add either is refused here, by name."""
    if residual is None:
        return True
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.device != input.device and residual.dim() > 0:
        raise ValueError(f"residual is on {residual.device} but input is on {input.device}")
    return residual.shape == input.shape and residual.dtype == input.dtype


def _lp_batch_norm(
    input, *, running_mean, running_dev, weight, bias, training, momentum, eps, norm, k, normalized,
    num_batches_tracked, backend, count_batch: bool = False, residual=None, activation=None,
    negative_slope=NEGATIVE_SLOPE, sync_group=None,
) -> Tensor:
    """Check every argument, then run the op on the chosen backend; with ``count_batch``
    (what a layer does in training) add 1 to ``num_batches_tracked`` once the checks pass.
    ``sync_group``: a process group to take the batch statistics over
    (``tritonorm.sync_batchnorm``; the size checks are then the whole batch's)."""
    _check_input(input)
    check_activation(activation, negative_slope)
    if not _fusable_residual(residual, input):  # e.g. a (C, 1, 1) bias, or a float64 tensor
        y = _lp_batch_norm(
            input, running_mean=running_mean, running_dev=running_dev, weight=weight, bias=bias, training=training,
            momentum=momentum, eps=eps, norm=norm, k=k, normalized=normalized,
            num_batches_tracked=num_batches_tracked, backend=backend, count_batch=count_batch, sync_group=sync_group,
        )
        return activate(y + residual, activation, negative_slope)
    c = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_dev", running_dev)):
        check_vector(name, t, c, input, "input", f"for input with {c} channels")
    if (running_mean is None) != (running_dev is None):
        raise ValueError("running_mean and running_dev must be given together")
    check_bool("training", training)
    if not training and running_mean is None:
        raise ValueError("running_mean and running_dev are required when training=False")
    check_eps(eps, positive=training)  # a batch's dispersion can be 0; the running one is set by the user
    check_momentum(momentum)
    check_bool("normalized", normalized)
    if norm == "topk":
        check_int("k", k)
    update = training and running_mean is not None
    if update:
        _check_update(("running_mean", "running_dev"), (running_mean, running_dev), momentum, num_batches_tracked)
    if training and sync_group is None:
        n = input.numel() // c if c else 0
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
    check_transforms(chosen, input, (running_mean, running_dev) if update else ())
    # the Triton path; a synchronized layer takes it with an empty batch too (its combine)
    triton = chosen == "triton" and (input.numel() > 0 or sync_group is not None)
    if count_batch and not (triton and update):  # else the running-statistics op counts it
        num_batches_tracked.add_(1)
    if sync_group is not None:
        y, mean, dev = _sync.sync_lp_batch_norm(
            input, weight, bias, residual, group=sync_group, triton=triton, norm=norm, k=k, eps=eps,
            normalized=normalized, activation=activation, negative_slope=negative_slope,
        )
    elif not triton:
        return _lp_ref.lp_batch_norm(
            input, weight=weight, bias=bias, running_mean=running_mean, running_dev=running_dev, batch_stats=training,
            momentum=momentum, eps=eps, norm=norm, k=k, normalized=normalized, num_batches_tracked=num_batches_tracked,
            residual=residual, activation=activation, negative_slope=negative_slope,
        )
    else:
        # the fused arguments only when used: the unfused call is the op's call as it always was
        fused = {} if residual is None and activation is None else {
            "residual": residual, "activation": activation or "none",
            "activation_param": torch.sym_float(negative_slope),
        }
        y, mean, dev, *_ = _lp_ops.lp_batch_norm(
            input, weight=weight, bias=bias, running_mean=running_mean, running_dev=running_dev,
            batch_stats=training, eps=torch.sym_float(eps), norm=norm, k=k, normalized=normalized, **fused,
        )
    if update and triton:
        _running_ops.update_running_stats(
            running_mean=running_mean, running_dev=running_dev, mean=mean, dev=dev,
            num_batches_tracked=num_batches_tracked if momentum is None or count_batch else None,
            momentum=None if momentum is None else torch.sym_float(momentum), count=count_batch,
        )
    elif update:  # synchronized, PyTorch path
        for running, batch in ((running_mean, mean), (running_dev, dev)):
            update_running(running, batch, momentum=momentum, num_batches_tracked=num_batches_tracked)
    return y


_LP_DOC = """{title}

    y = gamma * (x - mu) / (sigma + eps) + beta per channel (dim 1) of ``input`` (N, C, *),
    with mu the channel's mean and {sigma}.

    Arguments follow ``torch.nn.functional.batch_norm`` (``running_dev`` holds sigma where
    batch norm holds the variance).  In training the batch statistics are used and the
    running buffers, if given, are updated in place:
    running = (1 - momentum) * running + momentum * batch, or with momentum=None the
    cumulative average over ``num_batches_tracked`` (the caller increments it first); eps
    must then be > 0 (a batch's sigma can be 0), in eval >= 0.  ``normalized=False`` drops
    the constant.{extra}

    Fused epilogue: out = act(y + residual), with ``residual`` (input's shape, dtype and
    device, any memory layout) added and ``activation`` (None, or one of
    ``tritonorm.ACTIVATIONS``: "relu", "leaky_relu" with ``negative_slope``, "silu",
    "gelu", "gelu_tanh", "hardswish") applied in the accumulator dtype, rounded once to
    input's dtype.  Gradients reach residual too.  A residual of another shape or dtype
    (a (C, 1, 1) bias, a float64 tensor) is not fused: out = act(y + residual) as torch
    computes it, broadcasting and type promotion included, one more op.

    Args:
        input: (N, C, *), float16, bfloat16, float32 or float64.
        running_mean, running_dev: (C,) running mean and sigma, or None; required in eval,
            updated in place in training.
        weight, bias: (C,) gamma and beta, or None (1 and 0).
        training: batch statistics (True) or the running ones (False).
        momentum: of the running update; None for the cumulative average.
        eps: added to sigma.{k_arg}
        normalized: keep the constant that makes sigma the standard deviation of Gaussian
            data.
        num_batches_tracked: () long tensor, needed with momentum=None.
        residual: None, or a tensor added before the activation (fused when it has
            input's shape and dtype).
        activation: None, or one of ``tritonorm.ACTIVATIONS``.
        negative_slope: the slope of "leaky_relu" for z < 0.
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".

    Shape:
        input, residual and output: (N, C, *), all three the same (a residual that
            broadcasts gives the output torch's sum would have).

    Example::

        >>> x = torch.randn(8, 16, 4, 4)
        >>> mean, dev = torch.zeros(16), torch.ones(16)
        >>> y = tritonorm.functional.{name}(x, mean, dev, training=True{k_example}, activation="relu")
    """


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
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> Tensor:
    return _lp_batch_norm(
        input, running_mean=running_mean, running_dev=running_dev, weight=weight, bias=bias, training=training,
        momentum=momentum, eps=eps, norm="l1", k=0, normalized=normalized, num_batches_tracked=num_batches_tracked,
        residual=residual, activation=activation, negative_slope=negative_slope, backend=backend,
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
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> Tensor:
    return _lp_batch_norm(
        input, running_mean=running_mean, running_dev=running_dev, weight=weight, bias=bias, training=training,
        momentum=momentum, eps=eps, norm="linf", k=1, normalized=normalized, num_batches_tracked=num_batches_tracked,
        residual=residual, activation=activation, negative_slope=negative_slope, backend=backend,
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
    residual: Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> Tensor:
    return _lp_batch_norm(
        input, running_mean=running_mean, running_dev=running_dev, weight=weight, bias=bias, training=training,
        momentum=momentum, eps=eps, norm="topk", k=k, normalized=normalized, num_batches_tracked=num_batches_tracked,
        residual=residual, activation=activation, negative_slope=negative_slope, backend=backend,
    )


_NO_K = {"k_arg": "", "k_example": ""}
l1_batch_norm.__doc__ = _LP_DOC.format(
    title="L1 batch norm (\"Norm matters\", Hoffer et al. 2018).",
    sigma="sigma = sqrt(pi/2) * mean|x - mu| over the channel's n values", extra="", name="l1_batch_norm", **_NO_K,
)
linf_batch_norm.__doc__ = _LP_DOC.format(
    title="L-inf batch norm (\"Norm matters\", Hoffer et al. 2018).",
    sigma="sigma = Cinf(n) * max|x - mu|, Cinf(n) = (1 + sqrt(pi ln 4)) / (2 sqrt(2 ln n))", extra="",
    name="linf_batch_norm", **_NO_K,
)
topk_batch_norm.__doc__ = _LP_DOC.format(
    title="Top-k batch norm (\"Norm matters\", Hoffer et al. 2018).",
    sigma="sigma = Cinf(n) * (mean of the k largest |x - mu|), ties broken by the lowest index",
    extra="  The Triton path takes k <= 64.", name="topk_batch_norm",
    k_arg="\n        k: how many of the largest |x - mu| define sigma (training needs k values or more per\n"
          "            channel).", k_example=", k=3",
)


# ----------------------------------------------------------------------------- mean-only batch norm


def _mean_only_batch_norm(
    input, *, running_mean, bias, training, momentum, num_batches_tracked, backend, count_batch: bool = False,
) -> Tensor:
    """Check every argument, then run the op on the chosen backend; ``count_batch`` as in
    ``_lp_batch_norm``."""
    _check_input(input)
    c = input.shape[1]
    for name, t in (("bias", bias), ("running_mean", running_mean)):
        check_vector(name, t, c, input, "input", f"for input with {c} channels")
    check_bool("training", training)
    if not training and running_mean is None:
        raise ValueError("running_mean is required when training=False")
    check_momentum(momentum)
    update = training and running_mean is not None
    if update:
        _check_update(("running_mean",), (running_mean,), momentum, num_batches_tracked)
    if training and input.numel() == 0:
        raise ValueError(f"Expected at least 1 value per channel when training, got input size {tuple(input.shape)}")
    chosen = resolve_backend(backend, input)
    check_transforms(chosen, input, (running_mean,) if update else ())
    triton = chosen == "triton" and input.numel() > 0
    if count_batch and not (triton and update):  # else the running-mean op counts it
        num_batches_tracked.add_(1)
    if not triton:
        return _mo_ref.mean_only_batch_norm(
            input, bias=bias, running_mean=running_mean, batch_stats=training, momentum=momentum,
            num_batches_tracked=num_batches_tracked,
        )
    y, mean = _mo_ops.mean_only_batch_norm(input, bias, running_mean, training)
    if update:
        _running_ops.update_running_mean(
            running_mean=running_mean, mean=mean,
            num_batches_tracked=num_batches_tracked if momentum is None or count_batch else None,
            momentum=None if momentum is None else torch.sym_float(momentum), count=count_batch,
        )
    return y


def mean_only_batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    *,
    num_batches_tracked: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Mean-only batch norm ("Weight Normalization", Salimans & Kingma 2016; the partner of
    (bounded) weight norm in "Norm matters", Hoffer et al. 2018): y = x - mu + beta, mu the
    channel's batch mean (training) or ``running_mean``; no division, no scale.

    Args:
        input: (N, C, *), float16, bfloat16, float32 or float64.
        running_mean: None, or (C,): used when ``training`` is False (required then) and
            updated in place when it is True.
        bias: None, or beta (C,).
        training: use (and track) the batch mean.
        momentum: running = (1 - momentum) * running + momentum * batch; None for the
            cumulative average (needs ``num_batches_tracked``).
        num_batches_tracked: () long tensor, needed with momentum=None.
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".

    Shape:
        input and output: (N, C, *), the same.

    Example::

        >>> x = torch.randn(8, 16, 4, 4)
        >>> mean, beta = torch.zeros(16), torch.zeros(16)
        >>> y = tritonorm.functional.mean_only_batch_norm(x, mean, beta, training=True)
    """
    return _mean_only_batch_norm(
        input, running_mean=running_mean, bias=bias, training=training, momentum=momentum,
        num_batches_tracked=num_batches_tracked, backend=backend,
    )


# ----------------------------------------------------------------------------- EquiNorm


def _check_weight(weight, groups) -> None:
    if not isinstance(weight, Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a float16, bfloat16, float32 or float64 tensor, got {weight!r:.80}")
    check_int("groups", groups)
    if weight.dim() < 2 or weight.shape[0] == 0 or weight.shape[0] % groups:
        raise ValueError(
            f"weight must have shape (C_out, C_in / groups, *kernel) with C_out > 0 divisible by groups={groups}, "
            f"got {tuple(weight.shape)}"
        )
    if weight[0].numel() < 2:
        raise ValueError(
            f"EquiNorm needs at least 2 weights per output channel (C_in / groups x kernel volume), "
            f"got weight of shape {tuple(weight.shape)}: with one weight, w + b is always 0"
        )


def _transform(triton: bool, **arguments) -> Tensor:
    """gain * w'' on the chosen path."""
    if triton:
        return _equi_ops.equinorm_weight(**arguments)[0]
    return _equi_ref.equinorm_weight(**arguments)


def equinorm_weight(
    weight: Tensor,
    mass: Tensor,
    gain: Tensor | None = None,
    *,
    groups: int = 1,
    single_pass: bool = True,
    backend: str = "auto",
) -> Tensor:
    """gain_d * w''_d, the EquiNorm weight, for a weight (C_out, C_in/groups, *kernel).

    ``mass`` (C_in,) is the input mass m_c = v_c / r: v_c the sum of the input over batch
    and space, r = N * prod(output size) * prod(stride).  Then, per output channel d and
    input channel c of d's group, with W_dc the sum of w[d, c] over the kernel (K positions):

        b_d = - sum_c m_c W_dc / (K sum_c m_c)
        s_d = 1 / sum_c m_c P_dc,   P_dc = sum_k (w[d,c,k] + b_d) [w[d,c,k] > 0]  (single pass)
                                     or  sum_k (w[d,c,k] + b_d)^+                 (exact)
        w''_d = s_d (w_d + b_d)

    Differentiable in weight, mass and gain.  A degenerate row (sum_c m_c or the
    denominator zero up to rounding, or below) gets w'' = 0, never NaN or inf; see
    ``tritonorm.reference.equinorm``.  The method is that of "Controlling Covariate Shift
    using Equilibrium Normalization of Weights" (Defazio & Bottou 2019).

    Args:
        weight: (C_out, C_in / groups, *kernel), at least 2 weights per output channel.
        mass: (C_in,) the input mass.
        gain: (C_out,) or None (1).
        groups: as nn.Conv's.
        single_pass: True: P from the signs of w (the paper's default); False: the exact
            positive part.
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".

    Shape:
        output: weight's, (C_out, C_in / groups, *kernel).

    Example::

        >>> w = torch.randn(16, 3, 3, 3)
        >>> x = torch.rand(8, 3, 32, 32)
        >>> mass = x.sum((0, 2, 3)) / (8 * 30 * 30)      # r = N * output size (stride 1, no padding)
        >>> w2 = tritonorm.functional.equinorm_weight(w, mass)
        >>> y = torch.nn.functional.conv2d(x, w2)
    """
    _check_weight(weight, groups)
    check_vector("mass", mass, weight.shape[1] * groups, weight, "weight", "(one per input channel)")
    check_vector("gain", gain, weight.shape[0], weight, "weight", "(one per output channel)")
    check_bool("single_pass", single_pass)
    chosen = resolve_backend(backend, weight)
    check_transforms(chosen, weight)
    return _transform(chosen == "triton", weight=weight, mass=mass, gain=gain, groups=groups, single_pass=single_pass)


def _check_stats_fraction(stats_fraction) -> None:
    check_number("stats_fraction", stats_fraction, low=0, low_open=True, high=1, high_open=False)


def _stats_rows(n, stats_fraction):
    """How many leading samples of a batch of ``n`` the statistics come from,
    max(1, floor(n * stats_fraction)), or None for all of them (stats_fraction 1: no
    arithmetic on ``n``, so a symbolic batch size stays free)."""
    if stats_fraction == 1 or n == 0:
        return None
    return torch.sym_max(1, torch.sym_int(n * stats_fraction))


def _mass_ratio(input: Tensor, weight: Tensor, geometry: ConvGeometry | None) -> float:
    """Input mass per unit of the input's per-element mean (1 for a linear map); an error
    for an input too small for the kernel."""
    return 1.0 if geometry is None else geometry.mass_ratio(input.shape[2:], weight.shape[2:])


def _synced(process_group) -> bool:
    """Whether the statistics are summed over ``process_group``: a group of more than one
    process (no communication for None or a group of one)."""
    return process_group is not None and torch.distributed.get_world_size(process_group) > 1


class _AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the processes of a group; backward, the sum of the
    gradients over them (the gradient of every process's copy of the sum reaches every
    addend)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, process_group) -> Tensor:
        ctx.process_group = process_group
        total = tensor.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(total, group=process_group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.process_group), None


def _sum_over_group(v: Tensor, count, process_group) -> tuple[Tensor, Tensor]:
    """(sum of v, sum of count) over the processes of ``process_group``: one all_reduce of
    the packed (C + 1,) tensor [v, count] in v's dtype, and one of its gradient backward.
    The count travels with the sums, so processes may hold batches of any size, an empty
    one included; it stays a tensor (no host synchronization)."""
    total = _AllReduceSum.apply(torch.cat([v, v.new_full((1,), count)]), process_group)
    return total[:-1], total[-1]


def _input_mass(
    input, *, running_mean, training, momentum, stats_fraction, num_batches_tracked, triton: bool, ratio: float,
    linear: bool, update: bool, count_batch: bool, process_group=None,
) -> Tensor:
    """m (C_in,): the input mass of the batch (training) or from ``running_mean`` (eval);
    with ``update``, the batch's per-channel mean also goes into ``running_mean`` (on the
    Triton path that op also counts the batch, ``count_batch``).

    The batch's mass is v * (ratio / count), count the elements per channel of the
    statistics: one scalar multiply, whose backward is one multiply of C_in values.  With a
    ``process_group`` of more than one process, v and count are first summed over it
    (``_sum_over_group``): every process gets the mass, and the running mean, of the
    union of their batches."""
    if not training:
        return running_mean.to(accumulator_dtype(input.dtype)) * ratio
    c_in = input.shape[-1 if linear else 1]
    rows = _stats_rows(input.shape[0], stats_fraction)
    per_sample = math.prod(input.shape[1:]) // c_in  # elements of one channel in one sample
    count = (input.shape[0] if rows is None else rows) * per_sample
    if linear:  # (*, C_in) as (M, C_in): a sample is per_sample rows
        input, rows = input.reshape(-1, c_in), None if rows is None else count
    if triton:
        v = _equi_ops.input_sums(input, rows=rows)
    else:
        v = _equi_ref.input_sums(input if rows is None else input[:rows])
    if _synced(process_group):
        v, count = _sum_over_group(v, count, process_group)
    if update:
        mean = v.detach() / count
        if triton:
            _running_ops.update_running_mean(
                running_mean=running_mean, mean=mean,
                num_batches_tracked=num_batches_tracked if momentum is None or count_batch else None,
                momentum=None if momentum is None else torch.sym_float(momentum), count=count_batch,
            )
        else:
            update_running(running_mean, mean, momentum=momentum, num_batches_tracked=num_batches_tracked)
    return v * (ratio / count)


def _float16_compute(input: Tensor, weight: Tensor, gain: Tensor | None) -> bool:
    """Whether the convolution runs in float16 and its weight gradient is needed."""
    device = input.device.type
    half = input.dtype == torch.float16 or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )
    return half and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, weight, gain)
    )


def _input_scale(mass: Tensor) -> Tensor:
    """mu = 2^ceil(log2 max(1, max_c |m_c|)): a power of two at the input's magnitude.

    EquiNorm's weight w'' is about 1 / (mass * fan-in), so the weight gradient
    dL/dw'' = sum over the batch of x * dy is about mass times larger than a normalized
    layer's and overflows float16 for inputs of magnitude 1e4.  conv(x / mu, w''(m / mu))
    is conv(x, w''(m)) exactly (w'' scales like 1 / m, and mu is a power of two), and its
    weight gradient is that of inputs of magnitude 1."""
    return torch.exp2(torch.ceil(torch.log2(mass.detach().abs().amax().clamp_min(1.0))))


def _equinorm(
    input, weight, *, gain, bias, running_mean, training, momentum, groups, single_pass, stats_fraction,
    num_batches_tracked, backend, geometry: ConvGeometry | None, count_batch: bool = False, process_group=None,
) -> Tensor:
    """Shared body of the conv (``geometry`` given) and linear forms and of the layers:
    checks every argument, then (``count_batch``: adds 1 to ``num_batches_tracked``, as a
    layer in training does) computes."""
    if geometry is None and isinstance(input, Tensor) and input.dim() == 1:
        return _equinorm(
            input[None], weight, gain=gain, bias=bias, running_mean=running_mean, training=training,
            momentum=momentum, groups=groups, single_pass=single_pass, stats_fraction=stats_fraction,
            num_batches_tracked=num_batches_tracked, backend=backend, geometry=geometry, count_batch=count_batch,
            process_group=process_group,
        )[0]
    _check_input(input)
    _check_weight(weight, groups)
    linear = geometry is None
    if not linear and input.dim() != geometry.nd + 2:
        raise ValueError(
            f"input must have shape (N, C_in, *{geometry.nd} spatial dims) for a {geometry.nd}-d EquiNorm "
            f"convolution, got {tuple(input.shape)}"
        )
    c_in = weight.shape[1] * groups
    if linear and (weight.dim() != 2 or input.shape[-1] != c_in):
        raise ValueError(
            f"input must have shape (*, {weight.shape[1]}) for weight {tuple(weight.shape)}, got {tuple(input.shape)}"
        )
    if not linear and (weight.dim() != input.dim() or input.shape[1] != c_in):
        raise ValueError(
            f"weight {tuple(weight.shape)} with groups={groups} expects input of shape (N, {c_in}, *), "
            f"got {tuple(input.shape)}"
        )
    if input.device != weight.device:
        raise ValueError(f"input is on {input.device} but weight is on {weight.device}")
    if weight.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"input ({input.dtype}) and weight ({weight.dtype}) must have the same dtype")
    check_vector("gain", gain, weight.shape[0], weight, "weight", "(one per output channel)")
    check_vector("bias", bias, weight.shape[0], weight, "weight", "(one per output channel)")
    check_vector("running_mean", running_mean, c_in, weight, "weight", "(one per input channel)")
    check_bool("training", training)
    check_bool("single_pass", single_pass)
    if not training and running_mean is None:
        raise ValueError("running_mean is required when training=False")
    check_momentum(momentum)
    _check_stats_fraction(stats_fraction)
    update = training and running_mean is not None
    if update:
        _check_update(("running_mean",), (running_mean,), momentum, num_batches_tracked)
    check_process_group(process_group)
    synced = training and _synced(process_group)
    if training and input.numel() == 0 and not (synced and input.shape[0] == 0):
        raise ValueError(
            f"training needs a non-empty batch (or an empty one, N = 0, with a process_group), "
            f"got input of shape {tuple(input.shape)}"
        )
    ratio = _mass_ratio(input, weight, geometry)
    chosen = resolve_backend(backend, input)
    check_transforms(chosen, input, (running_mean,) if update else ())
    triton = chosen == "triton"
    if count_batch and not (triton and update):  # else the running-mean op counts it
        num_batches_tracked.add_(1)
    mass = _input_mass(
        input, running_mean=running_mean, training=training, momentum=momentum, stats_fraction=stats_fraction,
        num_batches_tracked=num_batches_tracked, triton=triton, ratio=ratio, linear=linear, update=update,
        count_batch=count_batch, process_group=process_group,
    )
    if _float16_compute(input, weight, gain):
        mu = _input_scale(mass)
        input, mass = input * (1 / mu).to(input.dtype), mass / mu
    w = _transform(triton, weight=weight, mass=mass, gain=gain, groups=groups, single_pass=single_pass)
    if linear:
        return _F.linear(input, w, bias)
    return geometry.conv(input, w, bias, groups)


_EQUINORM_DOC = """EquiNorm {kind}: y = {op}(x, gain * w'') + bias, w'' from ``equinorm_weight``
    ("Controlling Covariate Shift using Equilibrium Normalization of Weights", Defazio &
    Bottou 2019).

    In training the input mass comes from the batch (its first ``stats_fraction``, at
    least one sample) and ``running_mean`` (C_in,), if given, is updated in place with the
    per-channel mean of the input (torch's momentum convention; momentum=None averages over
    ``num_batches_tracked``, which the caller increments).  In eval it comes from
    ``running_mean``, scaled to the input's size, so batch size and resolution may change.
    Gradients reach weight, gain, bias and, through the input sums, the input.

    ``process_group``: None (the default, the paper's per-process statistics) or a
    torch.distributed ProcessGroup: in training, the input sums and element counts are
    summed over its processes (one all_reduce of C_in + 1 values forward, one backward), so
    the mass and ``running_mean`` are those of the union of the processes' batches (an
    empty one allowed); every process of the group must make the call.
    {extra}

    Args:
        input: {input_shape}, float16, bfloat16, float32 or float64.
        weight: {weight_shape}, at least 2 weights per output channel.
        gain, bias: (C_out,) or None (1 and 0).
        running_mean: (C_in,) running mean of the input, or None; required in eval,
            updated in place in training.
        training: the batch's statistics (True) or ``running_mean`` (False).
        momentum: of the running update; None for the cumulative average.{conv_args}
        single_pass: True: the scale from the signs of w (the paper's default); False: the
            exact two-pass form.
        stats_fraction: the fraction of the batch (its first samples) the training
            statistics come from, in (0, 1].
        num_batches_tracked: () long tensor, needed with momentum=None.
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".
        process_group: None, or the torch.distributed ProcessGroup to sum statistics over.

    Shape:
        input: {input_shape}.
        output: {output_shape}.

    Example::

        >>> x, w = torch.randn({example_input}), torch.randn({example_weight})
        >>> running_mean = torch.ones({example_c_in})
        >>> y = tritonorm.functional.{name}(x, w, running_mean=running_mean, training=True{example_extra})
    """


def _conv_function(nd: int):
    def equinorm_conv(
        input: Tensor,
        weight: Tensor,
        gain: Tensor | None = None,
        bias: Tensor | None = None,
        running_mean: Tensor | None = None,
        training: bool = False,
        momentum: float | None = 0.1,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        padding_mode: str = "zeros",
        *,
        single_pass: bool = True,
        stats_fraction: float = 1.0,
        num_batches_tracked: Tensor | None = None,
        backend: str = "auto",
        process_group=None,
    ) -> Tensor:
        geometry = ConvGeometry.of(nd, stride, padding, dilation, padding_mode)
        return _equinorm(
            input, weight, gain=gain, bias=bias, running_mean=running_mean, training=training, momentum=momentum,
            groups=groups, single_pass=single_pass, stats_fraction=stats_fraction,
            num_batches_tracked=num_batches_tracked, backend=backend, geometry=geometry, process_group=process_group,
        )

    equinorm_conv.__name__ = equinorm_conv.__qualname__ = f"equinorm_conv{nd}d"
    spatial = ("L", "H, W", "D, H, W")[nd - 1]
    equinorm_conv.__doc__ = _EQUINORM_DOC.format(
        kind=f"{nd}-d convolution", op=f"conv{nd}d",
        extra="stride, padding, dilation, groups and padding_mode are nn.Conv's.",
        input_shape=f"(N, C_in, {spatial})", weight_shape="(C_out, C_in / groups, *kernel)",
        output_shape=f"(N, C_out, {', '.join(s + '_out' for s in spatial.split(', '))}), sizes as conv{nd}d's",
        conv_args=f"\n        stride, padding, dilation, groups, padding_mode: as nn.Conv{nd}d.",
        name=f"equinorm_conv{nd}d", example_input=", ".join(["8", "3"] + ["16"] * nd),
        example_weight=", ".join(["16", "3"] + ["3"] * nd), example_c_in=3, example_extra=", padding=1",
    )
    return equinorm_conv


equinorm_conv1d = _conv_function(1)
equinorm_conv2d = _conv_function(2)
equinorm_conv3d = _conv_function(3)


def equinorm_linear(
    input: Tensor,
    weight: Tensor,
    gain: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    *,
    single_pass: bool = True,
    stats_fraction: float = 1.0,
    num_batches_tracked: Tensor | None = None,
    backend: str = "auto",
    process_group=None,
) -> Tensor:
    return _equinorm(
        input, weight, gain=gain, bias=bias, running_mean=running_mean, training=training, momentum=momentum,
        groups=1, single_pass=single_pass, stats_fraction=stats_fraction, num_batches_tracked=num_batches_tracked,
        backend=backend, geometry=None, process_group=process_group,
    )


equinorm_linear.__doc__ = _EQUINORM_DOC.format(
    kind="linear map", op="linear",
    extra="input is (*, C_in); the statistics run over every leading dim (a kernel of size 1).",
    input_shape="(*, C_in)", weight_shape="(C_out, C_in)", output_shape="(*, C_out)", conv_args="",
    name="equinorm_linear", example_input="128, 20", example_weight="30, 20", example_c_in=20, example_extra="",
)


# ----------------------------------------------------------------------------- bounded weight norm


def bounded_weight(
    v: Tensor, rho: Tensor | float, *, dim: int = 0, eps: float = _bwn_ref.EPS, p: float = 2.0,
    backend: str = "auto"
) -> Tensor:
    """w_i = rho_i * v_i / max(||v_i||_p, eps), per slice i of ``v`` along ``dim``: the
    bounded weight norm of "Norm matters" (Hoffer et al. 2018; ``tritonorm.bounded_weight_norm`` registers it
    as a parametrization).

    ``v`` is a floating-point tensor of any rank.  ``rho`` is the norm of every slice, a
    finite number > 0 or a () tensor (the paper: one per layer), or a (S,) tensor of
    per-slice scales, S = v.shape[dim] (the authors' learnable gain; a negative scale flips
    its slice).  A number rho is checked; a tensor rho is used as given, its values never
    read on the host (on CUDA each read would sync the device).  ``p`` is the norm order:
    2 (default), 1 (sum of |v_ij|) or float("inf") (max |v_ij|).  Returns w in v's dtype,
    norms accumulated in fp32 (fp64 for fp64).  Differentiable in v and rho, with n_i =
    ||v_i||_p and G = dL/dw:

        dL/dv_i = rho_i / n_i * (G_i - <v_i, G_i> / n_i * dn_i/dv_i)
        dL/drho_i = <v_i, G_i> / n_i

    dn_i/dv_i is v_i / n_i for p = 2, sign(v_i) for p = 1, and for p = inf sign(v_ik) at the
    max element k alone (ties: the lowest index within the slice, in row-major order).

    ``eps`` floors the norm, as in ``torch.nn.functional.normalize``: an all-zero slice gives
    zeros, not NaN.

    Args:
        v: the unnormalized weight, any rank >= 1.
        rho: a number > 0, a () tensor, or a (v.shape[dim],) tensor of per-slice scales.
        dim: the axis whose slices are normalized (0: the output channels of Linear and
            Conv).
        eps: floor on the slice norms.
        p: the norm order, 2, 1 or float("inf").
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".

    Shape:
        v and output: the same, any rank >= 1.

    Example::

        >>> v = torch.randn(64, 32, 3, 3, requires_grad=True)
        >>> w = tritonorm.functional.bounded_weight(v, 2.0)       # every w[i] has norm 2
        >>> y = torch.nn.functional.conv2d(torch.randn(8, 32, 16, 16), w)
    """
    _check_tensor("v", v)
    if v.dim() == 0 or v.numel() == 0:
        raise ValueError(f"v must have at least one dim and one element, got shape {tuple(v.shape)}")
    dim = check_slice_dim(dim, v, "v")
    if is_number(rho):
        check_number("rho", rho, low=0, low_open=True)
        rho = torch.full((), rho, dtype=accumulator_dtype(v.dtype), device=v.device)
    elif not isinstance(rho, Tensor) or not rho.is_floating_point():
        raise TypeError(f"rho must be a number or a floating-point tensor, got {rho!r:.80}")
    if rho.shape not in ((), (v.shape[dim],)):
        raise ValueError(
            f"rho must have shape () or ({v.shape[dim]},) (one per slice along dim={dim}), got {tuple(rho.shape)}"
        )
    if rho.device != v.device:
        raise ValueError(f"rho is on {rho.device} but v is on {v.device}")
    check_eps(eps)
    p = check_norm_order(p)
    chosen = resolve_backend(backend, v)
    check_transforms(chosen, v)
    if chosen == "torch":
        return _bwn_ref.bounded_weight(v, rho=rho, dim=dim, eps=eps, p=p)
    return _bwn_ops.bounded_weight(v, rho=rho, dim=dim, eps=torch.sym_float(eps), p=p)[0]


for _name in (*__all__, "_equinorm"):
    torch.fx.wrap(_name)
del _name
