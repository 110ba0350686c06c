"""Activations fused into the normalize pass and its backward (math and names:
``tritonorm.reference.activation``).

A fused layer computes out = act(z) with z = y + residual, y the normalized input.  Its
backward needs act'(z), recomputed from z (which the kernels rebuild from x, the saved
statistics and the residual, all of which they read anyway): no tensor is saved for it.

    relu        max(z, 0)                        1 if z > 0 else 0
    leaky_relu  z if z > 0 else slope * z        1 if z > 0 else slope
    silu        z * s, s = sigmoid(z)            s * (1 + z * (1 - s))
    gelu        z * Phi(z)                       Phi(z) + z * phi(z)
    gelu_tanh   z/2 (1 + tanh(u)),               (1 + t) / 2 + z/2 (1 - t^2) du/dz,
                u = sqrt(2/pi) (z + 0.044715 z^3)     t = tanh(u)
    hardswish   z * min(max(z + 3, 0), 6) / 6    0 if z < -3, z/3 + 1/2 if z <= 3, else 1

(the derivatives at the kinks are torch's: relu'(0) = 0, leaky_relu'(0) = slope,
hardswish'(-3) = -1/2, hardswish'(3) = 3/2).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

NONE = tl.constexpr(0)
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
SILU = tl.constexpr(3)
GELU = tl.constexpr(4)
GELU_TANH = tl.constexpr(5)
HARDSWISH = tl.constexpr(6)
# The op's activation names and the kernels' ACT codes.
CODES = {"none": 0, "relu": 1, "leaky_relu": 2, "silu": 3, "gelu": 4, "gelu_tanh": 5, "hardswish": 6}

_SQRT1_2 = tl.constexpr(math.sqrt(0.5))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1): exact at both ends (exp overflows to inf: 1)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu_tanh_argument(z):
    """u = sqrt(2/pi) (z + 0.044715 z^3) (tensor operands first: the interpreter does not
    take a constexpr on the left of a tensor)."""
    return (z * z * z * _GELU_CUBIC + z) * _SQRT_2_PI


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    """act(z) in z's dtype (fp32 in the kernels)."""
    if ACT == RELU:
        out = tl.maximum(z, 0.0)
    elif ACT == LEAKY_RELU:
        out = tl.where(z > 0, z, z * slope)
    elif ACT == SILU:
        out = z * tl.sigmoid(z)
    elif ACT == GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == GELU_TANH:
        out = 0.5 * z * (1.0 + _tanh(_gelu_tanh_argument(z)))
    elif ACT == HARDSWISH:
        out = z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    else:
        out = z
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr, slope):
    """act'(z) (see the module docstring for the kinks)."""
    if ACT == RELU:
        d = (z > 0).to(z.dtype)
    elif ACT == LEAKY_RELU:
        d = tl.where(z > 0, 1.0, slope).to(z.dtype)
    elif ACT == SILU:
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif ACT == GELU:
        d = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    elif ACT == GELU_TANH:
        t = _tanh(_gelu_tanh_argument(z))
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * (z * z * (3 * _GELU_CUBIC) + 1.0) * _SQRT_2_PI
    elif ACT == HARDSWISH:
        d = tl.where(z < -3.0, 0.0, tl.where(z <= 3.0, z / 3.0 + 0.5, 1.0)).to(z.dtype)
    else:
        d = tl.full(z.shape, 1.0, z.dtype)
    return d


@triton.jit
def pre_activation(a, scale, shift, res_ptr, offs, mask, ACC: tl.constexpr):
    """z = a * scale + shift [+ residual]: the fused layer's pre-activation from the
    centred input a = x - mu."""
    z = a * scale + shift
    if res_ptr is not None:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(ACC)
    return z
