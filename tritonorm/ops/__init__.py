"""torch.library custom ops binding the Triton kernels, with fake impls and autograd.

Each op is one node to torch.compile and torch.export: no graph break, and the fake
(meta) implementation gives shapes, dtypes and strides without running a kernel.
"""


def refuse_double_backward(backward_op, forward_name: str) -> None:
    """Give ``backward_op`` (a backward as a Triton kernel, with no derivative of its own)
    an autograd formula that raises a clear error: double backward through ``forward_name``
    is not supported on the Triton path."""

    def _backward(ctx, *grads):
        raise RuntimeError(
            f"double backward through {forward_name} is not supported on the Triton path (its backward is a "
            "Triton kernel without a derivative); use backend='torch', whose reference is differentiable twice"
        )

    backward_op.register_autograd(_backward)
