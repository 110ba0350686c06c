"""The ENorm cycle: Triton vs PyTorch parity, the paper's invariants, the authors' rule and
the optimizer state."""

import copy
import math

import pytest
import torch
from enorm_utils import cnn, mlp, weight_layers
from tolerances import assert_close
from torch import nn

from tritonorm import ENorm
from tritonorm.enorm import OPTIMIZER_STATE
from tritonorm.reference import enorm as ref

MLP = (7, 20, 19, 33, 5)
CNN = (3, 6, 5, 4)


def make(kind, bias, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    model = mlp(MLP, bias=bias) if kind == "fc" else cnn(CNN, bias=bias, in_size=6)
    return model.to(device=device, dtype=dtype)


def sample(kind, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (6, MLP[0]) if kind == "fc" else (4, CNN[0], 6, 6)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def train(model, optimizer, x, steps=2):
    """A few real steps, so that weights and state are random, never zeros."""
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).float().square().mean().backward()
        optimizer.step()


OPTIMIZERS = {
    "none": None,
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
}


def trained_pair(kind, bias, opt, dtype=torch.float32, device="cpu"):
    """Two identical trained models with their optimizers (or None)."""
    model = make(kind, bias, dtype=dtype, device=device)
    optimizer = (OPTIMIZERS[opt] or OPTIMIZERS["sgd"])(model.parameters())
    train(model, optimizer, sample(kind, dtype, device))
    twin = copy.deepcopy(model)
    twin_opt = type(optimizer)(twin.parameters(), **optimizer.defaults)
    twin_opt.load_state_dict(optimizer.state_dict())
    if OPTIMIZERS[opt] is None:
        optimizer = twin_opt = None
    return (model, optimizer), (twin, twin_opt)


def tensors(model, optimizer):
    out = {f"param {name}": p for name, p in model.named_parameters()}
    if optimizer is not None:
        for name, p in model.named_parameters():
            for key, value in optimizer.state[p].items():
                if value.shape == p.shape:
                    out[f"{key} of {name}"] = value
    return out


def assert_same(a, b, dtype, equal_nan=False):
    ta, tb = tensors(*a), tensors(*b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert_close(ta[name], tb[name], dtype, name, equal_nan=equal_nan)


def cycles(pair, n=2, **kwargs):
    model, optimizer = pair
    enorm = ENorm(weight_layers(model), optimizer, **kwargs)
    for _ in range(n):
        enorm.step()
    return enorm


@pytest.mark.parametrize("opt", ["none", "sgd", "adam"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_triton_matches_torch(mode, kind, bias, opt, device):
    a, b = trained_pair(kind, bias, opt, device=device)
    kwargs = dict(mode=mode, c=1.2, balance_last=bias, balance_biases=bias)
    cycles(a, backend="torch", **kwargs)
    cycles(b, backend="triton", **kwargs)
    assert_same(a, b, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_triton_matches_torch_dtypes(mode, dtype, device):
    a, b = trained_pair("fc", True, "sgd", dtype=dtype, device=device)
    cycles(a, backend="torch", mode=mode)
    cycles(b, backend="triton", mode=mode)
    assert_same(a, b, dtype)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # interpreter: |0|^p = 2^(p log2 0)
@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_triton_matches_torch_norms(mode, p, device):
    a, b = trained_pair("conv", False, "sgd", device=device)
    cycles(a, backend="torch", mode=mode, p=p, c=0.8)
    cycles(b, backend="triton", mode=mode, p=p, c=0.8)
    assert_same(a, b, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_channels_last_conv_weights(backend, device):
    """Weights and momentum in channels_last memory: the same cycle as contiguous ones."""
    a, b = trained_pair("conv", True, "sgd", device=device)
    for p in b[0].parameters():
        if p.dim() == 4:
            p.data = p.data.to(memory_format=torch.channels_last)
            b[1].state[p]["momentum_buffer"] = b[1].state[p]["momentum_buffer"].to(memory_format=torch.channels_last)
    cycles(a, backend="torch")
    cycles(b, backend=backend)
    assert_same(a, b, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parallel_is_the_authors_rule(backend, device):
    """Their code's setting (a bias-free conv chain, SGD momentum, last pair left alone,
    p = 2): ENorm's parallel cycle is their per-layer loop."""
    torch.manual_seed(0)
    convs = [nn.Conv2d(a, b, 3, padding=1, bias=False) for a, b in zip((3, 8, 6, 7, 5), (8, 6, 7, 5, 4), strict=True)]
    model = nn.Sequential(*[m for conv in convs for m in (conv, nn.ReLU())]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, optimizer, torch.randn(2, 3, 5, 5, device=device))
    expected = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for _ in range(3):
        ref.per_layer_cycle([w.flatten(2) for w in expected], [m.flatten(2) for m in buffers], c=1.2)
    enorm = ENorm(convs, optimizer, c=1.2, mode="parallel", backend=backend)
    for _ in range(3):
        enorm.step()
    for p, w, m in zip(model.parameters(), expected, buffers, strict=True):
        torch.testing.assert_close(p.detach(), w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(optimizer.state[p]["momentum_buffer"], m, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_function_preserved(kind, mode, backend, device):
    """A ReLU network with biases computes the same function after several cycles, while
    its weights did change."""
    model = make(kind, bias=True, device=device).double()
    x = sample(kind, torch.float64, device)
    before = model(x)
    weights = [p.detach().clone() for p in model.parameters()]
    cycles((model, None), n=4, mode=mode, c=1.3, balance_last=True, balance_biases=True, backend=backend)
    torch.testing.assert_close(model(x), before, atol=1e-12, rtol=1e-10)
    assert max((p - w).abs().max().item() for p, w in zip(model.parameters(), weights, strict=True)) > 1e-3


def chain_weights(model, balance_biases):
    layers = weight_layers(model)
    return [layer.weight.detach().flatten(1) for layer in layers], [
        layer.bias.detach() if balance_biases and layer.bias is not None else None for layer in layers
    ]


@pytest.mark.parametrize("balance_biases", [False, True])
def test_sequential_decreases_objective_to_balance(balance_biases):
    """Each sequential cycle lowers sum_k c^(-2k) ||W_k||^2 (block coordinate descent), and
    the cycles converge to the balanced point ||W_{q+1}[:, j]|| = c ||[W_q[j], b_q[j]]||."""
    model = make("fc", bias=True).double()
    c = 1.2
    enorm = ENorm(weight_layers(model), c=c, mode="sequential", balance_last=True, balance_biases=balance_biases,
                  backend="torch")
    values = [ref.objective(*chain_weights(model, balance_biases), c, 2.0).item()]
    for _ in range(300):
        enorm.step()
        values.append(ref.objective(*chain_weights(model, balance_biases), c, 2.0).item())
    steps = torch.tensor(values).diff()
    assert (steps <= 1e-12 * values[0]).all(), steps.max()
    assert values[-1] < 0.9 * values[0]
    weights, biases = chain_weights(model, balance_biases)
    for q in range(len(weights) - 1):
        r = ref.row_norms(weights[q][:, :, None], 2.0, biases[q])
        s = ref.col_norms(weights[q + 1][:, :, None], 2.0)
        torch.testing.assert_close(s, c * r, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_zero_rows_and_columns_stay_finite(mode, backend, device):
    """A dead unit (zero row) and an unused one (zero column): eps keeps every coefficient
    finite, and the function is kept."""
    model = make("fc", bias=False, device=device)
    layers = weight_layers(model)
    with torch.no_grad():
        layers[1].weight[3] = 0
        layers[2].weight[:, 5] = 0
        layers[1].weight[:, 2] = 0
    x = sample("fc", device=device)
    before = model(x)
    cycles((model, None), n=5, mode=mode, balance_last=True, backend=backend)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # interpreter: |0|^p = 2^(p log2 0)
@pytest.mark.parametrize("p", [2.0, 3.0, math.inf])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_non_finite_weight_is_left_alone(mode, value, p, device):
    """A NaN or inf written into W_1[j, i] after construction makes r_j of pair 1 and s_i of
    pair 0 non-finite: those units keep d = 1, so the entry stays where it is, alone, and
    both paths agree.  In parallel mode every other entry is what the cycle of the clean
    weights gives with those two coefficients set to 1."""
    j, i = 3, 5
    kwargs = dict(mode=mode, p=p, c=1.2, balance_last=True, balance_biases=True)
    model = make("fc", bias=True, device=device)
    twin, clean = copy.deepcopy(model), copy.deepcopy(model)
    enorms = [ENorm(weight_layers(m), backend=backend, **kwargs) for m, backend in ((model, "torch"), (twin, "triton"))]
    for m in (model, twin):
        with torch.no_grad():
            weight_layers(m)[1].weight[j, i] = value
    finite = {name: t.isfinite() for name, t in tensors(model, None).items()}
    for enorm in enorms:
        enorm.step()
    assert_same((model, None), (twin, None), torch.float32, equal_nan=True)
    for name, t in tensors(model, None).items():
        assert torch.equal(t.isfinite(), finite[name]), name
    torch.testing.assert_close(weight_layers(model)[1].weight[j, i], torch.tensor(value), equal_nan=True)
    if mode == "parallel":  # the clean entry enters only d_1[j] and d_0[i], which are set to 1
        layers = weight_layers(clean)
        weights = [layer.weight.detach()[:, :, None] for layer in layers]
        biases = [layer.bias.detach() for layer in layers]
        ds = ref.coefficients(weights, biases, pairs=3, c=1.2, p=p, eps=1e-8, sequential=False)
        ds[1][j] = ds[0][i] = 1
        with torch.no_grad():
            ref.rescale_(weights + biases, 2 * (ds + [None]), [None, *ds] + [None] * 4, [1] * 8)
            layers[1].weight[j, i] = value
        assert_same((model, None), (clean, None), torch.float32, equal_nan=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_huge_weights_stay_finite(mode, backend, device):
    """fp32 weights and biases of about 1e20 in one layer: their squares overflow fp32, not
    the fp64 norms, so a cycle keeps every entry finite and the function."""
    model = make("fc", bias=True, device=device)
    with torch.no_grad():
        for param in weight_layers(model)[1].parameters():
            param.mul_(1e20)
    x = sample("fc", device=device)
    before = model(x)
    cycles((model, None), n=1, mode=mode, balance_last=True, backend=backend)
    for name, param in model.named_parameters():
        assert param.isfinite().all(), name
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5 * before.abs().max().item())


@pytest.mark.parametrize("name", sorted(cls.__name__ for cls in OPTIMIZER_STATE))
def test_state_moves_like_the_gradient_history(name):
    """With lr = 0 the parameters stay put and the state is a function of the gradients
    alone: rescaling the state must give the state the optimizer builds from the rescaled
    gradients (d^-1 rows, d columns) on the rescaled parameters."""
    cls = getattr(torch.optim, name)
    extra = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
    # RMSprop's momentum holds grad / (sqrt(variance) + eps): invariant exactly only at eps = 0.
    extra |= {"centered": True, "eps": 0.0} if name == "RMSprop" else {}
    model = make("fc", bias=True).double()
    layers = weight_layers(model)
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(3)]

    def run(params, grads_of_step):
        optimizer = cls(params, lr=0.0, **extra)
        for gs in grads_of_step:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return optimizer

    optimizer = run(list(model.parameters()), grads)
    weights = [layer.weight.detach().flatten(1)[:, :, None] for layer in layers]
    ds = ref.coefficients(weights, [None] * len(layers), pairs=len(layers) - 2, c=1.0, p=2.0, eps=1e-8,
                          sequential=False)
    ENorm(layers, optimizer, backend="torch").step()

    def gradient_scale(k, g):
        """g with rows times d_k^-1 and (weights) columns times d_{k-1}."""
        if k < len(ds):
            g = g / ds[k].view(-1, *(1,) * (g.dim() - 1))
        if 0 < k <= len(ds) and g.dim() == 2:
            g = g * ds[k - 1]
        return g

    order = [(k, p) for k, layer in enumerate(layers) for p in (layer.weight, layer.bias)]
    rescaled_grads = [[gradient_scale(k, g) for (k, _), g in zip(order, gs, strict=True)] for gs in grads]
    twin = [p.detach().clone().requires_grad_() for _, p in order]
    expected = run(twin, rescaled_grads)
    for (k, p), q in zip(order, twin, strict=True):
        for key, value in optimizer.state[p].items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                torch.testing.assert_close(value, expected.state[q][key], rtol=1e-6, atol=1e-7,
                                           msg=lambda m, key=key, k=k: f"{key} of layer {k}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_state_created_after_construction_is_rescaled(backend, device):
    """ENorm built before the optimizer's first step finds the state made later."""
    model = make("fc", bias=True, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    enorm = ENorm(weight_layers(model), optimizer, backend=backend)
    enorm.step()
    train(model, optimizer, sample("fc", device=device), steps=1)
    buffers = {p: optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    enorm.step()
    first = weight_layers(model)[0]
    assert not torch.equal(optimizer.state[first.weight]["momentum_buffer"], buffers[first.weight])


def test_triton_needs_one_dtype(device):
    model = make("fc", bias=True, device=device)
    weight_layers(model)[1].double()
    with pytest.raises(TypeError, match="one dtype"):
        ENorm(weight_layers(model), backend="triton").step()


def test_compiled_model_trains_with_enorm(device):
    """optimizer.step(); enorm.step() around a torch.compile(fullgraph=True) model: the
    compiled graph reads the rescaled parameters, as the eager model does."""
    x = sample("fc", device=device)

    def losses(compile_model):
        torch._dynamo.reset()
        model = make("fc", bias=True, device=device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        enorm = ENorm.from_model(model, optimizer, c=1.2, scale_biases=False)  # changes the function
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_model else model
        out = []
        for _ in range(3):
            loss = run(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            enorm.step()
            out.append(loss.detach())
        return torch.stack(out)

    torch.testing.assert_close(losses(True), losses(False), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_rescale_splits_long_rows(mode, device, monkeypatch):
    """Rows longer than the rescale's chunk (a wide first layer) are split over programs."""
    from tritonorm.kernels import enorm as kernels

    monkeypatch.setattr(kernels, "ROW_CHUNK", kernels.BLOCK_R)
    torch.manual_seed(0)
    model = mlp((600, 12, 10, 3), bias=True).to(device)
    a, b = (model, None), (copy.deepcopy(model), None)
    cycles(a, backend="torch", mode=mode, balance_last=True)
    cycles(b, backend="triton", mode=mode, balance_last=True)
    assert_same(a, b, torch.float32)


@pytest.mark.parametrize("nd", [1, 3])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_conv1d_and_conv3d_chains(nd, mode, device):
    """(O, I, K) views of 1-d and 3-d kernels: parity, and the function is kept."""
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[nd]
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 5, 3), nn.ReLU(), conv(5, 4, 2), nn.ReLU(), conv(4, 2, 1)).to(device).double()
    x = torch.randn((2, 3) + (5,) * nd, device=device, dtype=torch.float64)
    before = model(x)
    twin = copy.deepcopy(model)
    cycles((model, None), mode=mode, balance_last=True, backend="torch")
    cycles((twin, None), mode=mode, balance_last=True, backend="triton")
    assert_same((model, None), (twin, None), torch.float64)
    torch.testing.assert_close(model(x), before, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind", ["fc", "conv"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_launches_of_a_cycle(kind, mode, device, monkeypatch):
    """One cycle's launches: 2 in parallel mode; in sequential mode one per pair, with
    PAIR_BLOCK_J hidden units a program, and one rescale.  An MLP's tensors have no kernel
    axis, so its kernels are compiled LINEAR (no division of row positions); a CNN's are not."""
    from tritonorm.kernels import enorm as kernels

    launches = []
    cls = type(kernels._rescale_kernel)  # JITFunction, or InterpretedFunction on the CPU
    run = cls.run

    def record(self, *args, grid, **kwargs):
        launches.append((self.fn.__name__, tuple(grid), kwargs["LINEAR"], kwargs["BLOCK_J"]))
        return run(self, *args, grid=grid, **kwargs)

    monkeypatch.setattr(cls, "run", record)
    enorm = cycles((make(kind, bias=True, device=device), None), n=1, backend="triton", mode=mode)
    plan, linear = enorm._plan, kind == "fc"
    rescale = ("_rescale_kernel", (len(plan.last_tiles if mode == "sequential" else plan.all_tiles),), linear,
               kernels.BLOCK_J)
    if mode == "sequential":
        pairs = [("_pair_kernel", (math.ceil(n / kernels.PAIR_BLOCK_J),), linear, kernels.PAIR_BLOCK_J)
                 for n in plan.sizes]
        assert launches == pairs + [rescale]
    else:
        assert launches == [("_coefficients_kernel", (len(plan.coefficient_tiles),), linear, kernels.BLOCK_J), rescale]
