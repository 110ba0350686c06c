"""One public function per operation: validates its arguments, then dispatches to the
Triton kernels (``tritonorm.ops``) or the PyTorch reference (``tritonorm.reference``).

Every function takes ``backend="auto" | "triton" | "torch"``; see ``tritonorm._dispatch``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as _F

from ._conv import ConvGeometry
from ._dispatch import TRITON_AVAILABLE, resolve_backend
from .reference import accumulator_dtype
from .reference import bounded_weight_norm as _bwn_ref
from .reference import equinorm as _equi_ref
from .reference import lp_batchnorm as _lp_ref

if TRITON_AVAILABLE:
    from .kernels.lp_batchnorm import MAX_K as _TRITON_MAX_K
    from .ops import bounded_weight_norm as _bwn_ops
    from .ops import equinorm as _equi_ops
    from .ops import lp_batchnorm as _lp_ops
    from .ops import running_stats as _running_ops

__all__ = [
    "l1_batch_norm", "linf_batch_norm", "topk_batch_norm",
    "equinorm_weight", "equinorm_conv1d", "equinorm_conv2d", "equinorm_conv3d", "equinorm_linear",
    "bounded_weight",
]

# The dtypes every op takes (fp32 accumulation for the first three).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_input(input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, *), got a {input.dim()}-d tensor of shape {tuple(input.shape)}")


def _check_vector(name: str, t, size: int, ref: Tensor, ref_name: str, what: str) -> None:
    """``t`` is None or a floating-point (size,) tensor on ``ref``'s device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) {what}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_momentum(momentum, update: bool, num_batches_tracked) -> None:
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                 or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] or None, got {momentum!r}")
    if update and momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")


def _lp_batch_norm(
    input, running_mean, running_dev, weight, bias, training, momentum, eps, norm, k, normalized,
    num_batches_tracked, backend,
) -> Tensor:
    _check_input(input)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_dev", running_dev)):
        _check_vector(name, t, input.shape[1], input, "input", f"for input with {input.shape[1]} channels")
    if (running_mean is None) != (running_dev is None):
        raise ValueError("running_mean and running_dev must be given together")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_dev are required when training=False")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    n = input.numel() // input.shape[1] if input.shape[1] else 0
    update = training and running_mean is not None
    _check_momentum(momentum, update, num_batches_tracked)
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


# ----------------------------------------------------------------------------- EquiNorm


def _check_weight(weight, groups) -> None:
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a float16, bfloat16, float32 or float64 tensor, got {weight!r:.80}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
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
    ``tritonorm.reference.equinorm``."""
    _check_weight(weight, groups)
    _check_vector("mass", mass, weight.shape[1] * groups, weight, "weight", "(one per input channel)")
    _check_vector("gain", gain, weight.shape[0], weight, "weight", "(one per output channel)")
    if resolve_backend(backend, weight) == "torch":
        return _equi_ref.equinorm_weight(weight, mass, gain, groups, single_pass)
    return _equi_ops.equinorm_weight(weight, mass, gain, groups, single_pass)[0]


def _stats_rows(n: int, stats_fraction) -> int:
    if isinstance(stats_fraction, bool) or not isinstance(stats_fraction, (int, float)) or not 0 < stats_fraction <= 1:
        raise ValueError(f"stats_fraction must be a number in (0, 1], got {stats_fraction!r}")
    return max(1, int(n * stats_fraction))


def _input_mass(
    input, weight, running_mean, training, momentum, stats_fraction, num_batches_tracked, triton: bool,
    geometry: ConvGeometry | None, update: bool,
) -> Tensor:
    """m (C_in,): the input mass of the batch (training) or from ``running_mean`` (eval);
    with ``update``, the batch's per-channel mean also goes into ``running_mean``."""
    c_in = input.shape[-1 if geometry is None else 1]
    ratio = 1.0 if geometry is None else geometry.mass_ratio(input.shape[2:], weight.shape[2:])
    if not training:
        return running_mean.to(accumulator_dtype(input.dtype)) * ratio
    rows = _stats_rows(input.shape[0], stats_fraction)
    stats = input if rows == input.shape[0] else input[:rows]
    if geometry is None:
        stats = stats.reshape(-1, c_in)
    v = _equi_ops.input_sums(stats) if triton else _equi_ref.input_sums(stats)
    mean = v / (stats.numel() // c_in)
    if update and triton:
        _running_ops.update_running_mean(
            running_mean, mean.detach(), num_batches_tracked if momentum is None else None,
            None if momentum is None else float(momentum),
        )
    elif update:
        _equi_ref.update_running_mean(running_mean, mean, momentum, num_batches_tracked)
    return mean * ratio


def _equinorm(
    input, weight, gain, bias, running_mean, training, momentum, groups, single_pass, stats_fraction,
    num_batches_tracked, backend, geometry: ConvGeometry | None,
) -> Tensor:
    """Shared body of the conv (``geometry`` given) and linear forms."""
    if geometry is None and isinstance(input, Tensor) and input.dim() == 1:
        return _equinorm(
            input[None], weight, gain, bias, running_mean, training, momentum, groups, single_pass,
            stats_fraction, num_batches_tracked, backend, geometry,
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
        raise ValueError(f"input must have shape (*, {weight.shape[1]}) for weight {tuple(weight.shape)}, got {tuple(input.shape)}")
    if not linear and (weight.dim() != input.dim() or input.shape[1] != c_in):
        raise ValueError(
            f"weight {tuple(weight.shape)} with groups={groups} expects input of shape (N, {c_in}, *), "
            f"got {tuple(input.shape)}"
        )
    if weight.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
        raise TypeError(f"input ({input.dtype}) and weight ({weight.dtype}) must have the same dtype")
    _check_vector("gain", gain, weight.shape[0], weight, "weight", "(one per output channel)")
    _check_vector("bias", bias, weight.shape[0], weight, "weight", "(one per output channel)")
    _check_vector("running_mean", running_mean, c_in, weight, "weight", "(one per input channel)")
    if not training and running_mean is None:
        raise ValueError("running_mean is required when training=False")
    update = training and running_mean is not None
    _check_momentum(momentum, update, num_batches_tracked)
    _stats_rows(input.shape[0], stats_fraction)
    if training and input.numel() == 0:
        raise ValueError(f"training needs a non-empty batch, got input of shape {tuple(input.shape)}")
    triton = resolve_backend(backend, input) == "triton"
    mass = _input_mass(
        input, weight, running_mean, training, momentum, stats_fraction, num_batches_tracked, triton, geometry,
        update,
    )
    if triton:
        w = _equi_ops.equinorm_weight(weight, mass, gain, groups, single_pass)[0]
    else:
        w = _equi_ref.equinorm_weight(weight, mass, gain, groups, single_pass)
    if linear:
        return _F.linear(input, w, bias)
    return geometry.conv(input, w, bias, groups)


_EQUINORM_DOC = """EquiNorm {kind}: y = {op}(x, gain * w'') + bias, w'' from ``equinorm_weight``.

    In training the input mass comes from the batch (its first ``stats_fraction``, at
    least one sample) and ``running_mean`` (C_in,), if given, is updated in place with the
    per-channel mean of the input (torch's momentum convention; momentum=None averages over
    ``num_batches_tracked``, which the caller increments).  In eval it comes from
    ``running_mean``, scaled to the input's size, so batch size and resolution may change.
    Gradients reach weight, gain, bias and, through the input sums, the input.
    {extra}"""


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
    ) -> Tensor:
        geometry = ConvGeometry.of(nd, stride, padding, dilation, padding_mode)
        return _equinorm(
            input, weight, gain, bias, running_mean, training, momentum, groups, single_pass, stats_fraction,
            num_batches_tracked, backend, geometry,
        )

    equinorm_conv.__name__ = equinorm_conv.__qualname__ = f"equinorm_conv{nd}d"
    equinorm_conv.__doc__ = _EQUINORM_DOC.format(
        kind=f"{nd}-d convolution", op=f"conv{nd}d",
        extra="stride, padding, dilation, groups and padding_mode are nn.Conv's.",
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
) -> Tensor:
    return _equinorm(
        input, weight, gain, bias, running_mean, training, momentum, 1, single_pass, stats_fraction,
        num_batches_tracked, backend, None,
    )


equinorm_linear.__doc__ = _EQUINORM_DOC.format(
    kind="linear map", op="linear",
    extra="input is (*, C_in); the statistics run over every leading dim (a kernel of size 1).",
)


# ----------------------------------------------------------------------------- bounded weight norm


def check_slice_dim(dim, weight: Tensor, name: str = "weight") -> int:
    """``dim`` as a non-negative axis of ``weight``, or a ValueError."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not -weight.dim() <= dim < weight.dim():
        raise ValueError(
            f"dim must be an int in [{-weight.dim()}, {weight.dim() - 1}] for {name} of shape {tuple(weight.shape)}, "
            f"got {dim!r}"
        )
    return dim % weight.dim()


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


def bounded_weight(v: Tensor, rho: Tensor, *, dim: int = 0, eps: float = _bwn_ref.EPS, backend: str = "auto") -> Tensor:
    """w_i = rho_i * v_i / max(||v_i||_2, eps), per slice i of ``v`` along ``dim``: the
    bounded weight norm of Hoffer et al. 2018 (``tritonorm.bounded_weight_norm`` registers it
    as a parametrization).

    ``v`` is a floating-point tensor of any rank; ``rho`` a floating-point tensor of shape ()
    (one scale for the layer, the paper) or (S,) with S = v.shape[dim] (per-slice scales, the
    authors' learnable gain).  Returns w in v's dtype, norms accumulated in fp32 (fp64 for
    fp64).  Differentiable in v and rho:

        dL/dv_i = rho_i / ||v_i|| * (G_i - u_i <u_i, G_i>),  u_i = v_i / ||v_i||,  G = dL/dw
        dL/drho_i = <u_i, G_i>

    ``eps`` floors the norm, as in ``torch.nn.functional.normalize``: an all-zero slice gives
    zeros, not NaN."""
    if not isinstance(v, Tensor) or v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"v must be a float16, bfloat16, float32 or float64 tensor, got {v!r:.80}")
    if v.dim() == 0 or v.numel() == 0:
        raise ValueError(f"v must have at least one dim and one element, got shape {tuple(v.shape)}")
    dim = check_slice_dim(dim, v, "v")
    if not isinstance(rho, Tensor) or not rho.is_floating_point():
        raise TypeError(f"rho must be a floating-point tensor, got {rho!r:.80}")
    if rho.shape not in ((), (v.shape[dim],)):
        raise ValueError(f"rho must have shape () or ({v.shape[dim]},) (one per slice along dim={dim}), got {tuple(rho.shape)}")
    if rho.device != v.device:
        raise ValueError(f"rho is on {rho.device} but v is on {v.device}")
    check_eps(eps)
    if resolve_backend(backend, v) == "torch":
        return _bwn_ref.bounded_weight(v, rho, dim, eps)
    return _bwn_ops.bounded_weight(v, rho, dim, float(eps))[0]
