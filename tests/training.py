"""A few training steps of a model, shared by the compile tests."""

import torch


def train_steps(model, x, steps=2):
    """``steps`` SGD steps on mean(out^2); returns the outputs, final parameters and buffers."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = []
    for _ in range(steps):
        out = model(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs, [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]
