"""The Lp batch norms under torch.compile(fullgraph=True) (no graph break, same result as
eager), torch.library.opcheck of their custom ops and of the running-statistics update, and
gradcheck in float64 of both paths."""

import pytest
import torch
from lp_utils import NORMS, random_input
from torch import nn
from training import assert_compiled_matches_eager

import tritonorm
from tritonorm.ops import lp_batchnorm as lp_ops
from tritonorm.ops import running_stats as running_ops

LAYERS = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}


def small_cnn(norm, backend):
    torch.manual_seed(0)
    extra = {"k": 4} if norm == "topk" else {}
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), LAYERS[norm](8, backend=backend, **extra), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), LAYERS[norm](8, backend=backend, **extra), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(norm, backend, compiler, device):
    if compiler == "inductor" and backend == "torch" and norm != "topk":
        pytest.skip("one inductor run of the reference is enough (compile time on 2 cores)")
    x = random_input((4, 3, 8, 8), torch.float32, device)
    assert_compiled_matches_eager(lambda: small_cnn(norm, backend).to(device), x, compiler)


def _lp_op_args(norm, device, batch_stats, dtype=torch.float32, channels_last=False):
    x = random_input((4, 3, 5, 6), dtype, device, channels_last).requires_grad_()
    w = torch.rand(3, device=device).add(0.5).requires_grad_()
    b = torch.randn(3, device=device).requires_grad_()
    rm, rd = torch.randn(3, device=device), torch.rand(3, device=device) + 1
    return (x, w, b, rm, rd, batch_stats, 1e-5, norm, 3, True)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_opcheck_forward(norm, batch_stats, channels_last, device):
    args = _lp_op_args(norm, device, batch_stats, channels_last=channels_last)
    torch.library.opcheck(lp_ops.lp_batch_norm, args)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_opcheck_fused_forward(norm, activation, device):
    args = _lp_op_args(norm, device, True)
    residual = torch.randn_like(args[0]).requires_grad_()
    torch.library.opcheck(lp_ops.lp_batch_norm, args + (residual, activation, 0.01))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation, residual", [("none", False), ("gelu", True)])
def test_opcheck_backward(norm, activation, residual, device):
    x, w, b, *_ = _lp_op_args(norm, device, True)
    res = torch.randn_like(x) if residual else None
    y, mean, dev, wbar, sel_i, sel_sign, affine = lp_ops.lp_batch_norm(
        x, w, b, None, None, True, 1e-5, norm, 3, True, res, activation, 0.01)
    args = (torch.randn_like(y), x.detach(), w.detach(), mean, dev, wbar, sel_i, sel_sign, affine, True, True, 1e-5,
            norm, 3, True, res, activation, 0.01, residual)
    torch.library.opcheck(lp_ops.lp_batch_norm_backward, args)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", [False, True], ids=["", "count"])
def test_opcheck_running_update(momentum, count, device):
    args = (torch.randn(5, device=device), torch.rand(5, device=device), torch.randn(5, device=device),
            torch.rand(5, device=device), torch.tensor(4, device=device), momentum, count)
    torch.library.opcheck(running_ops.update_running_stats, args)


@pytest.mark.parametrize("channels", [5, 5000], ids=["one-program", "several-programs"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_update_counts_the_batch(channels, momentum, device):
    """count=True adds 1 to num_batches_tracked before the cumulative factor is taken, in
    the same launch (one program) or by an add_ before it (several)."""
    g = torch.Generator().manual_seed(0)
    rm, rd, mean, dev = (torch.rand(channels, generator=g).to(device) for _ in range(4))
    nbt = torch.tensor(4, device=device)
    expected_rm, expected_rd = rm.clone(), rd.clone()
    factor = 0.1 if momentum is not None else 1 / 5
    expected_rm.lerp_(mean, factor)
    expected_rd.lerp_(dev, factor)
    running_ops.update_running_stats(rm, rd, mean, dev, nbt, momentum, True)
    assert nbt.item() == 5
    torch.testing.assert_close(rm, expected_rm)
    torch.testing.assert_close(rd, expected_rd)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_reference_float64(norm, training):
    """The reference is correctly differentiable (first and second order)."""
    x = random_input((4, 2, 3), torch.float64, "cpu").requires_grad_()
    w = torch.rand(2, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64).requires_grad_()
    rm, rd = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def f(x, w, b):
        return tritonorm.reference.lp_batchnorm.lp_batch_norm(
            x, weight=w, bias=b, running_mean=None if training else rm, running_dev=None if training else rd,
            batch_stats=training, momentum=0.1, eps=1e-5, norm=norm, k=3, normalized=True,
        )

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_triton_float64(norm, device):
    """The Triton backward is the derivative of the Triton forward (float64 kernels)."""
    x = random_input((3, 2, 4), torch.float64, device).requires_grad_()
    w = torch.rand(2, dtype=torch.float64, device=device).add(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=device).requires_grad_()

    def f(x, w, b):
        return lp_ops.lp_batch_norm(x, w, b, None, None, True, 1e-5, norm, 3, True)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


class _FusedBlock(nn.Module):
    """conv -> norm + relu, conv -> norm + residual + relu: a basic block, fused."""

    def __init__(self, norm, backend):
        super().__init__()
        torch.manual_seed(0)
        extra = {"k": 4} if norm == "topk" else {}
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
        self.bn1 = LAYERS[norm](3, backend=backend, activation="relu", **extra)
        self.bn2 = LAYERS[norm](3, backend=backend, activation="silu", **extra)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), residual=x)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_fused_matches_eager(norm, compiler, device):
    if compiler == "inductor" and norm != "l1":
        pytest.skip("one inductor run of the fused layers is enough (compile time on 2 cores)")
    x = random_input((4, 3, 8, 8), torch.float32, device)
    assert_compiled_matches_eager(lambda: _FusedBlock(norm, "triton").to(device), x, compiler)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish"])
@pytest.mark.parametrize("path", ["onchip", "split"])
def test_gradcheck_fused_triton_float64(activation, path, device, monkeypatch):
    """The fused backward (act'(z) rebuilt from x, the residual's gradient) is the
    derivative of the fused forward, on both paths (float64 kernels)."""
    monkeypatch.setenv("TRITONORM_LP_PATH", path)
    g = torch.Generator().manual_seed(3)
    x = random_input((3, 2, 4), torch.float64, device).requires_grad_()
    res = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = torch.randn(2, generator=g, dtype=torch.float64).to(device).requires_grad_()

    def f(x, res, w, b):
        return lp_ops.lp_batch_norm(x, w, b, None, None, True, 1e-5, "l1", 0, True, res, activation, 0.1)[0]

    assert torch.autograd.gradcheck(f, (x, res, w, b), fast_mode=True)
