"""What the L1 / L-inf / Top-k and mean-only batch-norm benchmarks run, shared by ``bench_lp_batchnorm.py``
(pytest-benchmark) and ``roofline.py`` (GPU bandwidth table).

A case is one layer in training mode on an (N, C, H, W) input, timed as the whole call a
training step makes, host overhead included:

* "forward": ``y = layer(x)`` with x and the affine parameters requiring grad, so autograd
  records the graph and keeps what the backward needs, as in training;
* "forward+backward": the same, then ``torch.autograd.grad`` of y with a fixed upstream
  gradient dy with respect to x, weight and bias (``autograd.grad`` rather than
  ``backward`` so that no .grad accumulation adds a read and a write of x per call).

Implementations of each norm: the Triton kernels, the plain-PyTorch reference eager,
``torch.compile`` of the reference, and ``PlainLpBatchNorm2d``: the straightforward autograd
module a user would write (channel-major rows, ``mean`` / ``amax`` / ``topk`` of |x - mu|,
autograd does the backward), the yardstick of the reference's CPU speed.  The mean-only
batch norm (``MEAN_ONLY``: ``tritonorm.MeanOnlyBatchNorm2d``, y = x - mu + beta) runs as
a fourth norm of ``BATCH_NORMS``, its plain contender ``PlainMeanOnlyBatchNorm2d``
(``x - x.mean((0, 2, 3), keepdim=True) + bias``, the running mean lerped).  The baseline is
``nn.BatchNorm2d`` (cuDNN on CUDA).  Parameters stay fp32 whatever the input dtype, as under
autocast.

Bytes: the compulsory ones (any batch norm) and the passes the Triton kernels make, as
docs/benchmarks.md describes them ("L1, L-inf and Top-k BatchNorm, mean-only BatchNorm");
``_COMPULSORY`` and ``_ALGORITHM`` hold the pass counts.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import tritonorm
from tritonorm.reference import accumulator_dtype
from tritonorm.reference.lp_batchnorm import C_L1, c_linf

from .timing import add_bandwidth, by_pass, fmt, guarded, markdown_table, ratio, time_passes

NORMS = ("l1", "linf", "topk")
MEAN_ONLY = "mean_only"
# The batch norms benchmarked (and counted by ``traffic_cases``): the Lp norms and the mean-only one.
BATCH_NORMS = (*NORMS, MEAN_ONLY)
TOPK_K = 10
TRITON, EAGER, COMPILED = "tritonorm-triton", "reference-eager", "reference-compile"
IMPLEMENTATIONS = (TRITON, EAGER, COMPILED)
PLAIN = "plain-autograd"
# The baseline, as a (norm, implementation) pair like the others.
BASELINE = ("bn", "nn.BatchNorm2d")

_LAYERS = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d,
           MEAN_ONLY: tritonorm.MeanOnlyBatchNorm2d}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Tensor passes over an (N, C, H, W) tensor per direction: compulsory, and per norm what
# the Triton kernels make.
_COMPULSORY = {"forward": 2, "backward": 3}
_ALGORITHM = {
    "l1": {"forward": 4, "backward": 5},
    "linf": {"forward": 3, "backward": 4},
    "topk": {"forward": 3, "backward": 4},
    MEAN_ONLY: {"forward": 3, "backward": 3},
}


def variants(implementations=IMPLEMENTATIONS, norms=BATCH_NORMS):
    """The (norm, implementation) pairs to run: every norm of ``norms`` with each of
    ``implementations``, then the baseline once."""
    return [(norm, impl) for norm in norms for impl in implementations] + [BASELINE]


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


class PlainLpBatchNorm2d(nn.Module):
    """The plain autograd implementation of ``norm`` (a contender, not the library): per
    channel row of x (transposed to channel-major), mu = mean, a = row - mu and

        sigma = C1 * mean(|a|)                            L1
              = Cinf(n) * amax(|a|)                        L-inf
              = Cinf(n) * mean(topk(|a|, k).values)        Top-k

    y = gamma (x - mu) / (sigma + eps) + beta, computed in the accumulator dtype, the
    running buffers updated with torch's momentum convention; autograd does the backward.
    Without ties in |a| it gives the reference's values and gradients; with ties, amax
    shares the gradient among the tied maxima and topk picks any of the tied elements,
    where the reference picks the lowest index."""

    def __init__(self, num_features: int, norm: str, *, k: int = TOPK_K, eps: float = 1e-5, momentum: float = 0.1,
                 device=None):
        super().__init__()
        self.norm, self.k, self.eps, self.momentum = norm, k, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features, device=device))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device))
        self.register_buffer("running_dev", torch.ones(num_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        rows = x.transpose(0, 1).reshape(c, -1).to(accumulator_dtype(x.dtype))
        mean = rows.mean(1)
        abs_a = (rows - mean[:, None]).abs()
        if self.norm == "l1":
            dev = C_L1 * abs_a.mean(1)
        elif self.norm == "linf":
            dev = c_linf(rows.shape[1]) * abs_a.amax(1)
        else:
            dev = c_linf(rows.shape[1]) * abs_a.topk(self.k, dim=1).values.mean(1)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_dev.lerp_(dev.to(self.running_dev.dtype), self.momentum)
        shape = (1, c) + (1,) * (x.dim() - 2)
        scale = self.weight / (dev + self.eps)
        return ((x - mean.view(shape)) * scale.view(shape) + self.bias.view(shape)).to(x.dtype)


class PlainMeanOnlyBatchNorm2d(nn.Module):
    """The plain autograd mean-only batch norm (a contender, not the library):
    y = x - x.mean((0, 2, 3), keepdim=True) + beta, the mean in the accumulator dtype, the
    running mean lerped with torch's momentum convention; autograd does the backward."""

    def __init__(self, num_features: int, *, momentum: float = 0.1, device=None):
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features, device=device))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean((0, 2, 3), keepdim=True, dtype=accumulator_dtype(x.dtype))
        with torch.no_grad():
            self.running_mean.lerp_(mean.flatten().to(self.running_mean.dtype), self.momentum)
        return (x - mean + self.bias.view(1, -1, 1, 1)).to(x.dtype)


def build_layer(norm: str, impl: str, channels: int, device) -> nn.Module:
    """A fresh layer in training mode; for COMPILED a ``torch.compile`` of the reference
    layer, compiled on its first call; for PLAIN a ``PlainLpBatchNorm2d`` (a
    ``PlainMeanOnlyBatchNorm2d`` for ``MEAN_ONLY``).

    Every COMPILED layer starts from ``torch._dynamo.reset()``: all three norm classes
    share one ``forward``, and Dynamo's per-code-object recompile limit would otherwise
    be reached after a few (norm, shape, dtype) and the rest would run eager, silently."""
    if (norm, impl) == BASELINE:
        return nn.BatchNorm2d(channels, device=device).train()
    if impl == PLAIN:
        if norm == MEAN_ONLY:
            return PlainMeanOnlyBatchNorm2d(channels, device=device).train()
        return PlainLpBatchNorm2d(channels, norm, device=device).train()
    extra = {"k": TOPK_K} if norm == "topk" else {}
    backend = "triton" if impl == TRITON else "torch"
    layer = _LAYERS[norm](channels, backend=backend, device=device, **extra).train()
    if impl == COMPILED:
        torch._dynamo.reset()
        layer = torch.compile(layer)
    return layer


def make_inputs(shape, dtype: torch.dtype, device, seed: int = 0, channels_last: bool = False):
    """(x, dy): Gaussian x with a per-channel offset and scale (x requires grad), and a
    Gaussian upstream gradient; both channels_last if asked."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    per_channel = (1, c, 1, 1)
    x = torch.randn(shape, generator=g) * (0.5 + torch.rand(c, generator=g)).view(per_channel)
    x += torch.randn(c, generator=g).view(per_channel)
    dy = torch.randn(shape, generator=g)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return (x.to(device, dtype, memory_format=layout).requires_grad_(),
            dy.to(device, dtype, memory_format=layout))


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, pass_: str) -> Callable[[], tuple]:
    """A zero-argument callable running one pass; it returns (y,) or (y, dx, dweight, dbias)."""
    if pass_ == "forward":
        return lambda: (layer(x),)
    inputs = (x, *layer.parameters())

    def forward_backward():
        y = layer(x)
        return (y, *torch.autograd.grad(y, inputs, dy))

    return forward_backward


def check_outputs(outputs: tuple, x: torch.Tensor, y_shape=None) -> None:
    """Cheap sanity of a step's outputs: y shaped like x (or ``y_shape``), dx shaped like x,
    everything finite."""
    y_shape = x.shape if y_shape is None else torch.Size(y_shape)
    assert outputs[0].shape == y_shape, (outputs[0].shape, y_shape)
    if len(outputs) > 1:
        assert outputs[1].shape == x.shape, (outputs[1].shape, x.shape)
    for t in outputs:
        assert torch.isfinite(t).all(), "non-finite output"


def synchronized(fn: Callable, device) -> Callable:
    """``fn`` followed, on CUDA, by a synchronize, so a wall-clock timer sees the GPU work."""
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def run_benchmark(benchmark, fn: Callable, device, group: str, nbytes: int | None = None):
    """Warm ``fn`` up (compiles happen here), then time it, synchronized, with the
    pytest-benchmark fixture in ``group``; with ``nbytes``, record the bytes and, when
    timed, the GB/s in ``extra_info``.  Returns ``fn``'s output."""
    fn = synchronized(fn, device)
    fn()
    benchmark.group = group
    if nbytes is not None:
        benchmark.extra_info["bytes"] = nbytes
    outputs = benchmark(fn)
    if nbytes is not None and benchmark.stats:  # None when timing is disabled
        benchmark.extra_info["gbps"] = nbytes / benchmark.stats.stats.median / 1e9
    return outputs


def _directions(pass_: str):
    return ("forward",) if pass_ == "forward" else ("forward", "backward")


def compulsory_bytes(pass_: str, x: torch.Tensor) -> int:
    """Bytes any batch norm must move for ``pass_`` on x (docs/benchmarks.md)."""
    return sum(_COMPULSORY[d] for d in _directions(pass_)) * x.numel() * x.element_size()


def algorithm_bytes(norm: str, pass_: str, x: torch.Tensor) -> int:
    """Bytes the Triton kernels of ``norm`` move for ``pass_`` on x (docs/benchmarks.md)."""
    return sum(_ALGORITHM[norm][d] for d in _directions(pass_)) * x.numel() * x.element_size()


# ----------------------------------------------------------------------------- the roofline section

SHAPES = ((256, 64, 56, 56), (128, 128, 28, 28), (128, 256, 14, 14), (128, 512, 7, 7), (64, 64, 56, 56))
QUICK_SHAPES = ((64, 64, 56, 56), (128, 256, 14, 14))
DTYPES = (torch.float32, torch.bfloat16)
SMOKE_SHAPE = (4, 8, 8, 8)


def _time_case(norm: str, impl: str, shape, x, dy, device: str) -> list[dict]:
    layer = build_layer(norm, impl, shape[1], device)
    times = time_passes(lambda pass_: step(layer, x, dy, pass_), lambda out: check_outputs(out, x), device)
    return [{
        "norm": norm, "impl": impl, "shape": shape_name(shape), "dtype": dtype_name(x.dtype),
        "pass": pass_, "time_us": time_us, "compulsory_bytes": compulsory_bytes(pass_, x),
        "algorithm_bytes": algorithm_bytes(norm, pass_, x) if impl == TRITON else None,
    } for pass_, time_us in times.items()]


def measure(shapes, dtypes, cases, device: str, log) -> tuple[list[dict], list[str]]:
    """Time every pass of every (norm, implementation) in ``cases`` at every shape and
    dtype; returns the rows and the errors of the cases that failed."""
    rows, errors = [], []
    for shape in shapes:
        for dtype in dtypes:
            x, dy = make_inputs(shape, dtype, device)
            block = []
            for norm, impl in cases:
                where = f"{shape_name(shape)} {dtype_name(dtype)} {norm} {impl}"
                block += guarded(where, errors, log, device, partial(_time_case, norm, impl, shape, x, dy, device))
            rows += by_pass(block)
    return rows, errors


def derive(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add GB/s, fractions of peak and the ratios to the baseline and to the compiled
    reference to each row; return the Top-k / L1 time ratios."""
    index = {(r["shape"], r["dtype"], r["pass"], r["norm"], r["impl"]): r for r in rows}
    for r in rows:
        config = (r["shape"], r["dtype"], r["pass"])
        add_bandwidth(r, r["compulsory_bytes"], peak_gbps)
        r["vs_batchnorm"] = ratio(r, index.get((*config, *BASELINE)))
        compiled = None if (r["norm"], r["impl"]) == BASELINE else index.get((*config, r["norm"], COMPILED))
        r["vs_compiled"] = ratio(r, compiled)
    topk_over_l1 = []
    for (shape, dtype, pass_, norm, impl), r in index.items():
        l1 = index.get((shape, dtype, pass_, "l1", impl))
        if norm == "topk" and l1:
            topk_over_l1.append({"shape": shape, "dtype": dtype, "pass": pass_, "impl": impl, "ratio": ratio(r, l1)})
    return topk_over_l1


def section(rows: list[dict], topk_over_l1: list[dict]) -> list[str]:
    """The markdown of the section: what it measures, its table and the Top-k / L1 table."""
    main = markdown_table(
        ["norm", "impl", "shape", "dtype", "pass", "time (us)", "GB/s", "floor / time",
         "alg. GB/s", "alg. / peak", "/ BN", "/ compiled ref"],
        [[r["norm"], r["impl"], r["shape"], r["dtype"], r["pass"], f"{r['time_us']:.1f}", f"{r['gbps']:.0f}",
          f"{r['floor_fraction']:.1%}", fmt(r.get("algorithm_gbps"), ".0f"), fmt(r.get("algorithm_fraction"), ".1%"),
          fmt(r["vs_batchnorm"], ".2f"), fmt(r["vs_compiled"], ".2f")] for r in rows],
    )
    ratios = markdown_table(
        ["shape", "dtype", "pass", "impl", "Top-k / L1 time"],
        [[t["shape"], t["dtype"], t["pass"], t["impl"], f"{t['ratio']:.2f}"] for t in topk_over_l1],
    )
    return [
        "## L1 / L-inf / Top-k and mean-only batch norm",
        "",
        f"Top-k k={TOPK_K}; mean_only: MeanOnlyBatchNorm2d, y = x - mu + beta (plain-autograd: "
        "x - x.mean((0, 2, 3), keepdim=True) + bias). "
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


def run_section(shapes, dtypes, cases, device: str, peak: float, log) -> tuple[dict, list[str], list[str]]:
    """Measure, derive and render the section: (record entries, markdown lines, errors)."""
    rows, errors = measure(shapes, dtypes, cases, device, log)
    topk_over_l1 = derive(rows, peak)
    return {"rows": rows, "topk_over_l1": topk_over_l1}, section(rows, topk_over_l1), errors
