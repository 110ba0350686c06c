"""Backend choice: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton", "torch".

The environment variable TRITONORM_BACKEND, read at every call, overrides "auto".
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "TRITONORM_BACKEND"

try:
    from .kernels.channel_reduce import INTERPRETED
except ImportError:  # no triton on this platform: the PyTorch path still works
    INTERPRETED = None

TRITON_AVAILABLE = INTERPRETED is not None


def check_backend(value: str, what: str = "backend") -> str:
    """``value`` if it is one of BACKENDS, else a ValueError naming ``what``."""
    if value not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend ("triton" or "torch") that runs an op on ``x``."""
    backend = check_backend(backend)
    if backend == "auto":
        backend = check_backend(os.environ.get(ENV_VAR, "auto"), f"the environment variable {ENV_VAR}")
    if backend == "auto":
        return "triton" if x.is_cuda and TRITON_AVAILABLE else "torch"
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not x.is_cuda and not INTERPRETED:
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, got a {x.device.type} tensor; set "
                "TRITON_INTERPRET=1 before importing tritonorm to run the kernels on the CPU "
                "(slow: for tests), or use backend='torch'"
            )
    return backend


def describe() -> str:
    """One line on what "auto" picks here and why."""
    env = os.environ.get(ENV_VAR)
    if env not in (None, "auto"):
        return f"{ENV_VAR}={env} forces the {env!r} backend"
    if not TRITON_AVAILABLE:
        return "auto -> torch everywhere (triton is not installed)"
    mode = "interpreted (TRITON_INTERPRET=1)" if INTERPRETED else "compiled"
    return f"auto -> triton ({mode}) for CUDA tensors, torch for the rest"
