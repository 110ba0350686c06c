"""Shared helpers of the ENorm tests: chains and their weight layers (the authors' per-layer
cycle, the oracle of the parallel mode, is ``tritonorm.reference.enorm.per_layer_cycle``)."""

from torch import nn


def mlp(widths, bias=False, batchnorm=False):
    """Linear-ReLU chain over ``widths`` (the study's nets: 3072, 500 x depth, 10)."""
    layers = []
    for k, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out, bias=bias))
        if k < len(widths) - 2:
            layers += [nn.BatchNorm1d(n_out)] if batchnorm else []
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(channels, bias=False, in_size=8, classes=10):
    """Conv3x3-ReLU chain with a max-pool after the second conv, flattened into a Linear."""
    layers = []
    for k, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), nn.ReLU()]
        if k == 1:
            layers.append(nn.MaxPool2d(2))
    size = in_size // 2 if len(channels) > 2 else in_size
    layers += [nn.Flatten(), nn.Linear(channels[-1] * size * size, classes, bias=bias)]
    return nn.Sequential(*layers)


def weight_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
