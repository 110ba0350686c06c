"""Mean-only batch norm: the Triton path against the float64 reference (values, gradients,
running mean; both layouts, training and eval, momentum=None), the reference against its
definition, the modules, recalibrate, opcheck, compile and the errors (``convert(...,
mean_only=True)``: tests/test_convert.py)."""

import pytest
import torch
from lp_utils import random_input
from tolerances import assert_close
from torch import nn
from training import assert_compiled_matches_eager

import tritonorm
from tritonorm import functional as F
from tritonorm.ops import mean_only_batchnorm as mo_ops
from tritonorm.reference.mean_only_batchnorm import mean_only_batch_norm as reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(4, 5, 3, 3), (6, 3), (2, 4, 7), (2, 3, 2, 3, 2)]
# both layouts where there are two (channels_last is 4-d / 5-d)
LAYOUTS = [(shape, last) for shape in SHAPES for last in (False, True) if not last or len(shape) in (4, 5)]


def _run(x, bias, running_mean, training, momentum, count, backend):
    """Output, input and bias gradients and the updated buffers of one call."""
    x = x.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    running_mean = running_mean.clone()
    count = count.clone()
    y = F.mean_only_batch_norm(x, running_mean, bias, training=training, momentum=momentum,
                               num_batches_tracked=count, backend=backend)
    return y, x, bias, running_mean, count


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, channels_last", LAYOUTS,
                         ids=["x".join(map(str, s)) + ("-last" if last else "") for s, last in LAYOUTS])
@pytest.mark.parametrize("training, momentum", [(True, 0.1), (True, None), (False, 0.1)],
                         ids=["train", "train-cumulative", "eval"])
def test_triton_matches_float64_reference(dtype, shape, channels_last, training, momentum, device):
    c = shape[1]
    x = random_input(shape, dtype, device, channels_last)
    bias = torch.randn(c, device=device).to(dtype)
    buffer_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # as a module's .to(dtype) keeps
    running_mean = torch.randn(c, device=device, dtype=buffer_dtype)
    count = torch.tensor(3, device=device)
    y, xt, bt, rm, nbt = _run(x, bias, running_mean, training, momentum, count, "triton")
    dy = torch.randn(shape, device=device).to(dtype)
    y.backward(dy)
    yr, xr, br, rmr, nbtr = _run(x.double(), bias.double(), running_mean.double(), training, momentum, count,
                                 "torch")
    yr.backward(dy.double())
    n = x.numel() // c
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, yr, dtype, "y", scale=x.abs().max())  # y = x - mu + beta: x's size
    assert_close(xt.grad, xr.grad, dtype, "dx", scale=dy.abs().max())
    assert_close(bt.grad, br.grad, dtype, "dbias", scale=n**0.5)
    # the float32 rule for every dtype, as lp_utils.compare: the update's momentum is a float32 kernel argument
    assert_close(rm, rmr, torch.float32, "running_mean")
    assert int(nbt) == int(nbtr) == 3  # the functional form does not count (the layers do)


@pytest.mark.parametrize("training", [True, False])
def test_reference_is_its_definition(training):
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm = torch.randn(4, dtype=torch.float64)
    expected_mean = x.detach().mean((0, 2, 3)) if training else rm.clone()
    expected_rm = 0.9 * rm + 0.1 * expected_mean if training else rm.clone()
    y = reference(x, bias=bias, running_mean=rm, batch_stats=training, momentum=0.1)
    torch.testing.assert_close(y, x - expected_mean.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1))
    torch.testing.assert_close(rm, expected_rm)
    dy = torch.randn_like(x)
    y.backward(dy)
    expected_dx = dy - dy.mean((0, 2, 3), keepdim=True) if training else dy
    torch.testing.assert_close(x.grad, expected_dx)
    torch.testing.assert_close(bias.grad, dy.sum((0, 2, 3)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_constant_channel_gives_beta_exactly(backend, device):
    x = torch.full((4, 2, 3, 3), 1000.1, device=device)
    bias = torch.tensor([0.5, -2.0], device=device)
    y = F.mean_only_batch_norm(x, bias=bias, training=True, backend=backend)
    assert torch.equal(y, bias.view(1, -1, 1, 1).expand_as(y))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_module_follows_batchnorm_modes(backend, device):
    """Running mean as nn.BatchNorm2d's (momentum and cumulative), eval uses it, and
    track_running_stats=False always uses the batch."""
    x = random_input((4, 3, 4, 4), torch.float32, device)
    for momentum in (0.1, None):
        layer = tritonorm.MeanOnlyBatchNorm2d(3, momentum=momentum, backend=backend).to(device)
        bn = nn.BatchNorm2d(3, momentum=momentum).to(device)
        for scale in (1.0, 2.0, -1.0):
            layer(x * scale), bn(x * scale)
        torch.testing.assert_close(layer.running_mean, bn.running_mean)
        assert int(layer.num_batches_tracked) == 3
        layer.eval()
        torch.testing.assert_close(layer(x), x - layer.running_mean.view(1, -1, 1, 1))
    free = tritonorm.MeanOnlyBatchNorm2d(3, track_running_stats=False, backend=backend).to(device).eval()
    assert free.running_mean is None and free.weight is None
    torch.testing.assert_close(free(x), x - x.mean((0, 2, 3), keepdim=True))
    plain = tritonorm.MeanOnlyBatchNorm1d(3, affine=False, backend=backend).to(device)
    assert plain.bias is None and dict(plain.named_parameters()) == {}
    out = plain(torch.ones(1, 3, device=device))  # one value per channel is enough
    assert torch.equal(out, torch.zeros(1, 3, device=device))
    assert "momentum=0.1" in repr(plain) and "affine=False" in repr(plain)


def test_recalibrate_and_norm_classes(device):
    layer = tritonorm.MeanOnlyBatchNorm2d(3).to(device)
    assert all(cls in tritonorm.NORM_CLASSES for cls in (
        tritonorm.MeanOnlyBatchNorm1d, tritonorm.MeanOnlyBatchNorm2d, tritonorm.MeanOnlyBatchNorm3d))
    batches = [random_input((4, 3, 2, 2), torch.float32, device, seed=s) for s in range(3)]
    model = nn.Sequential(layer)
    tritonorm.recalibrate(model, batches)
    expected = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)
    assert int(layer.num_batches_tracked) == 3 and layer.momentum == 0.1


@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck(batch_stats, channels_last, device):
    x = random_input((4, 3, 5, 6), torch.float32, device, channels_last).requires_grad_()
    bias = torch.randn(3, device=device, requires_grad=True)
    torch.library.opcheck(mo_ops.mean_only_batch_norm, (x, bias, torch.randn(3, device=device), batch_stats))
    torch.library.opcheck(mo_ops.mean_only_batch_norm_backward, (torch.randn_like(x), batch_stats, True))


def test_double_backward_is_refused_on_triton(device):
    x = random_input((4, 3, 2, 2), torch.float32, device).requires_grad_()
    y = F.mean_only_batch_norm(x, training=True, backend="triton")
    (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_fullgraph_matches_eager(backend, device):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), tritonorm.MeanOnlyBatchNorm2d(8, backend=backend), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        ).to(device)

    assert_compiled_matches_eager(model, random_input((4, 3, 6, 6), torch.float32, device), "aot_eager")


def test_errors(device):
    x = torch.randn(2, 3, 4, device=device)
    with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm2d expects 4-d input, got 3-d input"):
        tritonorm.MeanOnlyBatchNorm2d(3)(x)
    with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm1d\(4\) expects 4 channels"):
        tritonorm.MeanOnlyBatchNorm1d(4)(x)
    with pytest.raises(ValueError, match="running_mean is required when training=False"):
        F.mean_only_batch_norm(x)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        F.mean_only_batch_norm(x, bias=torch.zeros(2, device=device), training=True)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        F.mean_only_batch_norm(x, torch.zeros(3, device=device), training=True, momentum=None)
    with pytest.raises(ValueError, match="at least 1 value per channel"):
        F.mean_only_batch_norm(x[:0], training=True)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        F.mean_only_batch_norm([1.0, 2.0])
    with pytest.raises(TypeError, match="input must be float16"):
        F.mean_only_batch_norm(x.long(), training=True)
    with pytest.raises(ValueError, match="momentum"):
        tritonorm.MeanOnlyBatchNorm2d(3, momentum=2.0)
    with pytest.raises(TypeError, match="affine"):
        tritonorm.MeanOnlyBatchNorm2d(3, affine="yes")


@pytest.mark.parametrize("affine", [True, False])
def test_fold_makes_it_an_nn_batchnorm(affine):
    """fold: the eval output of x - running_mean + beta from a plain nn.BatchNorm2d."""
    layer = tritonorm.MeanOnlyBatchNorm2d(3, affine=affine)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), layer, nn.ReLU())
    with torch.no_grad():
        layer.running_mean.normal_()
        if affine:
            layer.bias.normal_()
    model.eval()
    x = torch.randn(2, 2, 5, 5)
    folded = tritonorm.fold(model)
    assert [type(m) for m in folded] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"model.1 \(MeanOnlyBatchNorm2d\): track_running_stats=False"):
        tritonorm.fold(nn.Sequential(nn.Conv2d(2, 3, 3), tritonorm.MeanOnlyBatchNorm2d(3, track_running_stats=False)))
