"""What the bounded-weight-norm benchmarks run, shared by ``bench_bounded_weight_norm.py``
(pytest-benchmark) and ``roofline.py`` (GPU table).

A case is one weight (``WeightCase``): every distinct conv weight of a torchvision
ResNet-50 (``resnet50_weights``: 20 convolution shapes over its 53 convolutions, the
downsampling ones included) and its fc, and a 4096x4096 linear.  What is timed is the
parametrized weight a training step computes, as the whole call, host overhead included:

* "forward": w = the weight computed from its parameters, which require grad, so autograd
  records what the backward needs;
* "forward+backward": the same, then ``torch.autograd.grad`` of w with a fixed random
  dL/dw with respect to the parameters (``autograd.grad`` rather than ``backward``: no .grad
  accumulation).

The contenders (``CONTENDERS``), each an ``nn.Module`` whose ``forward()`` returns w
(``build``), every one started from the same v:

* ``bwn-triton``: ``tritonorm.bounded_weight_norm(backend="triton")``, fixed rho (the mean
  of the initial slice norms), w read as ``module.weight`` through the parametrization: one
  custom-op launch forward, one backward;
* ``bwn-triton-gain``: the same with ``learnable_gain=True`` (parameters v and the gain g;
  the scale g rho_g / ||g|| is a few tiny PyTorch ops on S numbers around the kernels);
* ``bwn-triton-ops``: the two custom ops called directly, no parametrization and no
  autograd (``torch.ops.tritonorm.bounded_weight``, then ``bounded_weight_backward``):
  the kernels and their launches alone;
* ``bwn-torch-eager`` and ``bwn-torch-compile``: ``bounded_weight_norm(backend="torch")``,
  the plain-PyTorch reference, eager and ``torch.compile``-d;
* ``weight_norm``: ``torch.nn.utils.parametrizations.weight_norm(dim=0)``, the closest
  torch built-in (w = g v / ||v||, g and v parameters; its parametrization calls
  ``torch._weight_norm``, fused kernels on CUDA);
* ``formula-eager`` and ``formula-compile``: the plain-PyTorch formula
  ``rho * v / v.norm(p=2, dim=(1, ...), keepdim=True)`` (rho the same 0-d buffer), eager and
  ``torch.compile``-d;
* the norm orders p = 1 and inf (``ORDERS``): ``bwn-triton``, ``bwn-torch-eager`` and
  ``formula-eager`` with the suffix ``-p1`` or ``-pinf`` (``ORDER_CONTENDERS``), the same with
  ``bounded_weight_norm(p=...)`` and ``v.norm(p=...)`` (rho the mean of the initial slice
  p-norms); the p = 2 contenders above are the rest.

Bytes: the floor (``compulsory_bytes``) and the passes the Triton kernels make
(``algorithm_bytes``), as docs/benchmarks.md describes them ("Bounded weight norm");
``_COMPULSORY`` and ``_ALGORITHM`` hold the pass counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import tritonorm
from tritonorm.reference.bounded_weight_norm import EPS, slice_norms

from .lp_cases import dtype_name
from .timing import add_bandwidth, by_pass, fmt, guarded, markdown_table, ratio, time_passes

TRITON_FIXED, TRITON_GAIN, TRITON_OPS = "bwn-triton", "bwn-triton-gain", "bwn-triton-ops"
TORCH_EAGER, TORCH_COMPILED = "bwn-torch-eager", "bwn-torch-compile"
WEIGHT_NORM = "weight_norm"
FORMULA_EAGER, FORMULA_COMPILED = "formula-eager", "formula-compile"
# The norm orders other than 2, by contender-name suffix, and their contenders.
ORDERS = {"p1": 1.0, "pinf": math.inf}
ORDER_CONTENDERS = tuple(f"{name}-{suffix}" for suffix in ORDERS for name in (TRITON_FIXED, TORCH_EAGER, FORMULA_EAGER))
CONTENDERS = (TRITON_FIXED, TRITON_GAIN, TRITON_OPS, TORCH_EAGER, TORCH_COMPILED, WEIGHT_NORM, FORMULA_EAGER,
              FORMULA_COMPILED, *ORDER_CONTENDERS)
TRITON_CONTENDERS = (TRITON_FIXED, TRITON_GAIN, TRITON_OPS, *(f"{TRITON_FIXED}-{suffix}" for suffix in ORDERS))
COMPILED_CONTENDERS = (TORCH_COMPILED, FORMULA_COMPILED)
# The parametrizations the targets are about (forward+backward; ``SPEEDUP_TARGET``, ``FLOOR_TARGET``).
PARAMETRIZATIONS = (TRITON_FIXED, TRITON_GAIN)
_BACKENDS = {TRITON_FIXED: "triton", TRITON_GAIN: "triton", TORCH_EAGER: "torch", TORCH_COMPILED: "torch"}
# Weight passes per direction: compulsory, and what the Triton kernels make.
_COMPULSORY = {"forward": 2, "backward": 3}
_ALGORITHM = {"forward": 3, "backward": 5}


@dataclass(frozen=True)
class WeightCase:
    """A weight of ``shape``, cut along dim 0 (output channels or features); ``layers`` are
    the layers of the net that have it."""

    shape: tuple[int, ...]
    layers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """e.g. "512x512x3x3"."""
        return "x".join(map(str, self.shape))

    @property
    def where(self) -> str:
        """e.g. "layer4.0.conv2 (x3)": the first layer with this weight, and how many have it."""
        if not self.layers:
            return "-"
        return self.layers[0] + (f" (x{len(self.layers)})" if len(self.layers) > 1 else "")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def resnet50_weights() -> tuple[WeightCase, ...]:
    """The distinct weights of torchvision's ResNet-50, in network order: conv1, the four
    stages of bottlenecks (conv1 1x1, conv2 3x3, conv3 1x1 expanding 4x, a 1x1 downsample in
    each stage's first block), and fc."""
    layers: dict[tuple[int, ...], list[str]] = {}

    def add(name: str, shape: tuple[int, ...]) -> None:
        layers.setdefault(shape, []).append(name)

    add("conv1", (64, 3, 7, 7))
    inplanes = 64
    for stage, (planes, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3)), start=1):
        for b in range(blocks):
            prefix = f"layer{stage}.{b}"
            add(f"{prefix}.conv1", (planes, inplanes, 1, 1))
            add(f"{prefix}.conv2", (planes, planes, 3, 3))
            add(f"{prefix}.conv3", (4 * planes, planes, 1, 1))
            if b == 0:
                add(f"{prefix}.downsample.0", (4 * planes, inplanes, 1, 1))
            inplanes = 4 * planes
    add("fc", (1000, 2048))
    return tuple(WeightCase(shape, tuple(names)) for shape, names in layers.items())


RESNET50_WEIGHTS = resnet50_weights()
LINEAR_4096 = WeightCase((4096, 4096), ("linear 4096->4096",))
WEIGHTS = (*RESNET50_WEIGHTS, LINEAR_4096)
# Small weights of the same kinds (conv, linear), for the CPU.
SMALL_WEIGHTS = (WeightCase((16, 8, 3, 3), ("small conv",)), WeightCase((24, 40), ("small linear",)))


def is_triton(name: str) -> bool:
    return name in TRITON_CONTENDERS


def split_order(name: str) -> tuple[str, float]:
    """(the p = 2 contender, p) of contender ``name``: "formula-eager-pinf" -> ("formula-eager", inf)."""
    base, _, suffix = name.rpartition("-")
    return (base, ORDERS[suffix]) if suffix in ORDERS else (name, 2.0)


def with_order(name: str, p: float) -> str:
    """The contender ``name`` (of p = 2) at norm order ``p``: ("formula-eager", 1.0) -> "formula-eager-p1"."""
    return name if p == 2 else f"{name}-{next(suffix for suffix, order in ORDERS.items() if order == p)}"


def _fan_in_normal(case: WeightCase, seed: int) -> torch.Tensor:
    """N(0, 1 / fan_in): the scale of a Kaiming-initialised weight, every slice nonzero."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.shape, generator=g) / math.sqrt(case.numel // case.shape[0])


def make_grad(case: WeightCase, dtype: torch.dtype, device, seed: int = 1) -> torch.Tensor:
    """A Gaussian dL/dw."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.shape, generator=g).to(device, dtype)


class Weight(nn.Module):
    """A bare module with one parameter ``weight``, what the parametrizations attach to."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(v)


class WeightOf(nn.Module):
    """``forward()`` returns ``module.weight``: through its parametrization, if any."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self) -> torch.Tensor:
        return self.module.weight


class Formula(nn.Module):
    """``rho * v / v.norm(p=p, dim=(1, ...), keepdim=True)``: v a parameter, rho a 0-d buffer (the
    mean of the initial slice p-norms, as bounded_weight_norm's default)."""

    def __init__(self, v: torch.Tensor, p: float = 2.0):
        super().__init__()
        self.v = nn.Parameter(v)
        self.p = p
        self.register_buffer("rho", slice_norms(v.detach(), p=p).mean().to(v.dtype))
        self.dims = tuple(range(1, v.dim()))

    def forward(self) -> torch.Tensor:
        return self.rho * self.v / self.v.norm(p=self.p, dim=self.dims, keepdim=True)


class Ops(nn.Module):
    """The Triton custom ops called directly: ``forward()`` is the forward op on v (detached,
    nothing recorded), ``backward(grad)`` the backward op on its saved norms."""

    def __init__(self, v: torch.Tensor):
        super().__init__()
        self.register_buffer("v", v)
        self.register_buffer("rho", slice_norms(v).mean().to(v.dtype))
        self.norm = None

    def forward(self) -> torch.Tensor:
        w, self.norm = torch.ops.tritonorm.bounded_weight(self.v, rho=self.rho, dim=0, eps=EPS)
        return w

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.tritonorm.bounded_weight_backward(
            grad, v=self.v, rho=self.rho, norm=self.norm, dim=0, eps=EPS
        )


def build(name: str, case: WeightCase, dtype: torch.dtype, device, seed: int = 0) -> nn.Module:
    """Contender ``name`` on a fresh v (the same for every contender at one seed), as a
    module whose ``forward()`` returns w; for the compiled ones a ``torch.compile`` of it
    (after ``torch._dynamo.reset()``, as ``lp_cases.build_layer`` explains), compiled on its
    first call."""
    v = _fan_in_normal(case, seed).to(device, dtype)
    base, p = split_order(name)
    if name == TRITON_OPS:
        return Ops(v)
    if base in (FORMULA_EAGER, FORMULA_COMPILED):
        module = Formula(v, p)
    else:
        holder = Weight(v)
        if name == WEIGHT_NORM:
            torch.nn.utils.parametrizations.weight_norm(holder, dim=0)
        else:
            tritonorm.bounded_weight_norm(holder, learnable_gain=name == TRITON_GAIN, backend=_BACKENDS[base], p=p)
        module = WeightOf(holder)
    if name in COMPILED_CONTENDERS:
        torch._dynamo.reset()
        module = torch.compile(module)
    return module


def step(module: nn.Module, grad: torch.Tensor, pass_: str) -> Callable[[], tuple]:
    """A zero-argument callable running one pass; it returns (w,) or (w, dL/dv, ...), one
    gradient per parameter (for ``Ops``, dL/dv and dL/drho from the backward op)."""
    if pass_ == "forward":
        return lambda: (module(),)
    if isinstance(module, Ops):
        return lambda: (module(), *module.backward(grad))
    params = tuple(module.parameters())

    def forward_backward():
        w = module()
        return (w, *torch.autograd.grad(w, params, grad))

    return forward_backward


def check_outputs(outputs: tuple, case: WeightCase) -> None:
    """Cheap sanity of a step's outputs: w shaped like the weight, and so is one gradient
    (dL/dv; weight_norm's dL/dg comes first), all finite."""
    assert outputs[0].shape == case.shape, (outputs[0].shape, case.shape)
    if len(outputs) > 1:
        assert any(t.shape == case.shape for t in outputs[1:]), ([t.shape for t in outputs[1:]], case.shape)
    for t in outputs:
        assert torch.isfinite(t).all(), "non-finite output"


def _directions(pass_: str):
    return ("forward",) if pass_ == "forward" else ("forward", "backward")


def compulsory_bytes(pass_: str, case: WeightCase, dtype: torch.dtype) -> int:
    """The floor: bytes any implementation must move for ``pass_`` (docs/benchmarks.md)."""
    return sum(_COMPULSORY[d] for d in _directions(pass_)) * case.numel * dtype.itemsize


def algorithm_bytes(pass_: str, case: WeightCase, dtype: torch.dtype) -> int:
    """Bytes the Triton kernels move for ``pass_`` (docs/benchmarks.md)."""
    return sum(_ALGORITHM[d] for d in _directions(pass_)) * case.numel * dtype.itemsize


# ----------------------------------------------------------------------------- the roofline section

# fp32 weights (parameters stay fp32 under mixed precision).  --quick: a launch-bound conv,
# two ~1M-element ones, the fc and the 4096x4096 linear.
DTYPES = (torch.float32,)
QUICK_WEIGHTS = tuple(w for w in WEIGHTS if w.shape in ((64, 64, 3, 3), (512, 512, 3, 3), (2048, 512, 1, 1),
                                                        (1000, 2048), (4096, 4096)))
# The targets, Triton forward+backward of the parametrization: at least SPEEDUP_TARGET times
# faster than torch.nn.utils.parametrizations.weight_norm, and at most FLOOR_TARGET times the
# bandwidth floor's time on weights of more than FLOOR_MIN_NUMEL elements.
SPEEDUP_TARGET, FLOOR_TARGET, FLOOR_MIN_NUMEL = 2.0, 1.5, 1_000_000


def _time_case(case: WeightCase, name: str, dtype: torch.dtype, grad, device: str) -> list[dict]:
    module = build(name, case, dtype, device)
    times = time_passes(lambda pass_: step(module, grad, pass_), lambda out: check_outputs(out, case), device)
    return [{
        "weight": case.name, "layers": case.where, "numel": case.numel, "dtype": dtype_name(dtype), "pass": pass_,
        "contender": name, "time_us": time_us, "bytes": compulsory_bytes(pass_, case, dtype),
        "algorithm_bytes": algorithm_bytes(pass_, case, dtype) if is_triton(name) else None,
    } for pass_, time_us in times.items()]


def measure(cases, dtypes, device: str, names, log) -> tuple[list[dict], list[str]]:
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
                block += guarded(where, errors, log, device, partial(_time_case, case, name, dtype, grad, device))
            rows += by_pass(block)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, errors


def derive(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add GB/s over the floor (and over the kernels' bytes, Triton rows), their fractions of
    peak, time / weight_norm time and time / compiled-formula time to each row; return, per
    weight, dtype and Triton parametrization with a weight_norm row, the targets: weight_norm
    time / its forward+backward time (at least ``SPEEDUP_TARGET``) and, above
    ``FLOOR_MIN_NUMEL`` elements, its time / the floor's time (at most
    ``FLOOR_TARGET``), with the kernels alone (``bwn-triton-ops``) beside it."""
    index = {(r["weight"], r["dtype"], r["pass"], r["contender"]): r for r in rows}
    for r in rows:
        config = (r["weight"], r["dtype"], r["pass"])
        add_bandwidth(r, r["bytes"], peak_gbps)
        r["vs_weight_norm"] = ratio(r, index.get((*config, WEIGHT_NORM)))
        # against the compiled formula of the same norm order (p = 2 only: the others have none)
        compiled = with_order(FORMULA_COMPILED, split_order(r["contender"])[1])
        r["vs_formula_compiled"] = ratio(r, index.get((*config, compiled)))
    targets = []
    for (weight, dtype, pass_, name), r in index.items():
        weight_norm = index.get((weight, dtype, pass_, WEIGHT_NORM))
        if pass_ != "forward+backward" or name not in PARAMETRIZATIONS or not weight_norm:
            continue
        speedup = ratio(weight_norm, r)
        checked = r["numel"] > FLOOR_MIN_NUMEL
        over_floor = 1 / r["floor_fraction"]
        ops = index.get((weight, dtype, pass_, TRITON_OPS))
        targets.append({
            "weight": weight, "layers": r["layers"], "numel": r["numel"], "dtype": dtype, "contender": name,
            "speedup_vs_weight_norm": speedup, "time_over_floor": over_floor, "floor_checked": checked,
            "ops_time_over_floor": 1 / ops["floor_fraction"] if ops else None,
            "met": speedup >= SPEEDUP_TARGET and (not checked or over_floor <= FLOOR_TARGET),
        })
    return targets


def target_summary(targets: list[dict]) -> dict | None:
    """How many (weight, dtype, parametrization) meet each target, and the worst of each;
    None without targets (as on CPU)."""
    if not targets:
        return None
    floor = [t for t in targets if t["floor_checked"]]
    slowest = min(targets, key=lambda t: t["speedup_vs_weight_norm"])
    farthest = max(floor, key=lambda t: t["time_over_floor"]) if floor else None
    return {
        "cases": len(targets), "met": sum(t["met"] for t in targets),
        "speedup_met": sum(t["speedup_vs_weight_norm"] >= SPEEDUP_TARGET for t in targets),
        "worst_speedup": slowest["speedup_vs_weight_norm"],
        "worst_speedup_at": f"{slowest['weight']} {slowest['contender']}",
        "floor_cases": len(floor), "floor_met": sum(t["time_over_floor"] <= FLOOR_TARGET for t in floor),
        "worst_over_floor": farthest["time_over_floor"] if farthest else None,
        "worst_over_floor_at": f"{farthest['weight']} {farthest['contender']}" if farthest else None,
    }


def _summary_line(summary: dict | None) -> str:
    if summary is None:
        return "Targets: no Triton forward+backward rows with a weight_norm row measured."
    line = (f"Targets (Triton forward+backward of the parametrization): met at {summary['met']} of {summary['cases']}. "
            f">= {SPEEDUP_TARGET:g}x faster than weight_norm: {summary['speedup_met']} of {summary['cases']}, "
            f"slowest {summary['worst_speedup']:.2f}x ({summary['worst_speedup_at']}).")
    if summary["floor_cases"]:
        line += (f" Within {FLOOR_TARGET:g}x of the floor above {FLOOR_MIN_NUMEL:,} elements: "
                 f"{summary['floor_met']} of {summary['floor_cases']}, farthest {summary['worst_over_floor']:.2f}x "
                 f"({summary['worst_over_floor_at']}).")
    return line


def section(rows: list[dict], targets: list[dict], summary: dict | None) -> list[str]:
    """The markdown of the section: what it measures, the targets and the table."""
    table = markdown_table(
        ["weight", "layers", "dtype", "pass", "contender", "time (us)", "floor MB", "GB/s", "floor / time",
         "alg. GB/s", "alg. / peak", "/ weight_norm", "/ compiled formula"],
        [[r["weight"], r["layers"], r["dtype"], r["pass"], r["contender"], f"{r['time_us']:.1f}",
          f"{r['bytes'] / 1e6:.2f}", f"{r['gbps']:.0f}", f"{r['floor_fraction']:.1%}",
          fmt(r.get("algorithm_gbps"), ".0f"), fmt(r.get("algorithm_fraction"), ".1%"),
          fmt(r["vs_weight_norm"], ".2f"), fmt(r["vs_formula_compiled"], ".2f")] for r in rows],
    )
    target_table = markdown_table(
        ["weight", "layers", "elements", "dtype", "contender", f"weight_norm / time (>= {SPEEDUP_TARGET:g})",
         f"time / floor (<= {FLOOR_TARGET:g} above {FLOOR_MIN_NUMEL:,})", "ops alone: time / floor", "met"],
        [[t["weight"], t["layers"], f"{t['numel']:,}", t["dtype"], t["contender"], f"{t['speedup_vs_weight_norm']:.2f}",
          f"{t['time_over_floor']:.2f}" + ("" if t["floor_checked"] else " (n/a)"),
          fmt(t["ops_time_over_floor"], ".2f"), "yes" if t["met"] else "NO"] for t in targets],
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
        "eager and torch.compile; -p1 / -pinf: bwn-triton, bwn-torch-eager and formula-eager with the norm order p = 1 "
        "or inf (bounded_weight_norm(p=...), v.norm(p=...)). floor MB: the compulsory bytes (forward: read v, "
        "write w; backward: read dL/dw and v, write dL/dv; 2 and 3 weight passes, 5 for forward+backward). GB/s: "
        "those bytes / time; "
        "floor / time: the time they take at peak bandwidth over the time. alg.: the same for the bytes the Triton "
        "kernels move (forward reads v twice and writes w, backward reads dL/dw and v twice and writes dL/dv: 3 and "
        "5 passes). / weight_norm, / compiled formula: time over weight_norm's and over the compiled formula's.",
        "",
        _summary_line(summary),
        "",
        *([target_table, ""] if target_table else []),
        table,
    ]


def run_section(cases, names, device: str, peak: float, log) -> tuple[dict, list[str], list[str]]:
    """Measure, derive and render the section: (record entries, markdown lines, errors)."""
    rows, errors = measure(cases, DTYPES, device, names, log)
    targets = derive(rows, peak)
    summary = target_summary(targets)
    part = {"bounded_weight_norm": rows, "bounded_weight_norm_targets": targets,
            "bounded_weight_norm_summary": summary}
    return part, section(rows, targets, summary), errors
