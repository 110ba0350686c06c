"""The fused batch norms: L1 / L-inf / Top-k with the ReLU (and the residual add) in the
same kernels, against nn.BatchNorm2d followed by the same ops; the "fused" section of the
roofline and the cases of ``benchmarks/bench_fused.py``.

Two epilogues, as in a ResNet bottleneck:

* "relu": out = relu(bn(x)), after each convolution of a block but the last;
* "residual+relu": out = relu(bn(x) + r), the block's last norm and its shortcut r.

A case is one layer in training mode on an (N, C, H, W) input, timed as the whole call a
training step makes (``lp_cases.step``'s convention: "forward" with x, r and the affine
parameters requiring grad; "forward+backward" the same, then ``torch.autograd.grad`` of out
with a fixed dy with respect to x, r, weight and bias).  Contenders:

* ``tritonorm-triton``: ``tritonorm.L1BatchNorm2d(C, activation="relu")`` (and L-inf, Top-k)
  on the Triton path, called as ``layer(x, residual=r)``: the epilogue is fused into the
  normalize pass and its backward;
* ``tritonorm-triton-unfused``: the same layer without ``activation``, then ``out += r`` and
  ``torch.relu_`` in eager torch, what a user gets without the fusion (full runs only);
* ``reference-eager``: the fused layer on the PyTorch path (the CPU smoke runs this one);
* ``torch-eager``: ``nn.BatchNorm2d`` then ``out += r`` and ``nn.ReLU(inplace=True)``, as
  torchvision's ResNet does (cuDNN batch norm, then two elementwise kernels);
* ``torch-compile``: ``torch.compile`` of that module: Inductor fuses the add and the ReLU
  into the normalization's kernels, the strongest torch contender.

Bytes: the floor (any fused implementation) and the Triton kernels' own passes, by the path
a case takes (the planner is asked at the case's shape), as docs/benchmarks.md describes them
("Fused batch norm + ReLU (+ residual add)"); ``_FLOOR`` and ``_ALGORITHM`` (and their
residual shares) hold the pass counts, ``tests/test_traffic.py`` checks the kernels' against
the traffic counter.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

import tritonorm

from ..kernels import channel_resident
from ..kernels.channel_reduce import channel_view
from ..reference.lp_batchnorm import selected_count
from .lp_cases import EAGER, NORMS, TOPK_K, TRITON, check_outputs, dtype_name, make_inputs, shape_name
from .timing import by_pass, fmt, guarded, markdown_table, ratio, time_passes

RELU, RESIDUAL_RELU = "relu", "residual+relu"
EPILOGUES = (RELU, RESIDUAL_RELU)
UNFUSED = "tritonorm-triton-unfused"
TORCH_EAGER, TORCH_COMPILED = "torch-eager", "torch-compile"
# The baselines, as (norm, implementation) pairs like the others.
BASELINE = ("bn", TORCH_EAGER)
BASELINE_COMPILED = ("bn", TORCH_COMPILED)
COMPILED_IMPLS = (TORCH_COMPILED,)
ONCHIP, SPLIT = "onchip", "split"

_LAYERS = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}
# Passes over x per direction: the floor and the residual's share of it.
_FLOOR = {"forward": 2, "backward": 3}
_FLOOR_RESIDUAL = {"forward": 1, "backward": 1}
# The Triton kernels' passes per path and direction ({norm: passes}), and the residual's share.
_ALGORITHM = {
    ONCHIP: {"forward": {"l1": 2, "linf": 2, "topk": 2}, "backward": {"l1": 3, "linf": 3, "topk": 3}},
    SPLIT: {"forward": {"l1": 4, "linf": 3, "topk": 3}, "backward": {"l1": 5, "linf": 5, "topk": 5}},
}
_ALGORITHM_RESIDUAL = {ONCHIP: {"forward": 1, "backward": 2}, SPLIT: {"forward": 1, "backward": 3}}


def variants(implementations=(TRITON,), baselines=(BASELINE, BASELINE_COMPILED)) -> list[tuple[str, str]]:
    """The (norm, implementation) pairs to run: every norm with each of ``implementations``,
    then the baselines."""
    return [(norm, impl) for norm in NORMS for impl in implementations] + list(baselines)


def is_compiled(case: tuple[str, str]) -> bool:
    """Whether the contender compiles (about 30 s a case on a CPU)."""
    return case[1] in COMPILED_IMPLS


class BatchNormReLU(nn.Module):
    """nn.BatchNorm2d, then the residual added in place and an in-place ReLU: torchvision's
    Bottleneck ends ``out = bn3(conv3(x)); out += identity; out = relu(out)``."""

    def __init__(self, num_features: int, device=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, device=device)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = self.bn(x)
        if residual is not None:
            out += residual
        return self.relu(out)


class Unfused(nn.Module):
    """A tritonorm layer without activation, then the residual add and the ReLU in eager
    torch (two more elementwise kernels)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out = self.norm(x)
        if residual is not None:
            out += residual
        return torch.relu_(out)


def build(norm: str, impl: str, channels: int, device) -> nn.Module:
    """A fresh module in training mode, called as ``module(x, residual=r)``; a compiled one
    starts from ``torch._dynamo.reset()`` (see ``lp_cases.build_layer``)."""
    if norm == BASELINE[0]:
        module = BatchNormReLU(channels, device=device).train()
        if impl == TORCH_COMPILED:
            torch._dynamo.reset()
            module = torch.compile(module)
        return module
    extra = {"k": TOPK_K} if norm == "topk" else {}
    backend = "torch" if impl == EAGER else "triton"
    if impl == UNFUSED:
        return Unfused(_LAYERS[norm](channels, backend=backend, device=device, **extra)).train()
    return _LAYERS[norm](channels, activation="relu", backend=backend, device=device, **extra).train()


def make_residual(x: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A Gaussian r like x (shape, dtype, device, layout), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return torch.empty_like(x).copy_(torch.randn(x.shape, generator=g)).requires_grad_()


def step(module: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, dy: torch.Tensor, pass_: str):
    """A zero-argument callable running one pass; it returns (out,) or (out, dx, [dr,]
    dweight, dbias)."""
    kwargs = {} if residual is None else {"residual": residual}
    if pass_ == "forward":
        return lambda: (module(x, **kwargs),)
    inputs = (x, *kwargs.values(), *module.parameters())

    def forward_backward():
        out = module(x, **kwargs)
        return (out, *torch.autograd.grad(out, inputs, dy))

    return forward_backward


def _directions(pass_: str):
    return ("forward",) if pass_ == "forward" else ("forward", "backward")


def compulsory_bytes(pass_: str, x: torch.Tensor, residual: bool) -> int:
    """The floor of ``pass_`` (docs/benchmarks.md) on x, with or without a residual."""
    passes = sum(_FLOOR[d] + residual * _FLOOR_RESIDUAL[d] for d in _directions(pass_))
    return passes * x.numel() * x.element_size()


def triton_path(norm: str, x: torch.Tensor, direction: str) -> str:
    """ONCHIP or SPLIT: the path the Triton launchers take for ``direction`` at x (training)."""
    plan = channel_resident.plan(channel_view(x), selected_count(norm, TOPK_K), backward=direction == "backward")
    return SPLIT if plan is None else ONCHIP


def algorithm_bytes(norm: str, pass_: str, x: torch.Tensor, residual: bool) -> int:
    """The bytes the fused Triton kernels of ``norm`` move for ``pass_`` on x
    (docs/benchmarks.md; the per-channel traffic left out)."""
    passes = 0
    for d in _directions(pass_):
        path = triton_path(norm, x, d)
        passes += _ALGORITHM[path][d][norm] + residual * _ALGORITHM_RESIDUAL[path][d]
    return passes * x.numel() * x.element_size()


def paths(norm: str, x: torch.Tensor) -> str:
    """"forward path/backward path", e.g. "onchip/split"."""
    return "/".join(triton_path(norm, x, d) for d in ("forward", "backward"))


# ----------------------------------------------------------------------------- the roofline section

# The batch-norm shapes and dtypes (``lp_cases.SHAPES``, ``DTYPES``); --quick: QUICK_SHAPES in
# bf16, the fused Triton layers against nn.BatchNorm2d + ReLU eager and compiled (one compile
# per shape and epilogue).
QUICK_DTYPES = (torch.bfloat16,)



def _time_case(norm: str, impl: str, epilogue: str, shape, x, dy, device: str) -> list[dict]:
    module = build(norm, impl, shape[1], device)
    residual = make_residual(x) if epilogue == RESIDUAL_RELU else None
    with_residual = residual is not None
    times = time_passes(lambda pass_: step(module, x, residual, dy, pass_), lambda out: check_outputs(out, x), device)
    triton = impl == TRITON
    return [{
        "norm": norm, "impl": impl, "epilogue": epilogue, "shape": shape_name(shape), "dtype": dtype_name(x.dtype),
        "pass": pass_, "time_us": time_us, "compulsory_bytes": compulsory_bytes(pass_, x, with_residual),
        "algorithm_bytes": algorithm_bytes(norm, pass_, x, with_residual) if triton else None,
        "path": paths(norm, x) if triton else None,
    } for pass_, time_us in times.items()]


def measure(shapes, dtypes, epilogues, cases, device: str, log) -> tuple[list[dict], list[str]]:
    """Time both passes of every (norm, implementation) in ``cases`` at every shape, dtype
    and epilogue; returns the rows and the errors of the cases that failed."""
    rows, errors = [], []
    for shape in shapes:
        for dtype in dtypes:
            x, dy = make_inputs(shape, dtype, device)
            for epilogue in epilogues:
                block = []
                for norm, impl in cases:
                    where = f"fused {shape_name(shape)} {dtype_name(dtype)} {epilogue} {norm} {impl}"
                    block += guarded(where, errors, log, device,
                                     functools.partial(_time_case, norm, impl, epilogue, shape, x, dy, device))
                rows += by_pass(block)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, errors


def derive(rows: list[dict], peak_gbps: float) -> None:
    """Add GB/s over the floor and floor time / time, for the Triton rows the same over the
    kernels' own bytes, and time / torch-eager time and time / torch-compile time (same
    shape, dtype, epilogue and pass) to each row."""
    index = {(r["shape"], r["dtype"], r["epilogue"], r["pass"], r["norm"], r["impl"]): r for r in rows}
    for r in rows:
        config = (r["shape"], r["dtype"], r["epilogue"], r["pass"])
        seconds = r["time_us"] * 1e-6
        r["gbps"] = r["compulsory_bytes"] / seconds / 1e9
        r["floor_fraction"] = r["gbps"] / peak_gbps
        r["algorithm_gbps"] = None if r["algorithm_bytes"] is None else r["algorithm_bytes"] / seconds / 1e9
        r["algorithm_fraction"] = None if r["algorithm_gbps"] is None else r["algorithm_gbps"] / peak_gbps
        r["vs_torch"] = ratio(r, index.get((*config, *BASELINE)))
        r["vs_compiled"] = ratio(r, index.get((*config, *BASELINE_COMPILED)))


def section(rows: list[dict]) -> list[str]:
    """The markdown of the section: what it measures and its table."""
    table = markdown_table(
        ["norm", "epilogue", "impl", "shape", "dtype", "pass", "time (us)", "GB/s", "floor / time", "path",
         "alg. GB/s", "alg. / peak", "/ torch-eager", "/ torch-compile"],
        [[r["norm"], r["epilogue"], r["impl"], r["shape"], r["dtype"], r["pass"], f"{r['time_us']:.1f}",
          f"{r['gbps']:.0f}", f"{r['floor_fraction']:.1%}", r["path"] or "-", fmt(r["algorithm_gbps"], ".0f"),
          fmt(r["algorithm_fraction"], ".1%"), fmt(r["vs_torch"], ".2f"), fmt(r["vs_compiled"], ".2f")]
         for r in rows],
    )
    return [
        "## Fused batch norm + ReLU (+ residual add)",
        "",
        (f"Top-k k={TOPK_K}. epilogue relu: out = relu(bn(x)); residual+relu: out = relu(bn(x) + r). "
         "tritonorm-triton: the layer with activation=\"relu\" called as layer(x, residual=r), the epilogue fused "
         "into its kernels; tritonorm-triton-unfused: the layer alone, then out += r and relu_ in eager torch; "
         "reference-eager: the fused layer on the PyTorch path; torch-eager: nn.BatchNorm2d, out += r, "
         "nn.ReLU(inplace=True); torch-compile: torch.compile of that. GB/s: the floor's bytes / time (forward: "
         "read x, write out, + read r; backward: read x and dy, write dx, + write dr: 2 + 3 passes, 3 + 4 with r); "
         "floor / time: the time the floor takes at peak bandwidth, over the time. path: the Triton launchers' path, "
         "forward/backward (onchip: one program per channel block; split: the split reduction). alg.: the same for "
         "the bytes the Triton kernels move. / torch-eager, / torch-compile: time over their times at the same "
         "shape, dtype, epilogue and pass."),
        "",
        table,
    ]


def run_section(shapes, dtypes, epilogues, cases, device: str, peak: float, log) -> tuple[dict, list[str], list[str]]:
    """Measure, derive and render the section: (record entries, markdown lines, errors)."""
    rows, errors = measure(shapes, dtypes, epilogues, cases, device, log)
    derive(rows, peak)
    return {"fused": rows}, section(rows), errors

