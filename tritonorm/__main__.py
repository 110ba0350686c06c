"""``python -m tritonorm``: train a tiny CNN with each normalization and report.

The data are synthetic (no download): 8x8 single-channel images of one of four oriented
bars plus noise.  Each model is the same two-conv network with a different normalization
layer after each convolution: nn.BatchNorm2d and tritonorm's L1, L-inf and Top-k batch
norms; for EquiNorm, each convolution and its norm replaced by EquiNormConv2d (the weight
is normalized instead of the output); for bounded weight norm, the convolutions parametrized
and no norm layer; for ENorm, no norm layer and an ENorm cycle after every SGD step.  It
prints, per model, the final training loss, the test accuracy, the time per step and the
backend that ran the layers.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import tritonorm
from tritonorm._dispatch import describe, resolve_backend

NORMS = {
    "BatchNorm2d": lambda c, backend: nn.BatchNorm2d(c),
    "L1BatchNorm2d": lambda c, backend: tritonorm.L1BatchNorm2d(c, backend=backend),
    "LinfBatchNorm2d": lambda c, backend: tritonorm.LinfBatchNorm2d(c, backend=backend),
    "TopkBatchNorm2d": lambda c, backend: tritonorm.TopkBatchNorm2d(c, k=10, backend=backend),
}
EQUINORM = "EquiNormConv2d"
BOUNDED_WN = "bounded_weight_norm"
ENORM = "ENorm"


def bars(n: int, generator: torch.Generator):
    """n noisy 8x8 images of a bar in one of 4 orientations, and their labels."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.zeros(n, 1, 8, 8)
    pos = torch.randint(1, 7, (n,), generator=generator)
    idx = torch.arange(n)
    for i in range(8):
        images[idx[labels == 0], 0, pos[labels == 0], i] = 1.0  # horizontal
        images[idx[labels == 1], 0, i, pos[labels == 1]] = 1.0  # vertical
        images[labels == 2, 0, i, i] = 1.0  # diagonal
        images[labels == 3, 0, i, 7 - i] = 1.0  # anti-diagonal
    return images + 0.5 * torch.randn(images.shape, generator=generator), labels


def model(norm, backend: str) -> nn.Module:
    if norm == EQUINORM:
        features = [
            tritonorm.EquiNormConv2d(1, 16, 3, padding=1, backend=backend), nn.ReLU(),
            tritonorm.EquiNormConv2d(16, 32, 3, padding=1, stride=2, backend=backend), nn.ReLU(),
        ]
    elif norm in (BOUNDED_WN, ENORM):
        features = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU()]
    else:
        features = [
            nn.Conv2d(1, 16, 3, padding=1), NORMS[norm](16, backend), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), NORMS[norm](32, backend), nn.ReLU(),
        ]
    net = nn.Sequential(*features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    if norm == BOUNDED_WN:
        for layer in (net[0], net[2]):
            tritonorm.bounded_weight_norm(layer, backend=backend)
    return net


def train(norm: str, args, data) -> dict:
    (x, y), (x_test, y_test) = data
    torch.manual_seed(args.seed)
    net = model(norm, args.backend).to(args.device)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    enorm = tritonorm.ENorm.from_model(net, opt, backend=args.backend) if norm == ENORM else None
    start = time.perf_counter()
    for step in range(args.steps):
        i = torch.randint(0, len(x), (args.batch,))
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if enorm is not None:
            enorm.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / args.steps
    net.eval()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    return {"norm": norm, "loss": loss.item(), "accuracy": accuracy, "ms_per_step": 1e3 * per_step}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tritonorm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="SGD steps per model (default 150)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"))
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    data = [tuple(t.to(args.device) for t in bars(n, g)) for n in (2048, 512)]
    used = resolve_backend(args.backend, data[0][0])
    print(f"tritonorm {tritonorm.__version__}, torch {torch.__version__}, device {args.device}")
    print(f"backend {args.backend!r} runs the tritonorm layers on {used} ({describe()})")
    print(f"task: 4-way classification of noisy 8x8 bars, {args.steps} SGD steps of batch {args.batch}\n")
    print(f"{'normalization':<21}{'train loss':>11}{'test acc':>10}{'ms/step':>9}")
    for norm in [*NORMS, EQUINORM, BOUNDED_WN, ENORM]:
        r = train(norm, args, data)
        print(f"{r['norm']:<21}{r['loss']:>11.4f}{r['accuracy']:>10.3f}{r['ms_per_step']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
