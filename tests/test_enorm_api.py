"""ENorm's API: chain discovery with torch.fx, argument errors, state_dict."""

import math

import pytest
import torch
import torch.nn.functional as F
from enorm_utils import cnn, mlp, weight_layers
from torch import nn

from tritonorm import ENorm


class ViewCNN(nn.Module):
    """Functional ReLUs, a pool and x.view(x.size(0), -1) before the classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc1 = nn.Linear(6 * 2 * 2, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        return self.fc2(torch.relu(self.fc1(x)))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


@pytest.mark.parametrize("model, x", [
    (mlp((12, 9, 8, 4), bias=True), torch.randn(5, 12)),
    (cnn((3, 6, 5, 4), in_size=6), torch.randn(2, 3, 6, 6)),
    (ViewCNN(), torch.randn(2, 3, 8, 8)),
], ids=["mlp", "cnn-flatten", "cnn-view"])
def test_from_model_finds_the_chain(model, x):
    enorm = ENorm.from_model(model, balance_last=True, c=1.3)
    assert enorm.layers == weight_layers(model)
    before = model(x)
    enorm.step()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


def test_from_model_batchnorm_needs_the_flag():
    model = mlp((12, 9, 8, 4), batchnorm=True)
    with pytest.raises(ValueError, match=r"BatchNorm `1` \(BatchNorm1d\) sits between `0` \(Linear\) and `3` "
                                         r"\(Linear\).*allow_batchnorm=True"):
        ENorm.from_model(model)
    assert ENorm.from_model(model, allow_batchnorm=True).layers == weight_layers(model)


def test_from_model_refuses_a_resnet_block():
    with pytest.raises(ValueError, match=r"`x` feeds `conv1` \(Conv2d\), `add` \(add\).*residual"):
        ENorm.from_model(BasicBlock())


class Merge(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(F.relu(self.b(torch.relu(h))) * h.detach())


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(F.relu(self.a(F.relu(self.a(x)))))


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)), r"`1` \(Tanh\) between `0` \(Linear\) and "
                                                                 r"`2` \(Linear\) is not a positively homogeneous"),
    (nn.Sequential(nn.Linear(3, 4), nn.ReLU6(), nn.Linear(4, 4)), r"ReLU6.*not a positively homogeneous"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(0), nn.Linear(4, 4)), r"Flatten.*not a positively homogeneous"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)),
     r"exactly one flatten to \(N, -1\) between `0` \(Conv2d\) and `2` \(Linear\) \(found: none\)"),
    (nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2)),
     r"no flatten or reshape between `0` \(Linear\) and `3` \(Linear\) \(found: `2` \(Flatten\)\)"),
    (Merge(), r"`a` \(Linear\) feeds"),
    (Shared(), r"`a` \(Linear\) is called twice"),
    (nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), r"found 1 Linear/Conv layer"),
    (Branchy(), r"torch.fx could not trace Branchy"),
], ids=["tanh", "relu6", "flatten-batch", "conv-linear-no-flatten", "linear-flatten-linear", "merge", "shared",
        "one-layer", "untraceable"])
def test_from_model_refuses(model, message):
    with pytest.raises(ValueError, match=message):
        ENorm.from_model(model)


def test_from_model_needs_a_module():
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got function"):
        ENorm.from_model(lambda x: F.relu(x))


def test_from_model_ignores_what_is_outside_the_chain():
    """Normalising the input and a softmax after the last layer do not matter."""
    model = nn.Sequential(nn.BatchNorm1d(12), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(),
                          nn.Linear(8, 4), nn.Softmax(1))
    assert len(ENorm.from_model(model).layers) == 3


def chain():
    return weight_layers(mlp((6, 5, 4, 3), bias=True))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(c=0.0), ValueError, r"c must be a finite number > 0, got 0.0"),
    (dict(c=math.inf), ValueError, r"c must be a finite number > 0"),
    (dict(c=True), ValueError, r"c must be a finite number > 0, got True"),
    (dict(p=-1), ValueError, r"p must be a number > 0 \(math.inf allowed\), got -1"),
    (dict(p=math.nan), ValueError, r"p must be a number > 0 \(math.inf allowed\), got nan"),
    (dict(p=True), ValueError, r"p must be a number > 0 \(math.inf allowed\), got True"),
    (dict(eps=0), ValueError, r"eps must be a finite number > 0, got 0"),
    (dict(eps=True), ValueError, r"eps must be a finite number > 0, got True"),
    (dict(mode="jacobi"), ValueError, r"mode must be one of 'parallel', 'sequential', got 'jacobi'"),
    (dict(balance_last=1), TypeError, r"balance_last must be a bool, got 1"),
    (dict(scale_biases=0), TypeError, r"scale_biases must be a bool, got 0"),
    (dict(balance_biases=None), TypeError, r"balance_biases must be a bool, got None"),
    (dict(backend="cuda"), ValueError, r"backend must be one of 'auto', 'triton', 'torch', got 'cuda'"),
    (dict(balance_biases=True, scale_biases=False), ValueError, r"balance_biases=True needs scale_biases=True"),
])
def test_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        ENorm(chain(), **kwargs)


def test_bad_layers():
    with pytest.raises(ValueError, match=r"layers: ENorm needs at least 3 layers with balance_last=False \(got 2\)"):
        ENorm(chain()[:2])
    with pytest.raises(TypeError, match=r"layers\[1\]: expected nn.Linear or nn.Conv1d/2d/3d, got ReLU"):
        ENorm([nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)])
    with pytest.raises(ValueError, match=r"layers\[1\]: grouped convolutions \(groups=2\)"):
        ENorm([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)])
    with pytest.raises(ValueError, match=r"layers\[1\]: Conv2d with in_channels=5 cannot follow a layer with 4"):
        ENorm([nn.Conv2d(3, 4, 3), nn.Conv2d(5, 4, 3), nn.Conv2d(4, 2, 1)])
    with pytest.raises(ValueError, match=r"layers\[2\]: Linear with in_features=10 cannot follow a layer with 4"):
        ENorm([nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(10, 2)])
    with pytest.raises(ValueError, match=r"layers\[1\]: a convolution after a Linear layer"):
        ENorm([nn.Linear(3, 4), nn.Conv1d(4, 4, 1), nn.Linear(4, 2)])
    layer = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"layers\[2\]: the same module appears twice"):
        ENorm([nn.Linear(3, 4), layer, layer])
    layers = chain()
    with torch.no_grad():
        layers[1].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"layers\[1\].weight has non-finite entries"):
        ENorm(layers)


def test_bad_optimizer():
    layers = chain()
    params = [p for layer in layers for p in layer.parameters()]
    with pytest.raises(TypeError, match=r"optimizer: ENorm does not know how the state of LBFGS moves"):
        ENorm(layers, torch.optim.LBFGS(params))

    class Tracking(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            for p in self.state:
                self.state[p]["grad_ema"] = torch.zeros_like(p)

    optimizer = Tracking(params, lr=0.1, momentum=0.9)
    sum(layer.weight.sum() for layer in layers).backward()
    optimizer.step()
    with pytest.raises(TypeError, match=r"optimizer: unknown state 'grad_ema' of layers\[0\] in Tracking"):
        ENorm(layers, optimizer).step()


def test_construction_changes_nothing():
    layers = chain()
    before = [p.detach().clone() for layer in layers for p in layer.parameters()]
    ENorm(layers, torch.optim.SGD([p for layer in layers for p in layer.parameters()], lr=0.1, momentum=0.9))
    for p, b in zip((p for layer in layers for p in layer.parameters()), before, strict=True):
        assert torch.equal(p, b)


def test_state_dict_round_trip():
    enorm = ENorm(chain(), c=1.2, p=1.0, mode="sequential", balance_last=True, balance_biases=True, eps=1e-6,
                  backend="torch")
    state = enorm.state_dict()
    other = ENorm(chain())
    other.load_state_dict(state)
    assert other.state_dict() == state == {
        "num_layers": 3, "c": 1.2, "p": 1.0, "mode": "sequential", "balance_last": True, "scale_biases": True,
        "balance_biases": True, "eps": 1e-6, "backend": "torch", "optimizer_steps": 0,
    }
    assert other.pairs == 2
    with pytest.raises(ValueError, match=r"state_dict: saved for a chain of 3 layers, this one has 4"):
        ENorm(weight_layers(mlp((6, 5, 4, 3, 2)))).load_state_dict(state)
    with pytest.raises(KeyError, match=r"state_dict: missing \['mode'\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "mode"})
    with pytest.raises(ValueError, match=r"c must be a finite number > 0"):
        other.load_state_dict(state | {"c": -1.0})


def test_assigned_settings_are_checked_and_take_effect():
    layers = chain()
    enorm = ENorm(layers, backend="torch")
    enorm.step()
    bias = layers[0].bias.detach().clone()
    enorm.scale_biases = False
    enorm.step()
    assert torch.equal(layers[0].bias, bias)
    assert not torch.equal(layers[0].weight, ENorm(chain()).layers[0].weight)
    with pytest.raises(ValueError, match=r"c must be a finite number > 0, got -1"):
        enorm.c = -1
    assert enorm.c == 1.0
    with pytest.raises(ValueError, match=r"balance_biases=True needs scale_biases=True"):
        enorm.balance_biases = True


def test_optimizer_must_hold_the_rescaled_parameters():
    """The optimizer of another copy of the model, or one that misses a parameter the cycle
    rescales, would leave that parameter's state behind: refused, naming the parameter.
    Parameters the cycle does not touch, and frozen ones, need not be there."""
    layers = chain()
    other = chain()
    with pytest.raises(ValueError, match=r"optimizer: layers\[0\].weight is not among the optimizer's parameters"):
        ENorm(layers, torch.optim.SGD([p for layer in other for p in layer.parameters()], lr=0.1, momentum=0.9))

    def without(*missing):
        return torch.optim.Adam([p for layer in layers for p in layer.parameters() if all(p is not m for m in missing)])

    with pytest.raises(ValueError, match=r"optimizer: layers\[1\].weight is not among the optimizer's parameters"):
        ENorm(layers, without(layers[1].weight))
    with pytest.raises(ValueError, match=r"optimizer: layers\[0\].bias is not among the optimizer's parameters"):
        ENorm(layers, without(layers[0].bias))
    ENorm(layers, without(layers[0].bias), scale_biases=False)
    enorm = ENorm(layers, without(layers[2].weight, layers[2].bias))  # the last layer is left alone
    with pytest.raises(ValueError, match=r"optimizer: layers\[2\].weight is not among"):
        enorm.balance_last = True
    assert not enorm.balance_last
    layers[1].weight.requires_grad_(False)
    ENorm(layers, without(layers[1].weight))


def test_settings_are_declared_on_the_class():
    """Every setting is a typed attribute of ENorm (its annotations), set by name."""
    from tritonorm.enorm import _SETTINGS

    assert set(_SETTINGS) <= set(ENorm.__annotations__)
