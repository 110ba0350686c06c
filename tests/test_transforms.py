"""The transforms a PyTorch model goes through, for every layer on both paths:
torch.compile (fullgraph, dynamic=True, and a loop of 6 batch sizes that may compile at
most 2 frames), torch.export with a dynamic batch dimension in eval and in training,
torch.fx tracing, torch.func (grad, vmap) and double backward (docs/api.md, "Transforms")."""

import copy

import pytest
import torch
from torch import fx, nn
from torch._dynamo.utils import counters
from torch.export import Dim

import tritonorm

BACKENDS = ("triton", "torch")
BATCH_SIZES = range(2, 8)


def _make(name: str, backend: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A fresh layer and the per-sample shape of its input."""
    torch.manual_seed(0)
    layers = {
        "l1": (lambda: tritonorm.L1BatchNorm2d(4, backend=backend), (4, 3, 3)),
        "linf": (lambda: tritonorm.LinfBatchNorm2d(4, backend=backend), (4, 3, 3)),
        "topk": (lambda: tritonorm.TopkBatchNorm1d(4, k=3, backend=backend), (4, 5)),
        "equinorm_conv": (lambda: tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend), (3, 4, 4)),
        "equinorm_linear": (lambda: tritonorm.EquiNormLinear(5, 4, backend=backend), (5,)),
        "equinorm_fraction": (lambda: tritonorm.EquiNormLinear(5, 4, stats_fraction=0.5, backend=backend), (5,)),
        "bounded_wn": (lambda: tritonorm.BoundedWNConv2d(3, 4, 3, learnable_gain=True, backend=backend), (3, 4, 4)),
        "mean_only": (lambda: tritonorm.MeanOnlyBatchNorm2d(4, backend=backend), (4, 3, 3)),
        "lp_fused": (lambda: _Residual(tritonorm.TopkBatchNorm2d(4, k=3, activation="silu", backend=backend)),
                     (4, 3, 3)),
    }
    factory, sample = layers[name]
    return factory(), sample


LAYERS = ("l1", "linf", "topk", "equinorm_conv", "equinorm_linear", "bounded_wn", "mean_only")


class _Residual(nn.Module):
    """An Lp layer with its fused activation and residual add: bn(x, residual=x^2)."""

    def __init__(self, bn: nn.Module):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        return self.bn(x, residual=x.square())


def _input(batch: int, sample: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + batch)
    return torch.rand((batch, *sample), generator=g) + 0.1  # positive: EquiNorm's assumption


def _step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward and backward; the output, the input's and the parameters' gradients."""
    x = x.clone().requires_grad_()
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    return [y.detach(), *grads]


def _assert_all_close(got, expected):
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _assert_same_state(a: nn.Module, b: nn.Module):
    _assert_all_close([*a.state_dict().values()], [*b.state_dict().values()])


# ----------------------------------------------------------------------------- torch.compile


def _compiled_frames(name: str, backend: str, batches, *, training: bool = True, **options) -> int:
    """The frames torch.compile(fullgraph=True, **options) compiles for a loop over
    ``batches`` (forward and backward), each step and the final state checked against the
    eager layer."""
    torch._dynamo.reset()
    counters.clear()
    eager, sample = _make(name, backend)
    eager.train(training)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager", **options)
    for batch in batches:
        x = _input(batch, sample)
        _assert_all_close(_step(compiled, x), _step(eager, x))
    _assert_same_state(compiled_layer, eager)
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*LAYERS, "equinorm_fraction"])
def test_compile_over_batch_sizes(name, backend):
    """A training loop over 6 batch sizes compiles at most 2 frames (the first size, then
    one dynamic graph), as nn.BatchNorm2d does, and matches eager at every size.  (With
    stats_fraction=0.5 the sizes start at 4: a batch whose statistics come from one sample
    gets a frame of its own, torch specializing sizes of 1.)"""
    batches = BATCH_SIZES if name != "equinorm_fraction" else range(4, 10)
    assert _compiled_frames(name, backend, batches) <= 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_dynamic(name, backend, training):
    """fullgraph=True with dynamic=True: one frame for every batch size (module floats
    such as eps and momentum arrive symbolic).  The sizes are ones no other dim has (torch
    would guard on the equality)."""
    assert _compiled_frames(name, backend, (6, 9), training=training, dynamic=True) == 1


# ----------------------------------------------------------------------------- torch.export


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*LAYERS, "lp_fused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_dynamic_batch(name, backend, training):
    """torch.export with a dynamic batch dimension; the exported program, run at two other
    batch sizes, gives the eager layer's outputs and (training) running statistics."""
    eager, sample = _make(name, backend)
    eager.train(training)
    exported = torch.export.export(
        copy.deepcopy(eager), (_input(4, sample),), dynamic_shapes=({0: Dim("batch", min=2, max=64)},),
    ).module()
    for batch in (3, 9):
        x = _input(batch, sample)
        torch.testing.assert_close(exported(x), eager(x), atol=1e-5, rtol=1e-4)
    _assert_same_state(exported, eager)


# ----------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(name, training):
    """torch.fx traces every layer (as one call of a wrapped function, checks included) and
    the traced module computes what the layer does, running statistics included."""
    layer, sample = _make(name, "torch")
    layer.train(training)
    traced = fx.symbolic_trace(copy.deepcopy(layer))
    x = _input(4, sample)
    torch.testing.assert_close(traced(x), layer(x))
    _assert_same_state(traced, layer)


def _mlp(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), norm, nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_enorm_from_model_sees_tritonorm_batch_norms():
    """An Lp BatchNorm between two weights is a batch norm to from_model: refused, naming it,
    unless allow_batchnorm=True (the paper's ENorm + BN)."""
    model = _mlp(tritonorm.L1BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"BatchNorm `1` \(L1BatchNorm1d\) sits between `0` \(Linear\) and `3`"):
        tritonorm.ENorm.from_model(model)
    enorm = tritonorm.ENorm.from_model(model, allow_batchnorm=True)
    assert enorm.layers == [model[0], model[3], model[5]]


def test_enorm_from_model_refuses_equinorm_naming_it():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), tritonorm.EquiNormLinear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"EquiNorm layer `2` \(EquiNormLinear\) sits between `0` \(Linear\)"):
        tritonorm.ENorm.from_model(model)


class _Block(nn.Module):
    """A user's block that calls tritonorm's functional API in its own forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.v = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return nn.functional.conv2d(x, tritonorm.functional.bounded_weight(self.v, 1.0, backend="torch"))


def test_convert_traces_models_that_use_tritonorm():
    """convert's torch.fx pass goes through tritonorm's layers and functions: a model already
    converted, or calling tritonorm.functional, converts again."""
    model = nn.Sequential(_Block(), tritonorm.TopkBatchNorm2d(4, k=3), nn.ReLU()).eval()
    x = _input(2, (3, 5, 5))
    converted = tritonorm.convert(model, "equinorm")
    assert type(converted.get_submodule("0.conv")).__name__ == "EquiNormConv2d"
    assert converted(x).shape == model(x).shape
    again = tritonorm.convert(tritonorm.convert(model, "l1"), "bounded_wn")
    assert again(x).shape == model(x).shape


# ----------------------------------------------------------------------------- torch.func


@pytest.mark.parametrize("name", LAYERS)
def test_func_grad_on_the_torch_path(name):
    """torch.func.grad with the buffers passed in (as nn.BatchNorm needs in training) gives
    autograd's gradients."""
    layer, sample = _make(name, "torch")
    x = _input(4, sample)
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    reference = copy.deepcopy(layer)

    def loss(params, buffers, x):
        return torch.func.functional_call(layer, (params, buffers), (x,)).square().sum()

    grads = torch.func.grad(loss)(params, {k: b.clone() for k, b in buffers.items()}, x)
    expected = torch.autograd.grad(reference(x).square().sum(), list(reference.parameters()))
    _assert_all_close([grads[k] for k in params], expected)


@pytest.mark.parametrize("name", LAYERS)
def test_func_grad_on_the_triton_path_is_one_clear_error(name):
    layer, sample = _make(name, "triton")
    params, buffers = dict(layer.named_parameters()), dict(layer.named_buffers())

    def loss(params, x):
        return torch.func.functional_call(layer, (params, buffers), (x,)).square().sum()

    with pytest.raises(RuntimeError, match=r"torch.func.grad / vjp / jvp / jacrev / jacfwd cannot differentiate"):
        torch.func.grad(loss)(params, _input(4, sample))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LAYERS)
def test_vmap_in_eval_is_a_loop_over_the_batch(name, backend):
    layer, sample = _make(name, backend)
    layer.eval()
    xs = torch.stack([_input(3, sample, seed) for seed in range(2)])
    torch.testing.assert_close(torch.func.vmap(layer)(xs), torch.stack([layer(x) for x in xs]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["l1", "topk", "equinorm_linear"])
def test_vmap_in_training_with_running_statistics_is_refused(name, backend):
    """As nn.BatchNorm: the unbatched running buffers cannot take a batched update; nothing
    is updated."""
    layer, sample = _make(name, backend)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(RuntimeError, match=r"vmap: the running statistics are updated in place but are not batched"):
        torch.func.vmap(layer)(torch.stack([_input(3, sample, seed) for seed in range(2)]))
    _assert_all_close(layer.state_dict().values(), before.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_in_training_without_running_statistics(backend):
    layer = tritonorm.LinfBatchNorm1d(4, track_running_stats=False, backend=backend)
    xs = torch.stack([_input(5, (4,), seed) for seed in range(3)])
    torch.testing.assert_close(torch.func.vmap(layer)(xs), torch.stack([layer(x) for x in xs]))


# ----------------------------------------------------------------------------- double backward


@pytest.mark.parametrize("name", LAYERS)
def test_double_backward(name):
    """Twice differentiable on the PyTorch path; on the Triton path one clear error."""
    x = _input(4, _make(name, "torch")[1]).requires_grad_()
    for backend in BACKENDS:
        layer, _ = _make(name, backend)
        params = list(layer.parameters())
        grads = torch.autograd.grad(layer(x).square().sum(), [x, *params], create_graph=True)
        penalty = sum(g.square().sum() for g in grads)  # its gradient goes through the op's backward
        if backend == "torch":
            assert all(g is not None for g in torch.autograd.grad(penalty, params))
        else:
            with pytest.raises(RuntimeError, match=r"double backward through tritonorm::\w+ is not supported"):
                penalty.backward()
