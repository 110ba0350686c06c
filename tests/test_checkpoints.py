"""nn.BatchNorm checkpoints load into the L1 / L-inf / Top-k layers: a whole model's
state_dict, built with ``norm_layer=nn.BatchNorm2d``, into the same model built with an Lp
layer gives the BatchNorm model's eval output, with a warning (one message, shown once); strict
loading still reports real mismatches; an Lp layer's own state_dict loads as before."""

import functools
import warnings

import pytest
import torch
from torch import nn

import tritonorm
from tritonorm.nn.lp_batchnorm import running_dev_from_var

# The error tests load BatchNorm checkpoints, which warn; the warning has its own tests.
quiet = pytest.mark.filterwarnings("ignore:load_state_dict. an nn.BatchNorm checkpoint:UserWarning")

LP2D = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}
LP1D = {"l1": tritonorm.L1BatchNorm1d, "linf": tritonorm.LinfBatchNorm1d, "topk": tritonorm.TopkBatchNorm1d}
LP3D = {"l1": tritonorm.L1BatchNorm3d, "linf": tritonorm.LinfBatchNorm3d, "topk": tritonorm.TopkBatchNorm3d}


# --- a torchvision-style ResNet in miniature, built with any norm_layer ------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, norm_layer):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm_layer(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    def __init__(self, norm_layer=nn.BatchNorm2d, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm_layer(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1, norm_layer))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, norm_layer))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


NORM_PREFIXES = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1", "layer2.0.bn2", "layer2.0.downsample.1"]


def pretrained(dtype=torch.float32):
    """A TinyResNet with BatchNorms whose weights and running statistics are not the
    defaults (two training batches, then random affine parameters), in eval mode."""
    torch.manual_seed(0)
    model = TinyResNet().to(dtype)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 8, 8, dtype=dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def load(model, state_dict, **kwargs):
    """model.load_state_dict(state_dict), and the warnings it gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = model.load_state_dict(state_dict, **kwargs)
    return result, [w for w in record if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("norm", list(LP2D))
def test_batchnorm_model_state_dict_gives_batchnorm_eval_output(norm):
    bn_model = pretrained()
    lp_model = TinyResNet(norm_layer=LP2D[norm]).eval()
    result, record = load(lp_model, bn_model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys and len(record) == len(NORM_PREFIXES)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lp_model(x), bn_model(x), rtol=1e-5, atol=1e-5)
    # The map is convert's: the loaded buffers are exactly the converted model's.
    converted = tritonorm.convert(bn_model, norm)
    for key, value in converted.state_dict().items():
        assert torch.equal(lp_model.state_dict()[key], value), key
    for prefix in NORM_PREFIXES:
        bn = bn_model.get_submodule(prefix)
        assert torch.equal(lp_model.get_submodule(prefix).running_dev, running_dev_from_var(bn.running_var, bn.eps))


def test_the_warning_is_one_message_shown_once_per_model():
    """Every layer warns with the same message, so that Python's default filter shows it
    once for the whole model (and "always" once per layer)."""
    bn_state = pretrained().state_dict()
    lp_model = TinyResNet(norm_layer=tritonorm.L1BatchNorm2d)
    _, record = load(lp_model, bn_state)
    assert len(record) == len(NORM_PREFIXES) and len({str(w.message) for w in record}) == 1
    message = str(record[0].message)
    assert "running_var" in message and "running_dev = sqrt(running_var + eps) - eps" in message
    assert "tritonorm.recalibrate" in message
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        lp_model.load_state_dict(bn_state)
    assert len(shown) == 1


def test_layer_loads_a_batchnorm_state_dict_directly():
    bn = nn.BatchNorm2d(4)
    bn.running_var.uniform_(0.5, 2)
    layer = tritonorm.TopkBatchNorm2d(4)
    _, record = load(layer, bn.state_dict())
    assert len(record) == 1
    assert torch.equal(layer.running_dev, running_dev_from_var(bn.running_var, bn.eps))


@pytest.mark.parametrize("norm", list(LP2D))
def test_own_state_dict_round_trip_without_warning(norm):
    source = TinyResNet(norm_layer=LP2D[norm])
    with torch.no_grad():
        source(torch.randn(8, 3, 8, 8))  # running statistics move
    target = TinyResNet(norm_layer=LP2D[norm])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


@quiet
def test_strict_loading_reports_a_missing_key():
    state = pretrained().state_dict()
    del state["layer1.0.bn2.running_var"]  # neither running_var nor running_dev
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "layer1.0.bn2.running_dev"'):
        TinyResNet(norm_layer=tritonorm.L1BatchNorm2d).load_state_dict(state)
    result, _ = load(TinyResNet(norm_layer=tritonorm.L1BatchNorm2d), state, strict=False)
    assert result.missing_keys == ["layer1.0.bn2.running_dev"] and not result.unexpected_keys


@quiet
@pytest.mark.parametrize("strict", [True, False])
def test_wrong_shape_is_an_error(strict):
    state = pretrained().state_dict()
    state["bn1.running_var"] = torch.ones(5)
    with pytest.raises(RuntimeError, match=r"size mismatch for bn1.running_dev: copying a param with shape "
                                           r"torch.Size\(\[5\]\)"):
        TinyResNet(norm_layer=tritonorm.L1BatchNorm2d).load_state_dict(state, strict=strict)


@quiet
def test_running_var_and_running_dev_both_present():
    """running_dev is loaded as it is; running_var is an unexpected key (strict: an error)."""
    state = pretrained().state_dict()
    state["bn1.running_dev"] = torch.full((8,), 0.75)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bn1.running_var"'):
        TinyResNet(norm_layer=tritonorm.L1BatchNorm2d).load_state_dict(state)
    model = TinyResNet(norm_layer=tritonorm.L1BatchNorm2d)
    result, record = load(model, state, strict=False)
    assert result.unexpected_keys == ["bn1.running_var"] and not result.missing_keys
    assert torch.equal(model.bn1.running_dev, torch.full((8,), 0.75))
    assert len(record) == 5  # the other layers; bn1 loads its own running_dev


@quiet
def test_unexpected_extra_key():
    state = pretrained().state_dict()
    state["layer2.0.bn1.running_std"] = torch.ones(16)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "layer2.0.bn1.running_std"'):
        TinyResNet(norm_layer=tritonorm.LinfBatchNorm2d).load_state_dict(state)


def test_layer_without_running_stats_rejects_them_as_batchnorm_does():
    state = pretrained().state_dict()
    model = TinyResNet(norm_layer=functools.partial(tritonorm.L1BatchNorm2d, track_running_stats=False))
    reference = TinyResNet(norm_layer=functools.partial(nn.BatchNorm2d, track_running_stats=False))
    lp_result, record = load(model, state, strict=False)
    bn_result = reference.load_state_dict(state, strict=False)
    assert sorted(lp_result.unexpected_keys) == sorted(bn_result.unexpected_keys) != []
    assert not record


@quiet
@pytest.mark.parametrize("version", [None, 1])
def test_old_batchnorm_checkpoint_without_num_batches_tracked(version):
    """A checkpoint of torch < 0.4.1 (metadata version None or 1, no num_batches_tracked)
    loads as nn.BatchNorm loads it: the count is kept; with version 2 the key is missing."""
    state = pretrained().state_dict()
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]
    for prefix in NORM_PREFIXES:
        state._metadata[prefix] = {} if version is None else {"version": version}
    model = TinyResNet(norm_layer=tritonorm.L1BatchNorm2d)
    model.layer1[0].bn1.num_batches_tracked.fill_(7)
    reference = TinyResNet()
    reference.layer1[0].bn1.num_batches_tracked.fill_(7)
    load(model, state)  # strict
    reference.load_state_dict(state)
    for prefix in NORM_PREFIXES:
        assert torch.equal(model.get_submodule(prefix).num_batches_tracked,
                           reference.get_submodule(prefix).num_batches_tracked)
    assert model.layer1[0].bn1.num_batches_tracked.item() == 7
    for prefix in NORM_PREFIXES:
        state._metadata[prefix] = {"version": 2}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "bn1.num_batches_tracked"'):
        TinyResNet(norm_layer=tritonorm.L1BatchNorm2d).load_state_dict(state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_buffers(dtype):
    """A half-precision checkpoint into a half-precision model: the map computes in float64
    and rounds once; the eval output is the BatchNorm's to the dtype's rounding."""
    bn_model = pretrained(dtype)
    lp_model = TinyResNet(norm_layer=functools.partial(tritonorm.L1BatchNorm2d, dtype=dtype)).to(dtype).eval()
    load(lp_model, bn_model.state_dict())
    for prefix in NORM_PREFIXES:
        bn, layer = bn_model.get_submodule(prefix), lp_model.get_submodule(prefix)
        assert layer.running_dev.dtype == dtype
        expected = ((bn.running_var.double() + bn.eps).sqrt() - bn.eps).to(dtype)
        assert torch.equal(layer.running_dev, expected)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        reference = bn_model.float()(x)
        torch.testing.assert_close(lp_model(x.to(dtype)).float(), reference, rtol=0.05, atol=0.05)


def test_float32_checkpoint_into_bfloat16_model():
    bn_model = pretrained()
    lp_model = TinyResNet(norm_layer=tritonorm.LinfBatchNorm2d).to(torch.bfloat16)
    load(lp_model, bn_model.state_dict())
    bn = bn_model.bn1
    assert lp_model.bn1.running_dev.dtype == torch.bfloat16
    assert torch.equal(lp_model.bn1.running_dev, running_dev_from_var(bn.running_var, bn.eps).bfloat16())


@pytest.mark.parametrize("norm", list(LP1D))
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 7)])
def test_1d(norm, shape):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(5)
    bn(torch.randn(shape) * 3 + 1)
    model_bn = nn.Sequential(nn.Linear(5, 5) if len(shape) == 2 else nn.Identity(), bn).eval()
    model_lp = nn.Sequential(nn.Linear(5, 5) if len(shape) == 2 else nn.Identity(), LP1D[norm](5)).eval()
    load(model_lp, model_bn.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(model_lp(x), model_bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", list(LP3D))
def test_3d(norm):
    torch.manual_seed(0)
    model_bn = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4))
    model_bn(torch.randn(3, 2, 4, 4, 4))
    model_bn.eval()
    model_lp = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), LP3D[norm](4)).eval()
    _, record = load(model_lp, model_bn.state_dict())
    assert len(record) == 1
    x = torch.randn(2, 2, 4, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model_lp(x), model_bn(x), rtol=1e-5, atol=1e-5)


def test_assign_and_meta_device():
    """load_state_dict(assign=True) into a model built on the meta device (no memory for the
    random initialisation) gets real buffers, the converted running_dev among them."""
    bn_model = pretrained()
    with torch.device("meta"):
        lp_model = TinyResNet(norm_layer=tritonorm.L1BatchNorm2d)
    load(lp_model, bn_model.state_dict(), assign=True)
    lp_model.eval()
    assert lp_model.bn1.running_dev.device.type == "cpu"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(lp_model(x), bn_model(x), rtol=1e-5, atol=1e-5)


def test_the_callers_state_dict_is_left_as_it_was():
    state = pretrained().state_dict()
    keys = list(state)
    load(TinyResNet(norm_layer=tritonorm.L1BatchNorm2d), state)
    assert list(state) == keys and "bn1.running_var" in state and "bn1.running_dev" not in state
