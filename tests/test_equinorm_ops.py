"""EquiNorm under torch.compile(fullgraph=True), torch.library.opcheck of its custom ops,
and gradcheck in float64 of both paths."""

import pytest
import torch
from equinorm_utils import positive_input, random_weight
from torch import nn
from training import assert_compiled_matches_eager

import tritonorm
from tritonorm import functional as F
from tritonorm.ops import equinorm as equi_ops
from tritonorm.ops import running_stats as running_ops


def small_cnn(backend):
    torch.manual_seed(0)
    return nn.Sequential(
        tritonorm.EquiNormConv2d(3, 8, 3, padding=1, backend=backend), nn.ReLU(),
        tritonorm.EquiNormConv2d(8, 8, 3, stride=2, padding=1, padding_mode="circular", groups=2,
                                 single_pass=False, stats_fraction=0.5, backend=backend), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), tritonorm.EquiNormLinear(8, 4, momentum=None, backend=backend),
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, compiler, device):
    if compiler == "inductor" and backend == "torch" and device == "cpu":
        pytest.skip("one inductor run on CPU is enough (compile time on 2 cores)")
    x = positive_input((4, 3, 8, 8), device=device)
    assert_compiled_matches_eager(lambda: small_cnn(backend).to(device), x, compiler)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows"])
def test_opcheck_input_sums(layout, device):
    shape = (37, 6) if layout == "rows" else (3, 4, 5, 6)
    x = positive_input(shape, device=device, channels_last=layout == "channels_last").requires_grad_()
    torch.library.opcheck(equi_ops.input_sums, (x,))


def _weight_args(device, gain, groups=1, single_pass=True, dtype=torch.float32):
    w = random_weight((6, 4 // groups, 3, 3), dtype, device).requires_grad_()
    mass = (torch.rand(4, device=device) + 0.5).requires_grad_()
    g = (torch.rand(6, device=device, dtype=dtype) + 0.5).requires_grad_() if gain else None
    return (w, mass, g, groups, single_pass)


@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("single_pass", [True, False])
def test_opcheck_equinorm_weight(gain, groups, single_pass, device):
    torch.library.opcheck(equi_ops.equinorm_weight, _weight_args(device, gain, groups, single_pass))


def test_opcheck_equinorm_weight_bf16(device):
    torch.library.opcheck(equi_ops.equinorm_weight, _weight_args(device, True, dtype=torch.bfloat16))


@pytest.mark.parametrize("gain", [True, False])
def test_opcheck_equinorm_weight_backward(gain, device):
    w, mass, g, groups, single_pass = _weight_args(device, gain)
    out, s, b = equi_ops.equinorm_weight(w, mass, g, groups, single_pass)
    gain = None if g is None else g.detach()
    args = (torch.randn_like(out), w.detach(), mass.detach(), gain, s, b, groups, single_pass)
    torch.library.opcheck(equi_ops.equinorm_weight_backward, args)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", [False, True], ids=["", "count"])
def test_opcheck_update_running_mean(momentum, count, device):
    args = (torch.rand(5, device=device), torch.rand(5, device=device), torch.tensor(4, device=device), momentum, count)
    torch.library.opcheck(running_ops.update_running_mean, args)


def _layer_function(backend, training, single_pass, **conv):
    rm = torch.rand(2, dtype=torch.float64) + 0.5

    def f(x, w, gain, bias):
        return F.equinorm_conv2d(x, w, gain, bias, None if training else rm, training, single_pass=single_pass,
                                 backend=backend, **conv)

    return f


def _layer_inputs(device):
    x = positive_input((3, 2, 3, 4), torch.float64, device).requires_grad_()
    w = random_weight((3, 2, 2, 2), torch.float64, device).requires_grad_()
    gain = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, device=device).requires_grad_()
    return x, w, gain, bias


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("single_pass", [True, False])
def test_gradcheck_reference_float64(training, single_pass):
    """The reference is correctly differentiable, through v to x included (first and
    second order)."""
    f = _layer_function("torch", training, single_pass, padding=1, stats_fraction=0.7)
    inputs = _layer_inputs("cpu")
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("single_pass", [True, False])
def test_gradcheck_triton_float64(single_pass, device):
    """The Triton backward is the derivative of the Triton forward (float64 kernels), for
    the layer (x through the input sums) and for the weight op alone with groups.  Fast
    mode (random projections of the Jacobian): the interpreter runs each call on the host."""
    f = _layer_function("triton", True, single_pass, padding=1, stride=2, padding_mode="circular")
    assert torch.autograd.gradcheck(f, _layer_inputs(device), fast_mode=True)
    w = random_weight((4, 2, 2, 2), torch.float64, device).requires_grad_()
    mass = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    gain = (torch.rand(4, dtype=torch.float64, device=device) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda w, m, g: F.equinorm_weight(w, m, g, groups=2, single_pass=single_pass, backend="triton"),
        (w, mass, gain), fast_mode=True
    )


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_dynamic_shapes(backend, device):
    """One graph for several batch sizes and resolutions: the output size and the mass
    ratio are symbolic."""
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        return nn.Sequential(
            tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend), nn.ReLU(),
            tritonorm.EquiNormConv2d(4, 4, 3, stride=2, stats_fraction=0.5, backend=backend),
        ).to(device)

    eager, compiled_model = make(), make()
    compiled = torch.compile(compiled_model, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 3, 8, 8), (3, 3, 10, 9), (4, 3, 7, 12)]:
        x = positive_input(shape, device=device, seed=shape[0])
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_model[0].running_mean, eager[0].running_mean)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_export_eval(backend, device):
    """torch.export sees the weight transform as one custom op (Triton path)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend), nn.ReLU(), nn.Flatten(),
        tritonorm.EquiNormLinear(4 * 36, 2, backend=backend),
    ).to(device).eval()
    x = positive_input((2, 3, 6, 6), device=device)
    program = torch.export.export(model, (x,))
    ops = [n.target for n in program.graph.nodes if "tritonorm" in str(n.target)]
    assert len(ops) == (2 if backend == "triton" else 0)
    torch.testing.assert_close(program.module()(x), model(x))
