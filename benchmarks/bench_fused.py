"""pytest-benchmark suite of the fused batch norms (``fused_cases``: norm + ReLU, norm +
residual add + ReLU) and of a training step of the ResNet-50-shaped stack
(``stack_cases``).

Fused layers: each case times one training-mode pass (forward, or forward+backward) of one
norm and implementation with one epilogue, whole call with host overhead, next to
nn.BatchNorm2d + (out += r) + ReLU on the same input (pytest-benchmark groups them by pass,
epilogue, shape and dtype).  Implementations: the fused Triton layer, the same layer
unfused (add and ReLU in eager torch), the fused layer on the PyTorch path, and the
baseline eager and ``torch.compile``-d.  On CUDA the input is (64, 64, 56, 56) in fp32 and
bf16; on CPU a small (8, 16, 16, 16) fp32 input keeps the suite a quick smoke test, the
Triton cases are skipped and the compiled baseline runs forward+backward only.

Stack: one training step (forward and the parameters' gradients) of the stack with each
norm, eager: on CUDA one block per stage at N=32, fp32 (the roofline's "stack" section
has the full stack and torch.compile); on CPU channels / 8 at 16x16, N=4.

    pytest benchmarks/bench_fused.py --benchmark-enable

With timing on, ``extra_info`` holds the floor's bytes and GB/s against them (fused layers),
and for the Triton cases the kernels' bytes and their path.
"""

from __future__ import annotations

import pytest
import torch

from tritonorm.bench import fused_cases, stack_cases
from tritonorm.bench.fused_cases import BASELINE_COMPILED, EPILOGUES, RESIDUAL_RELU, UNFUSED
from tritonorm.bench.lp_cases import (
    EAGER,
    TRITON,
    check_outputs,
    dtype_name,
    make_inputs,
    run_benchmark,
    shape_name,
)
from tritonorm.bench.timing import PASSES

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
SHAPE = (64, 64, 56, 56) if ON_CUDA else (8, 16, 16, 16)
DTYPES = (torch.float32, torch.bfloat16) if ON_CUDA else (torch.float32,)
STACK = (stack_cases.StackCase(32, blocks=stack_cases.ONE_BLOCK) if ON_CUDA else
         stack_cases.StackCase(4, channel_scale=8, resolution=16, blocks=stack_cases.ONE_BLOCK))


def _marks(impl: str) -> list:
    if impl in (TRITON, UNFUSED) and not ON_CUDA:
        return [pytest.mark.skip(reason="the Triton path is timed on CUDA only "
                                        "(TRITON_INTERPRET=1 on CPU is far too slow)")]
    return [pytest.mark.slow] if impl == BASELINE_COMPILED[1] else []


def _cases():
    for pass_ in PASSES:
        for dtype in DTYPES:
            for epilogue in EPILOGUES:
                for norm, impl in fused_cases.variants((TRITON, UNFUSED, EAGER)):
                    if impl == BASELINE_COMPILED[1] and not ON_CUDA and pass_ == "forward":
                        continue  # one compile per epilogue on CPU; it covers forward and backward
                    yield pytest.param(pass_, dtype, epilogue, norm, impl, marks=_marks(impl),
                                       id=f"{pass_}-{dtype_name(dtype)}-{epilogue}-{norm}-{impl}")


@pytest.mark.parametrize("pass_, dtype, epilogue, norm, impl", list(_cases()))
def test_fused_norm(benchmark, pass_, dtype, epilogue, norm, impl):
    x, dy = make_inputs(SHAPE, dtype, DEVICE)
    residual = fused_cases.make_residual(x) if epilogue == RESIDUAL_RELU else None
    module = fused_cases.build(norm, impl, SHAPE[1], DEVICE)
    fn = fused_cases.step(module, x, residual, dy, pass_)
    if impl == TRITON:
        benchmark.extra_info["bytes_algorithm"] = fused_cases.algorithm_bytes(norm, pass_, x, residual is not None)
        benchmark.extra_info["path"] = fused_cases.paths(norm, x)
    group = f"{pass_} {epilogue} {shape_name(SHAPE)} {dtype_name(dtype)} {DEVICE}"
    nbytes = fused_cases.compulsory_bytes(pass_, x, residual is not None)

    outputs = run_benchmark(benchmark, fn, DEVICE, group, nbytes)

    check_outputs(outputs, x)
    assert len(outputs) == (1 if pass_ == "forward" else 4 + (residual is not None))
    assert (outputs[0] >= 0).all() and (outputs[0] == 0).any()  # the ReLU ran


@pytest.mark.parametrize("norm", stack_cases.NORMS)
def test_stack_step(benchmark, norm):
    x, dy = stack_cases.make_inputs(STACK, DEVICE)
    model = stack_cases.build(norm, stack_cases.EAGER, STACK, DEVICE)
    fn = stack_cases.train_step(model, x, dy, STACK.dtype)

    outputs = run_benchmark(benchmark, fn, DEVICE, f"stack step {STACK.name} {dtype_name(STACK.dtype)} {DEVICE}")

    stack_cases.check_outputs(outputs, STACK)
    assert len(outputs) == 1 + len(list(model.parameters()))
