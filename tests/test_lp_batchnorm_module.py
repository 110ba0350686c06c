"""The modules behave like nn.BatchNorm*d: buffers, train/eval, momentum, state_dict,
and the invariants of the method ("Norm matters", Hoffer et al. 2018)."""

import math

import pytest
import torch
from lp_utils import NORMS
from torch import nn

import tritonorm
from tritonorm.reference.lp_batchnorm import c_linf

BACKENDS = ("triton", "torch")
CLASSES = {
    ("l1", 1): tritonorm.L1BatchNorm1d, ("l1", 2): tritonorm.L1BatchNorm2d, ("l1", 3): tritonorm.L1BatchNorm3d,
    ("linf", 1): tritonorm.LinfBatchNorm1d, ("linf", 2): tritonorm.LinfBatchNorm2d,
    ("linf", 3): tritonorm.LinfBatchNorm3d,
    ("topk", 1): tritonorm.TopkBatchNorm1d, ("topk", 2): tritonorm.TopkBatchNorm2d,
    ("topk", 3): tritonorm.TopkBatchNorm3d,
}
INPUT_SHAPES = {1: (6, 4, 9), 2: (6, 4, 5, 3), 3: (3, 4, 3, 2, 5)}


def make(norm, dim=2, **kwargs):
    if norm == "topk":
        kwargs.setdefault("k", 3)
    return CLASSES[norm, dim](4, **kwargs)


@pytest.mark.parametrize("norm", NORMS)
def test_defaults_match_batchnorm(norm):
    m, bn = make(norm), nn.BatchNorm2d(4)
    settings = ("eps", "momentum", "affine", "track_running_stats")
    assert [getattr(m, name) for name in settings] == [getattr(bn, name) for name in settings]
    assert torch.equal(m.weight, bn.weight) and torch.equal(m.bias, bn.bias)
    assert torch.equal(m.running_mean, torch.zeros(4)) and torch.equal(m.running_dev, torch.ones(4))
    assert m.num_batches_tracked.dtype == torch.long and m.num_batches_tracked.item() == 0
    assert set(m.state_dict()) == {"weight", "bias", "running_mean", "running_dev", "num_batches_tracked"}
    assert tritonorm.TopkBatchNorm2d(4).k == 10


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dim", (1, 2, 3))
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_then_eval(norm, dim, backend, device):
    """Training updates the running statistics with torch's momentum convention; eval
    normalizes with them and leaves them alone."""
    torch.manual_seed(0)
    m = make(norm, dim, backend=backend).to(device)
    x = torch.randn(INPUT_SHAPES[dim], device=device) * 3 + 2
    m(x)
    mean, dev = tritonorm.reference.lp_batchnorm.batch_statistics(x.cpu(), norm, 3, True)
    torch.testing.assert_close(m.running_mean.cpu(), 0.1 * mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.running_dev.cpu(), 0.9 + 0.1 * dev, atol=1e-5, rtol=1e-5)
    assert m.num_batches_tracked.item() == 1
    m.eval()
    before = m.running_mean.clone()
    x2 = torch.randn(2, *INPUT_SHAPES[dim][1:], device=device)  # another batch size
    shape = (1, -1) + (1,) * (x2.dim() - 2)
    expected = (x2 - m.running_mean.view(shape)) / (m.running_dev.view(shape) + m.eps)
    torch.testing.assert_close(m(x2), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(m.running_mean, before) and m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cumulative_average_momentum_none(backend, device):
    m = make("l1", momentum=None, backend=backend).to(device)
    batches = [torch.randn(5, 4, 3, 3, device=device) + i for i in range(3)]
    for x in batches:
        m(x)
    means = torch.stack([x.transpose(0, 1).reshape(4, -1).mean(1) for x in batches])
    torch.testing.assert_close(m.running_mean, means.mean(0), atol=1e-5, rtol=1e-5)
    assert m.num_batches_tracked.item() == 3


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_running_stats_uses_batch_in_eval(norm, backend, device):
    m = make(norm, track_running_stats=False, affine=False, backend=backend).to(device)
    assert m.running_mean is None and m.num_batches_tracked is None
    x = torch.randn(5, 4, 3, 3, device=device)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train)


@pytest.mark.parametrize("norm", NORMS)
def test_state_dict_round_trip(norm, device):
    m = make(norm, backend="triton").to(device)
    for _ in range(2):
        m(torch.randn(6, 4, 3, 3, device=device))
    with torch.no_grad():
        m.weight.mul_(2)
    fresh = make(norm, backend="triton").to(device)
    fresh.load_state_dict(m.state_dict())
    for key, value in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = torch.randn(6, 4, 3, 3, device=device)
    m.eval(), fresh.eval()
    assert torch.equal(m(x), fresh(x))
    fresh.reset_running_stats()
    assert fresh.num_batches_tracked.item() == 0 and torch.equal(fresh.running_dev, torch.ones(4, device=device))


def test_extra_repr():
    assert repr(tritonorm.L1BatchNorm2d(8)) == (
        "L1BatchNorm2d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)"
    )
    assert repr(tritonorm.TopkBatchNorm1d(3, k=5, normalized=False, backend="torch")) == (
        "TopkBatchNorm1d(3, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, k=5, "
        "normalized=False, backend='torch')"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_l1_output_has_unit_std_on_gaussian_input(backend, device):
    """C1 = sqrt(pi/2) makes sigma the standard deviation of Gaussian data."""
    torch.manual_seed(0)
    x = torch.randn(32, 4, 32, 32, device=device) * 4 + 3
    y = make("l1", affine=False, backend=backend).to(device)(x)
    std = y.transpose(0, 1).reshape(4, -1).std(1)
    torch.testing.assert_close(std.cpu(), torch.ones(4), atol=0.01, rtol=0)


def test_linf_and_topk_constants():
    """sigma = Cinf(n) * max|a| (L-inf) and Cinf(n) * mean of the top k (Top-k)."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]]).T.reshape(5, 1)  # one channel, n = 5
    mean = 3.2
    linf = tritonorm.functional.linf_batch_norm(x, training=True)
    assert math.isclose(linf[4, 0].item(), (10 - mean) / (c_linf(5) * 6.8 + 1e-5), rel_tol=1e-5)
    topk = tritonorm.functional.topk_batch_norm(x, training=True, k=2)
    assert math.isclose(topk[4, 0].item(), (10 - mean) / (c_linf(5) * (6.8 + 3.2) / 2 + 1e-5), rel_tol=1e-5)
    raw = tritonorm.functional.topk_batch_norm(x, training=True, k=2, normalized=False)
    assert math.isclose(raw[4, 0].item(), (10 - mean) / ((6.8 + 3.2) / 2 + 1e-5), rel_tol=1e-5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_invariant_to_positive_scale_and_shift(norm, backend, device):
    """The property the paper builds on: BN(alpha * x + beta) = BN(x) for alpha > 0 (exactly
    with eps = 0, which training refuses; 1e-12 is far below rounding)."""
    m = make(norm, affine=False, backend=backend, eps=1e-12).to(device)
    x = torch.randn(6, 4, 5, 5, device=device)
    torch.testing.assert_close(m(7.5 * x - 3.0), m(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_and_parameters_untouched(norm, backend, device):
    m = make(norm, backend=backend).to(device)
    x = torch.randn(6, 4, 3, 3, device=device)
    x_copy, w_copy = x.clone(), m.weight.detach().clone()
    m(x).sum().backward()
    assert torch.equal(x, x_copy) and torch.equal(m.weight.detach(), w_copy)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_low_precision_module(norm, dtype, device):
    """A module converted with .half() / .bfloat16() (buffers and parameters in low
    precision) matches an fp32 module on the same values."""
    m = make(norm, backend="triton").to(device, dtype)
    ref = make(norm, backend="torch").to(device)
    x = torch.randn(6, 4, 3, 3, device=device).to(dtype)
    y = m(x)
    assert y.dtype == dtype and m.running_dev.dtype == dtype
    torch.testing.assert_close(y.float(), ref(x.float()), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(m.running_dev.float(), ref.running_dev, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, offset", [(torch.float32, 1e4 + 0.1), (torch.float32, -3.3e6),
                                           (torch.float16, 1000.5), (torch.bfloat16, 3.0e5)], ids=str)
def test_constant_channel_with_a_large_offset_gives_its_bias(norm, backend, dtype, offset, device):
    """sigma = 0 and x - mu = 0 exactly, whatever the offset (the mean is taken about one of
    the channel's values): y is the bias, not rounding noise divided by rounding noise."""
    layer = make(norm, backend=backend).to(device)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.25, -1.0, 0.5, 2.0]))
    x = torch.randn(INPUT_SHAPES[2], device=device)
    x[:, 0] = offset
    y = layer(x.to(dtype))
    assert (y[:, 0] == 0.25).all(), y[:, 0].unique()
    assert torch.isfinite(y).all()
