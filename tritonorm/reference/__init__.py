"""Plain-PyTorch implementations: the CPU path and the oracle of the tests."""

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def update_running(running: torch.Tensor, batch: torch.Tensor, *, momentum, num_batches_tracked) -> None:
    """running = (1 - f) running + f batch in place, f = momentum or 1 / num_batches_tracked.

    ``batch`` is detached and the buffer needs no grad, so autograd records nothing without
    a ``torch.no_grad()`` block (which torch.export would have to keep in its graph)."""
    factor = momentum if momentum is not None else 1.0 / num_batches_tracked
    running.mul_(1 - factor).add_(factor * batch.detach().to(running.dtype))
