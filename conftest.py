"""Without CUDA, run the Triton kernels on CPU tensors through Triton's interpreter.

The switch must be on before tritonorm defines its kernels (is imported), so it lives in
the root conftest, which pytest loads before collecting tests/ or benchmarks/.

Every test (in tests/ and benchmarks/) also starts from torch's global random generator
seeded from its own name (``_seed_torch``), so that the tensors it draws do not depend on
which tests ran before it in the same process: the order differs under pytest-xdist, from
one run to the next, and with ``-k`` or a single file."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton's interpreter patches triton.language once per launch, not at every jit-helper
    # call of every program: the traffic counter's rule, for every interpreted launch of the
    # session (an L1 forward at 4x8x7x7 in 0.063 s instead of 0.17 s, triton 3.9).
    from tritonorm.bench.traffic import language_patched_once_per_launch

    for _patcher in language_patched_once_per_launch():
        _patcher.start()

# A pytest-xdist worker shares the cores with the other workers: its share of them for
# torch's intra-op threads, not all of them each (2 workers x 2 threads on 2 cores spin
# against each other).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed_torch(request):
    """torch.manual_seed(a hash of the test's file and name); a test may seed again."""
    path, _, name = request.node.location  # without the "@group" suffix of --dist loadgroup
    torch.manual_seed(zlib.crc32(f"{path}::{name}".encode()))
