"""Training steps and the compiled-vs-eager check shared by the compile tests."""

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


def assert_compiled_matches_eager(make_model, x, compiler):
    """torch.compile(fullgraph=True) of a fresh ``make_model()`` trains and evaluates like
    another fresh one run eagerly: outputs, parameters and buffers."""
    torch._dynamo.reset()
    eager = make_model()
    compiled = torch.compile(make_model(), fullgraph=True, backend=compiler)
    eager_outs, eager_state = train_steps(eager, x)
    comp_outs, comp_state = train_steps(compiled, x)
    for a, b in zip(comp_outs + comp_state, eager_outs + eager_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    compiled.eval()
    torch.testing.assert_close(compiled(x), eager.eval()(x), atol=1e-4, rtol=1e-4)
