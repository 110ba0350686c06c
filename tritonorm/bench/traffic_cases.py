"""What ``tritonorm bench --traffic`` counts, and the H100 time model of ``--estimate``.

Cases: the L1, L-inf and Top-k (k = 10) batch norms and the mean-only one
(``lp_cases.BATCH_NORMS``: Triton path, training mode, fp32 affine parameters) on the
activations that follow ResNet-50's convolutions, 64x112x112, 256x56x56, 512x28x28,
1024x14x14 and 2048x7x7, at batch 32 and 256, NCHW and channels_last, fp32 and bf16.
Each case is one training step counted by
``traffic.count_step`` (the layer's forward, then ``torch.autograd.grad`` of its output with
respect to x, weight and bias), its launches planned for ``sms`` SMs, with
``traffic.Sampling()``: a row says whether its bytes were counted, predicted or averaged
(``traffic.Launch.method``).

Per pass: the path (on-chip: ``kernels.channel_resident``, or split), launches (Triton
launches and torch ops, the running-statistics update included), bytes, and passes =
bytes / bytes of x, beside the floor of any batch norm (2 forward: read x, write y; 3
backward: read x and dy, write dx) and cuDNN's BatchNorm (3 passes and 3 launches
forward: statistics, normalize, num_batches_tracked += 1; 5 passes and 2 launches
backward).

The model, an estimate and not a measurement: time = bytes / (0.85 x 3.35 TB/s) + launches
x 4 us, an H100 SXM moving data at 85% of its DRAM bandwidth, the same for cuDNN from its
passes and launches.  It ignores everything but DRAM traffic and launch latency: L2 hits,
occupancy, serial loops, arithmetic.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import traffic
from .lp_cases import BATCH_NORMS, MEAN_ONLY, TOPK_K, TRITON, build_layer, dtype_name, shape_name  # noqa: F401 (TOPK_K: the k counted)

RESNET50_ACTIVATIONS = ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7))
BATCHES = (32, 256)
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
DTYPES = (torch.float32, torch.bfloat16)
DIRECTIONS = ("forward", "backward")
# Passes over x: the floor of any batch norm, and cuDNN's (passes, launches).
FLOOR_PASSES = {"forward": 2, "backward": 3}
CUDNN = {"forward": (3, 3), "backward": (5, 2)}
# How the cases are counted (traffic.Sampling's defaults).
SAMPLING = traffic.Sampling()
# The model: sustained DRAM bandwidth (85% of an H100 SXM's 3.35 TB/s), seconds per launch.
BANDWIDTH = 0.85 * 3.35e12
LAUNCH_SECONDS = 4e-6
# The speed targets of the estimate: (what, norm, pass, the time it is held to, at most this ratio).
TARGETS = (
    ("Top-k forward <= 1.2 x L-inf forward", "topk", "forward", "linf", 1.2),
    ("L-inf forward <= cuDNN", "linf", "forward", "cudnn", 1.0),
    ("L-inf backward <= cuDNN", "linf", "backward", "cudnn", 1.0),
    ("Top-k forward <= cuDNN", "topk", "forward", "cudnn", 1.0),
    ("Top-k backward <= cuDNN", "topk", "backward", "cudnn", 1.0),
    ("L1 forward <= 1.35 x cuDNN", "l1", "forward", "cudnn", 1.35),
    ("L1 backward <= cuDNN", "l1", "backward", "cudnn", 1.0),
)
# The on-chip path's target: a layer whose passes both take it is at least this many times
# faster than cuDNN forward + backward.
ON_CHIP_SPEEDUP = 1.4
# torch.compile of nn.BatchNorm2d + ReLU, (passes, launches) per pass: an ASSUMPTION, not a
# count (Inductor's GPU code cannot be generated here): a reduction kernel and a pointwise
# kernel each way, the running statistics in the first, the ReLU mask rebuilt from x.
COMPILED_BN_RELU = {"forward": (3, 2), "backward": (5, 2)}
ON_CHIP, SPLIT = "on-chip", "split"


@dataclass(frozen=True)
class Input:
    """One activation: (N, C, H, W), layout ("nchw" or "nhwc") and dtype."""

    shape: tuple[int, int, int, int]
    layout: str
    dtype: torch.dtype

    def tensors(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, dy): standard normal, x requiring grad."""
        g = torch.Generator().manual_seed(seed)
        x = torch.empty(self.shape, dtype=self.dtype, memory_format=LAYOUTS[self.layout]).normal_(generator=g)
        return x.requires_grad_(), torch.empty_like(x).normal_(generator=g)


def inputs(shapes=None) -> list[Input]:
    """Every (N, C, H, W) of ``shapes`` (default: the ResNet-50 activations at each batch)
    in each layout and dtype."""
    shapes = shapes or [(n, *chw) for n in BATCHES for chw in RESNET50_ACTIVATIONS]
    return [Input(tuple(shape), layout, dtype) for shape in shapes for layout in LAYOUTS for dtype in DTYPES]


def estimate_us(nbytes: float, launches: int) -> float:
    """The model's time in microseconds (module docstring)."""
    return (nbytes / BANDWIDTH + launches * LAUNCH_SECONDS) * 1e6


def outside_summary(ops: tuple[traffic.TorchOp, ...], activation_numel: int) -> str:
    """The torch ops outside the kernels as "name xcount, ...", an op on a tensor of at least
    ``activation_numel`` elements marked "*": e.g. "zeros x3, add*"."""
    counts = Counter(op.name.removeprefix("aten.") + "*" * (op.numel >= activation_numel) for op in ops)
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items()) or "-"


def count_input(case: Input, norms=BATCH_NORMS, *, sms: int = traffic.H100_SMS,
                sampling: traffic.Sampling | None = SAMPLING) -> list[tuple[dict, traffic.Traffic]]:
    """(row, traffic) of each pass of each norm on one activation."""
    x, dy = case.tensors()
    x_bytes = x.numel() * x.element_size()
    results = []
    for norm in norms:
        layer = build_layer(norm, TRITON, case.shape[1], x.device)
        step = traffic.count_step(functools.partial(layer, x), (x, *layer.parameters()), dy, sms=sms,
                                  sampling=sampling)
        for direction, counted in zip(DIRECTIONS, step, strict=True):
            passes, launches = CUDNN[direction]
            time_us = estimate_us(counted.bytes, counted.launch_count)
            cudnn_us = estimate_us(passes * x_bytes, launches)
            results.append(({
                "norm": norm, "shape": shape_name(case.shape), "layout": case.layout, "dtype": dtype_name(case.dtype),
                "pass": direction, "path": path_of(counted), "launches": counted.launch_count, "bytes": counted.bytes,
                "passes": counted.passes(x_bytes), "floor": FLOOR_PASSES[direction], "cudnn_passes": passes,
                "method": counted.method, "outside": outside_summary(counted.torch_ops, x.numel()), "time_us": time_us,
                "cudnn_us": cudnn_us, "vs_cudnn": time_us / cudnn_us,
            }, counted))
    return results


def path_of(counted: traffic.Traffic) -> str:
    """"on-chip" when the pass ran the on-chip kernels (``kernels.channel_resident``)."""
    return ON_CHIP if any("_resident_" in launch.kernel for launch in counted.launches) else SPLIT


def run(cases: list[Input], log: Callable[[str], None] = print, **options) -> list[tuple[dict, traffic.Traffic]]:
    """``count_input`` of every case (``options``: its keywords), logging each."""
    results = []
    for case in cases:
        log(f"{shape_name(case.shape)} {case.layout} {dtype_name(case.dtype)}")
        results += count_input(case, **options)
    return results


def targets(rows: list[dict]) -> list[dict]:
    """Per target of ``TARGETS`` with rows to judge: how many cases meet it, and the worst."""
    index = {(r["shape"], r["layout"], r["dtype"], r["pass"], r["norm"]): r for r in rows}
    verdicts = []
    for what, norm, direction, against, bound in TARGETS:
        ratios = []
        for (shape, layout, dtype, pass_, n), r in index.items():
            if (n, pass_) != (norm, direction):
                continue
            other = r["cudnn_us"] if against == "cudnn" else index.get((shape, layout, dtype, pass_, against), {}).get(
                "time_us")
            if other:
                ratios.append((r["time_us"] / other, f"{shape} {layout} {dtype}"))
        if ratios:
            verdicts.append(_verdict(what, bound, ratios))
    layers = {}
    for (shape, layout, dtype, pass_, norm), r in index.items():
        layers.setdefault((shape, layout, dtype, norm), {})[pass_] = r
    ratios = [(sum(p["time_us"] for p in passes.values()) / sum(p["cudnn_us"] for p in passes.values()),
               f"{norm} {shape} {layout} {dtype}")
              for (shape, layout, dtype, norm), passes in layers.items()
              if len(passes) == len(DIRECTIONS) and all(p["path"] == ON_CHIP for p in passes.values())]
    if ratios:
        verdicts.append(_verdict(f"On-chip layers: forward+backward >= {ON_CHIP_SPEEDUP} x faster than cuDNN",
                                 1 / ON_CHIP_SPEEDUP, ratios))
    ratios = []
    for (shape, layout, dtype, pass_, norm), r in index.items():
        if norm == MEAN_ONLY:
            continue  # no fused epilogue
        x_bytes = activation_bytes(r)
        # what a fused ReLU adds to the norm's own traffic (tests/test_traffic.py, fused
        # budgets): nothing, but for one more read of x in L-inf / Top-k's split backward
        extra = x_bytes if pass_ == "backward" and r["path"] == SPLIT and norm != "l1" else 0
        passes, launches = COMPILED_BN_RELU[pass_]
        ratios.append((estimate_us(r["bytes"] + extra, r["launches"]) / estimate_us(passes * x_bytes, launches),
                       f"{norm} {pass_} {shape} {layout} {dtype} ({r['path']})"))
    if ratios:
        verdicts.append(_verdict("Fused norm + ReLU <= torch.compile(BatchNorm2d + ReLU) (assumed: 3 passes and 2 "
                                 "launches forward, 5 and 2 backward)", 1.0, ratios))
    return verdicts


def _verdict(what: str, bound: float, ratios: list[tuple[float, str]]) -> dict:
    worst, at = max(ratios)
    return {"target": what, "bound": bound, "cases": len(ratios), "met": sum(ratio <= bound for ratio, _ in ratios),
            "worst": worst, "at": at}


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """"NxCxHxW" -> (N, C, H, W), every size a positive int."""
    sizes = text.lower().split("x")
    if len(sizes) != 4 or not all(s.isdigit() and int(s) > 0 for s in sizes):
        raise ValueError(f"expected a shape NxCxHxW of positive ints, got {text!r}")
    return tuple(map(int, sizes))


def activation_bytes(row: dict) -> float:
    """Bytes of the x of a row."""
    return row["bytes"] / row["passes"] if row["passes"] else math.nan
