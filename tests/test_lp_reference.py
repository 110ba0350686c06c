"""The PyTorch path of the Lp batch norms (the CPU path and the tests' oracle) against its
definition, ties included, and the plain autograd contender of the benchmarks against it."""

import math

import pytest
import torch
from lp_utils import NORMS, call, random_input
from tolerances import assert_close

from tritonorm.bench.lp_cases import EAGER, PLAIN, TOPK_K, build_layer
from tritonorm.reference import lp_batchnorm as ref


def _rows(t):
    """An (N, C, *) tensor as (C, N * S): row c, column r = n * S + s."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _first_k(rows, k):
    """The definition: columns of the k largest entries of each row, ties to the lowest
    column (a stable descending sort keeps equal entries in column order), ascending."""
    return rows.sort(dim=1, descending=True, stable=True).indices[:, :k].sort(1).values


def _data(kind, shape, dtype, device="cpu", seed=0):
    """Gaussian values (no ties), Gaussian values rounded to quarters (some ties), three
    values (ties everywhere, the k largest all tied), or a constant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "quarters":
        x = (x * 4).round() / 4
    elif kind == "three-values":
        x = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)[torch.randint(3, shape, generator=g)]
    elif kind == "constant":
        x = torch.full(shape, 0.75, dtype=torch.float64)
    return x.to(device, dtype)


KINDS = ("gaussian", "quarters", "three-values", "constant")


@pytest.mark.parametrize("two_levels", [False, True], ids=["one-level", "two-levels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,k", [((12, 3, 20), 5), ((30, 2, 7), 10), ((9, 4, 1), 3), ((2, 3, 16), 16)])
def test_top_indices_are_the_k_largest_ties_to_the_lowest_r(shape, k, kind, dtype, two_levels, device, monkeypatch):
    """One topk of value-then-index keys, and its two levels over rows (forced here for
    every shape with more than k rows), pick what a stable sort does; over any strides."""
    if two_levels:
        monkeypatch.setattr(ref, "_TWO_LEVEL_MIN_SPARED", 0)
    abs_a = _data(kind, shape, dtype, device).abs()
    expected = _first_k(_rows(abs_a), k)
    for layout in (abs_a, abs_a.transpose(1, 2).contiguous().transpose(1, 2)):  # (N, C, S) and (N, S, C) memory
        assert torch.equal(ref.top_indices(layout, k).sort(1).values, expected)


def test_long_rows_take_the_sign_keys(device, monkeypatch):
    """A float32 row longer than its free mantissa bits can index gets the float64 keys
    (the sign against the k-th largest), which select the same columns."""
    monkeypatch.setattr(ref, "_FLOAT32_FREE_BITS", 3)  # rows of more than 8 columns
    values = _data("quarters", (5, 40), torch.float32, device).abs()
    assert torch.equal(ref.top_columns(values, 6).sort(1).values, _first_k(values, 6))


@pytest.mark.parametrize("kind", KINDS)
def test_max_abs_is_differentiable_at_the_first_maximum(kind, device):
    a = _data(kind, (6, 3, 10), torch.float64, device).requires_grad_()
    value = ref.max_abs(a)
    (grad,) = torch.autograd.grad(value.sum(), a)
    first = _first_k(_rows(a.detach().abs()), 1)
    assert torch.equal(value.detach(), _rows(a.detach().abs()).amax(1))
    assert torch.equal(_rows(grad).ne(0).nonzero()[:, 1:], first), "the gradient reaches the first maximum only"


def _definition(x, weight, bias, norm, k):
    """y of the Lp batch norms written from their definition (module docstring of
    ``tritonorm.reference.lp_batchnorm``) over channel-major rows, selection by stable sort."""
    rows = _rows(x)
    n = rows.shape[1]
    shift = rows[:, :1].detach()
    mean = shift + (rows - shift).mean(1, keepdim=True)
    abs_a = (rows - mean).abs()
    if norm == "l1":
        dev = math.sqrt(math.pi / 2) * abs_a.mean(1)
    else:
        count = 1 if norm == "linf" else k
        selected = abs_a.gather(1, _first_k(abs_a.detach(), count))
        dev = ref.c_linf(n) * selected.mean(1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / (dev.view(shape) + 1e-5) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("norm", NORMS)
def test_torch_path_matches_the_definition(norm, kind, channels_last, device, monkeypatch):
    """Values and the gradients of x, weight and bias in float64, ties included (the
    gradient of sigma must reach the lowest-r elements); Top-k through both levels."""
    monkeypatch.setattr(ref, "_TWO_LEVEL_MIN_SPARED", 0)
    g = torch.Generator().manual_seed(1)
    x = _data(kind, (12, 3, 4, 5), torch.float64) + torch.randn(3, 1, 1, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(3, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x, weight, bias, dy = (t.to(device) for t in (x, weight, bias, dy))
    results = []
    for fn in (lambda *t: call(norm, t[0], backend="torch", k=TOPK_K, weight=t[1], bias=t[2], training=True),
               lambda *t: _definition(*t, norm, TOPK_K)):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(*leaves)
        results.append((y, *torch.autograd.grad(y, leaves, dy)))
    for what, got, expected in zip(("y", "dx", "dweight", "dbias"), *results, strict=True):
        assert_close(got, expected, torch.float64, what)


def _no_ties_at_the_kth(x, k):
    """Whether each channel's k-th and (k+1)-th largest |x - mean| differ (where the plain
    contender's topk / amax may pick other tied elements than the reference)."""
    rows = _rows(x.double())
    top = (rows - rows.mean(1, keepdim=True)).abs().topk(k + 1, 1).values
    return bool((top[:, k - 1] > top[:, k]).all())


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_plain_contender_matches_the_reference(norm, dtype, channels_last, device):
    """The benchmarks' plain autograd contender computes what the torch path does: y, the
    gradients of x, weight and bias, and the running statistics.  On inputs without ties
    at the k-th largest |x - mu| only: there its topk (and amax, which shares the gradient
    among tied maxima) may pick other elements than the lowest-index rule."""
    x = random_input((6, 5, 7, 3), dtype, device, channels_last)
    assert _no_ties_at_the_kth(x, TOPK_K if norm == "topk" else 1)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    dy = torch.randn(x.shape, generator=g).to(device, dtype)
    outputs = []
    for impl in (PLAIN, EAGER):
        layer = build_layer(norm, impl, 5, device).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        xx = x.detach().clone().requires_grad_()
        y = layer(xx)
        outputs.append((y, *torch.autograd.grad(y, (xx, layer.weight, layer.bias), dy), layer.running_mean,
                        layer.running_dev))
    n = x.numel() // x.shape[1]
    for what, got, expected in zip(("y", "dx", "dweight", "dbias", "mean", "dev"), *outputs, strict=True):
        assert_close(got, expected, dtype, what, scale=n**0.5 if what in ("dweight", "dbias") else 1.0)
