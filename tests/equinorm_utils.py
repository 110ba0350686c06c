"""Shared helpers of the EquiNorm tests: random layers' tensors and one call on either path."""

import torch

from tritonorm import functional as F

CONV = {1: F.equinorm_conv1d, 2: F.equinorm_conv2d, 3: F.equinorm_conv3d}

def positive_input(shape, dtype=torch.float32, device="cpu", seed=0, channels_last=False):
    """ReLU-like data: positive, with a different mean per channel (dim 1), never constant."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = (1, c) + (1,) * (len(shape) - 2)
    x = torch.rand(shape, generator=g) * (0.5 + torch.rand(c, generator=g)).view(view) + 0.05
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def random_weight(shape, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def run_layer(x, weight_shape, backend, *, conv=None, linear=False, training=True, momentum=0.1, affine=True,
              param_dtype=None, grad_dtype=None, seed=2, **options):
    """Forward and backward of the functional EquiNorm conv (``conv`` = its options, with
    "nd") or linear on ``x``; returns y, the gradients and the running mean after the call.

    ``grad_dtype`` rounds the upstream gradient to that dtype's values, so a float64
    reference can see the same values as a low-precision run."""
    g = torch.Generator().manual_seed(seed)
    dev, param_dtype = x.device, param_dtype or x.dtype
    c_out, c_in = weight_shape[0], (x.shape[-1] if linear else x.shape[1])
    x = x.detach().clone().requires_grad_()
    w = random_weight(weight_shape, param_dtype, dev, seed).requires_grad_()
    gain = (torch.rand(c_out, generator=g) + 0.5).to(dev, param_dtype).requires_grad_() if affine else None
    bias = torch.randn(c_out, generator=g).to(dev, param_dtype).requires_grad_() if affine else None
    running = (torch.rand(c_in, generator=g) + 0.5).to(dev, param_dtype)
    nbt = torch.tensor(3, device=dev) if momentum is None else None
    common = dict(training=training, momentum=momentum, num_batches_tracked=nbt, backend=backend, **options)
    if linear:
        y = F.equinorm_linear(x, w, gain, bias, running, **common)
    else:
        conv = dict(conv)
        y = CONV[conv.pop("nd")](x, w, gain, bias, running, **conv, **common)
    dy = torch.randn(y.shape, generator=g).to(dev, grad_dtype or y.dtype).to(y.dtype)
    y.backward(dy)
    out = {"y": y.detach(), "dx": x.grad, "dweight": w.grad, "running_mean": running}
    if affine:
        out["dgain"], out["dbias"] = gain.grad, bias.grad
    return out
