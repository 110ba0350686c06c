"""Fused activation and residual add of the L1 / L-inf / Top-k batch norms:
out = act(bn(x) + residual).

The PyTorch path against the composition it replaces (the unfused layer, an add, a torch
activation module), values and gradients; gradcheck; the argument checks; the modules;
and the Triton path (``test_triton_*``, through the interpreter on CPU) against the
float64 PyTorch path."""

import math

import pytest
import torch
from lp_utils import NORMS, call, compare, random_input
from torch import nn

import tritonorm
from tritonorm.reference.activation import ACTIVATIONS, activate, activation_of

SLOPE = 0.2  # not leaky_relu's default: a dropped negative_slope shows

# The composition each fused form replaces: torch's own modules.
TORCH_ACTIVATIONS = {
    None: nn.Identity(),
    "relu": nn.ReLU(),
    "leaky_relu": nn.LeakyReLU(SLOPE),
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "hardswish": nn.Hardswish(),
}
LAYERS = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}


def test_activation_names_and_export():
    assert tritonorm.ACTIVATIONS == ACTIVATIONS == ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish")
    assert "ACTIVATIONS" in tritonorm.__all__
    assert set(TORCH_ACTIVATIONS) - {None} == set(ACTIVATIONS)


def test_activate_is_torch_activation():
    z = torch.linspace(-5, 5, 101, dtype=torch.float64)  # both sides of hardswish's +-3
    for name in ACTIVATIONS:
        torch.testing.assert_close(activate(z, name, SLOPE), TORCH_ACTIVATIONS[name](z), rtol=0, atol=0)
    assert activate(z, None, SLOPE) is z
    with pytest.raises(ValueError, match="activation must be None or one of 'relu'"):
        activate(z, "tanh", SLOPE)


def test_activation_of():
    f = nn.functional
    assert activation_of(nn.ReLU(inplace=True)) == ("relu", 0.01)
    assert activation_of(nn.LeakyReLU(0.3)) == ("leaky_relu", 0.3)
    assert activation_of(nn.SiLU()) == ("silu", 0.01)
    assert activation_of(nn.GELU()) == ("gelu", 0.01)
    assert activation_of(nn.GELU(approximate="tanh")) == ("gelu_tanh", 0.01)
    assert activation_of(nn.Hardswish()) == ("hardswish", 0.01)
    for fn, name in [(f.relu, "relu"), (torch.relu, "relu"), (f.leaky_relu, "leaky_relu"), (f.silu, "silu"),
                     (f.gelu, "gelu"), (f.hardswish, "hardswish")]:
        assert activation_of(fn) == (name, 0.01), fn

    class MyReLU(nn.ReLU):  # may compute anything: not recognized
        pass

    for other in (nn.ReLU6(), nn.Tanh(), nn.Sigmoid(), nn.Identity(), MyReLU(), torch.tanh, f.relu6, "relu", None,
                  [nn.ReLU()]):
        assert activation_of(other) is None, other


# --- the PyTorch path against the composition ---------------------------------------


def composed(norm, x, activation, residual, *, weight, bias, running_mean, running_dev, training, k=3):
    """The unfused functional + add + torch's activation module."""
    y = call(norm, x, backend="torch", k=k, weight=weight, bias=bias, running_mean=running_mean,
             running_dev=running_dev, training=training)
    return TORCH_ACTIVATIONS[activation](y if residual is None else y + residual)


def inputs(dtype, seed=0, shape=(4, 3, 5, 6)):
    """x, residual, weight (gamma up to 2.5, so that z reaches beyond +-3), bias."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = random_input(shape, dtype, "cpu", seed=seed)
    residual = torch.randn(shape, generator=g).to(dtype)
    weight = (torch.rand(c, generator=g) + 1.5).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    return x, residual, weight, bias


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_torch_path_is_the_composition(dtype, norm, activation, with_residual, training):
    x, residual, weight, bias = inputs(dtype)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
        xx, rr, ww, bb = leaves
        running = (0.1 * torch.ones(3, dtype=dtype), torch.full((3,), 1.3, dtype=dtype))
        kwargs = {"weight": ww, "bias": bb, "running_mean": running[0], "running_dev": running[1], "training": training}
        r = rr if with_residual else None
        if fused:
            y = call("l1" if norm is None else norm, xx, backend="torch", residual=r, activation=activation,
                     negative_slope=SLOPE, **kwargs)
        else:
            y = composed(norm, xx, activation, r, **kwargs)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
        y.backward(dy)
        results.append((y.detach(), *(t.grad for t in leaves), *running))
    names = ["y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_dev"]
    for name, a, b in zip(names, *results, strict=True):
        if name == "dresidual" and not with_residual:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert results[0][0].dtype == dtype
    if activation is not None:  # the activation did something here
        plain = call(norm, x, backend="torch", weight=weight, bias=bias, running_mean=running[0].clone(),
                     running_dev=running[1].clone(), training=training, residual=residual if with_residual else None)
        assert not torch.allclose(results[0][0], plain)


def test_one_rounding_at_the_end():
    """bf16: z + residual and the activation in fp32, then one rounding (the kernels' order),
    which is not the bf16 composition's three."""
    x, residual, weight, bias = inputs(torch.bfloat16, shape=(8, 4, 6, 6))
    y = call("l1", x, backend="torch", weight=weight, bias=bias, training=True, residual=residual,
             activation="silu")
    z = call("l1", x.float(), backend="torch", weight=weight.float(), bias=bias.float(), training=True)
    expected = nn.functional.silu(z + residual.float()).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    composed_bf16 = nn.functional.silu(call("l1", x, backend="torch", weight=weight, bias=bias, training=True)
                                       + residual)
    assert not torch.equal(y, composed_bf16)


@pytest.mark.parametrize("channels_last", [(False, True), (True, False), (True, True)], ids=str)
def test_any_residual_layout_output_keeps_input_format(channels_last):
    x, residual, weight, bias = inputs(torch.float32)
    expected = call("linf", x, backend="torch", weight=weight, bias=bias, training=True, residual=residual,
                    activation="relu")
    x_cl, r_cl = channels_last
    xx = x.to(memory_format=torch.channels_last) if x_cl else x
    rr = residual.to(memory_format=torch.channels_last) if r_cl else residual
    y = call("linf", xx, backend="torch", weight=weight, bias=bias, training=True, residual=rr, activation="relu")
    assert y.stride() == xx.stride()
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("norm, activation, training", [
    ("l1", "gelu", True), ("linf", "silu", False), ("topk", "leaky_relu", True), ("l1", "gelu_tanh", False),
    ("linf", "hardswish", True),
])
def test_gradcheck_float64(norm, activation, training):
    g = torch.Generator().manual_seed(3)
    shape = (3, 2, 4)
    x = random_input(shape, torch.float64, "cpu", seed=3).requires_grad_()
    residual = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(2, generator=g, dtype=torch.float64) + 1.5).requires_grad_()
    bias = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    running_mean, running_dev = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    def f(x, residual, weight, bias):
        stats = {} if training else {"running_mean": running_mean, "running_dev": running_dev}
        return call(norm, x, backend="torch", k=2, weight=weight, bias=bias, training=training, residual=residual,
                    activation=activation, negative_slope=SLOPE, **stats)

    assert torch.autograd.gradcheck(f, (x, residual, weight, bias))


# --- argument checks ------------------------------------------------------------------


def _state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"activation": "tanh"}, ValueError,
     r"activation must be None or one of 'relu', 'leaky_relu', 'silu', 'gelu', 'gelu_tanh', 'hardswish', got 'tanh'"),
    ({"activation": "ReLU"}, ValueError, r"activation must be None or one of .* got 'ReLU'"),
    ({"activation": "none"}, ValueError, r"activation must be None or one of .* got 'none'"),
    ({"activation": nn.ReLU()}, ValueError, r"activation must be None or one of .* got ReLU\(\)"),
    ({"negative_slope": math.nan}, ValueError, "negative_slope must be a finite number, got nan"),
    ({"negative_slope": math.inf}, ValueError, "negative_slope must be a finite number, got inf"),
    ({"negative_slope": True}, ValueError, "negative_slope must be a finite number, got True"),
    ({"negative_slope": "0.1"}, ValueError, "negative_slope must be a finite number, got '0.1'"),
    ({"negative_slope": None}, ValueError, "negative_slope must be a finite number, got None"),
    ({"residual": [1.0]}, TypeError, "residual must be a torch.Tensor or None, got list"),
    ({"residual": "device"}, ValueError, "residual is on meta but input is on cpu"),
])
@pytest.mark.parametrize("norm", NORMS)
def test_functional_errors(norm, kwargs, error, message):
    x = random_input((4, 3, 5, 6), torch.float32, "cpu")
    if kwargs.get("residual") == "device":
        kwargs = dict(kwargs, residual=torch.randn(4, 3, 5, 6, device="meta"))
    running_mean, running_dev = torch.zeros(3), torch.ones(3)
    for backend in ("torch", "triton"):  # checked before any backend runs
        with pytest.raises(error, match=message):
            call(norm, x, backend=backend, running_mean=running_mean, running_dev=running_dev, training=True,
                 **kwargs)
    assert torch.equal(running_mean, torch.zeros(3)) and torch.equal(running_dev, torch.ones(3))  # untouched
    if "residual" in kwargs:
        layer = LAYERS[norm](3, **({"k": 3} if norm == "topk" else {}), activation="relu")
        before = _state(layer)
        with pytest.raises(error, match=message):
            layer(x, residual=kwargs["residual"])
        after = _state(layer)
        assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked not counted


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("residual_shape, residual_dtype", [
    ((1, 3, 1, 1), torch.float32),  # a per-channel bias: broadcasts
    ((5, 6), torch.float32),  # broadcasts over batch and channels
    ((), torch.float32),  # a 0-d tensor
    ((4, 3, 5, 6), torch.float64),  # input's shape, another dtype: promotes
    ((2, 4, 3, 5, 6), torch.float32),  # broadcasts the norm's output up: a bigger output
], ids=["bias", "spatial", "0-d", "float64", "bigger"])
@pytest.mark.parametrize("norm", NORMS)
def test_unfusable_residual_is_added_as_torch_adds_it(norm, residual_shape, residual_dtype, backend):
    """A residual the epilogue cannot take (another shape or dtype) gives what the unfused
    code gives, act(bn(x) + residual) with torch's broadcasting and promotion: output, its
    dtype and shape, every gradient (the residual's summed over its broadcast dimensions),
    the running statistics and num_batches_tracked, counted once."""
    x, _, weight, bias = inputs(torch.float32)
    g = torch.Generator().manual_seed(3)
    residual = torch.randn(residual_shape, generator=g).to(residual_dtype)
    layers = []
    results = []
    for fused in (True, False):
        layer = LAYERS[norm](3, **({"k": 3} if norm == "topk" else {}), activation="silu" if fused else None,
                             backend=backend)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        xx, rr = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y = layer(xx, residual=rr) if fused else nn.functional.silu(layer(xx) + rr)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype))
        layers.append(layer)
        results.append((y.detach(), xx.grad, rr.grad, layer.weight.grad, layer.bias.grad, *layer.buffers()))
    assert results[0][0].shape == torch.broadcast_shapes(x.shape, residual_shape)
    assert results[0][0].dtype == torch.promote_types(x.dtype, residual_dtype)
    names = ["y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_dev", "num_batches_tracked"]
    for name, a, b in zip(names, *results, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert layers[0].num_batches_tracked.item() == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"activation": "swish"}, "activation must be None or one of 'relu', .* got 'swish'"),
    ({"activation": ""}, "activation must be None or one of .* got ''"),
    ({"negative_slope": math.nan}, "negative_slope must be a finite number, got nan"),
    ({"negative_slope": False}, "negative_slope must be a finite number, got False"),
])
def test_constructor_errors(kwargs, message):
    for cls in (tritonorm.L1BatchNorm1d, tritonorm.LinfBatchNorm3d, tritonorm.TopkBatchNorm2d):
        with pytest.raises(ValueError, match=message):
            cls(4, **kwargs)


# --- modules -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_module_forward_and_settings(activation):
    torch.manual_seed(0)
    x, residual = torch.randn(6, 4, 3, 3) * 2 + 1, torch.randn(6, 4, 3, 3)
    for norm, cls in LAYERS.items():
        extra = {"k": 4} if norm == "topk" else {}
        layer = cls(4, activation=activation, negative_slope=SLOPE, backend="torch", **extra)
        plain = cls(4, backend="torch", **extra)
        with torch.no_grad():
            layer.weight.uniform_(1.5, 2.5)
            layer.bias.normal_()
        plain.load_state_dict(layer.state_dict())  # same state: no new parameter or buffer
        assert layer.state_dict().keys() == plain.state_dict().keys()
        assert (layer.activation, layer.negative_slope) == (activation, SLOPE)
        for train in (True, False):
            layer.train(train)
            plain.train(train)
            torch.testing.assert_close(layer(x, residual=residual), TORCH_ACTIVATIONS[activation](plain(x) + residual))
            torch.testing.assert_close(layer(x), TORCH_ACTIVATIONS[activation](plain(x)))
            torch.testing.assert_close(layer(x, residual), TORCH_ACTIVATIONS[activation](plain(x) + residual))
        assert layer.num_batches_tracked.item() == plain.num_batches_tracked.item() == 3
        torch.testing.assert_close(layer.running_dev, plain.running_dev)


def test_module_extra_repr_and_defaults():
    layer = tritonorm.L1BatchNorm2d(8)
    assert (layer.activation, layer.negative_slope) == (None, 0.01)
    assert "activation" not in repr(layer) and "negative_slope" not in repr(layer)
    assert repr(tritonorm.TopkBatchNorm1d(8, k=3, activation="gelu_tanh")) == (
        "TopkBatchNorm1d(8, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, k=3, "
        "activation='gelu_tanh')")
    assert repr(tritonorm.LinfBatchNorm3d(2, activation="leaky_relu", negative_slope=0.2)).endswith(
        "track_running_stats=True, activation='leaky_relu', negative_slope=0.2)")
    assert tritonorm.L1BatchNorm2d(8, activation="relu").state_dict().keys() == layer.state_dict().keys()


def test_module_fx_trace_keeps_residual():
    """A layer's forward is one fx leaf call; the residual is one of its arguments."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = tritonorm.L1BatchNorm2d(3, activation="silu", backend="torch")

        def forward(self, x):
            return self.bn(x, residual=x)

    block = Block()
    traced = torch.fx.symbolic_trace(block)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(traced(x), block(x))


@pytest.mark.slow
def test_module_compiles_fullgraph():
    torch.manual_seed(0)
    layer = tritonorm.TopkBatchNorm2d(3, k=3, activation="leaky_relu", negative_slope=SLOPE, backend="torch")
    x, residual = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    eager = tritonorm.TopkBatchNorm2d(3, k=3, activation="leaky_relu", negative_slope=SLOPE, backend="torch")
    compiled = torch.compile(layer, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = compiled(xc, residual=residual)
    expected = eager(xe, residual=residual)
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(layer.running_dev, eager.running_dev)


# --- the Triton path (through the interpreter on CPU) ---------------------------------

TRITON_SHAPES = [((5, 3, 7, 6), False), ((5, 3, 7, 6), True), ((4, 5, 11), False)]
TRITON_DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("shape,channels_last", TRITON_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_triton_fused_training_parity(norm, dtype, shape, channels_last, device):
    """Values and gradients (x, residual, weight, bias) and running statistics against the
    float64 PyTorch path; an activation per case, the output in the input's format."""
    activation = ACTIVATIONS[(NORMS.index(norm) + TRITON_DTYPES.index(dtype) * 3 + len(shape)) % len(ACTIVATIONS)]
    x = random_input(shape, dtype, device, channels_last)
    tri, _ = compare(norm, x, residual=True, activation=activation, negative_slope=SLOPE)
    assert tri["y"].dtype == dtype and tri["dresidual"].dtype == dtype
    assert tri["y_stride"] == x.stride()


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_every_activation(activation, with_residual, device):
    x = random_input((6, 4, 5, 3), torch.float32, device)
    compare("l1", x, residual=with_residual, activation=activation, negative_slope=SLOPE)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_fused_eval_parity(norm, dtype, device):
    x = random_input((4, 3, 5, 7), dtype, device, channels_last=True)
    compare(norm, x, training=False, residual=True, activation="relu")


@pytest.mark.parametrize("norm", NORMS)
def test_triton_residual_only_and_mixed_layouts(norm, device):
    """A residual without activation; a channels_last residual with a contiguous input."""
    x = random_input((5, 3, 4, 6), torch.float32, device)
    compare(norm, x, residual=True)
    compare(norm, x, residual="channels_last", activation="gelu")


def test_triton_module_matches_torch_module(device):
    torch.manual_seed(0)
    x = (torch.randn(6, 4, 5, 5) * 2 + 1).to(device)
    residual = torch.randn(6, 4, 5, 5).to(device)
    layers = [tritonorm.L1BatchNorm2d(4, activation="hardswish", backend=b).to(device) for b in ("triton", "torch")]
    outs = [layer(x, residual=residual) for layer in layers]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(layers[0].running_dev, layers[1].running_dev)
