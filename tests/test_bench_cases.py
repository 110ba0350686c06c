"""The cases of the fused-norm and end-to-end benchmarks (``tritonorm.bench.fused_cases``,
``stack_cases``): that each contender computes what it is said to (the fused Triton layer,
its PyTorch path and the unfused layer agree, values and gradients), that the byte counts
are those of the kernels (the traffic counter, both paths), and that the stack is
ResNet-50's, with the norms and the fusion its docstring gives, on both paths.  The same
for the mean-only batch norm's contenders (``lp_cases``) and bounded weight norm's at the
norm orders p = 1 and inf (``bwn_cases``).

Everything at tiny sizes: the Triton cases run in Triton's interpreter on CPU."""

import functools

import pytest
import torch
from torch import nn

from tritonorm.bench import bwn_cases, fused_cases, lp_cases, stack_cases, traffic
from tritonorm.bench.fused_cases import RESIDUAL_RELU, UNFUSED
from tritonorm.bench.lp_cases import EAGER, MEAN_ONLY, NORMS, PLAIN, TRITON, make_inputs
from tritonorm.kernels import channel_reduce, channel_resident

interpreted = pytest.mark.skipif(not channel_reduce.INTERPRETED, reason="counts in Triton's interpreter")
SHAPE = (2, 4, 6, 6)


def run_case(norm: str, impl: str, epilogue: str, device: str):
    torch.manual_seed(0)
    x, dy = make_inputs(SHAPE, torch.float32, device)
    module = fused_cases.build(norm, impl, SHAPE[1], device)
    with torch.no_grad():  # parameters off their initial 1 and 0, so their gradients mean something
        for p in module.parameters():
            p.add_(torch.rand_like(p) - 0.5)
    residual = fused_cases.make_residual(x) if epilogue == RESIDUAL_RELU else None
    return fused_cases.step(module, x, residual, dy, "forward+backward")()


@pytest.mark.parametrize("epilogue", fused_cases.EPILOGUES)
@pytest.mark.parametrize("norm", NORMS)
def test_fused_contenders_agree(norm, epilogue, device):
    reference = run_case(norm, EAGER, epilogue, device)
    assert len(reference) == 4 + (epilogue == RESIDUAL_RELU)  # out, dx, [dr,] dweight, dbias
    assert (reference[0] == 0).any() and (reference[0] > 0).any()  # the ReLU clipped some, not all
    for impl in (TRITON, UNFUSED):
        for got, want in zip(run_case(norm, impl, epilogue, device), reference, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fused_baseline_is_batchnorm_add_relu():
    x, _ = make_inputs(SHAPE, torch.float32, "cpu")
    r = fused_cases.make_residual(x)
    module = fused_cases.build("bn", fused_cases.TORCH_EAGER, SHAPE[1], "cpu")
    want = torch.relu(nn.functional.batch_norm(x, None, None, training=True) + r)
    torch.testing.assert_close(module(x, residual=r), want)
    assert isinstance(fused_cases.build("bn", fused_cases.TORCH_COMPILED, SHAPE[1], "cpu"),
                      torch._dynamo.eval_frame.OptimizedModule)


def test_fused_floor_bytes():
    x = torch.empty(SHAPE, dtype=torch.bfloat16)
    x_bytes = x.numel() * 2
    assert [fused_cases.compulsory_bytes(p, x, False) for p in ("forward", "forward+backward")] == [2 * x_bytes,
                                                                                                   5 * x_bytes]
    assert [fused_cases.compulsory_bytes(p, x, True) for p in ("forward", "forward+backward")] == [3 * x_bytes,
                                                                                                  7 * x_bytes]


def activation_passes(counted: traffic.Traffic, x_bytes: int) -> float:
    """Passes over the activation-sized arguments (x, y, dy, dx, r, dr), the per-channel
    traffic (statistics, partials, selections) left out."""
    return sum(sum(rw) for launch in counted.launches for rw in launch.arguments.values()
               if sum(rw) >= x_bytes / 2) / x_bytes


@interpreted
@pytest.mark.parametrize("path", [channel_resident.PATHS[1], channel_resident.PATHS[2]])  # onchip, split
@pytest.mark.parametrize("norm", NORMS)
def test_fused_algorithm_bytes_are_the_kernels(monkeypatch, norm, path):
    monkeypatch.setenv(channel_resident.PATH_VARIABLE, path)
    x, dy = make_inputs((4, 8, 12, 12), torch.float32, "cpu")
    x_bytes = x.numel() * x.element_size()
    for residual in (None, fused_cases.make_residual(x)):
        layer = fused_cases.build(norm, TRITON, x.shape[1], "cpu")
        inputs = (x, *layer.parameters(), *(() if residual is None else (residual,)))
        step = traffic.count_step(functools.partial(layer, x, residual=residual), inputs, dy)
        forward = fused_cases.algorithm_bytes(norm, "forward", x, residual is not None) / x_bytes
        both = fused_cases.algorithm_bytes(norm, "forward+backward", x, residual is not None) / x_bytes
        assert fused_cases.paths(norm, x) == f"{path}/{path}"
        assert activation_passes(step.forward, x_bytes) == pytest.approx(forward, abs=0.05)
        assert activation_passes(step.backward, x_bytes) == pytest.approx(both - forward, abs=0.05)


# ----------------------------------------------------------------------------- mean-only batch norm, bwn orders


def test_mean_only_contenders_agree(device):
    """The Triton layer, the plain autograd contender and the compiled reference against the
    reference eager: y, dx, dbias and the running mean; the baseline beside them."""
    x, dy = make_inputs(SHAPE, torch.float32, device)
    results = {}
    for impl in (EAGER, TRITON, PLAIN, lp_cases.COMPILED):
        layer = lp_cases.build_layer(MEAN_ONLY, impl, SHAPE[1], device)
        outputs = lp_cases.step(layer, x, dy, "forward+backward")()
        lp_cases.check_outputs(outputs, x)
        results[impl] = (*outputs, layer.running_mean)
    for impl, got in results.items():
        for a, b in zip(got, results[EAGER], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=impl)
    assert (MEAN_ONLY, EAGER) in lp_cases.variants() and lp_cases.variants()[-1] == lp_cases.BASELINE


@interpreted
def test_mean_only_algorithm_bytes_are_the_kernels():
    x, dy = make_inputs((4, 8, 12, 12), torch.float32, "cpu")
    x_bytes = x.numel() * x.element_size()
    layer = lp_cases.build_layer(MEAN_ONLY, TRITON, x.shape[1], "cpu")
    step = traffic.count_step(functools.partial(layer, x), (x, *layer.parameters()), dy)
    forward = lp_cases.algorithm_bytes(MEAN_ONLY, "forward", x) / x_bytes
    both = lp_cases.algorithm_bytes(MEAN_ONLY, "forward+backward", x) / x_bytes
    assert (forward, both) == (3, 6)
    assert activation_passes(step.forward, x_bytes) == pytest.approx(forward, abs=0.05)
    assert activation_passes(step.backward, x_bytes) == pytest.approx(both - forward, abs=0.05)


@pytest.mark.parametrize("suffix", list(bwn_cases.ORDERS))
def test_bwn_order_contenders_agree(suffix, device):
    """At p = 1 and inf, the Triton parametrization and the plain formula against the
    reference eager: w and dL/dv, on a small conv and linear weight."""
    names = [name for name in bwn_cases.ORDER_CONTENDERS if name.endswith(suffix)]
    assert {bwn_cases.split_order(name) for name in names} == {
        (base, bwn_cases.ORDERS[suffix]) for base in (bwn_cases.TRITON_FIXED, bwn_cases.TORCH_EAGER,
                                                     bwn_cases.FORMULA_EAGER)}
    for case in bwn_cases.SMALL_WEIGHTS:
        grad = bwn_cases.make_grad(case, torch.float32, device)
        results = {}
        for name in names:
            outputs = bwn_cases.step(bwn_cases.build(name, case, torch.float32, device), grad, "forward+backward")()
            bwn_cases.check_outputs(outputs, case)
            results[name] = outputs
        reference = results[bwn_cases.with_order(bwn_cases.TORCH_EAGER, bwn_cases.ORDERS[suffix])]
        for name, got in results.items():
            for a, b in zip(got, reference, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- the stack

TINY = stack_cases.StackCase(3, channel_scale=16, resolution=15, blocks=(1, 2, 1, 1))


def test_stack_is_resnet50_shaped():
    full = stack_cases.build_stack("bn", device="meta")
    convs = [m for m in full.modules() if isinstance(m, nn.Conv2d)]
    assert len(full) == 16 and len(convs) == 16 * 3 + 4
    assert sum(p.numel() for p in full.parameters()) == 23_498_496  # torchvision resnet50's, less stem and fc
    assert [b.conv3.out_channels for b in full] == [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
    assert [b.conv2.stride[0] for b in full] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    assert stack_cases.StackCase(256).output_shape() == (256, 2048, 7, 7)


@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_stack_norms_fuse_relu_and_the_residual(norm):
    model = stack_cases.build_stack(norm, channel_scale=16, blocks=stack_cases.ONE_BLOCK)
    for block in model:
        assert [block.norm1.activation, block.norm2.activation, block.norm3.activation] == ["relu"] * 3
        assert block.downsample[1].activation is None
        assert type(block.norm1).__name__ == {"l1": "L1BatchNorm2d", "linf": "LinfBatchNorm2d",
                                              "topk": "TopkBatchNorm2d"}[norm]
    calls = []
    model[0].norm3.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    x, _ = stack_cases.make_inputs(stack_cases.StackCase(3, channel_scale=16, resolution=16,
                                                          blocks=stack_cases.ONE_BLOCK), "cpu")
    model(x)
    assert calls and calls[0]["residual"] is not None


@pytest.mark.parametrize("norm", stack_cases.NORMS)
def test_stack_step_on_the_torch_path(norm):
    x, dy = stack_cases.make_inputs(TINY, "cpu")
    model = stack_cases.build(norm, stack_cases.EAGER, TINY, "cpu")
    outputs = stack_cases.train_step(model, x, dy, TINY.dtype)()
    stack_cases.check_outputs(outputs, TINY)
    assert len(outputs) == 1 + len(list(model.parameters()))
    assert all(g.abs().sum() > 0 for g in outputs[1:])  # every parameter gets a gradient
    assert (outputs[0] == 0).any()  # ReLU at the end


def test_stack_step_triton_matches_torch(device):
    case = stack_cases.StackCase(2, channel_scale=32, resolution=8, blocks=stack_cases.ONE_BLOCK)
    x, dy = stack_cases.make_inputs(case, device)
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = stack_cases.build_stack("linf", channel_scale=32, blocks=stack_cases.ONE_BLOCK, backend=backend,
                                        device=device)
        results.append(stack_cases.train_step(model, x, dy, torch.float32)())
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_stack_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of bn, l1, linf, topk"):
        stack_cases.build_stack("ln")
    with pytest.raises(ValueError, match="blocks must be 4 positive ints"):
        stack_cases.build_stack("bn", blocks=(3, 4, 6))


def test_stack_bf16_step_runs_under_autocast():
    case = stack_cases.StackCase(3, torch.bfloat16, channel_scale=16, resolution=16, blocks=stack_cases.ONE_BLOCK)
    x, dy = stack_cases.make_inputs(case, "cpu")
    model = stack_cases.build("l1", stack_cases.EAGER, case, "cpu")
    outputs = stack_cases.train_step(model, x, dy, case.dtype)()
    stack_cases.check_outputs(outputs, case)
    assert outputs[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in outputs[1:])  # fp32 parameters
