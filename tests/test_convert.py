"""tritonorm.convert: torchvision-style ResNet blocks and an MLP converted to each norm;
parameters copied, eval outputs kept where the math says they must be, the input model
untouched, what EquiNorm leaves alone reported, and the errors."""

import warnings

import pytest
import torch
from torch import fx, nn

import tritonorm
from tritonorm.nn.bounded_weight_norm import BoundedWeightNorm

LP = {
    "l1": (tritonorm.L1BatchNorm1d, tritonorm.L1BatchNorm2d, tritonorm.L1BatchNorm3d),
    "linf": (tritonorm.LinfBatchNorm1d, tritonorm.LinfBatchNorm2d, tritonorm.LinfBatchNorm3d),
    "topk": (tritonorm.TopkBatchNorm1d, tritonorm.TopkBatchNorm2d, tritonorm.TopkBatchNorm3d),
}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --- the models: torchvision's BasicBlock and Bottleneck, an MLP -----------------------


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def down(cin, cout, stride):
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


def resnet():
    """Stem, a BasicBlock, a strided BasicBlock with downsample, a Bottleneck with
    downsample, a Bottleneck without; pool and fc."""
    return nn.Sequential(
        conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        BasicBlock(8, 8),
        BasicBlock(8, 12, stride=2, downsample=down(8, 12, 2)),
        Bottleneck(12, 4, downsample=down(12, 16, 1)),
        Bottleneck(16, 4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )


def mlp():
    return nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 3),
    )


MODELS = {"resnet": (resnet, (16, 3, 8, 8)), "mlp": (mlp, (16, 10))}


def trained(name, device="cpu"):
    """The model with random BatchNorm affines, eps 1e-3 (so that an eps misplaced in
    running_dev shows at rtol 1e-5) and running statistics from a few training batches
    (none of them at their initial value), then in eval mode; and an input."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().to(device)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCHNORMS):
                m.eps = 1e-3
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
        for _ in range(3):
            model(torch.randn(shape, device=device) * 2 + 1)
    return model.eval(), torch.randn(shape, device=device) * 2 + 1


def batchnorms(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, BATCHNORMS)}


# --- l1 / linf / topk ---------------------------------------------------------------


@pytest.mark.parametrize("norm", list(LP))
@pytest.mark.parametrize("name", list(MODELS))
def test_lp_replaces_every_batchnorm_and_copies(norm, name):
    model, _ = trained(name)
    converted = tritonorm.convert(model, norm)
    assert type(converted) is nn.Sequential
    assert not batchnorms(converted)
    bns = batchnorms(model)
    for qualified, bn in bns.items():
        layer = converted.get_submodule(qualified)
        assert type(layer) is LP[norm][BATCHNORMS.index(type(bn))], qualified
        assert (layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        assert layer.training is False
        torch.testing.assert_close(layer.weight, bn.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.bias, bn.bias, rtol=0, atol=0)
        torch.testing.assert_close(layer.running_mean, bn.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(layer.running_dev, (bn.running_var + bn.eps).sqrt() - bn.eps)
        assert layer.num_batches_tracked.item() == bn.num_batches_tracked.item() == 3
        assert layer.weight is not bn.weight and layer.running_mean is not bn.running_mean
    others = {n: type(m) for n, m in model.named_modules() if n not in bns}
    assert others == {n: type(m) for n, m in converted.named_modules() if n not in bns}


@pytest.mark.parametrize("norm", list(LP))
@pytest.mark.parametrize("name", list(MODELS))
def test_lp_eval_output_equals_batchnorm(norm, name, device):
    """running_dev = sqrt(running_var + eps) - eps: the eval output is the BatchNorm's."""
    model, x = trained(name, device)
    converted = tritonorm.convert(model, norm)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", list(LP))
@pytest.mark.parametrize("name", list(MODELS))
def test_lp_trains(norm, name, device):
    model, x = trained(name, device)
    converted = tritonorm.convert(model.train(), norm)
    assert all(m.training for m in converted.modules())
    before = {n: m.running_mean.clone() for n, m in converted.named_modules() if isinstance(m, LP[norm])}
    converted(x).square().mean().backward()
    for n, m in converted.named_modules():
        if isinstance(m, LP[norm]):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, n
            assert not torch.equal(m.running_mean, before[n]), n
    assert all(p.grad is None for p in model.parameters())


def test_topk_k_default_and_option():
    model, _ = trained("mlp")
    assert {m.k for m in tritonorm.convert(model, "topk").modules() if isinstance(m, LP["topk"])} == {10}
    assert {m.k for m in tritonorm.convert(model, "topk", k=3).modules() if isinstance(m, LP["topk"])} == {3}
    assert {m.backend for m in tritonorm.convert(model, "l1", backend="torch").modules()
            if isinstance(m, LP["l1"])} == {"torch"}


class MyBatchNorm2d(nn.BatchNorm2d):
    """A subclass defined outside torch.nn (fx would trace through it)."""


def test_lp_subclass_shared_root_and_settings():
    """Subclasses convert; a BatchNorm used twice becomes one Lp layer used twice; the
    root may be a BatchNorm; affine=False, track_running_stats=False, momentum=None,
    3-d, float64 and a mixed training flag are kept."""
    shared = nn.BatchNorm3d(4, affine=False, momentum=None, dtype=torch.float64)
    model = nn.Sequential(MyBatchNorm2d(4, eps=1e-3), nn.BatchNorm1d(4, track_running_stats=False), shared,
                          nn.Sequential(shared))
    model[0].eval()
    converted = tritonorm.convert(model, "linf")
    assert type(converted[0]) is tritonorm.LinfBatchNorm2d and converted[0].eps == 1e-3
    assert converted[0].training is False and converted.training is True
    assert converted[1].track_running_stats is False and converted[1].running_mean is None
    assert type(converted[2]) is tritonorm.LinfBatchNorm3d and converted[3][0] is converted[2]
    assert converted[2].weight is None and converted[2].momentum is None
    assert converted[2].running_mean.dtype == torch.float64
    root = tritonorm.convert(nn.BatchNorm2d(3), "l1")
    assert type(root) is tritonorm.L1BatchNorm2d


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m), m.training) for n, m in model.named_modules()],
        {n: id(p) for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("norm", [*LP, "equinorm", "bounded_wn"])
@pytest.mark.parametrize("training", [True, False])
def test_input_model_untouched(norm, training):
    """The model given is never changed, not even by training the converted one."""
    model, x = trained("resnet")
    model.train(training)
    state, modules, params = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = tritonorm.convert(model, norm)
    converted.train()(x).sum().backward()
    with torch.no_grad():
        for p in converted.parameters():
            p.add_(1.0)
    new_state, new_modules, new_params = snapshot(model)
    assert new_modules == modules and new_params == params
    assert new_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(new_state[k], v), k
    assert all(p.grad is None for p in model.parameters())


# --- equinorm -----------------------------------------------------------------------


def test_equinorm_basic_block():
    """Every conv + BN pair of a BasicBlock with downsample is fused, weight from the conv,
    gain and bias from the BN, hyper-parameters kept; no warning; forward and backward run."""
    torch.manual_seed(0)
    block = BasicBlock(4, 6, stride=2, downsample=down(4, 6, 2))
    with torch.no_grad():
        for bn in batchnorms(block).values():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = tritonorm.convert(block, "equinorm", stats_fraction=0.5)
    assert isinstance(converted, fx.GraphModule)
    assert not batchnorms(converted)
    for conv_name, bn_name in [("conv1", "bn1"), ("conv2", "bn2"), ("downsample.0", "downsample.1")]:
        conv, bn = block.get_submodule(conv_name), block.get_submodule(bn_name)
        layer = converted.get_submodule(conv_name)
        assert type(layer) is tritonorm.EquiNormConv2d
        assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                layer.dilation, layer.groups, layer.padding_mode) == (
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.padding_mode)
        assert layer.stats_fraction == 0.5 and layer.momentum == bn.momentum
        assert torch.equal(layer.weight, conv.weight) and layer.weight is not conv.weight
        assert torch.equal(layer.gain, bn.weight) and torch.equal(layer.bias, bn.bias)
    x = torch.rand(4, 4, 6, 6)
    y = converted(x)
    assert y.shape == block(x).shape
    y.square().mean().backward()
    assert all(p.grad is not None for p in converted.parameters())
    converted.eval()(x)


def test_equinorm_mlp_and_bottleneck():
    torch.manual_seed(0)
    model = mlp()
    converted = tritonorm.convert(model, "equinorm", single_pass=False, backend="torch")
    assert [type(m) for m in converted.children()] == [
        tritonorm.EquiNormLinear, nn.ReLU, tritonorm.EquiNormLinear, nn.ReLU, nn.Linear]
    first, second = converted.get_submodule("0"), converted.get_submodule("3")
    assert first.single_pass is False and first.backend == "torch"
    assert torch.equal(first.weight, model[0].weight) and torch.equal(second.weight, model[3].weight)
    converted(torch.rand(8, 10)).sum().backward()
    assert second.weight.grad.abs().sum() > 0

    block = Bottleneck(16, 4)
    converted = tritonorm.convert(block, "equinorm")
    assert [type(converted.get_submodule(f"conv{i}")) for i in (1, 2, 3)] == [tritonorm.EquiNormConv2d] * 3
    assert not batchnorms(converted)
    converted(torch.rand(2, 16, 5, 5)).sum().backward()


def test_equinorm_keeps_training_flags():
    """Each fused layer takes its BatchNorm's flag; fx's new containers take the model's."""
    model, _ = trained("resnet")
    converted = tritonorm.convert(model, "equinorm")
    assert not any(m.training for m in converted.modules())
    model.train()
    model[3].bn1.eval()
    converted = tritonorm.convert(model, "equinorm")
    assert converted.get_submodule("3.conv1").training is False
    assert all(m.training for n, m in converted.named_modules() if n != "3.conv1")


class LeftAlone(nn.Module):
    """bn_in on the input, conv1 + MyBatchNorm2d (converted), bn_add after an add, conv2
    feeding bn2 and the output, a ConvTranspose before bn3, a BN without running stats."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(3)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = MyBatchNorm2d(4)
        self.bn_add = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.bn3 = nn.BatchNorm2d(4)
        self.conv4 = nn.Conv2d(4, 4, 1)
        self.bn4 = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(self.bn_in(x))))
        h = self.bn_add(h + 1.0)
        g = self.conv2(h)
        h = self.bn2(g) + g
        return self.bn4(self.conv4(self.bn3(self.up(h))))


def test_equinorm_reports_what_it_leaves_alone():
    model = LeftAlone()
    with pytest.warns(UserWarning) as record:
        converted = tritonorm.convert(model, "equinorm")
    assert len(record) == 1
    message = str(record[0].message)
    assert "left 5 BatchNorm layer(s) alone" in message
    for expected in [
        "`bn_in` (BatchNorm2d): its input is the model input `x`, not the output of an nn.Conv2d",
        "`bn_add` (BatchNorm2d): its input is `add` (add), not the output of an nn.Conv2d",
        "`bn2` (BatchNorm2d): `conv2` (Conv2d) also feeds `add_1` (add)",
        "`bn3` (BatchNorm2d): its input is `up` (ConvTranspose2d)",
        "`bn4` (BatchNorm2d): track_running_stats=False",
    ]:
        assert expected in message, expected
    assert "bn1" not in message
    assert type(converted.conv1) is tritonorm.EquiNormConv2d and not hasattr(converted, "bn1")
    for name in ["bn_in", "bn_add", "bn2", "bn3", "bn4"]:
        assert type(converted.get_submodule(name)) is nn.BatchNorm2d
    for name in ["conv2", "conv4"]:
        assert type(converted.get_submodule(name)) is nn.Conv2d
    y = converted(torch.rand(2, 3, 4, 4))
    assert y.shape == (2, 4, 8, 8)
    y.sum().backward()


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.conv(self.bn(self.conv(x))))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_equinorm_refusals():
    with pytest.raises(ValueError, match=r"(?s)found no nn.Conv1d/2d/3d or nn.Linear followed by a BatchNorm.*"
                                         r"`conv` \(Linear\) is called 2 times"):
        tritonorm.convert(Shared(), "equinorm")
    with pytest.raises(ValueError, match="torch.fx could not trace Untraceable"):
        tritonorm.convert(Untraceable(), "equinorm")
    with pytest.raises(ValueError, match=r"EquiNorm refuses `0` \(Linear\): EquiNorm needs at least 2 weights"):
        tritonorm.convert(nn.Sequential(nn.Linear(1, 3), nn.BatchNorm1d(3)), "equinorm")
    with pytest.raises(ValueError, match=r"`0` \(Conv2d\) has 4 output channels, the BatchNorm 3"):
        tritonorm.convert(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(3)), "equinorm")


# --- bounded_wn ---------------------------------------------------------------------


def test_bounded_wn_every_weight():
    torch.manual_seed(0)
    model = nn.Sequential(resnet(), nn.Unflatten(1, (5, 1, 1)), nn.ConvTranspose2d(5, 3, 2), nn.Flatten(),
                          nn.Linear(12, 2))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))}
    assert len(layers) == 16
    converted = tritonorm.convert(model, "bounded_wn", rho=0.5)
    assert batchnorms(converted).keys() == batchnorms(model).keys()
    for name, layer in layers.items():
        new = converted.get_submodule(name)
        (param,) = new.parametrizations.weight
        assert isinstance(param, BoundedWeightNorm) and param.backend == "auto"
        dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        assert param.dim == dim
        others = [d for d in range(new.weight.dim()) if d != dim]
        norms = torch.linalg.vector_norm(new.weight, dim=others)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.5))
    converted(torch.randn(2, 3, 8, 8)).sum().backward()


def test_bounded_wn_default_rho_and_gain():
    torch.manual_seed(0)
    model = mlp()
    converted = tritonorm.convert(model, "bounded_wn")
    for i in (0, 3, 6):
        rho = torch.linalg.vector_norm(model[i].weight, dim=1).mean()
        norms = torch.linalg.vector_norm(converted[i].weight, dim=1)
        torch.testing.assert_close(norms, rho.expand(model[i].out_features))
    gained = tritonorm.convert(model, "bounded_wn", learnable_gain=True, backend="torch")
    (param,) = gained[0].parametrizations.weight
    assert param.learnable_gain and param.backend == "torch"
    torch.testing.assert_close(gained[0].weight, model[0].weight)


def test_bounded_wn_mean_only_swaps_batchnorms():
    """Each BatchNorm becomes the MeanOnlyBatchNorm of its dimension with its beta, running
    mean, momentum and flags; a shared one stays shared."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
                          nn.BatchNorm1d(5))
    shared = nn.BatchNorm1d(5)
    model.append(shared).append(shared)
    model[1].bias.data.normal_()
    model[1].running_mean.normal_()
    model[5].momentum = None
    converted = tritonorm.convert(model, "bounded_wn", mean_only=True)
    assert type(converted[1]) is tritonorm.MeanOnlyBatchNorm2d and type(converted[5]) is tritonorm.MeanOnlyBatchNorm1d
    assert type(model[1]) is nn.BatchNorm2d  # the original is left alone
    torch.testing.assert_close(converted[1].bias, model[1].bias)
    torch.testing.assert_close(converted[1].running_mean, model[1].running_mean)
    assert converted[5].momentum is None
    kept = tritonorm.convert(model, "bounded_wn")
    assert type(kept[1]) is nn.BatchNorm2d
    assert converted[6] is converted[7] and type(converted[6]) is tritonorm.MeanOnlyBatchNorm1d
    converted(torch.randn(2, 3, 4, 4)).sum().backward()


def test_bounded_wn_mean_only_errors():
    with pytest.raises(ValueError, match="found no nn.BatchNorm1d/2d/3d"):
        tritonorm.convert(nn.Sequential(nn.Linear(2, 2)), "bounded_wn", mean_only=True)
    with pytest.raises(ValueError, match="no synchronized mean-only layer"):
        tritonorm.convert(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)), "bounded_wn", mean_only=True)
    with pytest.raises(TypeError, match="mean_only must be a bool"):
        tritonorm.convert(nn.Sequential(nn.Linear(2, 2)), "bounded_wn", mean_only=1)

    class Doubled(nn.BatchNorm1d):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match=r"model.1 \(Doubled\): a BatchNorm subclass that .*convert it by hand"):
        tritonorm.convert(nn.Sequential(nn.Linear(2, 2), Doubled(2)), "bounded_wn", mean_only=True)



# --- errors -------------------------------------------------------------------------


def test_errors():
    model = mlp()
    valid = "'l1', 'linf', 'topk', 'equinorm', 'bounded_wn'"
    with pytest.raises(ValueError, match=f"norm must be one of {valid}, got 'l2'"):
        tritonorm.convert(model, "l2")
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        tritonorm.convert([model], "l1")
    with pytest.raises(TypeError, match=r"convert\(..., 'l1'\) got unknown option\(s\) 'k'; it takes 'backend'"):
        tritonorm.convert(model, "l1", k=3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'rho'; it takes 'single_pass', 'stats_fraction'"):
        tritonorm.convert(model, "equinorm", rho=1.0)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        tritonorm.convert(model, "topk", k=0)
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'triton', 'torch', got 'cuda'"):
        tritonorm.convert(model, "linf", backend="cuda")
    with pytest.raises(ValueError, match=r"stats_fraction must be a number in \(0, 1\], got 2"):
        tritonorm.convert(model, "equinorm", stats_fraction=2)
    with pytest.raises(TypeError, match="single_pass must be a bool"):
        tritonorm.convert(model, "equinorm", single_pass="yes")
    with pytest.raises(ValueError, match=r"model.0: rho must be a finite number > 0 or None, got -1"):
        tritonorm.convert(model, "bounded_wn", rho=-1)


@pytest.mark.parametrize("norm, message", [
    ("l1", "found no nn.BatchNorm1d/2d/3d or nn.SyncBatchNorm to convert to 'l1'"),
    ("topk", "found no nn.BatchNorm1d/2d/3d or nn.SyncBatchNorm to convert to 'topk'"),
    ("equinorm", "found no nn.BatchNorm1d/2d/3d to convert to 'equinorm'"),
    ("bounded_wn", "found no nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d to convert to 'bounded_wn'"),
])
def test_nothing_to_convert(norm, message):
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU()) if norm == "bounded_wn" else nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=message):
        tritonorm.convert(model, norm)


def test_lp_conversion_of_an_unusable_batchnorm_names_it():
    """A BatchNorm with momentum 1.5 would become a layer that fails every forward: refused at
    conversion, naming the module."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=1.5))
    message = r"model.1 \(BatchNorm2d\): momentum must be a number in \[0, 1\] or None, got 1.5"
    with pytest.raises(ValueError, match=message):
        tritonorm.convert(model, "l1")


# --- fused activations and residual adds (fuse=True), BatchNormAct-style subclasses -------


def lp_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, tritonorm.nn.lp_batchnorm._LpBatchNorm)}


def randomized(model):
    """Random BatchNorm affines and running statistics (eval equality must not be luck)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BATCHNORMS):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def assert_same_step(fused, plain, x):
    """Same output, input gradient, parameter gradients and running statistics."""
    outputs = []
    for model in (fused, plain):
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
        outputs.append((y, xx.grad, dict(model.named_parameters()), dict(model.named_buffers())))
    (y, dx, params, buffers), (y0, dx0, params0, buffers0) = outputs
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(dx, dx0)
    assert params.keys() == params0.keys() and buffers.keys() == buffers0.keys()
    for name, p in params.items():
        torch.testing.assert_close(p.grad, params0[name].grad, msg=lambda m, name=name: f"{name}: {m}")
    for name, b in buffers.items():
        torch.testing.assert_close(b, buffers0[name], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("norm", list(LP))
def test_fuse_resnet_blocks(norm, block, channels_last):
    """Every BN -> ReLU and BN -> add -> ReLU of a BasicBlock / Bottleneck (with a
    downsample) is fused; eval output, training forward and backward equal the unfused
    conversion's."""
    torch.manual_seed(0)
    model = BasicBlock(4, 6, stride=2, downsample=down(4, 6, 2)) if block == "basic" else \
        Bottleneck(8, 2, downsample=down(8, 8, 1))
    model = randomized(model)
    options = {"k": 5} if norm == "topk" else {}
    x = torch.randn(4, model.conv1.in_channels, 6, 6) * 2 + 1
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    for training in (False, True):
        model.train(training)
        fused = tritonorm.convert(model, norm, fuse=True, backend="torch", **options)
        plain = tritonorm.convert(model, norm, backend="torch", **options)
        assert isinstance(fused, fx.GraphModule) and not isinstance(plain, fx.GraphModule)
        layers = lp_layers(fused)
        last = "bn2" if block == "basic" else "bn3"
        expected = {"bn1": "relu", last: "relu", "downsample.1": None}
        if block == "bottleneck":
            expected["bn2"] = "relu"
        assert {n: m.activation for n, m in layers.items()} == expected
        assert not any(isinstance(m, nn.ReLU) for m in fused.modules())
        calls = [n for n in fused.graph.nodes if n.op == "call_module" and n.target == last]
        assert len(calls) == 1 and set(calls[0].kwargs) == {"residual"} and calls[0].name == last  # name kept
        assert not [n for n in fused.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
        if training:
            assert_same_step(fused, plain, x)
        else:
            with torch.no_grad():
                torch.testing.assert_close(fused(x), plain(x))
                torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    assert all(type(m) is not nn.ReLU or m.inplace for m in model.modules())  # the input model untouched


def test_fuse_resnet_eval_equals_batchnorm():
    model, x = trained("resnet")
    fused = tritonorm.convert(model, "l1", fuse=True)
    activations = {n: m.activation for n, m in lp_layers(fused).items()}
    assert len(activations) == 13 and [n for n, a in activations.items() if a is None] == [
        "4.downsample.1", "5.downsample.1"]
    assert set(activations.values()) == {"relu", None}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


class Forms(nn.Module):
    """One BatchNorm per way of writing an activation or a residual add (all fused)."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(12))
        self.lrelu, self.gelu_tanh, self.silu, self.hswish = (
            nn.LeakyReLU(0.3), nn.GELU(approximate="tanh"), nn.SiLU(), nn.Hardswish())

    def forward(self, x):
        f = nn.functional
        b = self.bns
        outs = [
            f.relu(b[0](x)), torch.relu(b[1](x)), b[2](x).relu(), f.leaky_relu(b[3](x), 0.25),
            f.gelu(b[4](x), approximate="tanh"), f.silu(b[5](x)), f.hardswish(b[6](x)), self.lrelu(b[7](x)),
            self.gelu_tanh(x + b[8](x)), self.silu(torch.add(b[9](x), x)), self.hswish(b[10](x).add(x)),
        ]
        h = b[11](x)
        h += x
        outs.append(f.gelu(h))
        return torch.stack(outs)


FORMS = [("relu", 0.01), ("relu", 0.01), ("relu", 0.01), ("leaky_relu", 0.25), ("gelu_tanh", 0.01),
         ("silu", 0.01), ("hardswish", 0.01), ("leaky_relu", 0.3), ("gelu_tanh", 0.01), ("silu", 0.01),
         ("hardswish", 0.01), ("gelu", 0.01)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fuse_every_form(training):
    model = randomized(Forms()).train(training)
    fused = tritonorm.convert(model, "linf", fuse=True, backend="torch")
    plain = tritonorm.convert(model, "linf", backend="torch")
    layers = lp_layers(fused)
    assert [(layers[f"bns.{i}"].activation, layers[f"bns.{i}"].negative_slope) for i in range(12)] == FORMS
    assert [n.op for n in fused.graph.nodes] == ["placeholder", *["call_module"] * 12, "call_function", "output"]
    assert sum("residual" in n.kwargs for n in fused.graph.nodes) == 4
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    assert_same_step(fused, plain, x)


class Unfusable(nn.Module):
    """Each BatchNorm here keeps its activation outside."""

    def __init__(self):
        super().__init__()
        self.shared = nn.BatchNorm2d(3)  # called twice
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(7))
        self.relu6 = nn.ReLU6()

    def forward(self, x):
        f = nn.functional
        b = self.bns
        shared = torch.relu(self.shared(x)) + torch.relu(self.shared(x * 2))
        two_users = b[0](x)
        outs = [
            shared, torch.relu(two_users) + two_users,      # the BN output also feeds the add
            torch.relu(b[1](x) + 1.0),                      # a scalar add
            torch.relu(torch.add(b[2](x), x, alpha=2)),     # alpha
            self.relu6(b[3](x)),                            # not a supported activation
            f.elu(b[4](x)),
            torch.tanh(b[5](x) + x),
        ]
        r = x * 3
        outs.append(torch.relu(r.add_(b[6](x))) + r)  # writes into r, read again: the BN output is not written
        return torch.stack(outs)


def test_fuse_leaves_the_rest_unfused():
    model = randomized(Unfusable()).eval()
    fused = tritonorm.convert(model, "l1", fuse=True)
    assert all(m.activation is None for m in lp_layers(fused).values())
    assert not any("residual" in n.kwargs for n in fused.graph.nodes)
    plain = tritonorm.convert(model, "l1")
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
    assert_same_step(fused.train(), plain.train(), x)


class OddResiduals(nn.Module):
    """Adds fx fuses without seeing shapes: a (C, 1, 1) bias, a float64 buffer (both
    broadcast), and an add that broadcasts the BatchNorm's output up."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(3) for _ in range(3))
        self.shift = nn.Parameter(torch.randn(3, 1, 1))
        self.register_buffer("wide", torch.randn(5, 5, dtype=torch.float64))

    def forward(self, x):
        b = self.bns
        return (torch.relu(b[0](x) + self.shift), nn.functional.silu(b[1](x) + self.wide),
                torch.relu(b[2](x) + x.unsqueeze(0).expand(2, -1, -1, -1, -1)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fuse_broadcasting_and_promoting_adds(backend):
    """The layer adds a residual it cannot fuse after the norm, as the graph did: the same
    outputs (shapes and dtypes included), gradients and running statistics."""
    model = randomized(OddResiduals())
    fused = tritonorm.convert(model, "topk", k=4, fuse=True, backend=backend)
    plain = tritonorm.convert(model, "topk", k=4, backend=backend)
    assert sum("residual" in n.kwargs for n in fused.graph.nodes) == 3
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    for training in (True, False):
        fused.train(training), plain.train(training)
        outputs = [m(x) for m in (fused, plain)]
        for a, b in zip(*outputs, strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
            torch.testing.assert_close(a, b)
    assert [o.dtype for o in outputs[0]] == [torch.float32, torch.float64, torch.float32]

    def step(model):
        xx = x.clone().requires_grad_()
        loss = sum(o.double().square().sum() for o in model.train()(xx))
        loss.backward()
        return xx.grad

    torch.testing.assert_close(step(fused), step(plain))
    for (name, p), p0 in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p0.grad, msg=lambda m, name=name: f"{name}: {m}")
    for (name, b), b0 in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b, b0, msg=lambda m, name=name: f"{name}: {m}")


def test_fuse_shared_activation_module_and_root():
    """One nn.ReLU called after two BatchNorms: both calls fused; a BatchNorm root has
    nothing to fuse."""
    class TwoCalls(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.act = nn.BatchNorm1d(4), nn.BatchNorm1d(4), nn.LeakyReLU(0.2)

        def forward(self, x):
            return self.act(self.bn2(self.act(self.bn1(x))))

    model = randomized(TwoCalls()).eval()
    fused = tritonorm.convert(model, "topk", k=2, fuse=True)
    assert [(m.activation, m.negative_slope) for m in lp_layers(fused).values()] == [("leaky_relu", 0.2)] * 2
    assert not hasattr(fused, "act")
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tritonorm.convert(model, "topk", k=2)(x))
    assert type(tritonorm.convert(nn.BatchNorm2d(3), "l1", fuse=True)) is tritonorm.L1BatchNorm2d


def test_fuse_errors():
    with pytest.raises(TypeError, match="fuse must be a bool, got 1"):
        tritonorm.convert(mlp(), "l1", fuse=1)
    with pytest.raises(ValueError, match="torch.fx could not trace Untraceable .* or convert without fuse=True"):
        tritonorm.convert(Untraceable(), "linf", fuse=True)
    assert type(tritonorm.convert(Untraceable(), "linf").bn) is tritonorm.LinfBatchNorm2d


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, in shape: a BatchNorm2d with act and drop submodules."""

    def __init__(self, num_features, act_layer=nn.ReLU, drop_layer=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class WithSubmodule(nn.BatchNorm2d):
    def __init__(self, num_features):
        super().__init__(num_features)
        self.scale = nn.Identity()


class UnusedAct(nn.BatchNorm2d):
    """An act submodule, but nn.BatchNorm2d's forward: not a BatchNormAct."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.ReLU()


@pytest.mark.parametrize("act_layer, expected", [
    (nn.ReLU, ("relu", 0.01)), (lambda: nn.LeakyReLU(0.2), ("leaky_relu", 0.2)), (nn.SiLU, ("silu", 0.01)),
    (lambda: nn.GELU(approximate="tanh"), ("gelu_tanh", 0.01)), (nn.Hardswish, ("hardswish", 0.01)),
    (None, (None, 0.01)),
])
@pytest.mark.parametrize("fuse", [False, True])
def test_batchnorm_act_keeps_its_activation(act_layer, expected, fuse):
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=act_layer), nn.ReLU()).eval())
    converted = tritonorm.convert(model, "l1", fuse=fuse)
    (layer,) = lp_layers(converted).values()
    if fuse and act_layer is None:  # nn.Identity: no activation of its own, so the ReLU after it is fused
        expected = ("relu", 0.01)
    assert (layer.activation, layer.negative_slope) == expected
    assert not any(isinstance(m, BatchNormAct2d) for m in converted.modules())
    # with fuse, the ReLU after a layer with no activation of its own is fused; else kept
    relu_kept = any(isinstance(m, nn.ReLU) for m in converted.modules())
    assert relu_kept == (not fuse or act_layer is not None)
    x = torch.randn(2, 3, 6, 6) * 2
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_layer, drop_layer, kept", [
    (nn.Tanh, None, ["act"]), (nn.Mish, lambda: nn.Dropout(0.5), ["drop", "act"]),
    (nn.ReLU, lambda: nn.Dropout(0.5), ["drop", "act"]), (None, lambda: nn.Dropout2d(0.5), ["drop"]),
])
@pytest.mark.parametrize("fuse", [False, True])
def test_batchnorm_act_keeps_what_it_cannot_fuse(act_layer, drop_layer, kept, fuse):
    """An act the layers cannot fuse, or a drop before the act: the Lp layer followed by
    the same drop and act modules, in timm's order, in training (same dropout masks) and
    eval."""
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=act_layer,
                                                                        drop_layer=drop_layer)))
    converted = tritonorm.convert(model, "l1", fuse=fuse)
    block = converted.get_submodule("1")
    assert type(block) is nn.Sequential and list(block._modules) == ["norm", *kept]
    assert type(block.norm) is tritonorm.L1BatchNorm2d and block.norm.activation is None
    assert all(getattr(block, name) is not getattr(model[1], name) for name in kept)  # the copy's modules
    x = torch.randn(2, 3, 6, 6) * 2
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), model.eval()(x), rtol=1e-5, atol=1e-5)
        torch.manual_seed(1)
        got = converted.train()(x)
        torch.manual_seed(1)
        model.train()  # its drop
        normalized = tritonorm.functional.l1_batch_norm(model[0](x), weight=model[1].weight, bias=model[1].bias,
                                                        training=True)
        torch.testing.assert_close(got, model[1].act(model[1].drop(normalized)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module, message", [
    (OwnForward(4), (r"model.1 \(OwnForward\): a BatchNorm subclass that overrides forward: an Lp layer in its "
                     r"place would not compute what it does")),
    (WithSubmodule(4), r"model.1 \(WithSubmodule\): a BatchNorm subclass that owns submodules \(scale\)"),
    (UnusedAct(4), r"model.1 \(UnusedAct\): a BatchNorm subclass that owns submodules \(act\)"),
])
@pytest.mark.parametrize("fuse", [False, True])
def test_batchnorm_subclass_refusals(module, message, fuse):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), module)
    with pytest.raises(ValueError, match=message):
        tritonorm.convert(model, "topk", fuse=fuse)


def test_equinorm_leaves_batchnorm_act_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"`1` \(BatchNormAct2d\): a BatchNorm subclass that overrides forward and "
                                         r"owns submodules \(drop, act\): EquiNorm would drop what it adds"):
        converted = tritonorm.convert(model, "equinorm")
    assert type(converted.get_submodule("1")) is BatchNormAct2d


# --- nn.SyncBatchNorm ---------------------------------------------------------------


class SyncModel(nn.Module):
    """What nn.SyncBatchNorm.convert_sync_batchnorm makes of a ResNet stem and block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv3x3(3, 8), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 8)

    def forward(self, x):
        return self.block(self.stem(x))


@pytest.mark.parametrize("fuse", [False, True])
def test_sync_batchnorm_becomes_the_synchronized_layer(fuse, world_of_one):
    model = randomized(nn.SyncBatchNorm.convert_sync_batchnorm(SyncModel(), process_group=world_of_one)).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = tritonorm.convert(model, "linf", fuse=fuse)
    layers = list(lp_layers(converted).values())
    assert [type(m) for m in layers] == [tritonorm.SyncLinfBatchNorm] * 3
    assert all(m.process_group is world_of_one for m in layers)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    assert type(tritonorm.convert(nn.SyncBatchNorm(4), "l1")) is tritonorm.SyncL1BatchNorm


def _sync_model():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(2, 4), nn.BatchNorm1d(4)))
    return randomized(model).eval()


def test_equinorm_leaves_sync_batchnorm_alone_without_a_process_group():
    model = _sync_model()
    model[3] = nn.BatchNorm1d(4)
    with pytest.warns(UserWarning, match=r"`1` \(SyncBatchNorm\): an nn.SyncBatchNorm over the default process group, "
                      "which does not exist before torch.distributed.init_process_group"):
        converted = tritonorm.convert(model, "equinorm")
    assert type(converted.get_submodule("1")) is nn.SyncBatchNorm
    assert type(converted.get_submodule("2")) is tritonorm.EquiNormLinear


def test_equinorm_synchronizes_where_sync_batchnorm_did(world_of_one):
    """An nn.SyncBatchNorm becomes an EquiNorm layer summing its input mass over the
    BatchNorm's group (the default one: torch.distributed.group.WORLD)."""
    converted = tritonorm.convert(_sync_model(), "equinorm")
    assert [type(converted.get_submodule(name)) for name in ("0", "2")] == [
        tritonorm.EquiNormConv2d, tritonorm.EquiNormLinear]
    assert all(converted.get_submodule(name).process_group is world_of_one for name in ("0", "2"))
