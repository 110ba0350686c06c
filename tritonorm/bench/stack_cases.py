"""End to end: one training step of a ResNet-50-shaped stack of convolution + norm + ReLU
blocks, with tritonorm's fused L1 / L-inf / Top-k norms against nn.BatchNorm2d + ReLU; the
"stack" section of the roofline.

The stack (``build_stack``) is ResNet-50 without its stem and head: its 16 bottleneck
blocks in 4 stages, from the stem's output (N, 64, 56, 56) to (N, 2048, 7, 7).

    stage  blocks  width  out   stride  resolution
      1      3       64    256    1       56
      2      4      128    512    2       28
      3      6      256   1024    2       14
      4      3      512   2048    2        7

A block is torchvision's Bottleneck (stride on the 3x3, "ResNet v1.5"):

    h = norm1(conv1x1(x))          + ReLU     (width channels)
    h = norm2(conv3x3(h, stride))  + ReLU     (width channels)
    out = norm3(conv1x1(h))        + shortcut, + ReLU     (out channels)

with the shortcut x itself, or at each stage's first block norm(conv1x1(x, stride)) (no
ReLU).  52 norms in all: 16 x 3, and 4 on the shortcuts.  The norms:

* "bn": ``nn.BatchNorm2d`` then ``out += shortcut`` and ``nn.ReLU(inplace=True)``, as
  torchvision writes it (``fused_cases.BatchNormReLU``);
* "l1", "linf", "topk" (k = 10): ``tritonorm.L1BatchNorm2d(C, activation="relu")`` and the
  others, the ReLU fused, and the last norm of a block called as ``norm(h, residual=shortcut)``:
  the add fused too.  The shortcut norms have no activation.

Convolutions have no bias; weights are initialised by torch's defaults.  Each stack is run
eager and ``torch.compile``-d (the whole stack, one graph: tritonorm's norms are custom ops,
no graph break).  A step is the forward on a fixed input, then ``torch.autograd.grad`` of
the output with a fixed upstream gradient with respect to every parameter: forward and
backward and nothing else (no loss, no optimizer; the input needs no gradient, as the stem
would).  ``dtype`` bf16 runs the step under ``torch.autocast`` (fp32 parameters, bf16
activations), which is how such a network trains; at N=256 an fp32 step also needs more
memory than some GPUs have.

``channel_scale`` divides every channel count and ``resolution`` sets the input's size, so
that the same stack runs as a smoke test on a CPU (channels / 16 at 16x16); ``blocks`` sets
the blocks per stage ((1, 1, 1, 1): each stage's first block, 16 norms).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

import tritonorm

from .fused_cases import BatchNormReLU
from .lp_cases import TOPK_K, dtype_name
from .timing import fmt, guarded, markdown_table, median_seconds

# (blocks, width, out channels, stride) per stage, and the stem's output.
RESNET50_STAGES = ((3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2))
RESNET50_BLOCKS = tuple(stage[0] for stage in RESNET50_STAGES)
ONE_BLOCK = (1, 1, 1, 1)
STEM_CHANNELS, RESOLUTION = 64, 56
NORMS = ("bn", "l1", "linf", "topk")
EAGER, COMPILED = "eager", "compile"
MODES = (EAGER, COMPILED)
BASELINE, BASELINE_COMPILED = ("bn", EAGER), ("bn", COMPILED)
# do_bench's timing window per case, ms: a step takes tens of ms, do_bench's default 100 ms
# would time one or two.
REP_MS = 1000

_LAYERS = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}


@dataclass(frozen=True)
class StackCase:
    """One stack and input: batch, dtype (bf16: autocast), channels divided by
    ``channel_scale``, the input's ``resolution``, ``blocks`` per stage."""

    batch: int
    dtype: torch.dtype = torch.float32
    channel_scale: int = 1
    resolution: int = RESOLUTION
    blocks: tuple[int, ...] = RESNET50_BLOCKS

    @property
    def name(self) -> str:
        depth = "" if self.blocks == RESNET50_BLOCKS else "-" + "".join(map(str, self.blocks))
        scale = "" if self.channel_scale == 1 else f" /{self.channel_scale}"
        return f"resnet50{depth} N={self.batch} {self.resolution}px{scale}"

    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, _channels(STEM_CHANNELS, self.channel_scale), self.resolution, self.resolution)

    def output_shape(self) -> tuple[int, int, int, int]:
        size = self.resolution
        for _, _, _, stride in RESNET50_STAGES:
            size = (size - 1) // stride + 1
        return (self.batch, _channels(RESNET50_STAGES[-1][2], self.channel_scale), size, size)


def _channels(c: int, scale: int) -> int:
    return max(1, c // scale)


def make_norm(norm: str, channels: int, *, relu: bool, backend: str = "auto", device=None) -> nn.Module:
    """The norm after a convolution: with ``relu``, the ReLU fused for tritonorm's (and
    ``BatchNormReLU`` for "bn"); called as ``module(h)`` or ``module(h, residual=r)``."""
    if norm == "bn":
        return BatchNormReLU(channels, device=device) if relu else nn.BatchNorm2d(channels, device=device)
    extra = {"k": TOPK_K} if norm == "topk" else {}
    return _LAYERS[norm](channels, activation="relu" if relu else None, backend=backend, device=device, **extra)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck with ``make_norm``'s norms (module docstring)."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int, norm_of):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.norm1 = norm_of(width, relu=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm_of(width, relu=True)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.norm3 = norm_of(c_out, relu=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            norm_of(c_out, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.norm1(self.conv1(x))
        h = self.norm2(self.conv2(h))
        return self.norm3(self.conv3(h), residual=shortcut)


def build_stack(norm: str, *, channel_scale: int = 1, blocks=RESNET50_BLOCKS, backend: str = "auto", device=None,
                dtype=None) -> nn.Sequential:
    """The stack of ``norm`` ("bn", "l1", "linf", "topk"; module docstring) in training mode:
    ``sum(blocks)`` bottlenecks, channel counts divided by ``channel_scale``; parameters in
    ``dtype`` (default: torch's, fp32; keep them fp32 and use autocast for bf16)."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if len(blocks) != len(RESNET50_STAGES) or not all(isinstance(b, int) and b >= 1 for b in blocks):
        raise ValueError(f"blocks must be {len(RESNET50_STAGES)} positive ints, got {blocks!r}")
    norm_of = functools.partial(make_norm, norm, backend=backend, device=device)
    layers, c_in = [], _channels(STEM_CHANNELS, channel_scale)
    for count, (_, width, c_out, stride) in zip(blocks, RESNET50_STAGES, strict=True):
        width, c_out = _channels(width, channel_scale), _channels(c_out, channel_scale)
        for i in range(count):
            layers.append(Bottleneck(c_in, width, c_out, stride if i == 0 else 1, norm_of))
            c_in = c_out
    return nn.Sequential(*layers).to(device=device, dtype=dtype).train()


def make_inputs(case: StackCase, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy): a non-negative input (the stem ends with a ReLU and a max-pool), fp32, and the
    upstream gradient in the output's dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.input_shape(), generator=g).relu_().to(device)
    dy = torch.randn(case.output_shape(), generator=g).to(device, case.dtype)
    return x, dy


def train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor, dtype: torch.dtype):
    """A zero-argument callable: the forward (under autocast when ``dtype`` is not fp32),
    then ``torch.autograd.grad`` of the output with ``dy`` for every parameter; it returns
    (out, *grads)."""
    params = tuple(model.parameters())
    autocast = dtype != torch.float32

    def run():
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            out = model(x)
        return (out, *torch.autograd.grad(out, params, dy))

    return run


def build(norm: str, mode: str, case: StackCase, device) -> nn.Module:
    """The stack of ``norm`` for ``case``, compiled when ``mode`` is COMPILED (after
    ``torch._dynamo.reset()``: every stack shares Bottleneck.forward's code object)."""
    model = build_stack(norm, channel_scale=case.channel_scale, blocks=case.blocks, device=device)
    if mode == COMPILED:
        torch._dynamo.reset()
        model = torch.compile(model)
    return model


def check_outputs(outputs: tuple, case: StackCase) -> None:
    """The output shaped as the case says, everything finite."""
    assert outputs[0].shape == case.output_shape(), (outputs[0].shape, case.output_shape())
    for t in outputs:
        assert torch.isfinite(t).all(), "non-finite output or gradient"


def contenders(norms=NORMS, modes=MODES) -> list[tuple[str, str]]:
    """Every (norm, mode), the baseline's first."""
    return [(norm, mode) for mode in modes for norm in norms]


# ----------------------------------------------------------------------------- the roofline section

# N=32 fp32 and bf16, N=256 bf16 (an fp32 step at N=256 may not fit); --quick: one block per
# stage, N=32 fp32 and N=256 bf16, torch.compile for bn and L1 only.
CASES = (StackCase(32), StackCase(32, torch.bfloat16), StackCase(256, torch.bfloat16))
QUICK_CASES = (StackCase(32, blocks=ONE_BLOCK), StackCase(256, torch.bfloat16, blocks=ONE_BLOCK))
QUICK_CONTENDERS = contenders(modes=(EAGER,)) + contenders(("bn", "l1"), (COMPILED,))
SMOKE_CASE = StackCase(3, channel_scale=16, resolution=16, blocks=ONE_BLOCK)



def _time_case(norm: str, mode: str, case: StackCase, x, dy, device: str) -> list[dict]:
    model = build(norm, mode, case, device)
    fn = train_step(model, x, dy, case.dtype)
    check_outputs(fn(), case)  # and the warm-up: compiles happen here
    seconds = median_seconds(fn, device, rep_ms=REP_MS)
    return [{"stack": case.name, "batch": case.batch, "dtype": dtype_name(case.dtype), "norm": norm, "mode": mode,
             "norms": sum(isinstance(m, (nn.BatchNorm2d, *_LAYERS.values())) for m in model.modules()),
             "time_ms": seconds * 1e3}]


def measure(cases, names, device: str, log) -> tuple[list[dict], list[str]]:
    """Time one training step of each (norm, mode) in ``names`` on every case, each on a
    fresh stack over the same input; returns the rows and the errors of the cases that
    failed (an out-of-memory among them)."""
    rows, errors = [], []
    for case in cases:
        x, dy = make_inputs(case, device)
        for norm, mode in names:
            where = f"stack {case.name} {dtype_name(case.dtype)} {norm} {mode}"
            rows += guarded(where, errors, log, device, functools.partial(_time_case, norm, mode, case, x, dy, device))
        del x, dy
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, errors


def derive(rows: list[dict]) -> None:
    """Add time / bn-eager time and time / bn-compile time (same stack and dtype) to each row."""
    index = {(r["stack"], r["dtype"], r["norm"], r["mode"]): r for r in rows}
    for r in rows:
        for key, baseline in (("vs_torch", BASELINE), ("vs_compiled", BASELINE_COMPILED)):
            other = index.get((r["stack"], r["dtype"], *baseline))
            r[key] = r["time_ms"] / other["time_ms"] if other else None


def section(rows: list[dict]) -> list[str]:
    """The markdown of the section: what it measures and its table."""
    table = markdown_table(
        ["stack", "dtype", "norm", "mode", "norms", "time / step (ms)", "/ bn eager", "/ bn compile"],
        [[r["stack"], r["dtype"], r["norm"], r["mode"], str(r["norms"]), f"{r['time_ms']:.2f}",
          fmt(r["vs_torch"], ".2f"), fmt(r["vs_compiled"], ".2f")] for r in rows],
    )
    return [
        "## End to end: a training step of a ResNet-50-shaped stack",
        "",
        ("ResNet-50's 16 bottleneck blocks without stem and head, (N, 64, 56, 56) in, (N, 2048, 7, 7) out "
         "(resnet50-1111: one block per stage); a step is the forward and torch.autograd.grad of the output for "
         "every parameter, nothing else. bf16: under torch.autocast, fp32 parameters. norm bn: nn.BatchNorm2d, "
         "out += shortcut, nn.ReLU(inplace=True), as torchvision; l1, linf, topk (k=10): tritonorm's layers with "
         "activation=\"relu\", the shortcut passed as residual= to each block's last norm. mode: eager, or "
         "torch.compile of the whole stack. norms: the norm layers in the stack. / bn eager, / bn compile: time over "
         "the bn stack's, eager and compiled, same stack and dtype, measured in the same run."),
        "",
        table,
    ]


def run_section(cases, names, device: str, log) -> tuple[dict, list[str], list[str]]:
    """Measure, derive and render the section: (record entries, markdown lines, errors)."""
    rows, errors = measure(cases, names, device, log)
    derive(rows)
    return {"stack": rows}, section(rows), errors
