"""Convolution geometry shared by the EquiNorm functions and layers: argument checks in
torch.nn.Conv's terms, padding modes, output sizes, and the convolution call itself."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(name: str, value, nd: int, minimum: int) -> tuple[int, ...]:
    values = (value,) * nd if isinstance(value, int) else tuple(value)
    if len(values) != nd or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {nd} of them, got {value!r}")
    return values


class ConvGeometry(NamedTuple):
    """stride, padding, dilation and padding mode of an nd convolution, as nn.Conv*d takes them
    (a NamedTuple: torch.fx records it as an argument of a call)."""

    nd: int
    stride: tuple[int, ...]
    padding: str | tuple[int, ...]
    dilation: tuple[int, ...]
    padding_mode: str

    @classmethod
    def of(cls, nd: int, stride=1, padding=0, dilation=1, padding_mode: str = "zeros") -> ConvGeometry:
        stride = _tuple("stride", stride, nd, 1)
        dilation = _tuple("dilation", dilation, nd, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a tuple of {nd} ints, got {padding!r}")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        else:
            padding = _tuple("padding", padding, nd, 0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        return cls(nd, stride, padding, dilation, padding_mode)

    def pads(self, kernel_size) -> tuple[tuple[int, int], ...]:
        """(before, after) padding per spatial dim; 'same' puts the odd one after, as torch."""
        if self.padding == "valid":
            return tuple((0, 0) for _ in kernel_size)
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, kernel_size, strict=True)]
            return tuple((t // 2, t - t // 2) for t in totals)
        return tuple((p, p) for p in self.padding)

    def output_size(self, input_size, kernel_size) -> tuple[int, ...]:
        return tuple(
            (n + lo + hi - d * (k - 1) - 1) // s + 1
            for n, (lo, hi), d, k, s in zip(
                input_size, self.pads(kernel_size), self.dilation, kernel_size, self.stride, strict=True
            )
        )

    def mass_ratio(self, input_size, kernel_size) -> float:
        """S_in / (prod(output size) * prod(stride)): input mass m = input mean * this ratio."""
        out = self.output_size(input_size, kernel_size)
        if any(o < 1 for o in out):
            raise ValueError(
                f"input of spatial size {tuple(input_size)} is too small for kernel size {tuple(kernel_size)} "
                f"with padding {self.padding}, dilation {self.dilation}: output size {out}"
            )
        return math.prod(input_size) / (math.prod(out) * math.prod(self.stride))

    def size_free(self, kernel_size) -> bool:
        """True when the output is input / stride for every input size divisible by the
        stride, so the mass ratio is 1 whatever the size ("same"-like padding)."""
        return all(
            d * (k - 1) + 1 - s <= lo + hi <= d * (k - 1)
            for (lo, hi), d, k, s in zip(self.pads(kernel_size), self.dilation, kernel_size, self.stride, strict=True)
        )

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        """The convolution nn.Conv*d with these settings computes."""
        conv = _CONV[self.nd]
        if self.padding_mode == "zeros":
            return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)
        pads = [p for pair in reversed(self.pads(weight.shape[2:])) for p in pair]
        return conv(F.pad(x, pads, mode=self.padding_mode), weight, bias, self.stride, 0, self.dilation, groups)

    def module(self, in_channels: int, out_channels: int, kernel_size, groups: int, bias: bool, **factory):
        """An nn.Conv*d with these settings (its parameters uninitialised)."""
        cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[self.nd]
        return cls(
            in_channels, out_channels, tuple(kernel_size), self.stride, self.padding, self.dilation, groups,
            bias, self.padding_mode, **factory,
        )
