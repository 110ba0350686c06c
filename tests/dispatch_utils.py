"""The torch ops a backward dispatches outside the Triton kernels, for tests that count them.

A ``TorchDispatchMode`` sees every aten op and every tritonorm custom op once, as the
caller made it: what a custom op does inside (its kernels and their allocations) is
hidden from it, and what it records is exactly what autograd adds around the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that fill memory with a constant (autograd materializing a zero gradient, a
# slice_backward's zeros) and ops that copy a tensor.
FILLS = {"aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.zero_", "aten.fill_", "aten.full",
         "aten.full_like", "aten.new_full"}
COPIES = {"aten.copy_", "aten._to_copy", "aten.clone", "aten.slice_backward", "aten.select_backward",
          "aten.index_put_", "aten.as_strided_scatter", "aten.slice_scatter"}


@dataclass(frozen=True)
class Op:
    name: str  # "aten.add", "tritonorm.equinorm_weight_backward", ...
    numel: int  # elements of its largest tensor output
    view: bool  # returns a view of an input (no data moved)


class DispatchLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        numel = max((t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)), default=0)
        self.ops.append(Op(str(func.overloadpacket), numel, func.is_view))
        return out


def backward_ops(outputs, inputs, grad_outputs) -> list[Op]:
    """The ops ``torch.autograd.grad(outputs, inputs, grad_outputs)`` dispatches."""
    with DispatchLog() as log:
        torch.autograd.grad(outputs, inputs, grad_outputs)
    return log.ops


def fills_and_copies(ops: list[Op]) -> list[Op]:
    return [op for op in ops if op.name in FILLS or op.name in COPIES]


def data_ops(ops: list[Op], min_numel: int = 0) -> list[str]:
    """The names of the ops that move data (not views), with an output of at least
    ``min_numel`` elements, in order."""
    return [op.name for op in ops if not op.view and op.numel >= min_numel]
