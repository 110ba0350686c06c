"""ENorm on residual networks: ``ENorm.from_model(model, residual=True)`` balances the pairs
inside each residual branch and leaves every layer whose output meets a skip connection
alone, so the network computes the same function after any number of cycles."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close
from torch import nn

from tritonorm import ENorm
from tritonorm.reference import enorm as ref


def conv(c_in, c_out, k=3, stride=1, bias=True):
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=bias)


class BasicBlock(nn.Module):
    """conv3x3 -> (BN) -> ReLU -> conv3x3 -> (BN), added to the identity or a downsample conv."""

    def __init__(self, c_in=4, c_out=4, stride=1, bn=False, downsample=False, mid=nn.ReLU):
        super().__init__()
        self.conv1, self.conv2 = conv(c_in, c_out, stride=stride, bias=not bn), conv(c_out, c_out, bias=not bn)
        self.bn1, self.bn2 = (nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)) if bn else (nn.Identity(), nn.Identity())
        self.act = mid()
        self.downsample = (nn.Sequential(conv(c_in, c_out, 1, stride, bias=not bn),
                                         nn.BatchNorm2d(c_out) if bn else nn.Identity()) if downsample else None)

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """conv1x1 -> ReLU -> conv3x3 -> ReLU -> conv1x1 (BN after each with bn), plus the skip."""

    def __init__(self, c_in=8, width=4, stride=1, bn=False, downsample=False):
        super().__init__()
        c_out = 2 * width if downsample else c_in
        self.conv1, self.conv2 = conv(c_in, width, 1, bias=not bn), conv(width, width, 3, stride, bias=not bn)
        self.conv3 = conv(width, c_out, 1, bias=not bn)
        norm = nn.BatchNorm2d if bn else (lambda c: nn.Identity())
        self.bn1, self.bn2, self.bn3 = norm(width), norm(width), norm(c_out)
        self.downsample = nn.Sequential(conv(c_in, c_out, 1, stride, bias=not bn), norm(c_out)) if downsample else None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return (out + identity).relu()


class DenseLayer(nn.Module):
    """DenseNet's merge: conv1x1 -> ReLU -> conv3x3, its output concatenated to the input."""

    downsample = None

    def __init__(self, c_in=4, growth=3):
        super().__init__()
        self.conv1, self.conv2 = conv(c_in, 2 * growth, 1), conv(2 * growth, growth)

    def forward(self, x):
        return torch.cat([x, self.conv2(F.relu(self.conv1(x)))], 1)


class ResNet(nn.Module):
    """A stem, two basic blocks (the second downsampling) and a two-layer head."""

    def __init__(self, bn=False):
        super().__init__()
        self.stem = conv(3, 4, bias=not bn)
        self.blocks = nn.Sequential(BasicBlock(4, 4, bn=bn), BasicBlock(4, 8, stride=2, bn=bn, downsample=True))
        self.fc1, self.fc2 = nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1))))


BLOCKS = {
    "basic": lambda bn=False: BasicBlock(bn=bn),
    "basic-downsample": lambda bn=False: BasicBlock(4, 6, stride=2, bn=bn, downsample=True),
    "bottleneck": lambda bn=False: Bottleneck(bn=bn),
    "bottleneck-downsample": lambda bn=False: Bottleneck(bn=bn, stride=2, downsample=True),
    "dense": DenseLayer,
}


def branch_of(block):
    return [block.conv1, block.conv2, *([block.conv3] if isinstance(block, Bottleneck) else [])]


def unbalance_(layers):
    """Scale each hidden unit's row by d and its column by 1/d (d from 1/8 to 8): the same
    function, far from balanced."""
    with torch.no_grad():
        for first, second in zip(layers[:-1], layers[1:], strict=True):
            d = torch.exp2(torch.empty(first.weight.shape[0]).uniform_(-3, 3))
            first.weight.mul_(d.view(-1, *[1] * (first.weight.dim() - 1)))
            if first.bias is not None:
                first.bias.mul_(d)
            second.weight.div_(d.view(1, -1, *[1] * (second.weight.dim() - 2)))


def objective(layers):
    return ref.objective([m.weight.detach().double().flatten(1) for m in layers], [None] * len(layers), 1.0, 2.0)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_from_model_finds_the_branch_and_leaves_the_skip_alone(name):
    block = BLOCKS[name]()
    enorm = ENorm.from_model(block, residual=True)
    assert enorm.layers == [] and len(enorm.branches) == 1
    assert enorm.branches[0] == branch_of(block)
    assert enorm.pairs == len(branch_of(block)) - 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_blocks_keep_their_function_and_balance(name, backend):
    block = BLOCKS[name]()
    branch = branch_of(block)
    unbalance_(branch)
    x = torch.randn(2, branch[0].in_channels, 6, 6)
    before = block(x)
    kept = [p.detach().clone() for p in (block.downsample or nn.Identity()).parameters()]
    last_rows = branch[-1].bias.detach().clone()
    enorm = ENorm.from_model(block, residual=True, backend=backend)
    values = [objective(branch).item()]
    for _ in range(3):
        enorm.step()
        values.append(objective(branch).item())
    assert_close(block(x), before, torch.float32, "block output", scale=before.abs().max().item())
    assert values[-1] < 0.5 * values[0] and all(b <= a * (1 + 1e-6) for a, b in zip(values, values[1:], strict=False))
    # the layers whose output meets the add keep their output scale: the skip path's weights
    # and the branch's last bias (its rows) are untouched
    assert all(torch.equal(p, q) for p, q in zip((block.downsample or nn.Identity()).parameters(), kept, strict=True))
    assert torch.equal(branch[-1].bias, last_rows)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resnet_keeps_its_function_with_an_optimizer(backend):
    model = ResNet()
    blocks = list(model.blocks)
    for block in blocks:
        unbalance_(branch_of(block))
    unbalance_([model.fc1, model.fc2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    enorm = ENorm.from_model(model, optimizer, residual=True, balance_last=True, backend=backend)
    assert enorm.layers == [model.fc1, model.fc2]
    assert enorm.branches == [branch_of(b) for b in blocks]
    assert enorm.pairs == 3
    stem = model.stem.weight.detach().clone()
    before = model(x)
    objectives = [objective(branch_of(b)).item() for b in blocks]
    enorm.step()
    enorm.step()
    assert_close(model(x), before, torch.float32, "model output", scale=before.abs().max().item())
    assert torch.equal(model.stem.weight, stem)
    assert all(objective(branch_of(b)).item() < o for b, o in zip(blocks, objectives, strict=True))
    assert "2 branches" in repr(enorm)


def test_resnet_with_batchnorm_needs_allow_batchnorm():
    model = ResNet(bn=True)
    with pytest.raises(ValueError, match=r"BatchNorm `blocks.0.bn1` \(BatchNorm2d\) sits between `blocks.0.conv1` "
                                         r"\(Conv2d\) and `blocks.0.conv2` \(Conv2d\).*allow_batchnorm=True"):
        ENorm.from_model(model, residual=True)
    enorm = ENorm.from_model(model, residual=True, allow_batchnorm=True)
    assert enorm.branches == [branch_of(b) for b in model.blocks]
    assert enorm.layers == [model.fc1, model.fc2] and enorm.pairs == 2  # balance_last=False: the head's pair stays
    before = objective(branch_of(model.blocks[0]))
    unbalance_(branch_of(model.blocks[0]))
    assert objective(branch_of(model.blocks[0])) > before
    enorm.step()
    assert objective(branch_of(model.blocks[0])) < before * 1.5


def test_plain_chain_is_the_same_with_residual():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    enorm = ENorm.from_model(model, residual=True)
    assert enorm.layers == [model[0], model[2], model[4]] and enorm.branches == [] and enorm.pairs == 1
    assert "branches" not in enorm.state_dict() and "branches" not in repr(enorm)


class AllMeetSkips(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


class SharedInBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return x + self.b(F.relu(self.a(F.relu(self.a(x)))))


@pytest.mark.parametrize("model, message", [
    (BasicBlock(mid=nn.Tanh), r"`act` \(Tanh\) between `conv1` \(Conv2d\) and `conv2` \(Conv2d\) is not a positively "
                              r"homogeneous"),
    (AllMeetSkips(), r"found no pair of Linear/Conv layers in AllMeetSkips"),
    (SharedInBranch(), r"`a` \(Linear\) is called twice"),
], ids=["tanh", "no-pair", "shared"])
def test_residual_refuses(model, message):
    with pytest.raises(ValueError, match=message):
        ENorm.from_model(model, residual=True)


def test_residual_flag_and_default():
    with pytest.raises(TypeError, match=r"residual must be a bool, got 1"):
        ENorm.from_model(BasicBlock(), residual=1)
    with pytest.raises(ValueError, match=r"`x` feeds `conv1` \(Conv2d\), `add` \(add\).*residual"):
        ENorm.from_model(BasicBlock())


def test_branches_state_dict_and_optimizer_errors():
    block = Bottleneck()
    enorm = ENorm.from_model(block, residual=True, c=1.2)
    state = enorm.state_dict()
    assert state["branch_layers"] == [3] and state["num_layers"] == 0
    other = ENorm([], branches=[branch_of(Bottleneck())])
    other.load_state_dict(state)
    assert other.c == 1.2
    with pytest.raises(ValueError, match=r"state_dict: saved for branches of \[3\] layers, this one has \[2\]"):
        ENorm([], branches=[branch_of(BasicBlock())]).load_state_dict(state)
    optimizer = torch.optim.SGD([block.conv1.weight], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer: branches\[0\]\[0\].bias is not among"):
        ENorm.from_model(block, optimizer, residual=True)
    with pytest.raises(ValueError, match=r"branches\[0\]: a branch needs at least 2 layers \(got 1\)"):
        ENorm([], branches=[[block.conv1]])
    with pytest.raises(ValueError, match=r"a module appears in two chains"):
        ENorm([block.conv1, block.conv2, block.conv3], branches=[[block.conv2, block.conv3]])
