"""What the EquiNorm benchmarks run, shared by ``bench_equinorm.py`` (pytest-benchmark) and
``roofline.py`` (GPU table).

A case is one ResNet-like convolution (``ConvCase``) on a batch of post-ReLU activations
(non-negative, as EquiNorm assumes), in training mode, timed as the whole call a training
step makes, host overhead included; ``lp_cases.step`` runs the "forward" and
"forward+backward" passes (x and the parameters require grad; the backward is
``torch.autograd.grad`` of the output with a fixed upstream gradient).

What is compared, as (what, implementation) pairs:

* ("equinorm", impl): the whole ``EquiNormConv2d`` (input sums, weight transform,
  convolution, running-mean update), with the Triton kernels, with the plain-PyTorch
  reference eager (backend="torch"), and ``torch.compile`` of the reference layer;
* ("norm-only", impl): the normalization without the convolution: ``normalized_weight(x)``
  of a layer without affine, i.e. the input sums and the weight transform (and, with
  forward+backward, their backward into x and the weight);
* ("conv", "nn.Conv2d") and ("conv+bn", "nn.Conv2d+nn.BatchNorm2d"): the baselines, the
  convolution alone and the convolution with the batch norm that EquiNorm replaces (both
  without conv bias, as in a ResNet; EquiNorm's bias plays BatchNorm's beta).

Parameters are fp32; a bf16 case runs its forward under ``torch.autocast`` (mixed-precision
training), so the convolutions run in bf16 and EquiNorm's sums read bf16 activations.

The kernels alone (``kernel_step``), with the bytes each must move:

* input sums v (C,) of x: read x once, ``x.numel() * x.element_size()`` bytes; forward only
  (its backward is a broadcast view, summed into dx by the convolution's backward);
* weight transform w -> gain * w'': forward reads w and writes w'' (2 weight passes);
  backward reads dL/dw'' and w and writes dL/dw (3 weight passes).  The per-channel
  vectors (mass, gain, s, b) are left out.  These kernels run at the weight's dtype (fp32,
  or bf16 for the bf16 cases) with an fp32 mass, as ``input_sums`` returns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

import tritonorm
from tritonorm.ops import equinorm as ops
from tritonorm.reference import equinorm as reference

from .lp_cases import COMPILED, EAGER, TRITON, step

EQUINORM, NORM_ONLY = "equinorm", "norm-only"
CONV, CONV_BN = ("conv", "nn.Conv2d"), ("conv+bn", "nn.Conv2d+nn.BatchNorm2d")
BASELINES = (CONV, CONV_BN)
INPUT_SUMS, WEIGHT_TRANSFORM = "input_sums", "weight_transform"
# (kernel, direction) pairs with a kernel of their own.
KERNELS = ((INPUT_SUMS, "forward"), (WEIGHT_TRANSFORM, "forward"), (WEIGHT_TRANSFORM, "backward"))
_WEIGHT_PASSES = {"forward": 2, "backward": 3}


@dataclass(frozen=True)
class ConvCase:
    """A 2-d convolution (padding kernel // 2, no dilation, one group) and its input batch."""

    batch: int
    in_channels: int
    out_channels: int
    size: int  # input height and width
    kernel: int = 3
    stride: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, self.in_channels, self.size, self.size)

    @property
    def output_shape(self) -> tuple[int, ...]:
        out = (self.size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1
        return (self.batch, self.out_channels, out, out)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, self.kernel, self.kernel)

    @property
    def name(self) -> str:
        """e.g. "64x64x56x56 k3 s1 ->64": input shape, kernel, stride, output channels."""
        return f"{'x'.join(map(str, self.input_shape))} k{self.kernel} s{self.stride} ->{self.out_channels}"

    def conv_args(self) -> dict:
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, kernel_size=self.kernel,
                    stride=self.stride, padding=self.kernel // 2)


def variants(implementations=(TRITON, EAGER, COMPILED), norm_only=(TRITON, EAGER)):
    """The (what, implementation) pairs to run: the EquiNorm layer with each of
    ``implementations``, the normalization alone with each of ``norm_only``, the baselines."""
    return [(EQUINORM, i) for i in implementations] + [(NORM_ONLY, i) for i in norm_only] + list(BASELINES)


class Autocast(nn.Module):
    """``module`` with its forward under ``torch.autocast(dtype)``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x):
        with torch.autocast(x.device.type, self.dtype):
            return self.module(x)


class NormOnly(nn.Module):
    """``layer.normalized_weight(x)``, w'' of shape (C_out, C_in, k, k): the input sums and the
    weight transform of an EquiNormConv2d, without its convolution.  The layer has no
    affine, so its weight is the one parameter and ``lp_cases.step`` differentiates wrt x
    and the weight alone."""

    def __init__(self, layer: tritonorm.EquiNormConv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer.normalized_weight(x)


def _equinorm(case: ConvCase, impl: str, device, affine: bool = True) -> nn.Module:
    backend = "triton" if impl == TRITON else "torch"
    return tritonorm.EquiNormConv2d(**case.conv_args(), affine=affine, backend=backend, device=device)


def _module(what: str, impl: str, case: ConvCase, device) -> nn.Module:
    if what == EQUINORM:
        return _equinorm(case, impl, device)
    if what == NORM_ONLY:
        return NormOnly(_equinorm(case, impl, device, affine=False))
    conv = nn.Conv2d(**case.conv_args(), bias=False, device=device)
    return conv if (what, impl) == CONV else nn.Sequential(conv, nn.BatchNorm2d(case.out_channels, device=device))


def build(what: str, impl: str, case: ConvCase, dtype: torch.dtype, device) -> nn.Module:
    """A fresh module in training mode, fp32 parameters, its forward under autocast unless
    ``dtype`` is fp32; for COMPILED a ``torch.compile`` of it (after ``torch._dynamo.reset()``,
    as ``lp_cases.build_layer`` explains), compiled on its first call."""
    module = _module(what, impl, case, device).train()
    if dtype != torch.float32:
        module = Autocast(module, dtype)
    if impl == COMPILED:
        torch._dynamo.reset()
        module = torch.compile(module)
    return module


class Inputs(NamedTuple):
    x: torch.Tensor  # (N, C_in, H, W), requires grad
    dy: torch.Tensor  # upstream gradient of a layer's output
    dw: torch.Tensor  # upstream gradient of w'' (norm-only)


def make_inputs(case: ConvCase, dtype: torch.dtype, device, seed: int = 0) -> Inputs:
    """Post-ReLU x (a Gaussian with a per-channel offset and scale, clamped at 0) in
    ``dtype``, and Gaussian upstream gradients in the dtype of what they flow into."""
    g = torch.Generator().manual_seed(seed)
    per_channel = (1, case.in_channels, 1, 1)
    x = torch.randn(case.input_shape, generator=g) * (0.5 + torch.rand(per_channel, generator=g))
    x = (x + torch.randn(per_channel, generator=g)).relu_()
    dy = torch.randn(case.output_shape, generator=g)
    dw = torch.randn(case.weight_shape, generator=g)
    return Inputs(x.to(device, dtype).requires_grad_(), dy.to(device, dtype), dw.to(device))


def output_shape(what: str, case: ConvCase) -> tuple[int, ...]:
    return case.weight_shape if what == NORM_ONLY else case.output_shape


def layer_step(what: str, module: nn.Module, inputs: Inputs, pass_: str) -> Callable[[], tuple]:
    """``lp_cases.step`` with the upstream gradient of ``what``'s output."""
    return step(module, inputs.x, inputs.dw if what == NORM_ONLY else inputs.dy, pass_)


# ----------------------------------------------------------------------------- kernels


def _kernel_inputs(kernel: str, case: ConvCase, x: torch.Tensor, seed: int = 0) -> tuple:
    """(x,) for the input sums; for the weight transform (weight, mass, gain), the weight in
    x's dtype, mass and gain fp32."""
    if kernel == INPUT_SUMS:
        return (x.detach(),)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(case.weight_shape, generator=g) / case.weight_shape[1] ** 0.5
    mass = 0.5 + torch.rand(case.in_channels, generator=g)
    gain = 1 + 0.1 * torch.randn(case.out_channels, generator=g)
    return weight.to(x.device, x.dtype), mass.to(x.device), gain.to(x.device)


def _kernel_fn(kernel: str, impl: str) -> Callable:
    """The call under test: the custom op (TRITON) or the reference (EAGER); one tensor out."""
    if kernel == INPUT_SUMS:
        return ops.input_sums if impl == TRITON else reference.input_sums
    if impl == TRITON:
        return lambda w, m, gain: ops.equinorm_weight(w, m, gain, groups=1, single_pass=True)[0]
    return lambda w, m, gain: reference.equinorm_weight(w, m, gain, groups=1, single_pass=True)


def kernel_bytes(kernel: str, direction: str, tensor: torch.Tensor) -> int:
    """Bytes ``kernel`` must move in ``direction`` (see the module docstring); ``tensor`` is x
    for the input sums, the weight for the weight transform."""
    passes = 1 if kernel == INPUT_SUMS else _WEIGHT_PASSES[direction]
    return passes * tensor.numel() * tensor.element_size()


def kernel_step(kernel: str, direction: str, impl: str, case: ConvCase, x: torch.Tensor):
    """(fn, bytes): a zero-argument callable running ``kernel`` for ``case`` (on x, or on a
    weight of x's dtype) and returning a tuple of tensors, and the bytes it must move.  A
    backward is ``torch.autograd.grad`` (retain_graph) of one recorded forward wrt weight,
    mass and gain: the weight-transform backward op for TRITON, the reference's autograd
    graph for EAGER."""
    tensors = _kernel_inputs(kernel, case, x)
    fn = _kernel_fn(kernel, impl)
    nbytes = kernel_bytes(kernel, direction, tensors[0])
    if direction == "forward":
        return (lambda: (fn(*tensors),)), nbytes
    tensors = tuple(t.requires_grad_() for t in tensors)
    out = fn(*tensors)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return (lambda: torch.autograd.grad(out, tensors, grad, retain_graph=True)), nbytes


def check_finite(outputs: tuple) -> None:
    for t in outputs:
        assert torch.isfinite(t).all(), "non-finite output"
