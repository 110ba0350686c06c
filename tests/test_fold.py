"""tritonorm.fold: an inference copy with no tritonorm module left, equal in eval to the
model; what is absorbed into the layer before and what becomes an nn.BatchNorm; EquiNorm
and bounded weight norm folded; export and AOTInductor packaging; the errors."""

import operator

import pytest
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

import tritonorm

LP_2D = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d,
         "topk": lambda c, **kw: tritonorm.TopkBatchNorm2d(c, k=3, **kw)}


class Block(nn.Module):
    """A torchvision BasicBlock with downsample, written with fused Lp layers."""

    def __init__(self, norm, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = LP_2D[norm](cout, activation="relu")
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = LP_2D[norm](cout, activation="silu")
        self.down = nn.Conv2d(cin, cout, 1, bias=False)
        self.down_bn = LP_2D[norm](cout)

    def forward(self, x):
        out = self.bn1(input=self.conv1(x))
        return self.bn2(self.conv2(out), self.down_bn(self.down(x)))  # the residual passed by position


def net(norm):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=True), LP_2D[norm](8, activation="leaky_relu", negative_slope=0.2),
        Block(norm, 8, 12), nn.MaxPool2d(2), LP_2D[norm](12),  # after a pool: an nn.BatchNorm2d
        nn.Flatten(), nn.Linear(12 * 9, 6), tritonorm.L1BatchNorm1d(6, activation="gelu_tanh"), nn.Linear(6, 3),
    )


def trained(model, shape, steps=3):
    """Random affines and running statistics from a few training batches, then eval."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "affine", False) and isinstance(m, tritonorm.nn.lp_batchnorm._LpBatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        for _ in range(steps):
            model(torch.randn(shape) * 2 + 1)
    return model.eval()


def tritonorm_modules(model):
    return [type(m).__name__ for m in model.modules() if type(m).__module__.startswith("tritonorm")]


@pytest.mark.parametrize("norm", LP_2D)
def test_fold_resnet_block(norm):
    model = trained(net(norm), (4, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, 8, 8)
    folded = tritonorm.fold(model, (x[:2],))
    assert tritonorm_modules(folded) == []
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # every Lp layer after a convolution or the Linear absorbed, the one after the pool a BatchNorm (eps 0)
    (bn,) = [m for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert type(bn) is nn.BatchNorm2d and bn.eps == 0 and not bn.training
    functions = [n.target for n in folded.graph.nodes if n.op == "call_function"]
    assert functions == [nn.functional.leaky_relu, nn.functional.relu, operator.add, nn.functional.silu,
                         nn.functional.gelu]
    # the model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(tritonorm_modules(model)) == 6


def test_fold_exports_without_tritonorm_ops():
    model = trained(net("l1"), (4, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(tritonorm.fold(model, (x,)), (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets and not [t for t in targets if "tritonorm" in t]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_converted_model_matches_batchnorm_model():
    """The deployment path of a converted pretrained model: BatchNorm model -> convert(fuse)
    -> fold gives the BatchNorm model's eval output, with every BatchNorm absorbed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 8, 8))
    model.eval()
    folded = tritonorm.fold(tritonorm.convert(model, "topk", fuse=True))
    assert [type(m) for m in folded.children()] == [nn.Conv2d, nn.Conv2d]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_linear_absorbs_only_with_shapes_that_prove_it():
    model = trained(nn.Sequential(nn.Linear(5, 4), tritonorm.LinfBatchNorm1d(4)), (8, 5))
    x = torch.randn(3, 5)
    without_shapes = tritonorm.fold(model)
    assert [type(m) for m in without_shapes.children()] == [nn.Linear, nn.BatchNorm1d]
    with_shapes = tritonorm.fold(model, (x,))
    assert [type(m) for m in with_shapes.children()] == [nn.Linear]
    # over (N, C, L) the BatchNorm1d normalizes dim 1, not the Linear's features: never absorbed
    sequence = trained(nn.Sequential(nn.Linear(5, 4), tritonorm.L1BatchNorm1d(3)), (8, 3, 5))
    sequence_folded = tritonorm.fold(sequence, (torch.randn(2, 3, 5),))
    assert [type(m) for m in sequence_folded.children()] == [nn.Linear, nn.BatchNorm1d]
    with torch.no_grad():
        for folded in (without_shapes, with_shapes):
            torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)
        y = torch.randn(2, 3, 5)
        torch.testing.assert_close(sequence_folded(y), sequence(y), rtol=1e-5, atol=1e-6)


class Shared(nn.Module):
    """A convolution with two users, a convolution called twice, an Lp layer called twice,
    a layer without affine, a BatchNorm3d: none absorbed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = tritonorm.L1BatchNorm2d(4)
        self.twice = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_b = tritonorm.LinfBatchNorm2d(4, affine=False, activation="hardswish")
        self.bn_c = tritonorm.TopkBatchNorm3d(2, k=2)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn_a(y) + y
        z = self.bn_b(self.twice(self.twice(z)))
        z = self.bn_b(z)
        return self.bn_c(z.unflatten(1, (2, 2)))


def test_not_absorbed_becomes_batchnorm():
    model = trained(Shared(), (4, 3, 6, 6))
    folded = tritonorm.fold(model)
    children = dict(folded.named_children())
    assert [type(children[k]) for k in ("bn_a", "bn_b", "bn_c")] == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm3d]
    assert not children["bn_b"].affine
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_root_layer_and_dtype():
    layer = trained(tritonorm.L1BatchNorm2d(4, activation="relu"), (6, 4, 3, 3)).to(torch.bfloat16)
    folded = tritonorm.fold(layer)
    assert isinstance(folded, fx.GraphModule) and type(folded.get_submodule("0")) is nn.BatchNorm2d
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), layer(x), rtol=2e-2, atol=2e-2)


def test_equinorm_and_bounded_weight_norm():
    torch.manual_seed(0)
    stacked = nn.Linear(6, 4)
    tritonorm.bounded_weight_norm(stacked, learnable_gain=True)
    parametrize.register_parametrization(stacked, "weight", _Double())
    model = nn.Sequential(
        tritonorm.EquiNormConv2d(3, 6, 3), nn.ReLU(),  # no padding: the eval weight needs the input size
        tritonorm.BoundedWNConv2d(6, 6, 1, rho=2.0), nn.AdaptiveAvgPool2d(1), nn.Flatten(), stacked,
    )
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 8, 8) + 0.1)
    model.eval()
    x = torch.rand(2, 3, 8, 8) + 0.1
    with pytest.raises(ValueError, match=r"model.0 \(EquiNormConv2d\): fold\(\) needs input_size .* or pass "
                                         r"example_inputs to tritonorm.fold"):
        tritonorm.fold(model)
    folded = tritonorm.fold(model, (x,))
    assert [type(m) for m in folded] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    assert not parametrize.is_parametrized(folded[5])  # the whole stack baked
    assert parametrize.is_parametrized(model[5]) and type(model[2]) is not nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        tritonorm.fold([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="example_inputs must be a tuple of the model's positional inputs, got Tensor"):
        tritonorm.fold(nn.Linear(2, 2), torch.randn(1, 2))
    batch_only = nn.Sequential(nn.Conv2d(3, 4, 3), tritonorm.TopkBatchNorm2d(4, k=2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"model.1 \(TopkBatchNorm2d\): track_running_stats=False normalizes by "
                                         r"each batch's statistics in eval too"):
        tritonorm.fold(batch_only)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = tritonorm.L1BatchNorm2d(4)

        def forward(self, x):
            return self.bn(x) if x.sum() > 0 else x

    with pytest.raises(ValueError, match="could not trace Untraceable .*; fold its traceable submodules one by one"):
        tritonorm.fold(Untraceable())

    class Functional(nn.Module):
        def forward(self, x):
            return tritonorm.functional.linf_batch_norm(x, training=True)

    with pytest.raises(ValueError, match=r"its forward calls linf_batch_norm \(`linf_batch_norm`\); tritonorm.fold "
                                         r"folds tritonorm's modules"):
        tritonorm.fold(nn.Sequential(tritonorm.L1BatchNorm2d(3), Functional()))


@pytest.mark.slow
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
])
def test_aot_inductor_package(device, tmp_path):
    """The deployment path end to end: fold, export, package with AOTInductor, load, run
    (about 20 s of C++ compilation on CPU)."""
    model = trained(net("topk"), (4, 3, 8, 8)).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    program = torch.export.export(tritonorm.fold(model, (x,)), (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-4)
