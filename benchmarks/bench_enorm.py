"""pytest-benchmark suite of the ENorm cycle (``enorm_cases`` says what a contender runs and
which bytes a cycle must move).

``test_enorm`` times one call of each contender on each net: the ENorm cycle (Triton
parallel and sequential, PyTorch path), the authors' per-layer loop, and one SGD step
(pytest-benchmark groups them by net).  On CUDA the nets are the study's 3072-500x20-10 MLP
and 9-conv CIFAR net and the timed function synchronizes; on CPU small nets of the same
structure keep the suite a quick smoke test and the Triton cases are skipped.

    pytest benchmarks/bench_enorm.py                      # each case once, unmeasured
    pytest benchmarks/bench_enorm.py --benchmark-enable   # timed; --benchmark-json keeps extra_info

With timing on, the cycles' ``extra_info`` holds the bytes of the bandwidth floor and GB/s.
"""

from __future__ import annotations

import pytest
import torch

from tritonorm.bench.enorm_cases import (
    CONTENDERS,
    SGD_STEP,
    SMALL_NETS,
    STUDY_NETS,
    TRITON_CONTENDERS,
    build,
    contender,
    cycle_bytes,
    state,
)
from tritonorm.bench.equinorm_cases import check_finite
from tritonorm.bench.lp_cases import run_benchmark

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
NETS = STUDY_NETS if ON_CUDA else SMALL_NETS
SKIP_TRITON = pytest.mark.skip(reason="the Triton path is timed on CUDA only "
                                      "(TRITON_INTERPRET=1 on CPU is far too slow)")


def _cases():
    for net in NETS:
        for name in CONTENDERS:
            marks = [SKIP_TRITON] if name in TRITON_CONTENDERS and not ON_CUDA else []
            yield pytest.param(net, name, marks=marks, id=f"{net.name}-{name}")


@pytest.mark.parametrize("net, name", list(_cases()))
def test_enorm(benchmark, net, name):
    chain = build(net, DEVICE)
    nbytes = None if name == SGD_STEP else cycle_bytes(chain)
    run_benchmark(benchmark, contender(name, chain), DEVICE, f"enorm {net.name} {DEVICE}", nbytes)
    check_finite(state(chain))
