"""pytest-benchmark suite of inference before and after ``tritonorm.fold``: the eval-mode
forward of the ResNet-50-shaped stack (``tritonorm.bench.stack_cases``) side by side:

* ``bn``: the stack with nn.BatchNorm2d + ReLU, eager (torch's own inference);
* ``l1``: the stack with fused L1BatchNorm2d layers, eager (the eval normalize kernel on
  CUDA, the PyTorch path elsewhere; in eval every Lp norm computes the same affine map,
  so one norm stands for the three);
* ``l1-folded``: ``tritonorm.fold`` of that stack: every norm absorbed into the
  convolution before it, the adds and ReLUs left, nothing of tritonorm;
* ``l1-folded-compiled``: the folded stack under ``torch.compile`` (CUDA only).

On CUDA one block per stage at N=32, fp32; on CPU channels / 8 at 16x16, N=4, a quick smoke
test.  Each case checks that its output equals the unfolded stack's.

    pytest benchmarks/bench_fold.py --benchmark-enable
"""

from __future__ import annotations

import pytest
import torch

import tritonorm
from tritonorm.bench import stack_cases
from tritonorm.bench.lp_cases import dtype_name, run_benchmark

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
STACK = (stack_cases.StackCase(32, blocks=stack_cases.ONE_BLOCK) if ON_CUDA else
         stack_cases.StackCase(4, channel_scale=8, resolution=16, blocks=stack_cases.ONE_BLOCK))
IMPLS = ("bn", "l1", "l1-folded", pytest.param("l1-folded-compiled", marks=[
    pytest.mark.slow, pytest.mark.skipif(not ON_CUDA, reason="an inductor compile: timed on CUDA only")]))


def _trained_stack(norm: str) -> torch.nn.Module:
    """The stack after two training steps (running statistics away from their start), in eval."""
    model = stack_cases.build_stack(norm, channel_scale=STACK.channel_scale, blocks=STACK.blocks, device=DEVICE)
    with torch.no_grad():
        for seed in (1, 2):
            model(stack_cases.make_inputs(STACK, DEVICE, seed)[0])
    return model.eval()


@pytest.mark.parametrize("impl", IMPLS)
def test_inference(benchmark, impl):
    x, _ = stack_cases.make_inputs(STACK, DEVICE)
    model = _trained_stack(impl.split("-")[0])
    if impl.startswith("l1-folded"):
        reference = model
        model = tritonorm.fold(model)
        assert not [m for m in model.modules() if type(m).__module__.startswith("tritonorm")]
        if impl.endswith("compiled"):
            torch._dynamo.reset()
            model = torch.compile(model)

    @torch.no_grad()
    def infer():
        return model(x)

    out = run_benchmark(benchmark, infer, DEVICE, f"inference {STACK.name} {dtype_name(STACK.dtype)} {DEVICE}")

    assert out.shape == STACK.output_shape() and torch.isfinite(out).all()
    if impl.startswith("l1-folded"):
        with torch.no_grad():
            torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
