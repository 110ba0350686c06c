"""pytest-benchmark suite of bounded weight normalization (``bwn_cases`` says what a
contender runs and which bytes a pass must move).

``test_bounded_weight_norm`` times one pass (forward, or forward+backward) of the
parametrized weight: tritonorm's Triton path (fixed rho, learnable gain, and its two custom
ops called directly), its PyTorch reference eager and compiled,
``torch.nn.utils.parametrizations.weight_norm``, and the plain formula
``rho * v / v.norm(...)`` eager and compiled, and at the norm orders p = 1 and inf the
Triton path, the reference eager and the formula eager (``bwn_cases.ORDER_CONTENDERS``), on
the same v and dL/dw (pytest-benchmark groups them by weight and pass).

On CUDA the weights are ResNet-50's layer4 3x3 conv (512x512x3x3) and a 4096x4096 linear,
fp32, and the timed function synchronizes; on CPU a small conv and linear weight keep the
suite a quick smoke test and the Triton cases are skipped.  ``torch.compile`` runs
forward+backward only (one compile per weight; the roofline times its forward).

    pytest benchmarks/bench_bounded_weight_norm.py                      # each case once, unmeasured
    pytest benchmarks/bench_bounded_weight_norm.py --benchmark-enable   # timed; --benchmark-json keeps extra_info

With timing on, ``extra_info`` holds the compulsory bytes of the pass (the floor) and GB/s.
"""

from __future__ import annotations

import pytest
import torch

from tritonorm.bench.bwn_cases import (
    COMPILED_CONTENDERS,
    CONTENDERS,
    SMALL_WEIGHTS,
    WeightCase,
    build,
    check_outputs,
    compulsory_bytes,
    is_triton,
    make_grad,
    step,
)
from tritonorm.bench.lp_cases import dtype_name, run_benchmark
from tritonorm.bench.timing import PASSES

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
WEIGHTS = (WeightCase((512, 512, 3, 3), ("layer4.0.conv2",)), WeightCase((4096, 4096), ("linear",))) \
    if ON_CUDA else SMALL_WEIGHTS
DTYPE = torch.float32
SKIP_TRITON = pytest.mark.skip(reason="the Triton path is timed on CUDA only "
                                      "(TRITON_INTERPRET=1 on CPU is far too slow)")


def _marks(name: str) -> list:
    if is_triton(name) and not ON_CUDA:
        return [SKIP_TRITON]
    return [pytest.mark.slow] if name in COMPILED_CONTENDERS else []


def _cases():
    for pass_ in PASSES:
        for case in WEIGHTS:
            for name in CONTENDERS:
                if name in COMPILED_CONTENDERS and pass_ == "forward":
                    continue  # one compile per weight; it covers forward and backward
                yield pytest.param(pass_, case, name, marks=_marks(name), id=f"{pass_}-{case.name}-{name}")


@pytest.mark.parametrize("pass_, case, name", list(_cases()))
def test_bounded_weight_norm(benchmark, pass_, case, name):
    fn = step(build(name, case, DTYPE, DEVICE), make_grad(case, DTYPE, DEVICE), pass_)
    group = f"bounded_weight_norm {pass_} {case.name} {dtype_name(DTYPE)} {DEVICE}"
    outputs = run_benchmark(benchmark, fn, DEVICE, group, compulsory_bytes(pass_, case, DTYPE))
    check_outputs(outputs, case)
