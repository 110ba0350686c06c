"""Argument checks: one rule and one wording per kind of argument, shared by every public
function, layer constructor and ENorm, at construction and again at call (an attribute
such as ``layer.momentum`` may be reassigned in between).

Every error names the argument and says what was expected.  A number may arrive as a
``torch.SymInt`` / ``torch.SymFloat`` (``torch.compile(dynamic=True)`` passes a module's
float attributes that way): the checks only compare it, which guards on the condition
without specializing the value, and never call ``math`` functions on it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference.activation import ACTIVATIONS

NUMBER_TYPES = (int, float, torch.SymInt, torch.SymFloat)


def is_number(value) -> bool:
    """A real number (possibly symbolic), not a bool."""
    return isinstance(value, NUMBER_TYPES) and not isinstance(value, bool)


def _describe_range(low: float, high: float, low_open: bool, high_open: bool) -> str:
    low_s, high_s = f"{low:g}", f"{high:g}"
    if high == math.inf:
        sign = ">" if low_open else ">="
        if low == -math.inf:
            return "a finite number" if high_open else "a number (math.inf allowed)"
        return f"a finite number {sign} {low_s}" if high_open else f"a number {sign} {low_s} (math.inf allowed)"
    return f"a number in {'(' if low_open else '['}{low_s}, {high_s}{')' if high_open else ']'}"


def check_number(
    name: str,
    value,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
    none: bool = False,
):
    """``value`` if it is a real number in the range (NaN never is; math.inf only when
    ``high`` is math.inf and ``high_open`` is False), or None when ``none``; else a
    ValueError naming ``name``."""
    if value is None and none:
        return value
    if is_number(value):
        above = low < value if low_open else low <= value
        below = value < high if high_open else value <= high
        if above and below:
            return value
    expected = _describe_range(low, high, low_open, high_open) + (" or None" if none else "")
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool), else a ValueError."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool) and value >= minimum:
        return value
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool, else a TypeError (1 and 0 are refused: a flag is a flag)."""
    if isinstance(value, bool):
        return value
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_process_group(process_group, none: str = "per-process statistics") -> None:
    """None (meaning ``none``) or a torch.distributed ProcessGroup, else a TypeError."""
    if process_group is None or (
        torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup)
    ):
        return
    raise TypeError(
        f"process_group must be None ({none}) or a torch.distributed.ProcessGroup "
        f"(e.g. torch.distributed.group.WORLD after init_process_group), got {process_group!r:.80}"
    )


def check_choice(name: str, value, choices, what: str | None = None):
    """``value`` if it is one of ``choices``, else a ValueError naming ``what`` (or ``name``)."""
    if isinstance(value, str) and value in choices:
        return value
    raise ValueError(f"{what or name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_activation(activation, negative_slope) -> None:
    """A fused activation: None or one of ``ACTIVATIONS``, and a finite negative_slope
    (a real number, not a bool; checked whatever the activation, as a layer keeps it)."""
    if activation is not None and not (isinstance(activation, str) and activation in ACTIVATIONS):
        raise ValueError(f"activation must be None or one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    check_number("negative_slope", negative_slope)


def check_layer_input(input, layer: str, ndims: tuple[int, ...], num_features: int) -> None:
    """A batch-norm layer's own checks of a tensor input: ``ndims`` dimensions and
    ``num_features`` channels in dim 1 (anything but a tensor is left to the functional's
    TypeError)."""
    if not isinstance(input, Tensor):
        return
    if input.dim() not in ndims:
        expected = " or ".join(f"{d}-d" for d in ndims)
        raise ValueError(f"{layer} expects {expected} input, got {input.dim()}-d input")
    if input.shape[1] != num_features:
        raise ValueError(
            f"{layer}({num_features}) expects {num_features} channels (dim 1), got input of shape "
            f"{tuple(input.shape)}"
        )


def check_momentum(momentum):
    """A running-average momentum: a number in [0, 1], or None for a cumulative average."""
    return check_number("momentum", momentum, low=0, high=1, high_open=False, none=True)


def check_eps(eps, *, positive: bool = True):
    """A finite eps, > 0 (``positive``) or >= 0."""
    return check_number("eps", eps, low=0, low_open=positive)


def has_internal_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` share memory (an expanded tensor): such a tensor
    cannot be written in place."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True))


def check_vector(name: str, t, size: int, ref: Tensor, ref_name: str, what: str) -> None:
    """``t`` is None or a floating-point (size,) tensor on ``ref``'s device."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != (size,):
        raise ValueError(f"{name} must have shape ({size},) {what}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_writable(name: str, t: Tensor) -> None:
    """A buffer updated in place: no two elements may share memory, and autograd must not
    track it (the update would be recorded, or refused, as an in-place op on a leaf)."""
    if has_internal_overlap(t):
        raise ValueError(
            f"{name} is updated in place but is an expanded tensor (stride 0): its elements share memory; pass "
            f"a tensor of its own (e.g. {name}.clone())"
        )
    if t.requires_grad:
        raise ValueError(f"{name} is updated in place and must not require grad")


def check_slice_dim(dim, t: Tensor, name: str = "weight") -> int:
    """``dim`` as a non-negative axis of ``t``, or a ValueError."""
    if isinstance(dim, bool) or not isinstance(dim, int) or not -t.dim() <= dim < t.dim():
        raise ValueError(
            f"dim must be an int in [{-t.dim()}, {t.dim() - 1}] for {name} of shape {tuple(t.shape)}, got {dim!r}"
        )
    return dim % t.dim()


# The norm orders bounded weight norm takes.
NORM_ORDERS = (2.0, 1.0, math.inf)


def check_norm_order(p) -> float:
    """``p`` as a float if it is 2, 1 or inf (a real number, not a bool), else a ValueError
    naming p and the accepted values."""
    if isinstance(p, NUMBER_TYPES) and not isinstance(p, bool) and float(p) in NORM_ORDERS:
        return float(p)
    raise ValueError(f"p must be 2, 1 or float('inf') (the norm order of every slice), got {p!r:.80}")
