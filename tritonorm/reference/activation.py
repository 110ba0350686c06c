"""The activations the Lp batch norms fuse: out = act(z), z = bn(x) (+ residual).

Names (``ACTIVATIONS``), the map f and its derivative f' as the Triton kernels compute
them (the PyTorch path calls ``torch.nn.functional``, which agrees, boundary values
included):

    "relu"        f = max(z, 0)                            f' = 1 if z > 0 else 0
    "leaky_relu"  f = z if z > 0 else s z                  f' = 1 if z > 0 else s
                  (s = negative_slope, 0.01 by default)
    "silu"        f = z sigmoid(z)                         f' = sigmoid(z) (1 + z (1 - sigmoid(z)))
    "gelu"        f = z Phi(z),                            f' = Phi(z) + z phi(z)
                  Phi(z) = (1 + erf(z / sqrt 2)) / 2,  phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    "gelu_tanh"   f = z (1 + tanh u) / 2,                  f' = (1 + tanh u) / 2 + z (1 - tanh^2 u) u' / 2
                  u = sqrt(2 / pi) (z + 0.044715 z^3)      u' = sqrt(2 / pi) (1 + 3 * 0.044715 z^2)
                  (torch's approximate="tanh")
    "hardswish"   f = 0 for z <= -3, z for z >= 3,         f' = 0 for z < -3, 1 for z > 3,
                  z (z + 3) / 6 between                         (2 z + 3) / 6 for -3 <= z <= 3

None is no activation (f = z).  ``activation_of`` names the activation of an nn.Module or a
function, for ``tritonorm.convert``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "NEGATIVE_SLOPE", "activate", "activation_of", "functional_form"]

ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish")
NEGATIVE_SLOPE = 0.01  # the default of nn.LeakyReLU and of every layer's negative_slope


def functional_form(activation: str, negative_slope: float = NEGATIVE_SLOPE) -> tuple[Callable, dict]:
    """(function, keyword arguments) of the ``torch.nn.functional`` call that computes
    ``activation`` (one of ``ACTIVATIONS``): what ``activate`` calls, and what
    ``tritonorm.fold`` writes into a graph in place of a fused activation."""
    forms = {
        "relu": (F.relu, {}), "leaky_relu": (F.leaky_relu, {"negative_slope": negative_slope}), "silu": (F.silu, {}),
        "gelu": (F.gelu, {}), "gelu_tanh": (F.gelu, {"approximate": "tanh"}), "hardswish": (F.hardswish, {}),
    }
    if activation not in forms:
        raise ValueError(f"activation must be None or one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    return forms[activation]


def activate(z: Tensor, activation: str | None, negative_slope: float = NEGATIVE_SLOPE) -> Tensor:
    """act(z) by ``torch.nn.functional`` (differentiable by autograd, double backward
    included); z itself for None.  The caller has checked ``activation``."""
    if activation is None or activation == "none":
        return z
    function, kwargs = functional_form(activation, negative_slope)
    return function(z, **kwargs)


# Modules by exact type: a subclass may compute something else in its forward.
_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Hardswish: "hardswish"}
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", F.silu: "silu", F.gelu: "gelu",
              F.hardswish: "hardswish"}


def activation_of(module_or_function) -> tuple[str, float] | None:
    """(name, negative_slope) of a supported activation, else None.

    Modules (exact types): nn.ReLU, nn.LeakyReLU (its negative_slope), nn.SiLU, nn.GELU
    (approximate "none" -> "gelu", "tanh" -> "gelu_tanh"), nn.Hardswish.  Functions:
    F.relu, torch.relu, F.leaky_relu, F.silu, F.gelu, F.hardswish, named with their
    defaults (F.leaky_relu -> ("leaky_relu", 0.01), F.gelu -> ("gelu", 0.01)): a caller
    reading an fx call reads its ``negative_slope`` / ``approximate`` arguments itself.
    negative_slope is 0.01 (the default) for every activation but leaky_relu."""
    kind = type(module_or_function)
    if kind in _MODULES:
        return _MODULES[kind], NEGATIVE_SLOPE
    if kind is nn.LeakyReLU:
        return "leaky_relu", float(module_or_function.negative_slope)
    if kind is nn.GELU:
        approximate = {"none": "gelu", "tanh": "gelu_tanh"}.get(module_or_function.approximate)
        return None if approximate is None else (approximate, NEGATIVE_SLOPE)
    try:
        name = _FUNCTIONS.get(module_or_function)
    except TypeError:  # unhashable
        return None
    return None if name is None else (name, NEGATIVE_SLOPE)
