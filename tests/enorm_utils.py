"""Shared helpers of the ENorm tests and benchmarks: chains, and the authors' update rule."""

import torch
from torch import nn


def per_layer_cycle(weights: list[torch.Tensor], buffers: list[torch.Tensor] | None, c: float) -> None:
    """The published ENorm step (facebookresearch/enorm, ``_step_conv``), restated: a Python
    loop over the pairs of (O, I, K) weights, every coefficient from the norms at the start
    of the cycle, the last pair left alone, no biases, p = 2, momentum buffers rescaled
    rows by 1/d and columns by d.  The oracle of the parallel mode and the benchmarks'
    per-layer baseline."""
    left = weights[0].flatten(1).norm(dim=1)
    right = weights[1].transpose(0, 1).flatten(1).norm(dim=1)
    for i in range(1, len(weights) - 1):
        balancer = (right / (left * c)).pow(0.5)
        left = weights[i].flatten(1).norm(dim=1)
        right = weights[i + 1].transpose(0, 1).flatten(1).norm(dim=1)
        weights[i - 1].mul_(balancer[:, None, None])
        weights[i].mul_(1 / balancer[None, :, None])
        if buffers is not None:
            buffers[i - 1].mul_(1 / balancer[:, None, None])
            buffers[i].mul_(balancer[None, :, None])


def mlp(widths, bias=False, batchnorm=False):
    """Linear-ReLU chain over ``widths`` (the study's nets: 3072, 500 x depth, 10)."""
    layers = []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if k < len(widths) - 2:
            layers += [nn.BatchNorm1d(n_out)] if batchnorm else []
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(channels, bias=False, in_size=8, classes=10):
    """Conv3x3-ReLU chain with a max-pool after the second conv, flattened into a Linear."""
    layers = []
    for k, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), nn.ReLU()]
        if k == 1:
            layers.append(nn.MaxPool2d(2))
    size = in_size // 2 if len(channels) > 2 else in_size
    layers += [nn.Flatten(), nn.Linear(channels[-1] * size * size, classes, bias=bias)]
    return nn.Sequential(*layers)


def weight_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
