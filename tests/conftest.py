"""Fixtures of the test suite (the interpreter switch and the per-test seed are in the root
conftest.py)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
