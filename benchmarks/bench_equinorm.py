"""pytest-benchmark suite of EquiNorm (``equinorm_cases`` says what a case runs and which
bytes a kernel must move).

``test_equinorm_layer`` times one training-mode pass (forward, or forward+backward) of
EquiNormConv2d (Triton, reference eager, reference compiled), of its normalization alone
(input sums and weight transform) and of the baselines nn.Conv2d and nn.Conv2d +
nn.BatchNorm2d, on the same input (pytest-benchmark groups them by pass and dtype).
``test_equinorm_kernel`` times the input sums and the weight transform forward and
backward, Triton op against the reference.

On CUDA the layer is a ResNet-like 3x3 convolution 64 -> 64 on (64, 64, 56, 56), fp32 and
bf16 (autocast), and the timed function synchronizes; on CPU a small (8, 16, 16, 16) fp32
input keeps the suite a quick smoke test and the Triton cases are skipped.
``torch.compile`` runs forward+backward only (one compile per dtype; the roofline times its
forward).

    pytest benchmarks/bench_equinorm.py                      # each case once, unmeasured
    pytest benchmarks/bench_equinorm.py --benchmark-enable   # timed; --benchmark-json keeps extra_info

With timing on, the kernel cases' ``extra_info`` holds the bytes they must move and GB/s.
"""

from __future__ import annotations

import pytest
import torch

from tritonorm.bench.equinorm_cases import (
    KERNELS,
    ConvCase,
    build,
    check_finite,
    kernel_step,
    layer_step,
    make_inputs,
    output_shape,
    variants,
)
from tritonorm.bench.lp_cases import COMPILED, EAGER, TRITON, check_outputs, dtype_name, run_benchmark
from tritonorm.bench.timing import PASSES

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
CASE = ConvCase(64, 64, 64, 56) if ON_CUDA else ConvCase(8, 16, 16, 16)
DTYPES = (torch.float32, torch.bfloat16) if ON_CUDA else (torch.float32,)
SKIP_TRITON = pytest.mark.skip(reason="the Triton path is timed on CUDA only "
                                      "(TRITON_INTERPRET=1 on CPU is far too slow)")


def _marks(impl: str) -> list:
    if impl == TRITON and not ON_CUDA:
        return [SKIP_TRITON]
    return [pytest.mark.slow] if impl == COMPILED else []


def _layer_cases():
    for pass_ in PASSES:
        for dtype in DTYPES:
            for what, impl in variants():
                if impl == COMPILED and pass_ == "forward":
                    continue  # one compile per dtype; it covers forward and backward
                yield pytest.param(pass_, dtype, what, impl, marks=_marks(impl),
                                   id=f"{pass_}-{dtype_name(dtype)}-{what}-{impl}")


def _kernel_cases():
    for kernel, direction in KERNELS:
        for dtype in DTYPES:
            for impl in (TRITON, EAGER):
                yield pytest.param(kernel, direction, dtype, impl, marks=_marks(impl),
                                   id=f"{kernel}-{direction}-{dtype_name(dtype)}-{impl}")


@pytest.mark.parametrize("pass_, dtype, what, impl", list(_layer_cases()))
def test_equinorm_layer(benchmark, pass_, dtype, what, impl):
    inputs = make_inputs(CASE, dtype, DEVICE)
    fn = layer_step(what, build(what, impl, CASE, dtype, DEVICE), inputs, pass_)
    outputs = run_benchmark(benchmark, fn, DEVICE, f"equinorm {pass_} {CASE.name} {dtype_name(dtype)} {DEVICE}")
    check_outputs(outputs, inputs.x, output_shape(what, CASE))


@pytest.mark.parametrize("kernel, direction, dtype, impl", list(_kernel_cases()))
def test_equinorm_kernel(benchmark, kernel, direction, dtype, impl):
    x = make_inputs(CASE, dtype, DEVICE).x
    fn, nbytes = kernel_step(kernel, direction, impl, CASE, x)
    group = f"{kernel} {direction} {CASE.name} {dtype_name(dtype)} {DEVICE}"
    check_finite(run_benchmark(benchmark, fn, DEVICE, group, nbytes))
