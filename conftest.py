"""Without CUDA, run the Triton kernels on CPU tensors through Triton's interpreter.

The switch must be on before tritonorm defines its kernels (is imported), so it lives in
the root conftest, which pytest loads before collecting tests/ or benchmarks/."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
