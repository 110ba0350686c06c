"""Test set-up: without CUDA, the Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before the kernels are defined (imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tritonorm  # noqa: E402,F401  (defines the kernels under the setting above)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE

