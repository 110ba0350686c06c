"""Backend choice: "auto" (Triton on CUDA tensors, PyTorch elsewhere), "triton", "torch".

The environment variable TRITONORM_BACKEND, read at every call, overrides "auto".
"""

from __future__ import annotations

import os

import torch
from torch._C._functorch import TransformType, get_interpreter_stack, is_batchedtensor

from ._checks import check_choice

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "TRITONORM_BACKEND"

try:
    from .kernels.channel_reduce import INTERPRETED
except ImportError:  # no triton on this platform: the PyTorch path still works
    INTERPRETED = None

TRITON_AVAILABLE = INTERPRETED is not None


def check_backend(value: str, what: str = "backend") -> str:
    """``value`` if it is one of BACKENDS, else a ValueError naming ``what``."""
    return check_choice("backend", value, BACKENDS, what)


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


def check_transforms(backend: str, input: torch.Tensor, buffers: tuple[torch.Tensor, ...] = ()) -> None:
    """Refuse, with one clear error, what ``torch.func`` cannot do with an op.

    * grad / vjp / jvp / jacrev / jacfwd on the Triton path: torch.library builds a custom
      op's autograd as an autograd.Function without ``setup_context``, which torch.func
      transforms refuse (the PyTorch path is plain autograd and works);
    * vmap over a call that updates ``buffers`` (running statistics) in place while the
      input is batched and the buffers are not, as nn.BatchNorm refuses it.

    Nothing is checked while torch.compile traces: the checks ran when the call did."""
    if torch.compiler.is_compiling():
        return
    stack = get_interpreter_stack() or ()
    if backend == "triton" and any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in stack):
        raise RuntimeError(
            "torch.func.grad / vjp / jvp / jacrev / jacfwd cannot differentiate tritonorm's Triton path (its custom "
            "ops' autograd is not a torch.func-compatible autograd.Function); use backend='torch' under torch.func, "
            "or torch.autograd.grad"
        )
    if buffers and is_batchedtensor(input) and not all(is_batchedtensor(b) for b in buffers):
        raise RuntimeError(
            "vmap: the running statistics are updated in place but are not batched while the input is; use "
            "track_running_stats=False (or eval mode) under vmap, as for nn.BatchNorm"
        )


def describe() -> str:
    """One line on what "auto" picks here and why."""
    env = os.environ.get(ENV_VAR)
    if env not in (None, "auto"):
        return f"{ENV_VAR}={env} forces the {env!r} backend"
    if not TRITON_AVAILABLE:
        return "auto -> torch everywhere (triton is not installed)"
    mode = "interpreted (TRITON_INTERPRET=1)" if INTERPRETED else "compiled"
    return f"auto -> triton ({mode}) for CUDA tensors, torch for the rest"
