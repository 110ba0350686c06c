"""Checks that only a GPU can make: compiled (not interpreted) kernels, "auto" choosing
Triton, and channels of about a million elements split over many programs."""

import pytest
import torch
from lp_utils import NORMS, compare, random_input

import tritonorm
from tritonorm import _dispatch
from tritonorm.kernels import channel_reduce

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_kernels_are_compiled_and_auto_picks_triton(monkeypatch):
    monkeypatch.delenv("TRITONORM_BACKEND", raising=False)
    assert not _dispatch.INTERPRETED
    assert _dispatch.resolve_backend("auto", torch.ones(1, device="cuda")) == "triton"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("channels_last", (False, True))
def test_large_channels(norm, dtype, channels_last):
    """N=256 at 56x56: 802816 values per channel, split over many programs."""
    x = random_input((256, 4, 56, 56), dtype, "cuda", channels_last)
    assert channel_reduce.plan(channel_reduce.channel_view(x)).splits > 16
    compare(norm, x, k=10)


@pytest.mark.parametrize("norm", NORMS)
def test_module_on_cuda_matches_cpu_reference(norm):
    layer = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}[norm]
    gpu, cpu = layer(64).cuda(), layer(64, backend="torch")
    x = torch.randn(32, 64, 14, 14)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.running_dev.cpu(), cpu.running_dev, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("channels_last", (False, True))
def test_equinorm_input_sums_large(dtype, channels_last):
    """The input sums of a 64x256x56x56 activation (200k values per channel)."""
    from equinorm_utils import positive_input
    from tolerances import assert_close

    from tritonorm.ops.equinorm import input_sums

    x = positive_input((64, 256, 56, 56), dtype, "cuda", channels_last=channels_last)
    n = x.numel() // x.shape[1]
    assert_close(input_sums(x), x.double().sum((0, 2, 3)), torch.float32, "v", scale=n**0.5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("single_pass", (True, False))
def test_equinorm_resnet_layer(dtype, single_pass, monkeypatch):
    """A ResNet layer (256 -> 256, 3x3, 14x14) on both paths, values and gradients
    (TF32 off: the comparison is of the normalization, not of cuDNN's precision)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from equinorm_utils import positive_input, run_layer
    from tolerances import assert_close

    x = positive_input((32, 256, 14, 14), dtype, "cuda")
    kwargs = dict(conv=dict(nd=2, padding=1), single_pass=single_pass)
    tri = run_layer(x, (256, 256, 3, 3), "triton", **kwargs)
    exp = run_layer(x.double(), (256, 256, 3, 3), "torch", grad_dtype=dtype, **kwargs)
    for key in ("y", "dx", "dweight", "dgain", "dbias"):
        assert_close(tri[key], exp[key], dtype, key, scale=max(1.0, exp[key].abs().max().item()) * 4)


@pytest.mark.parametrize("mode", ("parallel", "sequential"))
@pytest.mark.parametrize("net", ("mlp", "cnn"))
def test_enorm_study_nets(net, mode):
    """The study's 3072-500x19-10 MLP and the authors' 9-conv CNN, with SGD momentum: the
    compiled Triton cycle against the torch cycle on a copy, five cycles."""
    import copy

    from enorm_utils import weight_layers

    from tritonorm import ENorm

    torch.manual_seed(0)
    if net == "mlp":
        from enorm_utils import mlp

        model, x = mlp((3072, *[500] * 20, 10)).cuda(), torch.randn(64, 3072, device="cuda")
    else:
        channels = (3, 128, 128, 128, 256, 256, 256, 320, 320, 10)
        convs = [torch.nn.Conv2d(a, b, 3 if k < 7 else 1, padding=1 if k < 7 else 0, bias=False)
                 for k, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True))]
        model = torch.nn.Sequential(*[m for conv in convs for m in (conv, torch.nn.ReLU())]).cuda()
        x = torch.randn(8, 3, 16, 16, device="cuda")
    results = []
    for backend in ("triton", "torch"):
        twin = copy.deepcopy(model)
        opt = torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.9)
        twin(x).square().mean().backward()
        opt.step()
        enorm = ENorm(weight_layers(twin), opt, c=1.2, mode=mode, backend=backend)
        for _ in range(5):
            enorm.step()
        results.append([*twin.parameters(), *(opt.state[p]["momentum_buffer"] for p in twin.parameters())])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape, dim", [((4096, 4096), 0), ((512, 512, 3, 3), 0), ((2048, 512, 1, 1), 1),
                                        ((1000, 2048), 1)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bounded_weight_norm_large(shape, dim, dtype):
    """Weights of ResNet-50 and a 4096 x 4096 linear (16.8M elements), rows and columns:
    compiled kernels against the float64 reference, weight and both gradients."""
    from tritonorm.reference.bounded_weight_norm import bounded_weight

    g = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn(shape, generator=g, device="cuda").to(dtype)
    rho = torch.rand(shape[dim], generator=g, device="cuda") + 0.5
    grad = torch.randn(shape, generator=g, device="cuda").to(dtype)
    results = []
    for op, cast in ((tritonorm.functional.bounded_weight, dtype), (bounded_weight, torch.float64)):
        leaves = [v.to(cast, copy=True).requires_grad_(), rho.to(cast if cast == torch.float64 else rho.dtype,
                                                                copy=True).requires_grad_()]
        w = op(leaves[0], rho=leaves[1], dim=dim)
        w.backward(grad.to(cast))
        results.append([w.detach().double(), leaves[0].grad.double(), leaves[1].grad.double()])
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for tri, exp in zip(*results, strict=True):
        torch.testing.assert_close(tri, exp, atol=tol * exp.abs().max().item(), rtol=tol)
