"""What the ENorm benchmarks run, shared by ``bench_enorm.py`` (pytest-benchmark) and
``roofline.py`` (GPU table).

A case is one of the study's nets (``Net``) in fp32, trained for one step with
SGD(momentum=0.9, foreach=True), so that its gradients and momentum buffers are populated
(``build``).  What is compared, each a zero-argument callable over a fresh copy of the net
(``contender``):

* one ENorm cycle (c = ``C``, p = 2, no bias, the last pair left alone, momentum buffers
  rescaled): Triton parallel (2 launches), Triton sequential (one launch per pair, and one
  more), and the PyTorch path (backend="torch", parallel);
* the same cycle as the authors' per-layer Python loop (``reference.enorm.per_layer_cycle``);
* one ``optimizer.step()`` of the SGD the cycle accompanies, the yardstick of its cost.

The bandwidth floor of one parallel cycle (``cycle_bytes``) is docs/benchmarks.md's ("ENorm").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from typing import NamedTuple

import torch
from torch import nn

from tritonorm import ENorm
from tritonorm.reference.enorm import per_layer_cycle

from .equinorm_cases import check_finite
from .timing import fmt, guarded, markdown_table, median_seconds, ratio

TRITON_PARALLEL, TRITON_SEQUENTIAL = "enorm-triton-parallel", "enorm-triton-sequential"
TORCH_PARALLEL, PER_LAYER, SGD_STEP = "enorm-torch-parallel", "per-layer-loop", "sgd-step"
CONTENDERS = (TRITON_PARALLEL, TRITON_SEQUENTIAL, TORCH_PARALLEL, PER_LAYER, SGD_STEP)
TRITON_CONTENDERS = (TRITON_PARALLEL, TRITON_SEQUENTIAL)
# (backend, mode) of the ENorm contenders.
_ENORM = {TRITON_PARALLEL: ("triton", "parallel"), TRITON_SEQUENTIAL: ("triton", "sequential"),
          TORCH_PARALLEL: ("torch", "parallel")}
C = 1.2  # the study's depth penalty
LR = 1e-3


@dataclass(frozen=True)
class Net:
    """A bias-free chain: "mlp", Linear-ReLU over ``widths``; "cnn", the authors' fully
    convolutional CIFAR net over channels ``widths`` (``_cnn``) on in_size x in_size images."""

    kind: str
    widths: tuple[int, ...]
    batch: int = 8
    in_size: int = 32

    @property
    def name(self) -> str:
        """e.g. "mlp 3072-500x20-10": the widths, repeats counted."""
        runs = [(w, len(list(same))) for w, same in groupby(self.widths)]
        return f"{self.kind} " + "-".join(f"{w}x{n}" if n > 1 else str(w) for w, n in runs)

    @property
    def input_shape(self) -> tuple[int, ...]:
        spatial = (self.in_size, self.in_size) if self.kind == "cnn" else ()
        return (self.batch, self.widths[0], *spatial)


# The study's nets: the 3072-500x20-10 MLP (21 weights) and the 9-conv CIFAR net; and small
# ones of the same structure, for the CPU.
STUDY_NETS = (Net("mlp", (3072, *[500] * 20, 10)), Net("cnn", (3, 128, 128, 128, 256, 256, 256, 320, 320, 10)))
SMALL_NETS = (Net("mlp", (48, *[16] * 6, 10)), Net("cnn", (3, 8, 8, 8, 16, 16, 16, 24, 24, 10), in_size=8))


def _mlp(widths) -> nn.Sequential:
    """Bias-free Linear-ReLU chain over ``widths`` (the study's nets: 3072, 500 x depth, 10)."""
    layers = []
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(n_in, n_out, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _cnn(channels) -> nn.Sequential:
    """3x3 convolutions (padding 1) with a max-pool after the third and the sixth, the last
    two 1x1, ReLU between, a global average pool over the last one's class maps."""
    layers = []
    last = len(channels) - 2
    for k, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
        kernel = 1 if k >= last - 1 else 3
        layers.append(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False))
        layers += [nn.ReLU()] if k < last else []
        layers += [nn.MaxPool2d(2)] if k in (2, 5) else []
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Chain(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.SGD
    layers: list[nn.Module]  # the weight layers, input to output


def build(net: Net, device, seed: int = 0) -> Chain:
    """The net on ``device`` after one backward and one step of SGD(momentum=0.9,
    foreach=True): gradients and momentum buffers populated."""
    torch.manual_seed(seed)
    model = (_mlp(net.widths) if net.kind == "mlp" else _cnn(net.widths)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, foreach=True)
    x = torch.randn(net.input_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    model(x).square().mean().backward()
    optimizer.step()
    return Chain(model, optimizer, [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])


def _buffer(chain: Chain, weight: torch.Tensor) -> torch.Tensor:
    return chain.optimizer.state[weight]["momentum_buffer"]


def _oik(t: torch.Tensor) -> torch.Tensor:
    """The (O, I, K) view per_layer_cycle takes, without autograd history."""
    return t.detach().view(t.shape[0], t.shape[1], -1)


def contender(name: str, chain: Chain) -> Callable[[], None]:
    """One call of contender ``name`` on ``chain``, in place."""
    if name == SGD_STEP:
        return chain.optimizer.step
    if name == PER_LAYER:
        weights = [_oik(layer.weight) for layer in chain.layers]
        buffers = [_oik(_buffer(chain, layer.weight)) for layer in chain.layers]
        return lambda: per_layer_cycle(weights, buffers, C)
    backend, mode = _ENORM[name]
    return ENorm(chain.layers, chain.optimizer, c=C, mode=mode, backend=backend).step


def cycle_bytes(chain: Chain) -> int:
    """The floor of one parallel cycle: 3 x weight bytes + 2 x buffer bytes over the layers
    it touches (all but the last)."""
    weights = [layer.weight for layer in chain.layers[:-1]]
    return sum(3 * w.nbytes + 2 * _buffer(chain, w).nbytes for w in weights)


def state(chain: Chain) -> tuple[torch.Tensor, ...]:
    """The weights and momentum buffers, for ``equinorm_cases.check_finite``."""
    return tuple(t for layer in chain.layers for t in (layer.weight, _buffer(chain, layer.weight)))


# ----------------------------------------------------------------------------- the roofline section

# The targets, per net: Triton parallel cycle / SGD step at most SGD_TARGET, per-layer loop /
# Triton parallel cycle at least LOOP_TARGET.
SGD_TARGET, LOOP_TARGET = 1.0, 20.0


def _time_case(net: Net, name: str, device: str) -> list[dict]:
    chain = build(net, device)
    fn = contender(name, chain)
    fn()  # the warm-up: Triton compiles, ENorm's views and tables
    time_us = median_seconds(fn, device) * 1e6
    check_finite(state(chain))
    return [{"net": net.name, "contender": name, "time_us": time_us,
             "bytes": None if name == SGD_STEP else cycle_bytes(chain)}]


def measure(nets, names, device: str, log) -> tuple[list[dict], list[str]]:
    """Time one call of each contender in ``names`` on each net, each on a fresh copy;
    returns the rows and the errors of the cases that failed."""
    rows, errors = [], []
    for net in nets:
        for name in names:
            rows += guarded(f"ENorm {net.name} {name}", errors, log, device, partial(_time_case, net, name, device))
    return rows, errors


def derive(rows: list[dict], peak_gbps: float) -> list[dict]:
    """Add time / Triton parallel time, time / SGD step time and, for the cycles, GB/s over
    the floor and its fraction of peak to each row; return, per net with the rows they need,
    the target ratios Triton parallel / SGD step and per-layer loop / Triton parallel, and
    whether both are met."""
    index = {(r["net"], r["contender"]): r for r in rows}
    for r in rows:
        r["vs_parallel"] = ratio(r, index.get((r["net"], TRITON_PARALLEL)))
        r["vs_sgd"] = ratio(r, index.get((r["net"], SGD_STEP)))
        r["gbps"] = None if r["bytes"] is None else r["bytes"] / (r["time_us"] * 1e-6) / 1e9
        r["peak_fraction"] = None if r["gbps"] is None else r["gbps"] / peak_gbps
    targets = []
    for (net, name), parallel in index.items():
        sgd, loop = index.get((net, SGD_STEP)), index.get((net, PER_LAYER))
        if name == TRITON_PARALLEL and sgd and loop:
            vs_sgd, loop_ratio = ratio(parallel, sgd), ratio(loop, parallel)
            targets.append({"net": net, "parallel_vs_sgd": vs_sgd, "loop_vs_parallel": loop_ratio,
                            "met": vs_sgd <= SGD_TARGET and loop_ratio >= LOOP_TARGET})
    return targets


def section(rows: list[dict], targets: list[dict]) -> list[str]:
    """The markdown of the section: what it measures, the targets and the table."""
    table = markdown_table(
        ["net", "contender", "time (us)", "/ Triton parallel", "floor MB", "GB/s", "/ peak"],
        [[r["net"], r["contender"], f"{r['time_us']:.1f}", fmt(r["vs_parallel"], ".2f"),
          fmt(None if r["bytes"] is None else r["bytes"] / 1e6, ".2f"), fmt(r["gbps"], ".0f"),
          fmt(r["peak_fraction"], ".1%")] for r in rows],
    )
    target_table = markdown_table(
        ["net", f"Triton parallel / SGD step (<= {SGD_TARGET:g})",
         f"per-layer loop / Triton parallel (>= {LOOP_TARGET:g})", "met"],
        [[t["net"], f"{t['parallel_vs_sgd']:.2f}", f"{t['loop_vs_parallel']:.1f}", "yes" if t["met"] else "NO"]
         for t in targets],
    ) if targets else "Targets: no Triton parallel rows measured."
    return [
        "## ENorm: one cycle against the per-layer loop and an SGD step",
        "",
        f"One ENorm cycle (c = {C}, p = 2, the last pair left alone, momentum buffers rescaled) on fp32 nets "
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


def run_section(nets, names, device: str, peak: float, log) -> tuple[dict, list[str], list[str]]:
    """Measure, derive and render the section: (record entries, markdown lines, errors)."""
    rows, errors = measure(nets, names, device, log)
    targets = derive(rows, peak)
    return {"enorm": rows, "enorm_targets": targets}, section(rows, targets), errors
