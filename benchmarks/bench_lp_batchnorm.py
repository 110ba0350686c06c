"""pytest-benchmark suite of the L1 / L-inf / Top-k and mean-only batch norms (``lp_cases``
says what a case runs and which bytes it must move).

Each case times one training-mode pass (forward, or forward+backward) of one norm and
implementation, whole call with host overhead, next to ``nn.BatchNorm2d`` on the same
input (pytest-benchmark groups them by pass, shape, layout and dtype).  The implementations
are the Triton path, the PyTorch reference eager and compiled, and the plain autograd
contender (``lp_cases.PlainLpBatchNorm2d``; for the mean-only layer
``lp_cases.PlainMeanOnlyBatchNorm2d``: x - x.mean((0, 2, 3), keepdim=True) + bias), the
yardstick of the reference's CPU speed.
On CUDA the input is a ResNet-like (64, 64, 56, 56) in fp32 and bf16 and the timed
function synchronizes.  On CPU a small (8, 16, 16, 16) fp32 input keeps the suite a quick
smoke test, the Triton cases are skipped and ``torch.compile`` (about 10 s per compile on
CPU) runs forward+backward only; the reference and the plain contender are also timed at
(32, 64, 28, 28), NCHW and channels_last.

    pytest benchmarks                      # each case once, unmeasured (pyproject default)
    pytest benchmarks --benchmark-enable   # timed; --benchmark-json=FILE keeps extra_info
    pytest benchmarks/bench_lp_batchnorm.py --benchmark-enable -k "eager or plain"   # torch path vs contender

With timing on, ``extra_info`` holds the compulsory bytes and GB/s against them, and for
the Triton cases the bytes and GB/s of the passes the kernels make.
"""

from __future__ import annotations

import pytest
import torch

from tritonorm.bench.lp_cases import (
    COMPILED,
    EAGER,
    IMPLEMENTATIONS,
    PLAIN,
    TRITON,
    algorithm_bytes,
    build_layer,
    check_outputs,
    compulsory_bytes,
    dtype_name,
    make_inputs,
    shape_name,
    step,
    synchronized,
    variants,
)
from tritonorm.bench.timing import PASSES

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
SHAPE = (64, 64, 56, 56) if ON_CUDA else (8, 16, 16, 16)
DTYPES = (torch.float32, torch.bfloat16) if ON_CUDA else (torch.float32,)
# On CPU, the torch path and the plain contender at a larger shape too, in both layouts.
CPU_LARGE_SHAPE = (32, 64, 28, 28)


def _layout(channels_last: bool) -> str:
    return "nhwc" if channels_last else "nchw"


def _marks(impl: str) -> list:
    if impl == TRITON and not ON_CUDA:
        return [pytest.mark.skip(reason="the Triton path is timed on CUDA only "
                                        "(TRITON_INTERPRET=1 on CPU is far too slow)")]
    return [pytest.mark.slow] if impl == COMPILED else []


def _cases():
    for pass_ in PASSES:
        for dtype in DTYPES:
            for norm, impl in variants((*IMPLEMENTATIONS, PLAIN)):
                if impl == COMPILED and not ON_CUDA and pass_ == "forward":
                    continue  # one compile per norm on CPU; it covers forward and backward
                yield pytest.param(pass_, dtype, norm, impl, SHAPE, False, marks=_marks(impl),
                                   id=f"{pass_}-{dtype_name(dtype)}-{norm}-{impl}")
    if not ON_CUDA:
        for pass_ in PASSES:
            for channels_last in (False, True):
                for norm, impl in variants((EAGER, PLAIN)):
                    yield pytest.param(pass_, torch.float32, norm, impl, CPU_LARGE_SHAPE, channels_last,
                                       id=f"{pass_}-{shape_name(CPU_LARGE_SHAPE)}-{_layout(channels_last)}-fp32-"
                                          f"{norm}-{impl}")


@pytest.mark.parametrize("pass_, dtype, norm, impl, shape, channels_last", list(_cases()))
def test_lp_batch_norm(benchmark, pass_, dtype, norm, impl, shape, channels_last):
    x, dy = make_inputs(shape, dtype, DEVICE, channels_last=channels_last)
    fn = synchronized(step(build_layer(norm, impl, shape[1], DEVICE), x, dy, pass_), DEVICE)
    fn()  # compile / JIT and allocator warm-up, outside the timed calls
    benchmark.group = f"{pass_} {shape_name(shape)} {_layout(channels_last)} {dtype_name(dtype)} {DEVICE}"
    moved = {"compulsory": compulsory_bytes(pass_, x)}
    if impl == TRITON:
        moved["algorithm"] = algorithm_bytes(norm, pass_, x)
    for what, nbytes in moved.items():
        benchmark.extra_info[f"bytes_{what}"] = nbytes

    outputs = benchmark(fn)

    check_outputs(outputs, x)
    if benchmark.stats:  # None when timing is disabled
        median = benchmark.stats.stats.median
        for what, nbytes in moved.items():
            benchmark.extra_info[f"gbps_{what}"] = nbytes / median / 1e9
