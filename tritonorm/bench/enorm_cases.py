"""What the ENorm benchmarks run, shared by ``bench_enorm.py`` (pytest-benchmark) and
``roofline.py`` (GPU table).

A case is one of the study's nets (``Net``) in fp32, trained for one step with
SGD(momentum=0.9, foreach=True), so that its gradients and momentum buffers are populated
(``build``).  What is compared, each a zero-argument callable over a fresh copy of the net
(``contender``):

* one ENorm cycle (c = ``C``, p = 2, no bias, the last pair left alone, momentum buffers
  rescaled): Triton parallel (2 launches), Triton sequential (one launch per pair, and one
  more), and the PyTorch path (backend="torch", parallel);
* the same cycle as the authors' per-layer Python loop (``per_layer_cycle``);
* one ``optimizer.step()`` of the SGD the cycle accompanies, the yardstick of its cost.

The bandwidth floor of one parallel cycle (``cycle_bytes``): every weight the cycle touches
read once for the norms and read and written once by the rescale, and its momentum buffer
read and written once, i.e. the sum over the touched layers of 3 x weight bytes + 2 x
buffer bytes (the coefficients are left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Callable, NamedTuple

import torch
from torch import nn

from tritonorm import ENorm

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


def per_layer_cycle(weights: list[torch.Tensor], buffers: list[torch.Tensor] | None, c: float) -> None:
    """The published ENorm step (facebookresearch/enorm, ``_step_conv``), restated: a Python
    loop over the pairs of (O, I, K) weights, every coefficient from the norms at the start
    of the cycle, the last pair left alone, no biases, p = 2, momentum buffers rescaled
    rows by 1/d and columns by d.  The per-layer baseline of the benchmarks and the tests'
    oracle of the parallel mode (``tests/enorm_utils`` re-exports it)."""
    left = weights[0].flatten(1).norm(dim=1)
    right = weights[1].transpose(0, 1).flatten(1).norm(dim=1)
    for i in range(1, len(weights) - 1):
        balancer = (right / (left * c)).pow(0.5)
        left = weights[i].flatten(1).norm(dim=1)
        right = weights[i + 1].transpose(0, 1).flatten(1).norm(dim=1)
        weights[i - 1].mul_(balancer[:, None, None])
        weights[i].mul_(1 / balancer[None, :, None])
        if buffers is not None:
            buffers[i - 1].mul_(1 / balancer[:, None, None])
            buffers[i].mul_(balancer[None, :, None])


def _mlp(widths) -> nn.Sequential:
    """Bias-free Linear-ReLU chain over ``widths`` (the study's nets: 3072, 500 x depth, 10)."""
    layers = []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(n_in, n_out, bias=False), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _cnn(channels) -> nn.Sequential:
    """3x3 convolutions (padding 1) with a max-pool after the third and the sixth, the last
    two 1x1, ReLU between, a global average pool over the last one's class maps."""
    layers = []
    last = len(channels) - 2
    for k, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
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
