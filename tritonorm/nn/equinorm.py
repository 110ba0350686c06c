"""EquiNorm layers (Equilibrium Normalization, Defazio & Bottou 2019): convolution and
linear layers whose weight is normalized by the statistics of their input, then a
per-output-channel affine (gain, bias).

In training the input mass comes from the batch (the first ``stats_fraction`` of it) and
``running_mean``, the per-channel mean of the input, is updated with torch's momentum
convention; eval uses ``running_mean``, scaled to the input's size.  With a
``process_group``, training sums the statistics over its processes (as nn.SyncBatchNorm).  ``fold()`` returns the
plain nn.Conv*d / nn.Linear that computes the eval-mode output.  The math is in
``tritonorm.functional.equinorm_weight`` and ``tritonorm.reference.equinorm``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_bool, check_int, check_momentum, check_process_group
from .._conv import ConvGeometry, _tuple
from .._dispatch import check_backend, resolve_backend
from ..reference import accumulator_dtype
from ..sync_batchnorm import copy_model

__all__ = ["EquiNormConv1d", "EquiNormConv2d", "EquiNormConv3d", "EquiNormLinear", "balance_signs_", "fold_equinorm"]

# Resampling rounds before balance_signs_ gives up (each round leaves a unit of n >= 2
# weights unbalanced with probability 2^(1-n) <= 1/2).
_MAX_RESAMPLES = 200


@torch.no_grad()
def balance_signs_(weight: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Resample, in place, the signs of every unit of ``weight`` whose weights all have the
    same sign, until each unit has a positive and a negative weight (the initialization of
    "Controlling Covariate Shift using Equilibrium Normalization of Weights": a row whose
    weights share one sign is degenerate for EquiNorm).  A unit is a kernel w[d, c] when the
    kernel has more than one position, else a whole row w[d] (linear and 1x1 layers).
    Magnitudes are kept.  The EquiNorm layers call it in ``reset_parameters``.

    Args:
        weight: a floating-point tensor (C_out, C_in / groups, *kernel) whose units hold at
            least 2 weights.
        generator: the torch.Generator the new signs are drawn from; None for the default.

    Returns:
        ``weight``, modified in place.

    Example::

        >>> conv = nn.Conv2d(3, 8, 1)
        >>> tritonorm.balance_signs_(conv.weight.data)
        >>> bool(((conv.weight > 0).any(1) & (conv.weight < 0).any(1)).all())
        True
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() < 2:
        raise TypeError(f"weight must be a floating-point tensor of shape (C_out, C_in, *), got {weight!r:.80}")
    rows = weight.shape[0] * weight.shape[1] if weight[0, 0].numel() > 1 else weight.shape[0]
    units = weight.view(rows, -1)
    if units.shape[1] < 2:
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} has units of one weight: their signs cannot be balanced"
        )
    for _ in range(_MAX_RESAMPLES):
        bad = (~((units > 0).any(1) & (units < 0).any(1))).nonzero().squeeze(1)
        if bad.numel() == 0:
            return weight
        signs = torch.randint(0, 2, units[bad].shape, generator=generator, device=weight.device) * 2 - 1
        units[bad] = units[bad].abs() * signs.to(weight.dtype)
    raise RuntimeError(f"balance_signs_ did not balance {bad.numel()} units in {_MAX_RESAMPLES} rounds")


class _EquiNorm(nn.Module):
    """Parameters, buffers and the shared forward; subclasses give the geometry."""

    _geometry: ConvGeometry | None = None

    def __init__(self, in_channels, out_channels, kernel_size, groups, affine, momentum, single_pass,
                 stats_fraction, backend, process_group, device, dtype):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            check_int(name, value)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
            )
        if in_channels // groups * math.prod(kernel_size) < 2:
            raise ValueError(
                "EquiNorm needs at least 2 weights per output channel (in_channels / groups x kernel volume), "
                f"got in_channels={in_channels}, groups={groups}, kernel_size={tuple(kernel_size)}"
            )
        F._check_stats_fraction(stats_fraction)
        check_momentum(momentum)
        check_bool("affine", affine)
        check_bool("single_pass", single_pass)
        check_backend(backend)
        check_process_group(process_group)
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = tuple(kernel_size)
        self.affine, self.momentum, self.single_pass = affine, momentum, single_pass
        self.stats_fraction, self.backend = stats_fraction, backend
        # An attribute, as nn.SyncBatchNorm's: not in the state_dict.
        self.process_group = process_group
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *kernel_size, **factory))
        if affine:
            self.gain = nn.Parameter(torch.empty(out_channels, **factory))
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("gain", None)
            self.register_parameter("bias", None)
        # Ones, not zeros: a zero mean would make an untrained layer's eval output its
        # bias alone (the guard).  Ones weigh every input channel alike.
        self.register_buffer("running_mean", torch.ones(in_channels, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """nn.Conv's default initialisation with balanced signs; gain 1, bias 0."""
        self.reset_running_stats()
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        balance_signs_(self.weight)
        if self.affine:
            nn.init.ones_(self.gain)
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return F._equinorm(
            input, self.weight, gain=self.gain, bias=self.bias, running_mean=self.running_mean,
            training=self.training, momentum=self.momentum, groups=self.groups, single_pass=self.single_pass,
            stats_fraction=self.stats_fraction, num_batches_tracked=self.num_batches_tracked, backend=self.backend,
            geometry=self._geometry, count_batch=self.training, process_group=self.process_group,
        )

    def normalized_weight(self, input: Tensor) -> Tensor:
        """w'' (without the gain) that ``forward(input)`` uses in the current mode; the
        running statistics are left alone.  In training with a ``process_group``, every
        process of the group must call it (its statistics are summed over them)."""
        F._check_input(input)
        mass = F._input_mass(
            input, running_mean=self.running_mean, training=self.training, momentum=self.momentum,
            stats_fraction=self.stats_fraction, num_batches_tracked=None,
            triton=resolve_backend(self.backend, input) == "triton",
            ratio=F._mass_ratio(input, self.weight, self._geometry), linear=self._geometry is None, update=False,
            count_batch=False, process_group=self.process_group,
        )
        return F.equinorm_weight(
            self.weight, mass, groups=self.groups, single_pass=self.single_pass, backend=self.backend
        )

    def _mass_ratio(self, input_size) -> float:
        return 1.0

    @torch.no_grad()
    def fold(self, input_size=None) -> nn.Module:
        """A plain nn.Conv*d / nn.Linear equal to this layer in eval mode: weight
        gain * w'' from ``running_mean``, bias the bias.  See the subclasses for
        ``input_size``."""
        mass = self.running_mean.to(accumulator_dtype(self.weight.dtype))
        weight = F.equinorm_weight(
            self.weight, mass * self._mass_ratio(input_size), self.gain, groups=self.groups,
            single_pass=self.single_pass, backend=self.backend,
        )
        layer = self._plain_layer()
        layer.weight.copy_(weight)
        if self.affine:
            layer.bias.copy_(self.bias)
        return layer

    def _options_repr(self) -> str:
        s = f", affine={self.affine}, momentum={self.momentum}"
        if not self.single_pass:
            s += ", single_pass=False"
        if self.stats_fraction != 1.0:
            s += f", stats_fraction={self.stats_fraction}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.process_group is not None:
            s += f", process_group={self.process_group!r}"
        return s


class _EquiNormConvNd(_EquiNorm):
    _nd: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        *,
        padding_mode: str = "zeros",
        affine: bool = True,
        momentum: float | None = 0.1,
        single_pass: bool = True,
        stats_fraction: float = 1.0,
        backend: str = "auto",
        process_group=None,
        device=None,
        dtype=None,
    ):
        kernel_size = _tuple("kernel_size", kernel_size, self._nd, 1)
        geometry = ConvGeometry.of(self._nd, stride, padding, dilation, padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, groups, affine, momentum, single_pass,
                         stats_fraction, backend, process_group, device, dtype)
        self._geometry = geometry
        self.stride, self.padding, self.dilation = geometry.stride, geometry.padding, geometry.dilation
        self.padding_mode = geometry.padding_mode

    def _mass_ratio(self, input_size) -> float:
        """``input_size`` (the spatial size of the input the folded layer will see) is needed
        unless the padding is "same"-like (output = input / stride), where the layer is the
        same for every input size divisible by the stride."""
        if input_size is not None:
            size = (input_size,) * self._nd if isinstance(input_size, int) else tuple(input_size)
            if len(size) != self._nd:
                raise ValueError(f"input_size must give {self._nd} spatial sizes, got {input_size!r}")
            return self._geometry.mass_ratio(size, self.kernel_size)
        if not self._geometry.size_free(self.kernel_size):
            raise ValueError(
                f"fold() needs input_size for padding={self.padding!r} with kernel_size={self.kernel_size}: the "
                "eval-mode weight depends on the ratio of input to output size"
            )
        return 1.0

    def _plain_layer(self) -> nn.Module:
        return self._geometry.module(
            self.in_channels, self.out_channels, self.kernel_size, self.groups, self.affine,
            device=self.weight.device, dtype=self.weight.dtype,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._nd:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * self._nd:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + self._options_repr()


_OPTIONS_DOC = """affine: a learnable per-output-channel gain (``gain``, ones) and bias (``bias``,
            zeros) applied after the {op}; False: neither.
        momentum: of ``running_mean``, the per-channel mean of the input used in eval:
            running = (1 - momentum) * running + momentum * batch; None for the cumulative
            average.
        single_pass: True (the paper's default): the scale s from the signs of w; False: the
            exact two-pass form (see ``tritonorm.functional.equinorm_weight``).
        stats_fraction: the training statistics come from the first fraction of the batch,
            at least one sample (in (0, 1]; 0.25 cured the paper's overfitting).
        backend: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton" or "torch".
        process_group: None (the paper's per-process statistics) or a torch.distributed
            ProcessGroup whose processes' batches together give the training statistics
            (one all_reduce of C_in + 1 values per forward and per backward).
        device, dtype: of the parameters and buffers."""

_CONV_DOC = """EquiNorm {nd}-d convolution ("Controlling Covariate Shift using Equilibrium
    Normalization of Weights", Defazio & Bottou 2019): nn.Conv{nd}d's drop-in for a
    convolution followed by nn.BatchNorm{nd}d.

    The weight is normalized by the statistics of the input instead of the output being
    normalized: per output channel d, w''_d = s_d (w_d + b_d), with the shift b_d and the
    scale s_d computed from the input mass (the batch's per-channel mean in training,
    ``running_mean`` in eval) so that the output has mean zero and a balanced positive
    and negative contribution; then y = conv{nd}d(x, gain * w'') + bias.  The math is in
    ``tritonorm.functional.equinorm_weight``.  ``fold()`` returns the plain nn.Conv{nd}d
    that computes the eval-mode output.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
            padding_mode: as nn.Conv{nd}d (there is no ``bias`` argument: the affine's
            bias takes its place).  Every output channel needs at least 2 weights
            (in_channels / groups x kernel volume).
        {options}

    Shape:
        input: (N, C_in, {spatial_in}), C_in = in_channels.
        output: (N, C_out, {spatial_out}), C_out = out_channels, each size as nn.Conv{nd}d's.

    Attributes:
        weight: (out_channels, in_channels / groups, *kernel_size), nn.Conv's default
            initialization with every unit's signs balanced (``balance_signs_``).
        gain, bias: (out_channels,), or None with ``affine=False``.
        running_mean: (in_channels,), starts at ones.

    Example::

        >>> conv = tritonorm.EquiNormConv{nd}d(16, 32, 3, padding=1)
        >>> x = torch.randn({example_shape})
        >>> y = torch.relu(conv(x))                    # in place of relu(bn(conv(x)))
        >>> plain = conv.eval().fold()                 # an nn.Conv{nd}d with the same eval output
    """

_SPATIAL = {1: ("L_in", "L_out", "8, 16, 32"), 2: ("H_in, W_in", "H_out, W_out", "8, 16, 32, 32"),
            3: ("D_in, H_in, W_in", "D_out, H_out, W_out", "4, 16, 8, 8, 8")}


class EquiNormConv1d(_EquiNormConvNd):
    _nd = 1


class EquiNormConv2d(_EquiNormConvNd):
    _nd = 2


class EquiNormConv3d(_EquiNormConvNd):
    _nd = 3


for _cls in (EquiNormConv1d, EquiNormConv2d, EquiNormConv3d):
    _in, _out, _shape = _SPATIAL[_cls._nd]
    _cls.__doc__ = _CONV_DOC.format(nd=_cls._nd, spatial_in=_in, spatial_out=_out, example_shape=_shape,
                                    options=_OPTIONS_DOC.format(op="convolution"))
del _cls, _in, _out, _shape


class EquiNormLinear(_EquiNorm):
    __doc__ = f"""EquiNorm linear layer ("Controlling Covariate Shift using Equilibrium
    Normalization of Weights", Defazio & Bottou 2019): nn.Linear's drop-in for a linear
    layer followed by nn.BatchNorm1d.

    y = linear(x, gain * w'') + bias, with w'' the weight normalized by the input mass, as
    EquiNormConv2d's with a kernel of one position; the statistics run over every leading
    dim of the input.  ``fold()`` returns the plain nn.Linear that computes the eval-mode
    output.

    Args:
        in_features, out_features: as nn.Linear (there is no ``bias`` argument: the
            affine's bias takes its place); in_features >= 2.
        {_OPTIONS_DOC.format(op="linear map")}

    Shape:
        input: (*, H_in), H_in = in_features, any number of leading dims (a 1-d input is
            one sample).
        output: (*, H_out), H_out = out_features.

    Attributes:
        weight: (out_features, in_features), nn.Linear's default initialization with every
            row's signs balanced (``balance_signs_``).
        gain, bias: (out_features,), or None with ``affine=False``.
        running_mean: (in_features,), starts at ones.

    Example::

        >>> layer = tritonorm.EquiNormLinear(20, 30)
        >>> x = torch.randn(128, 20)
        >>> y = torch.relu(layer(x))                   # in place of relu(bn(linear(x)))
        >>> plain = layer.eval().fold()                # an nn.Linear with the same eval output
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        affine: bool = True,
        momentum: float | None = 0.1,
        single_pass: bool = True,
        stats_fraction: float = 1.0,
        backend: str = "auto",
        process_group=None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, (), 1, affine, momentum, single_pass, stats_fraction,
                         backend, process_group, device, dtype)
        self.in_features, self.out_features = in_features, out_features

    def _plain_layer(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, self.affine, device=self.weight.device,
                         dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}" + self._options_repr()


def fold_equinorm(model: nn.Module, input_sizes: dict[str, tuple[int, ...]] | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode with every EquiNorm layer replaced by its
    ``fold()``: plain nn.Conv*d / nn.Linear layers that give the same eval-mode output.
    ``model`` is left as it is.  ``tritonorm.fold`` does this and more (Lp batch norms,
    bounded weight norm), finding the input sizes from an example input.

    Args:
        model: any nn.Module (an EquiNorm layer itself gives its plain layer).
        input_sizes: maps the qualified name of a layer (as in ``named_modules()``) to the
            spatial size of its input, for the layers whose ``fold()`` needs one (a padding
            that is not "same"-like); a layer that needs one and is not given one raises a
            ValueError naming it, and so does a name that is no EquiNorm layer.

    Example::

        >>> model = nn.Sequential(tritonorm.EquiNormConv2d(3, 8, 3), nn.ReLU())
        >>> plain = tritonorm.fold_equinorm(model, {"0": (32, 32)})   # for 32 x 32 inputs
        >>> type(plain[0])
        <class 'torch.nn.modules.conv.Conv2d'>
    """
    folded = copy_model(model).eval()
    input_sizes = dict(input_sizes or {})
    for name, module in list(folded.named_modules()):
        if not isinstance(module, _EquiNorm):
            continue
        try:
            plain = module.fold(input_sizes.pop(name, None))
        except ValueError as e:
            raise ValueError(f"cannot fold {name!r}: {e}") from None
        if not name:
            return plain
        parent, _, child = name.rpartition(".")
        setattr(folded.get_submodule(parent), child, plain)
    if input_sizes:
        raise ValueError(f"input_sizes names no EquiNorm layer: {sorted(input_sizes)}")
    return folded
