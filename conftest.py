"""Without CUDA, run the Triton kernels on CPU tensors through Triton's interpreter.

The switch must be on before tritonorm defines its kernels (is imported), so it lives in
the root conftest, which pytest loads before collecting tests/ or benchmarks/.

Every test (in tests/ and benchmarks/) also starts from torch's global random generator
seeded from its own name (``_seed_torch``), so that the tensors it draws do not depend on
which tests ran before it in the same process: the order differs under pytest-xdist, from
one run to the next, and with ``-k`` or a single file."""

import os
import threading
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches triton.language (an inspect.getmembers walk of its
    modules) before the launch of a kernel and again before every call of a jit helper
    inside it, for every program, and restores it when the launch ends.  The helpers see
    the modules the launch has already patched, so within a launch the launch's own patch
    is enough: the same rule as the traffic counter's (``tritonorm.bench.traffic``), here
    for every interpreted launch of the test session.  An L1 forward at 4x8x7x7 runs in
    0.063 s instead of 0.17 s (triton 3.9), and nothing else changes: the helpers' calls
    return nothing from it, and the launch restores what it patched.  Left alone if the
    interpreter is not shaped as expected (another triton version)."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    if not (callable(getattr(interpreter, "_patch_lang", None)) and hasattr(interpreter, "GridExecutor")):
        return
    patch_lang, launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    state = threading.local()

    def launch_patching_once(self, *args, **kwargs):
        state.patched = set()  # the triton.language modules patched for this launch
        try:
            return launch(self, *args, **kwargs)
        finally:
            state.patched = None

    def patch_lang_once(fn):
        languages = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        patched = getattr(state, "patched", None)
        if patched is not None and patched and languages <= patched:
            return None  # a helper's call: the launch's own call patched these (its scope restores them)
        if patched is not None:
            patched |= languages
        return patch_lang(fn)

    interpreter.GridExecutor.__call__ = launch_patching_once
    interpreter._patch_lang = patch_lang_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()

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
