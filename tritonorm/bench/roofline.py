"""Bandwidth roofline of the L1 / L-inf / Top-k batch norms (alone, with a fused ReLU and
residual add, and in a ResNet-50-shaped training step), EquiNorm, ENorm and bounded weight
norm: what ``benchmarks/roofline.py`` and ``tritonorm bench`` measure and report.

``plan_for(device, quick)`` says what to run: on "cuda" the GPU cases below (``quick``: a few of
them), on "cpu" one tiny shape (and one tiny EquiNorm layer, small ENorm nets, a small conv
and linear weight for bounded weight norm), PyTorch implementations only, timed with
perf_counter, to check that the benchmarks work.  ``run(plan, sections)`` measures the
sections (any of ``SECTIONS``: "lp", "equinorm", "enorm", "bwn", "fused", "stack") and returns a ``Roofline``:
the set-up (device, the peak bandwidth used, torch / triton / tritonorm versions, date), the
JSON record of every row and the markdown page of the tables.  A case that fails is reported
in ``errors`` and left out.  ``write(result, out_dir)`` writes the page and the record as
``<device-slug>-<YYYY-MM-DD>[-<sections>].{md,json}``: the sections end the name when not
all ran, so a partial run does not overwrite the day's full table.

Batch norms.  At ResNet-like shapes, fp32 and bf16, training mode, it times forward and
forward+backward (``lp_cases`` defines both, and the bytes) of each norm's Triton path,
its PyTorch reference eager and ``torch.compile``-d, and ``nn.BatchNorm2d`` (cuDNN), all in
the same run: the median of ``triton.testing.do_bench`` (CUDA events, L2 flushed before
each call), whole call with host overhead.  A batch norm is memory-bound, so each time is
set against bandwidth:

* GB/s over the compulsory bytes (x in, y out; x and dy in, dx out), and the fraction of
  peak it is: floor time / time, where the floor time is compulsory bytes / peak
  bandwidth;
* for the Triton path, GB/s over the bytes of the passes its kernels make, and that
  fraction of peak: how close the kernels are to their own roofline;
* time / nn.BatchNorm2d time and time / compiled-reference time at the same shape, dtype
  and pass; and, in a table of its own, Top-k time / L1 time per implementation.

EquiNorm (``equinorm_cases`` defines the layers, the compared callables and the bytes).  At
ResNet-like EquiNormConv2d layers, fp32 and bf16 (autocast), training mode, the same timer:

* forward and forward+backward of EquiNormConv2d (Triton, reference eager and compiled),
  of its normalization alone (input sums + weight transform and their backward), of
  nn.Conv2d and of nn.Conv2d + nn.BatchNorm2d; as time / conv time (for the normalization
  alone: the fraction of the convolution it costs), time / conv+BN time, and the overhead
  ratio (EquiNorm - conv) / (conv+BN - conv): what EquiNorm adds to the convolution over
  what BatchNorm adds, to be at most ``OVERHEAD_TARGET`` for the Triton forward+backward;
* the kernels alone, Triton op and reference: the input sums (forward: read x) and the
  weight transform (forward: read w, write w''; backward: read dL/dw'' and w, write dL/dw),
  GB/s over those bytes and that as a fraction of peak, and time / reference time.

ENorm (``enorm_cases`` defines the nets, the contenders and the bytes).  On the study's
3072-500x20-10 MLP and 9-conv CIFAR net, fp32, with SGD momentum buffers, the same timer on
one call of: the ENorm cycle (Triton parallel and sequential, PyTorch path), the authors'
per-layer loop and one SGD step; as time / Triton parallel time, and GB/s over the floor
of one parallel cycle (3 x weight bytes + 2 x momentum-buffer bytes over the weights it
touches) and that as a fraction of peak.  The targets, per net: Triton parallel time /
SGD step time at most ``ENORM_SGD_TARGET``, per-layer loop time / Triton parallel time at
least ``ENORM_LOOP_TARGET``.

Bounded weight norm (``bwn_cases`` defines the weights, the contenders and the bytes).  On
every distinct conv weight of ResNet-50, its fc and a 4096x4096 linear, fp32, the same timer
on forward and forward+backward of the weight computed from its parameters (backward:
``torch.autograd.grad`` of w with a random dL/dw): tritonorm's parametrization on the Triton
path (fixed rho, and learnable gain), its two custom ops called directly, the PyTorch
reference eager and ``torch.compile``-d, ``torch.nn.utils.parametrizations.weight_norm`` and
the plain formula ``rho * v / v.norm(...)`` eager and compiled:

* GB/s over the compulsory bytes, the floor (forward: read v, write w; backward: read dL/dw
  and v, write dL/dv: 2 + 3 weight passes), and floor time / time; for the Triton rows the
  same over the bytes its kernels move (3 + 5 passes);
* time / weight_norm time and time / compiled-formula time, same weight, dtype and pass;
* the targets, per weight, for the Triton parametrization (fixed rho and learnable gain)
  forward+backward: weight_norm time / its time at least ``BWN_SPEEDUP_TARGET``, and its
  time / the floor's time at most ``BWN_FLOOR_TARGET`` on weights of more than
  ``BWN_FLOOR_MIN_NUMEL`` elements (the ops' own ratio beside it, without the
  parametrization's and autograd's host overhead).

Fused batch norms (``fused_cases`` defines the contenders, the bytes, the measurement and
the table).  At the batch-norm shapes, norm + ReLU and norm + residual add + ReLU: the
fused Triton layers against nn.BatchNorm2d + ReLU eager and ``torch.compile``-d, forward
and forward+backward, GB/s over the fused floor (the batch norm's 2 + 3 passes, with a
residual 3 + 4) and over the Triton kernels' own passes (by the path each case takes).

End to end (``stack_cases``).  One training step (forward and the gradients of every
parameter) of ResNet-50's bottleneck stack with each norm, eager and compiled, at N=32 and
N=256: time per step and its ratio to the nn.BatchNorm2d + ReLU stack's, eager and compiled.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

import tritonorm

try:
    import triton
except ImportError:  # no triton on this platform: the CPU timings still run
    triton = None

from .bwn_cases import (
    CONTENDERS as BWN_CONTENDERS,
    FORMULA_COMPILED,
    PARAMETRIZATIONS,
    SMALL_WEIGHTS,
    TRITON_OPS,
    WEIGHT_NORM,
    WEIGHTS,
    WeightCase,
    is_triton,
    make_grad,
)
from .bwn_cases import (
    algorithm_bytes as bwn_algorithm_bytes,
    build as build_bwn,
    check_outputs as check_bwn,
    compulsory_bytes as bwn_compulsory_bytes,
    step as bwn_step,
)
from .enorm_cases import (
    C as ENORM_C,
    CONTENDERS,
    PER_LAYER,
    SGD_STEP,
    SMALL_NETS,
    STUDY_NETS,
    TRITON_CONTENDERS,
    TRITON_PARALLEL,
    Net,
    contender,
    cycle_bytes,
)
from .enorm_cases import build as build_chain, state as chain_state
from .equinorm_cases import (
    CONV,
    CONV_BN,
    EQUINORM,
    INPUT_SUMS,
    KERNELS,
    ConvCase,
    build,
    check_finite,
    kernel_step,
    layer_step,
    output_shape,
)
from .equinorm_cases import make_inputs as equinorm_inputs, variants as equinorm_variants
from .lp_cases import (
    BASELINE,
    COMPILED,
    EAGER,
    TOPK_K,
    TRITON,
    algorithm_bytes,
    build_layer,
    check_outputs,
    compulsory_bytes,
    dtype_name,
    make_inputs,
    shape_name,
    step,
    variants,
)
from . import fused_cases, stack_cases
from .timing import by_pass, guarded, markdown_table, median_seconds, time_passes
from .timing import fmt as _fmt
from .timing import ratio as _ratio

SHAPES = ((256, 64, 56, 56), (128, 128, 28, 28), (128, 256, 14, 14), (128, 512, 7, 7), (64, 64, 56, 56))
QUICK_SHAPES = ((64, 64, 56, 56), (128, 256, 14, 14))
DTYPES = (torch.float32, torch.bfloat16)
SMOKE_SHAPE = (4, 8, 8, 8)
# EquiNormConv2d layers of a ResNet: the 3x3 convolutions of the four stages, the 1x1
# reduction of a bottleneck and the stride-2 entry of stage 2.
EQUINORM_LAYERS = (
    ConvCase(256, 64, 64, 56), ConvCase(128, 128, 128, 28), ConvCase(128, 256, 256, 14), ConvCase(128, 512, 512, 7),
    ConvCase(64, 256, 64, 56, kernel=1), ConvCase(128, 64, 128, 56, stride=2),
)
# --quick: two layers, torch.compile at the first only (compiles dominate the time).
QUICK_EQUINORM_LAYERS = (ConvCase(64, 64, 64, 56), ConvCase(64, 256, 64, 56, kernel=1))
SMOKE_EQUINORM_LAYER = ConvCase(4, 8, 8, 8)
# The bound on (EquiNorm - conv) / (conv+BN - conv), Triton forward+backward.
OVERHEAD_TARGET = 0.5
# The bounds on Triton parallel cycle / SGD step and per-layer loop / Triton parallel cycle.
ENORM_SGD_TARGET, ENORM_LOOP_TARGET = 1.0, 20.0
# Bounded weight norm: fp32 weights (parameters stay fp32 under mixed precision).  --quick:
# a launch-bound conv, two ~1M-element ones, the fc and the 4096x4096 linear.
BWN_DTYPES = (torch.float32,)
QUICK_BWN_WEIGHTS = tuple(w for w in WEIGHTS if w.shape in ((64, 64, 3, 3), (512, 512, 3, 3), (2048, 512, 1, 1),
                                                            (1000, 2048), (4096, 4096)))
# The targets, Triton forward+backward of the parametrization: at least this many
# times faster than torch.nn.utils.parametrizations.weight_norm, and at most this many times
# the bandwidth floor's time on weights of more than BWN_FLOOR_MIN_NUMEL elements.
BWN_SPEEDUP_TARGET, BWN_FLOOR_TARGET, BWN_FLOOR_MIN_NUMEL = 2.0, 1.5, 1_000_000
# Fused norm + ReLU (+ residual): the lp shapes; --quick: QUICK_SHAPES in bf16, the fused Triton
# layers against nn.BatchNorm2d + ReLU eager and compiled (one compile per shape and epilogue).
FUSED_QUICK_DTYPES = (torch.bfloat16,)
# The end-to-end stack: N=32 fp32 and bf16, N=256 bf16 (an fp32 step at N=256 may not fit);
# --quick: one block per stage, N=32 fp32 and N=256 bf16, torch.compile for bn and L1 only.
STACK_CASES = (stack_cases.StackCase(32), stack_cases.StackCase(32, torch.bfloat16),
               stack_cases.StackCase(256, torch.bfloat16))
QUICK_STACK_CASES = (stack_cases.StackCase(32, blocks=stack_cases.ONE_BLOCK),
                     stack_cases.StackCase(256, torch.bfloat16, blocks=stack_cases.ONE_BLOCK))
QUICK_STACK_CONTENDERS = (stack_cases.contenders(modes=(stack_cases.EAGER,))
                          + stack_cases.contenders(("bn", "l1"), (stack_cases.COMPILED,)))
SMOKE_STACK_CASE = stack_cases.StackCase(3, channel_scale=16, resolution=16, blocks=stack_cases.ONE_BLOCK)
SECTIONS = ("lp", "equinorm", "enorm", "bwn", "fused", "stack")
# The JSON record's entries of every section, as they stand when the section does not run.
EMPTY_RECORD = {
    "rows": [], "topk_over_l1": [], "equinorm_layers": [], "equinorm_kernels": [], "equinorm_overhead": None,
    "enorm": [], "enorm_targets": [], "bounded_weight_norm": [], "bounded_weight_norm_targets": [],
    "bounded_weight_norm_summary": None, "fused": [], "stack": [],
}
# Peak DRAM bandwidth in GB/s by device-name substring (first match), unless the caller
# passes one.
KNOWN_PEAKS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H100", 3350.0))
DEFAULT_PEAK = 3350.0  # H100 SXM


def _time_norm(norm: str, impl: str, shape, x, dy, device: str) -> list[dict]:
    layer = build_layer(norm, impl, shape[1], device)
    times = time_passes(lambda pass_: step(layer, x, dy, pass_), lambda out: check_outputs(out, x), device)
    return [{
        "norm": norm, "impl": impl, "shape": shape_name(shape), "dtype": dtype_name(x.dtype),
        "pass": pass_, "time_us": time_us, "compulsory_bytes": compulsory_bytes(pass_, x),
        "algorithm_bytes": algorithm_bytes(norm, pass_, x) if impl == TRITON else None,
    } for pass_, time_us in times.items()]


def measure(shapes, dtypes, device: str, cases, log) -> tuple[list[dict], list[str]]:
    """Time every pass of every (norm, implementation) in ``cases`` at every shape and
    dtype; returns the rows and the errors of the cases that failed."""
    rows, errors = [], []
    for shape in shapes:
        for dtype in dtypes:
            x, dy = make_inputs(shape, dtype, device)
            block = []
            for norm, impl in cases:
                where = f"{shape_name(shape)} {dtype_name(dtype)} {norm} {impl}"
                block += guarded(where, errors, log, device, partial(_time_norm, norm, impl, shape, x, dy, device))
            rows += by_pass(block)
    return rows, errors


def _time_equinorm_layer(what: str, impl: str, case: ConvCase, inputs, device: str) -> list[dict]:
    module = build(what, impl, case, inputs.x.dtype, device)
    times = time_passes(lambda pass_: layer_step(what, module, inputs, pass_),
                        lambda out: check_outputs(out, inputs.x, output_shape(what, case)), device)
    return [{"layer": case.name, "what": what, "impl": impl, "dtype": dtype_name(inputs.x.dtype), "pass": pass_,
             "time_us": time_us} for pass_, time_us in times.items()]


def _time_equinorm_kernel(kernel: str, direction: str, impl: str, case: ConvCase, x, device: str) -> list[dict]:
    fn, nbytes = kernel_step(kernel, direction, impl, case, x)
    check_finite(fn())  # and the warm-up
    shape = case.input_shape if kernel == INPUT_SUMS else case.weight_shape
    return [{
        "kernel": kernel, "impl": impl, "shape": shape_name(shape), "dtype": dtype_name(x.dtype),
        "direction": direction, "time_us": median_seconds(fn, device) * 1e6, "bytes": nbytes,
    }]


def equinorm_variants_of(impls: tuple, compiled_cases: tuple) -> Callable:
    """``variants_of`` for ``measure_equinorm``: the layer with each of ``impls``, compiled too
    at ``compiled_cases``; the normalization alone with each of ``impls``."""
    def variants_of(case: ConvCase) -> list:
        return equinorm_variants(impls + ((COMPILED,) if case in compiled_cases else ()), norm_only=impls)

    return variants_of


def measure_equinorm(cases, dtypes, device: str, variants_of, kernel_impls, log):
    """Time both passes of every (what, implementation) in ``variants_of(case)`` and every
    kernel direction of each of ``kernel_impls`` for every layer case and dtype; returns
    the layer rows, the kernel rows and the errors of the cases that failed."""
    layers, kernels, errors = [], [], []
    for case in cases:
        for dtype in dtypes:
            inputs = equinorm_inputs(case, dtype, device)
            block = []
            for what, impl in variants_of(case):
                where = f"EquiNorm {case.name} {dtype_name(dtype)} {what} {impl}"
                block += guarded(where, errors, log, device,
                                 partial(_time_equinorm_layer, what, impl, case, inputs, device))
            layers += by_pass(block)
            for kernel, direction in KERNELS:
                for impl in kernel_impls:
                    where = f"EquiNorm {case.name} {dtype_name(dtype)} {kernel} {direction} {impl}"
                    kernels += guarded(where, errors, log, device,
                                       partial(_time_equinorm_kernel, kernel, direction, impl, case, inputs.x, device))
    return layers, kernels, errors


def _time_enorm(net: Net, name: str, device: str) -> list[dict]:
    chain = build_chain(net, device)
    fn = contender(name, chain)
    fn()  # the warm-up: Triton compiles, ENorm's views and tables
    time_us = median_seconds(fn, device) * 1e6
    check_finite(chain_state(chain))
    return [{"net": net.name, "contender": name, "time_us": time_us,
             "bytes": None if name == SGD_STEP else cycle_bytes(chain)}]


def measure_enorm(nets, names, device: str, log) -> tuple[list[dict], list[str]]:
    """Time one call of each contender in ``names`` on each net, each on a fresh copy;
    returns the rows and the errors of the cases that failed."""
    rows, errors = [], []
    for net in nets:
        for name in names:
            rows += guarded(f"ENorm {net.name} {name}", errors, log, device, partial(_time_enorm, net, name, device))
    return rows, errors


def _time_bwn(case: WeightCase, name: str, dtype: torch.dtype, grad, device: str) -> list[dict]:
    module = build_bwn(name, case, dtype, device)
    times = time_passes(lambda pass_: bwn_step(module, grad, pass_), lambda out: check_bwn(out, case), device)
    return [{
        "weight": case.name, "layers": case.where, "numel": case.numel, "dtype": dtype_name(dtype), "pass": pass_,
        "contender": name, "time_us": time_us, "bytes": bwn_compulsory_bytes(pass_, case, dtype),
        "algorithm_bytes": bwn_algorithm_bytes(pass_, case, dtype) if is_triton(name) else None,
    } for pass_, time_us in times.items()]


def measure_bwn(cases, dtypes, device: str, names, log) -> tuple[list[dict], list[str]]:
    """Time both passes of each contender in ``names`` on every weight and dtype, each on a
    fresh module over the same v and dL/dw; returns the rows and the errors of the cases that
    failed."""
    rows, errors = [], []
    for case in cases:
        for dtype in dtypes:
            grad = make_grad(case, dtype, device)
            block = []
            for name in names:
                where = f"bounded weight norm {case.name} {dtype_name(dtype)} {name}"
                block += guarded(where, errors, log, device, partial(_time_bwn, case, name, dtype, grad, device))
            rows += by_pass(block)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, errors


def _add_bandwidth(r: dict, floor_bytes: int, peak_gbps: float) -> None:
    """GB/s of row ``r`` over ``floor_bytes`` and over its kernels' own bytes (when it has
    them), each also as a fraction of peak."""
    seconds = r["time_us"] * 1e-6
    r["gbps"] = floor_bytes / seconds / 1e9
    r["floor_fraction"] = r["gbps"] / peak_gbps
    if r["algorithm_bytes"] is not None:
        r["algorithm_gbps"] = r["algorithm_bytes"] / seconds / 1e9
        r["algorithm_fraction"] = r["algorithm_gbps"] / peak_gbps


def derive(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add GB/s, fractions of peak and the ratios to the baseline and to the compiled
    reference to each row; return the Top-k / L1 time ratios."""
    index = {(r["shape"], r["dtype"], r["pass"], r["norm"], r["impl"]): r for r in rows}
    for r in rows:
        config = (r["shape"], r["dtype"], r["pass"])
        _add_bandwidth(r, r["compulsory_bytes"], peak_gbps)
        r["vs_batchnorm"] = _ratio(r, index.get((*config, *BASELINE)))
        compiled = None if (r["norm"], r["impl"]) == BASELINE else index.get((*config, r["norm"], COMPILED))
        r["vs_compiled"] = _ratio(r, compiled)
    topk_over_l1 = []
    for (shape, dtype, pass_, norm, impl), r in index.items():
        l1 = index.get((shape, dtype, pass_, "l1", impl))
        if norm == "topk" and l1:
            topk_over_l1.append({"shape": shape, "dtype": dtype, "pass": pass_, "impl": impl, "ratio": _ratio(r, l1)})
    return topk_over_l1


def _overhead(r: dict, conv: dict | None, conv_bn: dict | None) -> float | None:
    """(time - conv time) / (conv+BN time - conv time) of an EquiNorm layer row; None for the
    other rows, or when BatchNorm's own time is not positive (noise at tiny sizes)."""
    if r["what"] != EQUINORM or not conv or not conv_bn or conv_bn["time_us"] <= conv["time_us"]:
        return None
    return (r["time_us"] - conv["time_us"]) / (conv_bn["time_us"] - conv["time_us"])


def derive_equinorm(layers: list[dict], kernels: list[dict], peak_gbps: float) -> None:
    """Add time / conv, time / conv+BN, the overhead ratio and (EquiNorm layers) time /
    compiled-reference time to the layer rows; GB/s, its fraction of peak and time /
    reference time to the kernel rows."""
    index = {(r["layer"], r["dtype"], r["pass"], r["what"], r["impl"]): r for r in layers}
    for r in layers:
        config = (r["layer"], r["dtype"], r["pass"])
        conv, conv_bn = index.get((*config, *CONV)), index.get((*config, *CONV_BN))
        r["vs_conv"], r["vs_conv_bn"] = _ratio(r, conv), _ratio(r, conv_bn)
        r["overhead_vs_bn"] = _overhead(r, conv, conv_bn)
        r["vs_compiled"] = _ratio(r, index.get((*config, EQUINORM, COMPILED))) if r["what"] == EQUINORM else None
    kernel_index = {(r["kernel"], r["shape"], r["dtype"], r["direction"], r["impl"]): r for r in kernels}
    for r in kernels:
        r["gbps"] = r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["peak_fraction"] = r["gbps"] / peak_gbps
        r["vs_reference"] = _ratio(r, kernel_index.get((r["kernel"], r["shape"], r["dtype"], r["direction"], EAGER)))


def derive_enorm(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add time / Triton parallel time, time / SGD step time and, for the cycles, GB/s over
    the floor and its fraction of peak to each row; return, per net with the rows they need,
    the target ratios Triton parallel / SGD step and per-layer loop / Triton parallel, and
    whether both are met."""
    index = {(r["net"], r["contender"]): r for r in rows}
    for r in rows:
        r["vs_parallel"] = _ratio(r, index.get((r["net"], TRITON_PARALLEL)))
        r["vs_sgd"] = _ratio(r, index.get((r["net"], SGD_STEP)))
        r["gbps"] = None if r["bytes"] is None else r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["peak_fraction"] = None if r["gbps"] is None else r["gbps"] / peak_gbps
    targets = []
    for (net, name), parallel in index.items():
        sgd, loop = index.get((net, SGD_STEP)), index.get((net, PER_LAYER))
        if name == TRITON_PARALLEL and sgd and loop:
            vs_sgd, loop_ratio = _ratio(parallel, sgd), _ratio(loop, parallel)
            targets.append({"net": net, "parallel_vs_sgd": vs_sgd, "loop_vs_parallel": loop_ratio,
                            "met": vs_sgd <= ENORM_SGD_TARGET and loop_ratio >= ENORM_LOOP_TARGET})
    return targets


def derive_bwn(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add GB/s over the floor (and over the kernels' bytes, Triton rows), their fractions of
    peak, time / weight_norm time and time / compiled-formula time to each row; return, per
    weight, dtype and Triton parametrization with a weight_norm row, the targets: weight_norm
    time / its forward+backward time (at least ``BWN_SPEEDUP_TARGET``) and, above
    ``BWN_FLOOR_MIN_NUMEL`` elements, its time / the floor's time (at most
    ``BWN_FLOOR_TARGET``), with the kernels alone (``bwn-triton-ops``) beside it."""
    index = {(r["weight"], r["dtype"], r["pass"], r["contender"]): r for r in rows}
    for r in rows:
        config = (r["weight"], r["dtype"], r["pass"])
        _add_bandwidth(r, r["bytes"], peak_gbps)
        r["vs_weight_norm"] = _ratio(r, index.get((*config, WEIGHT_NORM)))
        r["vs_formula_compiled"] = _ratio(r, index.get((*config, FORMULA_COMPILED)))
    targets = []
    for (weight, dtype, pass_, name), r in index.items():
        weight_norm = index.get((weight, dtype, pass_, WEIGHT_NORM))
        if pass_ != "forward+backward" or name not in PARAMETRIZATIONS or not weight_norm:
            continue
        speedup = _ratio(weight_norm, r)
        checked = r["numel"] > BWN_FLOOR_MIN_NUMEL
        over_floor = 1 / r["floor_fraction"]
        ops = index.get((weight, dtype, pass_, TRITON_OPS))
        targets.append({
            "weight": weight, "layers": r["layers"], "numel": r["numel"], "dtype": dtype, "contender": name,
            "speedup_vs_weight_norm": speedup, "time_over_floor": over_floor, "floor_checked": checked,
            "ops_time_over_floor": 1 / ops["floor_fraction"] if ops else None,
            "met": speedup >= BWN_SPEEDUP_TARGET and (not checked or over_floor <= BWN_FLOOR_TARGET),
        })
    return targets


def bwn_summary(targets: list[dict]) -> dict | None:
    """How many (weight, dtype, parametrization) meet each target, and the worst of each;
    None without targets (as on CPU)."""
    if not targets:
        return None
    floor = [t for t in targets if t["floor_checked"]]
    slowest = min(targets, key=lambda t: t["speedup_vs_weight_norm"])
    farthest = max(floor, key=lambda t: t["time_over_floor"]) if floor else None
    return {
        "cases": len(targets), "met": sum(t["met"] for t in targets),
        "speedup_met": sum(t["speedup_vs_weight_norm"] >= BWN_SPEEDUP_TARGET for t in targets),
        "worst_speedup": slowest["speedup_vs_weight_norm"],
        "worst_speedup_at": f"{slowest['weight']} {slowest['contender']}",
        "floor_cases": len(floor), "floor_met": sum(t["time_over_floor"] <= BWN_FLOOR_TARGET for t in floor),
        "worst_over_floor": farthest["time_over_floor"] if farthest else None,
        "worst_over_floor_at": f"{farthest['weight']} {farthest['contender']}" if farthest else None,
    }


def overhead_summary(layers: list[dict]) -> dict | None:
    """The worst overhead ratio of the Triton forward+backward rows, against the target;
    None without such rows (as on CPU)."""
    rows = [r for r in layers if r["impl"] == TRITON and r["pass"] == "forward+backward"
            and r["overhead_vs_bn"] is not None]
    if not rows:
        return None
    worst = max(rows, key=lambda r: r["overhead_vs_bn"])
    return {"target": OVERHEAD_TARGET, "worst": worst["overhead_vs_bn"], "layer": worst["layer"],
            "dtype": worst["dtype"], "met": worst["overhead_vs_bn"] <= OVERHEAD_TARGET}


def lp_section(rows: list[dict], topk_over_l1: list[dict]) -> list[str]:
    main = markdown_table(
        ["norm", "impl", "shape", "dtype", "pass", "time (us)", "GB/s", "floor / time",
         "alg. GB/s", "alg. / peak", "/ BN", "/ compiled ref"],
        [[r["norm"], r["impl"], r["shape"], r["dtype"], r["pass"], f"{r['time_us']:.1f}", f"{r['gbps']:.0f}",
          f"{r['floor_fraction']:.1%}", _fmt(r.get("algorithm_gbps"), ".0f"), _fmt(r.get("algorithm_fraction"), ".1%"),
          _fmt(r["vs_batchnorm"], ".2f"), _fmt(r["vs_compiled"], ".2f")] for r in rows],
    )
    ratios = markdown_table(
        ["shape", "dtype", "pass", "impl", "Top-k / L1 time"],
        [[t["shape"], t["dtype"], t["pass"], t["impl"], f"{t['ratio']:.2f}"] for t in topk_over_l1],
    )
    return [
        "## L1 / L-inf / Top-k batch norm",
        "",
        f"Top-k k={TOPK_K}. "
        "GB/s: compulsory bytes (forward: read x, write y; backward: read x, dy, write dx) / time. "
        "floor / time: the time the compulsory bytes take at peak bandwidth, over the time. "
        "alg.: the same for the bytes of the passes the Triton kernels make. "
        "/ BN, / compiled ref: time over nn.BatchNorm2d's, and over torch.compile of the reference's.",
        "",
        main,
        "",
        "## Top-k time / L1 time",
        "",
        ratios,
    ]


def _overhead_line(summary: dict | None) -> str:
    if summary is None:
        return "Overhead target: no Triton forward+backward rows measured."
    verdict = "met" if summary["met"] else "NOT met"
    return (f"Overhead target (Triton forward+backward, (EquiNorm - conv) / (conv+BN - conv) <= {summary['target']}): "
            f"{verdict}; worst {summary['worst']:.2f} at {summary['layer']} {summary['dtype']}.")


def equinorm_section(layers: list[dict], kernels: list[dict], summary: dict | None) -> list[str]:
    layer_table = markdown_table(
        ["layer", "dtype", "pass", "what", "impl", "time (us)", "/ conv", "/ conv+BN", "overhead / BN's",
         "/ compiled ref"],
        [[r["layer"], r["dtype"], r["pass"], r["what"], r["impl"], f"{r['time_us']:.1f}", _fmt(r["vs_conv"], ".2f"),
          _fmt(r["vs_conv_bn"], ".2f"), _fmt(r["overhead_vs_bn"], ".2f"), _fmt(r["vs_compiled"], ".2f")]
         for r in layers],
    )
    kernel_table = markdown_table(
        ["kernel", "impl", "tensor", "dtype", "direction", "time (us)", "MB", "GB/s", "/ peak", "/ reference"],
        [[r["kernel"], r["impl"], r["shape"], r["dtype"], r["direction"], f"{r['time_us']:.1f}",
          f"{r['bytes'] / 1e6:.2f}", f"{r['gbps']:.0f}", f"{r['peak_fraction']:.1%}", _fmt(r["vs_reference"], ".2f")]
         for r in kernels],
    )
    return [
        "## EquiNorm: EquiNormConv2d against nn.Conv2d and nn.Conv2d + nn.BatchNorm2d",
        "",
        "layer: input shape, kernel, stride, output channels; bf16 runs under autocast (fp32 parameters). "
        "what: equinorm, the whole EquiNormConv2d; norm-only, its input sums and weight transform (and their "
        "backward) without the convolution; conv and conv+bn, the baselines (no conv bias). "
        "/ conv, / conv+BN: time over nn.Conv2d's and over nn.Conv2d + nn.BatchNorm2d's (for norm-only, / conv is "
        "the fraction of the convolution's time the normalization costs). overhead / BN's: "
        "(time - conv time) / (conv+BN time - conv time). / compiled ref: time over torch.compile of the "
        "reference layer's.",
        "",
        _overhead_line(summary),
        "",
        layer_table,
        "",
        "## EquiNorm kernels",
        "",
        "MB the kernel must move: input sums, read x; weight transform forward, read w and write w''; backward, "
        "read dL/dw'' and w and write dL/dw. GB/s: those bytes / time; / peak: GB/s over the peak bandwidth. "
        "Backward: torch.autograd.grad of a recorded forward. / reference: time over the PyTorch reference's.",
        "",
        kernel_table,
    ]


def enorm_section(rows: list[dict], targets: list[dict]) -> list[str]:
    table = markdown_table(
        ["net", "contender", "time (us)", "/ Triton parallel", "floor MB", "GB/s", "/ peak"],
        [[r["net"], r["contender"], f"{r['time_us']:.1f}", _fmt(r["vs_parallel"], ".2f"),
          _fmt(None if r["bytes"] is None else r["bytes"] / 1e6, ".2f"), _fmt(r["gbps"], ".0f"),
          _fmt(r["peak_fraction"], ".1%")] for r in rows],
    )
    target_table = markdown_table(
        ["net", f"Triton parallel / SGD step (<= {ENORM_SGD_TARGET:g})",
         f"per-layer loop / Triton parallel (>= {ENORM_LOOP_TARGET:g})", "met"],
        [[t["net"], f"{t['parallel_vs_sgd']:.2f}", f"{t['loop_vs_parallel']:.1f}", "yes" if t["met"] else "NO"]
         for t in targets],
    ) if targets else "Targets: no Triton parallel rows measured."
    return [
        "## ENorm: one cycle against the per-layer loop and an SGD step",
        "",
        f"One ENorm cycle (c = {ENORM_C}, p = 2, the last pair left alone, momentum buffers rescaled) on fp32 nets "
        "without bias, after one SGD(momentum=0.9, foreach=True) step; each contender on a fresh copy. "
        "Triton parallel: 2 launches; sequential: one per pair and one more; torch: backend=\"torch\", parallel; "
        "per-layer loop: the authors' Python loop over the pairs; sgd-step: one optimizer.step(). "
        "/ Triton parallel: time over the Triton parallel cycle's. floor MB: the bytes one parallel cycle must move, "
        "sum over the weights it touches (all but the last) of 3 x weight bytes (read for the norms, read and "
        "written by the rescale) + 2 x momentum-buffer bytes (read and written). GB/s: those bytes / time (the "
        "cycles only); / peak: GB/s over the peak bandwidth.",
        "",
        target_table,
        "",
        table,
    ]


def _bwn_summary_line(summary: dict | None) -> str:
    if summary is None:
        return "Targets: no Triton forward+backward rows with a weight_norm row measured."
    line = (f"Targets (Triton forward+backward of the parametrization): met at {summary['met']} of {summary['cases']}. "
            f">= {BWN_SPEEDUP_TARGET:g}x faster than weight_norm: {summary['speedup_met']} of {summary['cases']}, "
            f"slowest {summary['worst_speedup']:.2f}x ({summary['worst_speedup_at']}).")
    if summary["floor_cases"]:
        line += (f" Within {BWN_FLOOR_TARGET:g}x of the floor above {BWN_FLOOR_MIN_NUMEL:,} elements: "
                 f"{summary['floor_met']} of {summary['floor_cases']}, farthest {summary['worst_over_floor']:.2f}x "
                 f"({summary['worst_over_floor_at']}).")
    return line


def bwn_section(rows: list[dict], targets: list[dict], summary: dict | None) -> list[str]:
    table = markdown_table(
        ["weight", "layers", "dtype", "pass", "contender", "time (us)", "floor MB", "GB/s", "floor / time",
         "alg. GB/s", "alg. / peak", "/ weight_norm", "/ compiled formula"],
        [[r["weight"], r["layers"], r["dtype"], r["pass"], r["contender"], f"{r['time_us']:.1f}",
          f"{r['bytes'] / 1e6:.2f}", f"{r['gbps']:.0f}", f"{r['floor_fraction']:.1%}",
          _fmt(r.get("algorithm_gbps"), ".0f"), _fmt(r.get("algorithm_fraction"), ".1%"),
          _fmt(r["vs_weight_norm"], ".2f"), _fmt(r["vs_formula_compiled"], ".2f")] for r in rows],
    )
    target_table = markdown_table(
        ["weight", "layers", "elements", "dtype", "contender", f"weight_norm / time (>= {BWN_SPEEDUP_TARGET:g})",
         f"time / floor (<= {BWN_FLOOR_TARGET:g} above {BWN_FLOOR_MIN_NUMEL:,})", "ops alone: time / floor", "met"],
        [[t["weight"], t["layers"], f"{t['numel']:,}", t["dtype"], t["contender"], f"{t['speedup_vs_weight_norm']:.2f}",
          f"{t['time_over_floor']:.2f}" + ("" if t["floor_checked"] else " (n/a)"),
          _fmt(t["ops_time_over_floor"], ".2f"), "yes" if t["met"] else "NO"] for t in targets],
    ) if targets else ""
    return [
        "## Bounded weight norm: the parametrized weight against weight_norm and the plain formula",
        "",
        "The weight a training step computes from its parameters (w_i = rho_i v_i / ||v_i|| per output channel), "
        "forward, and forward+backward (torch.autograd.grad of w with a random dL/dw wrt the parameters); every "
        "distinct conv weight of ResNet-50 (layers: the first with the shape, and how many have it), its fc and a "
        "4096x4096 linear. Contenders: bwn-triton, tritonorm.bounded_weight_norm(backend=\"triton\") with a fixed "
        "rho; bwn-triton-gain, the same with learnable_gain=True; bwn-triton-ops, the two custom ops called "
        "directly (no parametrization, no autograd); bwn-torch-eager / -compile, the PyTorch reference "
        "(backend=\"torch\"), eager and torch.compile; weight_norm, torch.nn.utils.parametrizations.weight_norm "
        "(dim=0, parameters g and v); formula-eager / -compile, rho * v / v.norm(p=2, dim=(1, ...), keepdim=True), "
        "eager and torch.compile. floor MB: the compulsory bytes (forward: read v, write w; backward: read dL/dw "
        "and v, write dL/dv; 2 and 3 weight passes, 5 for forward+backward). GB/s: those bytes / time; "
        "floor / time: the time they take at peak bandwidth over the time. alg.: the same for the bytes the Triton "
        "kernels move (forward reads v twice and writes w, backward reads dL/dw and v twice and writes dL/dv: 3 and "
        "5 passes). / weight_norm, / compiled formula: time over weight_norm's and over the compiled formula's.",
        "",
        _bwn_summary_line(summary),
        "",
        *([target_table, ""] if target_table else []),
        table,
    ]


def report(meta: dict, sections: list[list[str]], errors: list[str]) -> str:
    """The markdown page: set-up, the sections (batch norms, EquiNorm, ENorm, bounded weight
    norm, those run), failures."""
    lines = [
        f"# tritonorm roofline: {meta['device']}",
        "",
        f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, tritonorm {meta['tritonorm']}; "
        f"peak bandwidth {meta['peak_gbps']:.0f} GB/s ({meta['peak_source']}); training mode, median of the "
        "whole call.",
    ]
    for section in sections:
        lines += ["", *section]
    if errors:
        lines += ["", "## Failed cases", "", *(f"- {e}" for e in errors)]
    return "\n".join(lines) + "\n"


def peak_bandwidth(device_name: str, override: float | None) -> tuple[float, str]:
    """(GB/s, where the number comes from)."""
    if override is not None:
        return override, "--peak-gbps"
    for key, gbps in KNOWN_PEAKS:
        if key in device_name:
            return gbps, f"spec of {key}"
    return DEFAULT_PEAK, "H100 SXM default, device not recognized: pass --peak-gbps"




class Plan(NamedTuple):
    """What one run measures: the device, and per section the cases and the contenders."""

    device: str
    shapes: tuple  # batch norms
    dtypes: tuple
    lp_cases: list  # (norm, implementation) pairs
    equinorm_layers: tuple
    equinorm_compiled: tuple  # the layers also timed with torch.compile
    impls: tuple  # EquiNorm implementations (layers, norm-only, kernels)
    enorm_nets: tuple
    enorm_contenders: tuple
    bwn_weights: tuple
    bwn_contenders: tuple
    fused_shapes: tuple
    fused_dtypes: tuple
    fused_cases: list  # (norm, implementation) pairs, both epilogues each
    stack_cases: tuple
    stack_contenders: tuple  # (norm, mode) pairs


class Roofline(NamedTuple):
    """One run's outcome: the set-up, the JSON record (every row), the markdown page."""

    meta: dict
    record: dict
    page: str
    errors: list[str]


def plan_for(device: str, quick: bool = False) -> Plan:
    """The GPU cases on "cuda" (``quick``: ``QUICK_SHAPES``, two EquiNorm layers, one
    compiled, ``QUICK_BWN_WEIGHTS``, the fused norms in bf16 only, the one-block stacks);
    on "cpu" the tiny ones, PyTorch implementations only (``quick`` changes nothing)."""
    if device == "cpu":
        return Plan(
            device, (SMOKE_SHAPE,), (torch.float32,), variants((EAGER, COMPILED)), (SMOKE_EQUINORM_LAYER,),
            (SMOKE_EQUINORM_LAYER,), (EAGER,), SMALL_NETS, tuple(n for n in CONTENDERS if n not in TRITON_CONTENDERS),
            SMALL_WEIGHTS, tuple(n for n in BWN_CONTENDERS if not is_triton(n)),
            (SMOKE_SHAPE,), (torch.float32,), fused_cases.variants((EAGER,)), (SMOKE_STACK_CASE,),
            QUICK_STACK_CONTENDERS,
        )
    layers = QUICK_EQUINORM_LAYERS if quick else EQUINORM_LAYERS
    fused = fused_cases.variants((TRITON,) if quick else (TRITON, fused_cases.UNFUSED))
    return Plan(
        device, QUICK_SHAPES if quick else SHAPES, DTYPES, variants(), layers, layers[:1] if quick else layers,
        (TRITON, EAGER), STUDY_NETS, CONTENDERS, QUICK_BWN_WEIGHTS if quick else WEIGHTS, BWN_CONTENDERS,
        QUICK_SHAPES if quick else SHAPES, FUSED_QUICK_DTYPES if quick else DTYPES, fused,
        QUICK_STACK_CASES if quick else STACK_CASES,
        QUICK_STACK_CONTENDERS if quick else tuple(stack_cases.contenders()),
    )


def device_name(device: str) -> str:
    """The CUDA device's name, or "cpu"."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def progress_log() -> Callable[[str], None]:
    """A log to stderr, each message after the seconds since this call."""
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    return log


def run(plan: Plan, sections=SECTIONS, peak_gbps: float | None = None, log=None) -> Roofline:
    """Measure ``sections`` (in ``SECTIONS`` order) of ``plan`` and derive the bandwidths and
    ratios, against ``peak_gbps`` (default: from the device name); ``log`` gets one line per
    case (default: ``progress_log()``)."""
    log = log or progress_log()
    sections = [s for s in SECTIONS if s in sections]
    name = device_name(plan.device)
    peak, peak_source = peak_bandwidth(name, peak_gbps)
    meta = {
        "device": name, "peak_gbps": peak, "peak_source": peak_source, "torch": torch.__version__,
        "triton": triton.__version__ if triton else None, "tritonorm": tritonorm.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(), "topk_k": TOPK_K, "sections": sections,
    }
    record, pages, errors = {"meta": meta, **EMPTY_RECORD}, [], []
    for section in sections:
        part, page, section_errors = _MEASURE[section](plan, peak, log)
        record.update(part)
        pages.append(page)
        errors += section_errors
    record["errors"] = errors
    return Roofline(meta, record, report(meta, pages, errors), errors)


def _run_lp(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    rows, errors = measure(plan.shapes, plan.dtypes, plan.device, plan.lp_cases, log)
    topk_over_l1 = derive(rows, peak)
    return {"rows": rows, "topk_over_l1": topk_over_l1}, lp_section(rows, topk_over_l1), errors


def _run_equinorm(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    variants_of = equinorm_variants_of(plan.impls, plan.equinorm_compiled)
    layers, kernels, errors = measure_equinorm(plan.equinorm_layers, plan.dtypes, plan.device, variants_of,
                                               plan.impls, log)
    derive_equinorm(layers, kernels, peak)
    summary = overhead_summary(layers)
    part = {"equinorm_layers": layers, "equinorm_kernels": kernels, "equinorm_overhead": summary}
    return part, equinorm_section(layers, kernels, summary), errors


def _run_enorm(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    rows, errors = measure_enorm(plan.enorm_nets, plan.enorm_contenders, plan.device, log)
    targets = derive_enorm(rows, peak)
    return {"enorm": rows, "enorm_targets": targets}, enorm_section(rows, targets), errors


def _run_bwn(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    rows, errors = measure_bwn(plan.bwn_weights, BWN_DTYPES, plan.device, plan.bwn_contenders, log)
    targets = derive_bwn(rows, peak)
    summary = bwn_summary(targets)
    part = {"bounded_weight_norm": rows, "bounded_weight_norm_targets": targets,
            "bounded_weight_norm_summary": summary}
    return part, bwn_section(rows, targets, summary), errors


def _run_fused(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return fused_cases.run_section(plan.fused_shapes, plan.fused_dtypes, fused_cases.EPILOGUES, plan.fused_cases,
                                   plan.device, peak, log)


def _run_stack(plan: Plan, peak: float, log) -> tuple[dict, list[str], list[str]]:
    return stack_cases.run_section(plan.stack_cases, plan.stack_contenders, plan.device, log)


# Each section's measure-derive-report step: (record entries, markdown lines, errors).
_MEASURE = {"lp": _run_lp, "equinorm": _run_equinorm, "enorm": _run_enorm, "bwn": _run_bwn, "fused": _run_fused,
            "stack": _run_stack}


def write(result: Roofline, out_dir: Path) -> Path:
    """Write ``result``'s page and record to ``out_dir`` (created if missing) as
    ``<stem>.md`` and ``<stem>.json``; return the stem."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = result.meta
    name = re.sub(r"[^a-z0-9]+", "-", meta["device"].lower()).strip("-")
    only = "" if len(meta["sections"]) == len(SECTIONS) else "-" + "-".join(meta["sections"])
    stem = out_dir / f"{name}-{meta['date']}{only}"
    stem.with_suffix(".md").write_text(result.page)
    stem.with_suffix(".json").write_text(json.dumps(result.record, indent=1) + "\n")
    return stem
