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

The kernels alone (``kernel_step``): the input sums v (C,) of x, forward only (its backward
is a broadcast view, summed into dx by the convolution's backward), and the weight transform
w -> gain * w'', forward and backward, at the weight's dtype (fp32, or bf16 for the bf16
cases) with an fp32 mass, as ``input_sums`` returns it.  The bytes each must move
(``kernel_bytes``) are docs/benchmarks.md's ("EquiNorm").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import nn

import tritonorm
from tritonorm.ops import equinorm as ops
from tritonorm.reference import equinorm as reference

from .lp_cases import COMPILED, EAGER, TRITON, check_outputs, dtype_name, shape_name, step
from .timing import by_pass, fmt, guarded, markdown_table, median_seconds, ratio, time_passes

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
    """Bytes ``kernel`` must move in ``direction`` (docs/benchmarks.md); ``tensor`` is x
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


# ----------------------------------------------------------------------------- the roofline section

# EquiNormConv2d layers of a ResNet: the 3x3 convolutions of the four stages, the 1x1
# reduction of a bottleneck and the stride-2 entry of stage 2.
LAYERS = (
    ConvCase(256, 64, 64, 56), ConvCase(128, 128, 128, 28), ConvCase(128, 256, 256, 14), ConvCase(128, 512, 512, 7),
    ConvCase(64, 256, 64, 56, kernel=1), ConvCase(128, 64, 128, 56, stride=2),
)
# --quick: two layers, torch.compile at the first only (compiles dominate the time).
QUICK_LAYERS = (ConvCase(64, 64, 64, 56), ConvCase(64, 256, 64, 56, kernel=1))
SMOKE_LAYER = ConvCase(4, 8, 8, 8)
# The target on (EquiNorm - conv) / (conv+BN - conv), Triton forward+backward: at most this.
OVERHEAD_TARGET = 0.5


def _time_layer(what: str, impl: str, case: ConvCase, inputs, device: str) -> list[dict]:
    module = build(what, impl, case, inputs.x.dtype, device)
    times = time_passes(lambda pass_: layer_step(what, module, inputs, pass_),
                        lambda out: check_outputs(out, inputs.x, output_shape(what, case)), device)
    return [{"layer": case.name, "what": what, "impl": impl, "dtype": dtype_name(inputs.x.dtype), "pass": pass_,
             "time_us": time_us} for pass_, time_us in times.items()]


def _time_kernel(kernel: str, direction: str, impl: str, case: ConvCase, x, device: str) -> list[dict]:
    fn, nbytes = kernel_step(kernel, direction, impl, case, x)
    check_finite(fn())  # and the warm-up
    shape = case.input_shape if kernel == INPUT_SUMS else case.weight_shape
    return [{
        "kernel": kernel, "impl": impl, "shape": shape_name(shape), "dtype": dtype_name(x.dtype),
        "direction": direction, "time_us": median_seconds(fn, device) * 1e6, "bytes": nbytes,
    }]


def layer_variants(impls: tuple, compiled_cases: tuple) -> Callable:
    """``variants_of`` for ``measure``: the layer with each of ``impls``, compiled too at
    ``compiled_cases``; the normalization alone with each of ``impls``."""
    def variants_of(case: ConvCase) -> list:
        return variants(impls + ((COMPILED,) if case in compiled_cases else ()), norm_only=impls)

    return variants_of


def measure(cases, dtypes, device: str, variants_of, kernel_impls, log):
    """Time both passes of every (what, implementation) in ``variants_of(case)`` and every
    kernel direction of each of ``kernel_impls`` for every layer case and dtype; returns
    the layer rows, the kernel rows and the errors of the cases that failed."""
    layers, kernels, errors = [], [], []
    for case in cases:
        for dtype in dtypes:
            inputs = make_inputs(case, dtype, device)
            block = []
            for what, impl in variants_of(case):
                where = f"EquiNorm {case.name} {dtype_name(dtype)} {what} {impl}"
                block += guarded(where, errors, log, device, partial(_time_layer, what, impl, case, inputs, device))
            layers += by_pass(block)
            for kernel, direction in KERNELS:
                for impl in kernel_impls:
                    where = f"EquiNorm {case.name} {dtype_name(dtype)} {kernel} {direction} {impl}"
                    kernels += guarded(where, errors, log, device,
                                       partial(_time_kernel, kernel, direction, impl, case, inputs.x, device))
    return layers, kernels, errors


def _overhead(r: dict, conv: dict | None, conv_bn: dict | None) -> float | None:
    """(time - conv time) / (conv+BN time - conv time) of an EquiNorm layer row; None for the
    other rows, or when BatchNorm's own time is not positive (noise at tiny sizes)."""
    if r["what"] != EQUINORM or not conv or not conv_bn or conv_bn["time_us"] <= conv["time_us"]:
        return None
    return (r["time_us"] - conv["time_us"]) / (conv_bn["time_us"] - conv["time_us"])


def derive(layers: list[dict], kernels: list[dict], peak_gbps: float) -> None:
    """Add time / conv, time / conv+BN, the overhead ratio and (EquiNorm layers) time /
    compiled-reference time to the layer rows; GB/s, its fraction of peak and time /
    reference time to the kernel rows."""
    index = {(r["layer"], r["dtype"], r["pass"], r["what"], r["impl"]): r for r in layers}
    for r in layers:
        config = (r["layer"], r["dtype"], r["pass"])
        conv, conv_bn = index.get((*config, *CONV)), index.get((*config, *CONV_BN))
        r["vs_conv"], r["vs_conv_bn"] = ratio(r, conv), ratio(r, conv_bn)
        r["overhead_vs_bn"] = _overhead(r, conv, conv_bn)
        r["vs_compiled"] = ratio(r, index.get((*config, EQUINORM, COMPILED))) if r["what"] == EQUINORM else None
    kernel_index = {(r["kernel"], r["shape"], r["dtype"], r["direction"], r["impl"]): r for r in kernels}
    for r in kernels:
        r["gbps"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["peak_fraction"] = r["gbps"] / peak_gbps
        r["vs_reference"] = ratio(r, kernel_index.get((r["kernel"], r["shape"], r["dtype"], r["direction"], EAGER)))


def overhead_summary(layers: list[dict]) -> dict | None:
    """The worst overhead ratio of the Triton forward+backward rows, against the target;
    None without such rows (as on CPU)."""
    rows = [r for r in layers if r["impl"] == TRITON and r["pass"] == "forward+backward"
            and r["overhead_vs_bn"] is not None]
    if not rows:
        return None
    worst = max(rows, key=lambda r: r["overhead_vs_bn"])
    return {"target": OVERHEAD_TARGET, "worst": worst["overhead_vs_bn"], "layer": worst["layer"],
            "dtype": worst["dtype"], "met": worst["overhead_vs_bn"] <= OVERHEAD_TARGET}


def _overhead_line(summary: dict | None) -> str:
    if summary is None:
        return "Overhead target: no Triton forward+backward rows measured."
    verdict = "met" if summary["met"] else "NOT met"
    return (f"Overhead target (Triton forward+backward, (EquiNorm - conv) / (conv+BN - conv) <= {summary['target']}): "
            f"{verdict}; worst {summary['worst']:.2f} at {summary['layer']} {summary['dtype']}.")


def section(layers: list[dict], kernels: list[dict], summary: dict | None) -> list[str]:
    """The markdown of the section: what it measures, the layer table and the kernel table."""
    layer_table = markdown_table(
        ["layer", "dtype", "pass", "what", "impl", "time (us)", "/ conv", "/ conv+BN", "overhead / BN's",
         "/ compiled ref"],
        [[r["layer"], r["dtype"], r["pass"], r["what"], r["impl"], f"{r['time_us']:.1f}", fmt(r["vs_conv"], ".2f"),
          fmt(r["vs_conv_bn"], ".2f"), fmt(r["overhead_vs_bn"], ".2f"), fmt(r["vs_compiled"], ".2f")]
         for r in layers],
    )
    kernel_table = markdown_table(
        ["kernel", "impl", "tensor", "dtype", "direction", "time (us)", "MB", "GB/s", "/ peak", "/ reference"],
        [[r["kernel"], r["impl"], r["shape"], r["dtype"], r["direction"], f"{r['time_us']:.1f}",
          f"{r['bytes'] / 1e6:.2f}", f"{r['gbps']:.0f}", f"{r['peak_fraction']:.1%}", fmt(r["vs_reference"], ".2f")]
         for r in kernels],
    )
    return [
        "## EquiNorm: EquiNormConv2d against nn.Conv2d and nn.Conv2d + nn.BatchNorm2d",
        "",
        "layer: input shape, kernel, stride, output channels; bf16 runs under autocast (fp32 parameters). "
        "what: equinorm, the whole EquiNormConv2d; norm-only, its input sums and weight transform (and their "
        "backward) without the convolution; conv and conv+bn, the baselines (no conv bias). "
        "/ conv, / conv+BN: time over nn.Conv2d's and over nn.Conv2d + nn.BatchNorm2d's (for norm-only, / conv is "
        "the fraction of the convolution's time the normalization costs). overhead / BN's: "
        "(time - conv time) / (conv+BN time - conv time). / compiled ref: time over torch.compile of the "
        "reference layer's.",
        "",
        _overhead_line(summary),
        "",
        layer_table,
        "",
        "## EquiNorm kernels",
        "",
        "MB the kernel must move: input sums, read x; weight transform forward, read w and write w''; backward, "
        "read dL/dw'' and w and write dL/dw. GB/s: those bytes / time; / peak: GB/s over the peak bandwidth. "
        "Backward: torch.autograd.grad of a recorded forward. / reference: time over the PyTorch reference's.",
        "",
        kernel_table,
    ]


def run_section(cases, compiled_cases, dtypes, impls, device: str, peak: float,
                log) -> tuple[dict, list[str], list[str]]:
    """Measure, derive and render the section: (record entries, markdown lines, errors)."""
    layers, kernels, errors = measure(cases, dtypes, device, layer_variants(impls, compiled_cases), impls, log)
    derive(layers, kernels, peak)
    summary = overhead_summary(layers)
    part = {"equinorm_layers": layers, "equinorm_kernels": kernels, "equinorm_overhead": summary}
    return part, section(layers, kernels, summary), errors
