"""Fixtures of the test suite (the interpreter switch and the per-test seed are in the root
conftest.py)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _native_cpu_convolution():
    """torch's native CPU convolution in the tests, not oneDNN's.  oneDNN 3.12 (torch
    2.13's CPU build) corrupts the heap computing the weight gradient of a small
    channels_last 1x1 stride-2 convolution with one intra-op thread on an AVX2 CPU
    (4 -> 6 channels, 6x6, on an AMD EPYC: "corrupted double-linked list", then an abort;
    with two threads, or without oneDNN, it does not), which is how a pytest-xdist worker
    runs; the tests are about tritonorm, whatever computes the convolutions around it.
    The benchmarks keep oneDNN (they time torch as users run it)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = DEVICE != "cpu"
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=["onchip", "split"])
def lp_path(request, monkeypatch):
    """Each path of the Lp batch-norm kernels in turn: channels held on chip, or split
    over many programs (TRITONORM_LP_PATH forces it; "auto" would pick by size)."""
    monkeypatch.setenv("TRITONORM_LP_PATH", request.param)
    return request.param


@pytest.fixture
def split_path(monkeypatch):
    """The split path of the Lp batch-norm kernels, for the tests of its plans."""
    monkeypatch.setenv("TRITONORM_LP_PATH", "split")


@pytest.fixture
def world_of_one(tmp_path):
    """The default process group of a one-process gloo world (nothing to synchronize: a
    real ProcessGroup for the arguments that take one), destroyed afterwards."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()
