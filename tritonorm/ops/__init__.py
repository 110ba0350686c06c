"""torch.library custom ops binding the Triton kernels, with fake impls and autograd.

Each op is one node to torch.compile and torch.export: no graph break, and the fake
(meta) implementation gives shapes, dtypes and strides without running a kernel.
"""
