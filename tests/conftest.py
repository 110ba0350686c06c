"""Fixtures of the test suite (the interpreter switch is in the root conftest.py)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE
