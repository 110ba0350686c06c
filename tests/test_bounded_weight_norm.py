"""Bounded weight norm: Triton (interpreted on CPU, compiled on CUDA) against the float64
reference, gradcheck, opcheck, the paper's invariants (every slice's norm is rho after any
step; the output ignores the scale of v), the parametrization's life cycle, compile, errors
and the learning-rate correction."""

import math

import pytest
import torch
import triton
from dispatch_utils import backward_ops, data_ops, fills_and_copies
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import assert_close
from torch import nn
from torch.nn.utils import parametrize
from training import assert_compiled_matches_eager

import tritonorm
from tritonorm import functional as F
from tritonorm.ops import bounded_weight_norm as bwn_ops
from tritonorm.reference import bounded_weight_norm as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (shape, dim): rows (dim 0) of linear, conv 2-d / 3-d weights; slices along a middle axis
# and along the contiguous last axis; a row longer than one tile (3000 > 2048); many short
# rows packed per tile; a 1-d weight (one element per slice); a stem conv's rows of 147,
# not a multiple of 16 bytes, read 2 to 8 to a tile row (the grouped view).
CASES = [
    ((7, 5), 0), ((7, 5), 1), ((6, 3, 3, 3), 0), ((6, 3, 3, 3), 1), ((3, 2, 3, 3, 3), 0),
    ((4, 5, 3), -1), ((130, 33), 1), ((2, 3000), 0), ((300, 3), 0), ((9,), 0), ((16, 3, 7, 7), 0),
]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _run(backend, v, rho, grad, dim, p=2.0):
    v, rho = _leaf(v), _leaf(rho)
    w = F.bounded_weight(v, rho, dim=dim, p=p, backend=backend)
    w.backward(grad.to(w.dtype))
    return w.detach(), v.grad, rho.grad


def _inputs(shape, dim, dtype, device, per_slice, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g).to(device, dtype)
    rho_shape = (shape[dim],) if per_slice else ()
    rho = (torch.rand(rho_shape, generator=g) + 0.5).to(device, dtype)
    return v, rho, torch.randn(shape, generator=g).to(device, dtype)


def _compare(v, rho, grad, dim, dtype, p=2.0):
    """The Triton path against the float64 reference: w, dL/dv and dL/drho in v's dtype and
    rho's shape, each within the tolerance rule at its own scale (w: its largest value;
    dL/dv: rho / ||v|| |G|, the size before the projection, for p = 2, where the projected
    part is no larger; for p = 1 and inf, whose projected part t_i dn_i/dv_i (|dn/dv| <= 1)
    may be larger, plus rho / ||v|| <|v|, |G|> / ||v||; dL/drho: the sum of |v G| / ||v||,
    before cancellation)."""
    tri = _run("triton", v, rho, grad, dim, p)
    exp = _run("torch", v.double(), rho.double(), grad.double(), dim, p)
    assert tri[0].dtype == tri[1].dtype == tri[2].dtype == dtype and tri[2].shape == rho.shape
    bound = ref.slice_shape(v, dim)
    norms = ref.slice_norms(v.double(), dim, p).reshape(bound)
    unprojected = rho.double().expand(v.shape[dim]).reshape(bound) / norms
    magnitude = _run("torch", v.double().abs(), rho.double(), grad.double().abs(), dim, p)[2]
    dv_scale = (unprojected * grad.double()).abs().max()
    if p != 2:
        dv_scale += unprojected.abs().max() * magnitude.abs().max()
    assert_close(tri[0], exp[0], dtype, "w", scale=exp[0])
    assert_close(tri[1], exp[1], dtype, "dL/dv", scale=dv_scale.item())
    assert_close(tri[2], exp[2], dtype, "dL/drho", scale=magnitude)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("per_slice", [False, True], ids=["rho", "per-slice-rho"])
def test_parity(dtype, case, per_slice, device):
    shape, dim = CASES[case]
    _compare(*_inputs(shape, dim, dtype, device, per_slice, seed=case), dim, dtype)


@settings(max_examples=20, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), dim=st.integers(-4, 3),
       per_slice=st.booleans(), seed=st.integers(0, 2**16))
def test_parity_property(shape, dim, per_slice, seed):
    """Random ranks, sizes (1-element slices included) and axes, fp32."""
    from conftest import DEVICE

    dim %= len(shape)
    _compare(*_inputs(tuple(shape), dim, torch.float32, DEVICE, per_slice, seed), dim, torch.float32)


def test_parity_non_contiguous(device):
    v, rho, grad = _inputs((6, 40), 1, torch.float32, device, True, seed=1)
    _compare(v.t(), rho, grad.t(), 0, torch.float32)  # (40, 6) with strides (1, 40), cut along dim 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck_float64(backend, dim, device):
    g = torch.Generator().manual_seed(dim + 5)
    v = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    for rho_shape in [(v.shape[dim],), ()]:
        rho = (torch.rand(rho_shape, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
        assert torch.autograd.gradcheck(lambda v, rho: F.bounded_weight(v, rho, dim=dim, backend=backend), (v, rho),
                                        fast_mode=backend == "triton")


@pytest.mark.parametrize("per_slice", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(per_slice, dtype, device):
    v, rho, grad = _inputs((6, 4, 3), 1, dtype, device, per_slice, seed=3)
    torch.library.opcheck(bwn_ops.bounded_weight, (_leaf(v), _leaf(rho), 1, 1e-12))
    norm = bwn_ops.bounded_weight(v, rho, 1, 1e-12)[1]
    torch.library.opcheck(bwn_ops.bounded_weight_backward, (grad, v, rho, norm, 1, 1e-12))


def test_zero_slice_guard_gives_zeros_not_nan(device):
    v = torch.randn(4, 6, device=device)
    v[2] = 0
    for backend in ("triton", "torch"):
        leaf = _leaf(v)
        w = F.bounded_weight(leaf, torch.tensor(1.5, device=device), backend=backend)
        w.backward(torch.ones_like(w))
        assert torch.isfinite(w).all() and torch.isfinite(leaf.grad).all()
        assert torch.equal(w[2], torch.zeros(6, device=device))
        torch.testing.assert_close(w[[0, 1, 3]].norm(dim=1), torch.full((3,), 1.5, device=device))


# ----------------------------------------------------------------------------- the norm order p

ORDERS = [1.0, math.inf]


@pytest.mark.parametrize("p", ORDERS, ids=["p1", "pinf"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_parity_p(p, case, device):
    """p = 1 and inf, every layout (the grouped view and one slice over several tiles
    included), fp32 with a per-slice rho, and the other dtypes with one rho."""
    shape, dim = CASES[case]
    _compare(*_inputs(shape, dim, torch.float32, device, True, seed=case), dim, torch.float32, p)


@pytest.mark.parametrize("p", ORDERS, ids=["p1", "pinf"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", [2, 7, 10])
def test_parity_p_dtypes(p, dtype, case, device):
    """Low precision makes ties of max |v| likely: both paths send the L-inf gradient to the
    lowest index."""
    shape, dim = CASES[case]
    _compare(*_inputs(shape, dim, dtype, device, False, seed=case), dim, dtype, p)


@pytest.mark.parametrize("p", ORDERS, ids=["p1", "pinf"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck_float64_p(p, backend, dim, device):
    """Random float64 inputs: no zeros (the L1 kink) and no ties of max |v|."""
    g = torch.Generator().manual_seed(dim + 11)
    v = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    for rho_shape in [(v.shape[dim],), ()]:
        rho = (torch.rand(rho_shape, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
        assert torch.autograd.gradcheck(
            lambda v, rho: F.bounded_weight(v, rho, dim=dim, p=p, backend=backend), (v, rho),
            fast_mode=backend == "triton")


def _expected_linf_grad(v, rho, grad, dim, first):
    """dL/dv of w = rho v / max|v| per slice, written out: rho / n (G - <v, G> / n sign(v_k)
    e_k), k = ``first[i]``, the flat index within slice i (row-major over the other axes)."""
    rows, g = v.movedim(dim, 0).reshape(v.shape[dim], -1), grad.movedim(dim, 0).reshape(v.shape[dim], -1)
    n = rows.abs().amax(1, keepdim=True)
    dn = torch.zeros_like(rows)
    dn[torch.arange(rows.shape[0]), first] = rows[torch.arange(rows.shape[0]), first].sign()
    dv = rho / n * (g - (rows * g).sum(1, keepdim=True) / n * dn)
    return dv.reshape(v.movedim(dim, 0).shape).movedim(0, dim)


# (shape, dim, slice, the tied flat indices within the slice (the first one is the lowest)):
# rows, a middle axis (the slice's elements strided, across A and B), the contiguous last
# axis, the grouped view (rows of 147), a row over two tiles (3000 > 2048).
TIES = [
    ((4, 6), 0, 1, [2, 4, 5]), ((3, 4, 5), 1, 2, [4, 10, 14]), ((5, 4), -1, 3, [0, 4]),
    ((16, 3, 7, 7), 0, 9, [17, 100, 146]), ((2, 3000), 0, 1, [100, 2500]),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", range(len(TIES)))
def test_linf_gradient_goes_to_the_lowest_tied_index(case, backend, device):
    """Ties of max |v| (opposite signs too): the whole gradient of the norm goes to the
    lowest index, on the reference and on the Triton path; every other slice's to its one
    max element."""
    shape, dim, tied, at = TIES[case]
    g = torch.Generator().manual_seed(case)
    v = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1  # |v| < 1
    rows = v.movedim(dim, 0)  # a view: writes go to v
    flat = rows[tied].reshape(-1).clone()
    flat[at] = torch.tensor([(-1.0) ** j * 1.5 for j in range(len(at))], dtype=torch.float64)
    rows[tied] = flat.reshape(rows[tied].shape)
    v, grad = v.to(device), torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    first = v.movedim(dim, 0).reshape(v.shape[dim], -1).abs().argmax(1)
    assert first[tied].item() == at[0]
    leaf = _leaf(v)
    rho = torch.tensor(1.3, dtype=torch.float64, device=device)
    F.bounded_weight(leaf, rho, dim=dim, p=math.inf, backend=backend).backward(grad)
    expected = _expected_linf_grad(v, rho, grad, dim, first)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)
    norm_leaf = _leaf(v)
    ref.slice_norms(norm_leaf, dim, math.inf)[tied].backward()
    hot = torch.zeros(flat.numel(), dtype=torch.float64)
    hot[at[0]] = 1.0
    assert torch.equal(norm_leaf.grad.movedim(dim, 0)[tied].reshape(-1).cpu(), hot)
    for dtype in (torch.float32, torch.bfloat16):  # the tie survives the cast: same rule in the kernel
        _compare(v.to(dtype), rho.to(dtype), grad.to(dtype), dim, dtype, math.inf)


@pytest.mark.parametrize("p", ORDERS, ids=["p1", "pinf"])
def test_opcheck_p(p, device):
    v, rho, grad = _inputs((6, 4, 3), 1, torch.float32, device, True, seed=3)
    torch.library.opcheck(bwn_ops.bounded_weight, (_leaf(v), _leaf(rho), 1, 1e-12, p))
    norm = bwn_ops.bounded_weight(v, rho, 1, 1e-12, p)[1]
    torch.library.opcheck(bwn_ops.bounded_weight_backward, (grad, v, rho, norm, 1, 1e-12, p))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_modules_take_p(p, backend, device):
    """Every slice's p-norm is rho (by default the mean initial p-norm), for the modules
    and the registration, and after a step."""
    torch.manual_seed(0)
    linear = tritonorm.BoundedWNLinear(6, 5, p=p, backend=backend, device=device)
    conv = tritonorm.BoundedWNConv2d(3, 4, 3, rho=0.7, p=p, backend=backend, device=device)
    layer = nn.Linear(6, 5, device=device)
    rho0 = ref.slice_norms(layer.weight.detach(), 0, p).mean()
    tritonorm.bounded_weight_norm(layer, p=p, backend=backend)
    assert layer.parametrizations.weight[0].p == float(p)
    torch.testing.assert_close(layer.parametrizations.weight[0].rho, rho0.float())
    opt = torch.optim.SGD([*linear.parameters(), *conv.parameters()], lr=0.5)
    for _ in range(2):
        for module, rho in ((linear, linear.parametrizations.weight[0].rho), (conv, 0.7)):
            norms = tritonorm.slice_norms(module.weight, p=p)
            torch.testing.assert_close(norms, torch.full_like(norms, float(rho)))
        (linear(torch.randn(3, 6, device=device)).sum() + conv(torch.randn(2, 3, 5, 5, device=device)).sum()).backward()
        opt.step()
    assert ("p=inf" in repr(conv)) == (p == math.inf) and ("p=1.0" in repr(linear)) == (p == 1)


@pytest.mark.parametrize("p", [3, 0, -1, math.nan, "inf", True, None])
def test_invalid_p_is_refused(p):
    message = r"p must be 2, 1 or float\('inf'\) \(the norm order of every slice\), got "
    with pytest.raises(ValueError, match=message):
        tritonorm.bounded_weight_norm(nn.Linear(3, 4), p=p)
    with pytest.raises(ValueError, match=message):
        tritonorm.BoundedWNLinear(3, 4, p=p)
    with pytest.raises(ValueError, match=message):
        F.bounded_weight(torch.randn(3, 4), 1.0, p=p)


# ----------------------------------------------------------------------------- what the Triton path runs


@pytest.mark.parametrize("rho_kind", ["buffer", "scalar", "per_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_dispatches_its_op_alone(rho_kind, dtype, device):
    """The norm output (never differentiated) costs no aten.zeros, and dL/drho comes out
    of the kernel in rho's dtype: besides the backward op, only the sum of the per-slice
    dL/drho of a () rho that needs a gradient (and its one-element cast in bf16)."""
    v, rho, grad = _inputs((6, 4, 3), 0, dtype, device, rho_kind == "per_slice", seed=4)
    v.requires_grad_()
    rho.requires_grad_(rho_kind != "buffer")
    w = F.bounded_weight(v, rho, backend="triton")
    ops = backward_ops(w, [v] + ([rho] if rho.requires_grad else []), grad)
    expected = ["tritonorm.bounded_weight_backward"]
    if rho_kind == "scalar":
        expected += ["aten.sum"] + (["aten._to_copy"] if dtype == torch.bfloat16 else [])
    assert data_ops(ops) == expected


@pytest.mark.parametrize("learnable_gain", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_backward_has_no_fill_or_copy(learnable_gain, dtype, device):
    """A BoundedWNConv2d's backward: the convolution's backward and the weight's op (with
    the gain, plus its few (S,)-sized autograd ops); no zero-fill, no copy."""
    torch.manual_seed(0)
    layer = tritonorm.BoundedWNConv2d(3, 5, 3, padding=1, learnable_gain=learnable_gain, backend="triton")
    layer = layer.to(device, dtype)
    x = torch.randn(2, 3, 6, 6, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    ops = backward_ops(y, [x, *layer.parameters()], torch.randn_like(y))
    assert not fills_and_copies(ops), ops
    assert data_ops(ops, min_numel=layer.weight.numel()) == ["aten.convolution_backward",
                                                              "tritonorm.bounded_weight_backward"]
    if not learnable_gain:
        assert data_ops(ops) == ["aten.convolution_backward", "tritonorm.bounded_weight_backward"]


# (weight, dim, dtype) -> (BLOCK_C, BLOCK_S, GROUP, programs), planned for an H100's 132
# SMs: 3x3 conv rows (576 to 4608 weights) in one to three tiles of 1024 / 2048 per pass
# (they were 9 tiles of 64 to 512); 1x1 rows of 64 two (fp32) or four (bf16) to a tile, so
# that one warp loads 16-byte vectors; the stem's rows of 147, not a multiple of 16 bytes,
# 4 (fp32) or 8 (bf16) to a grouped row; a wide linear row; slices along the contiguous
# last axis (16 neighbouring slices per tile row, 128 rows).
PLANS = [
    (((64, 64, 3, 3), 0, torch.float32), (1, 1024, 1, 64)),
    (((512, 512, 3, 3), 0, torch.float32), (1, 2048, 1, 512)),
    (((2048, 512, 1, 1), 0, torch.float32), (4, 512, 1, 512)),
    (((64, 64, 1, 1), 0, torch.float32), (2, 64, 1, 32)),
    (((64, 64, 1, 1), 0, torch.bfloat16), (4, 64, 1, 16)),
    (((64, 3, 7, 7), 0, torch.float32), (1, 1024, 4, 16)),
    (((64, 3, 7, 7), 0, torch.bfloat16), (1, 2048, 8, 8)),
    (((1000, 2048), 0, torch.float32), (1, 2048, 1, 1000)),
    (((4096, 1000), 1, torch.float32), (16, 128, 1, 63)),
]


@pytest.mark.parametrize("case, plan", PLANS, ids=[f"{case[0]}-{case[1]}-{case[2]}" for case, _ in PLANS])
def test_tiles(case, plan, monkeypatch):
    """Halving BLOCK_C for grid fill doubles BLOCK_S in both layouts: a tile holds
    min(MAX_TILE, BLOCK_C x the row rounded up to a power of two) elements, so a program
    walks a slice in few wide tiles, not many narrow ones (their loads are one chain), and
    at least one warp of 16-byte vectors."""
    from tritonorm.kernels import bounded_weight_norm as bwn_kernels
    from tritonorm.kernels import channel_reduce

    monkeypatch.setattr(channel_reduce, "_num_programs_per_wave", lambda device: 132)
    shape, dim, dtype = case
    view = bwn_kernels.slice_view(torch.empty(shape, dtype=dtype), dim)
    (programs,), args, meta = bwn_kernels._launch(view)
    assert (meta["BLOCK_C"], meta["BLOCK_S"], meta["GROUP"], programs) == plan
    row = args[2]  # the grouped view's row: GROUP slices
    tile = meta["BLOCK_C"] * meta["BLOCK_S"]
    assert tile == min(channel_reduce.MAX_TILE, meta["BLOCK_C"] * triton.next_power_of_2(row))
    assert tile * view.tensor.element_size() >= bwn_kernels.MIN_TILE_BYTES


# ----------------------------------------------------------------------------- the parametrization


def _cnn(backend, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        tritonorm.BoundedWNConv2d(3, 8, 3, padding=1, backend=backend), nn.ReLU(),
        tritonorm.bounded_weight_norm(nn.ConvTranspose2d(8, 6, 2, stride=2), dim=1, learnable_gain=True,
                                      backend=backend), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), tritonorm.BoundedWNLinear(6, 4, rho=0.7, backend=backend),
    )


def _slice_norms(module):
    p = module.parametrizations.weight[0]
    return tritonorm.slice_norms(module.weight, p.dim), p


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_every_slice_has_norm_rho_after_any_step(backend, optimizer, device):
    model = _cnn(backend).to(device)
    opt = (torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5))
    x = torch.randn(4, 3, 6, 6, device=device)
    conv, deconv, linear = model[0], model[2], model[6]
    rho0 = conv.parametrizations.weight[0].rho.item()
    gain_norm = deconv.parametrizations.weight[0].gain_norm.item()
    gain0 = deconv.parametrizations.weight[0].gain.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        norms, _ = _slice_norms(conv)
        torch.testing.assert_close(norms, torch.full_like(norms, rho0))
        norms, _ = _slice_norms(linear)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.7))
        norms, p = _slice_norms(deconv)  # the gain moves each slice; their overall norm stays
        torch.testing.assert_close(norms, p.scale().detach())
        torch.testing.assert_close(norms.norm().item(), gain_norm)
    assert not torch.allclose(deconv.parametrizations.weight[0].gain, gain0)  # the gain was trained


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_output_ignores_the_scale_of_v(backend, device):
    model = _cnn(backend).to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    before = model(x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (model[0], model[2], model[6]):
            v = module.parametrizations.weight.original
            dim = module.parametrizations.weight[0].dim
            scale = torch.rand(v.shape[dim], generator=g).to(device) * 10 + 0.1  # per slice, positive
            v.mul_(scale.reshape(ref.slice_shape(v, dim)))
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def test_registration_defaults(device):
    torch.manual_seed(0)
    linear = nn.Linear(20, 8, device=device)
    weight = linear.weight.detach().clone()
    tritonorm.bounded_weight_norm(linear)
    p = linear.parametrizations.weight[0]
    assert p.rho.item() == pytest.approx(weight.norm(dim=1).mean().item(), rel=1e-6)
    torch.testing.assert_close(linear.parametrizations.weight.original, weight)  # v starts as the weight
    torch.testing.assert_close(linear.weight, p.rho * weight / weight.norm(dim=1, keepdim=True))
    gained = tritonorm.bounded_weight_norm(nn.Linear(20, 8, device=device), learnable_gain=True)
    torch.testing.assert_close(gained.weight, gained.parametrizations.weight.original)  # unchanged
    fixed = tritonorm.bounded_weight_norm(nn.Linear(20, 8, device=device), rho=2.0, learnable_gain=True)
    torch.testing.assert_close(fixed.weight.norm(dim=1), torch.full((8,), 2.0, device=device))


def test_custom_module_and_parameter_name(device):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(5, 4))

        def forward(self, x):
            return x @ self.kernel

    module = tritonorm.bounded_weight_norm(Scaled().to(device), "kernel", rho=3.0, dim=1)
    torch.testing.assert_close(module.kernel.norm(dim=0), torch.full((4,), 3.0, device=device))
    assert "parametrizations.kernel.0.rho" in module.state_dict()


def test_state_dict_round_trip_and_removal(device):
    model = _cnn("auto", seed=0).to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).square().mean().backward()
    opt.step()
    state = model.state_dict()
    assert {"0.parametrizations.weight.original", "0.parametrizations.weight.0.rho",
            "2.parametrizations.weight.0.gain", "2.parametrizations.weight.0.gain_norm"} <= set(state)
    other = _cnn("auto", seed=1).to(device)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), model(x))

    expected = model(x)
    weights = [m.weight.detach().clone() for m in (model[0], model[2], model[6])]
    for m in (model[0], model[2], model[6]):
        tritonorm.remove_bounded_weight_norm(m)
        assert not parametrize.is_parametrized(m)
    assert all(type(m.weight) is nn.Parameter for m in (model[0], model[2], model[6]))
    assert all(torch.equal(m.weight, w) for m, w in zip((model[0], model[2], model[6]), weights, strict=True))
    torch.testing.assert_close(model(x), expected)


def test_assigning_the_weight_sets_v(device):
    linear = tritonorm.bounded_weight_norm(nn.Linear(4, 3, device=device), rho=2.0)
    new = torch.randn(3, 4, device=device)
    linear.weight = new
    torch.testing.assert_close(linear.parametrizations.weight.original, new)
    torch.testing.assert_close(linear.weight, 2.0 * new / new.norm(dim=1, keepdim=True))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend, compiler, device):
    if compiler == "inductor" and backend == "torch" and device == "cpu":
        pytest.skip("one inductor run on CPU is enough (compile time on 2 cores)")
    x = torch.randn(4, 3, 6, 6, device=device)
    assert_compiled_matches_eager(lambda: _cnn(backend).to(device), x, compiler)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, message", [
    ({"rho": 0.0}, ValueError, r"rho must be a finite number > 0 or None, got 0.0"),
    ({"rho": -1}, ValueError, r"rho must be a finite number > 0 or None, got -1"),
    ({"rho": math.inf}, ValueError, r"rho must be a finite number > 0 or None, got inf"),
    ({"rho": True}, ValueError, r"rho must be a finite number > 0 or None, got True"),
    ({"dim": 2}, ValueError, r"dim must be an int in \[-2, 1\] for weight of shape \(4, 3\), got 2"),
    ({"dim": 1.0}, ValueError, r"dim must be an int"),
    ({"name": "bias2"}, ValueError, r"name: Linear has no tensor attribute 'bias2'"),
    ({"learnable_gain": 1}, TypeError, r"learnable_gain must be a bool"),
    ({"eps": 0.0}, ValueError, r"eps must be a finite number > 0"),
    ({"backend": "cuda"}, ValueError, r"backend must be one of 'auto', 'triton', 'torch', got 'cuda'"),
], ids=["rho-0", "rho-negative", "rho-inf", "rho-bool", "dim-range", "dim-float", "name", "gain", "eps", "backend"])
def test_registration_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        tritonorm.bounded_weight_norm(nn.Linear(3, 4), **kwargs)


def test_positional_arguments_match_torch_weight_norm():
    """(module, name, dim) positionally, as torch.nn.utils.parametrizations.weight_norm; rho
    and learnable_gain only by keyword."""
    up = tritonorm.bounded_weight_norm(nn.ConvTranspose2d(4, 6, 2), "weight", 1)
    assert up.parametrizations.weight[0].dim == 1
    with pytest.raises(TypeError, match=r"positional argument"):
        tritonorm.bounded_weight_norm(nn.Linear(3, 4), "weight", 0, 2.0)


@pytest.mark.parametrize("value", [0.0, math.nan])
def test_zero_or_nonfinite_slice_is_refused(value):
    linear = nn.Linear(3, 4)
    with torch.no_grad():
        linear.weight[2] = value
    with pytest.raises(ValueError, match=r"weight: slice\(s\) \[2\] along dim=0 of Linear.weight have norm"):
        tritonorm.bounded_weight_norm(linear)
    assert not parametrize.is_parametrized(linear)


def test_twice_and_removal_errors():
    linear = tritonorm.bounded_weight_norm(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"Linear.weight already has bounded_weight_norm"):
        tritonorm.bounded_weight_norm(linear)
    with pytest.raises(ValueError, match=r"Linear.bias has no bounded_weight_norm"):
        tritonorm.remove_bounded_weight_norm(linear, "bias")
    buffered = nn.Linear(3, 4)
    buffered.register_buffer("scale", torch.ones(4))
    with pytest.raises(ValueError, match=r"name: Linear.scale is not a parameter"):
        tritonorm.bounded_weight_norm(buffered, "scale")
    integer = nn.Module()
    integer.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError,
                       match=r"weight must be a floating-point tensor with one dim or more, got torch.int64"):
        tritonorm.bounded_weight_norm(integer)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"v": torch.ones(3, 4, dtype=torch.int32)}, TypeError, r"v must be float16, bfloat16, float32 or float64"),
    ({"v": torch.ones(0, 4)}, ValueError, r"v must have at least one dim and one element, got shape \(0, 4\)"),
    ({"rho": torch.ones((), dtype=torch.long)}, TypeError, r"rho must be a number or a floating-point tensor"),
    ({"rho": -1.0}, ValueError, r"rho must be a finite number > 0, got -1.0"),
    ({"rho": torch.ones(4)}, ValueError, r"rho must have shape \(\) or \(3,\) \(one per slice along dim=0\)"),
    ({"dim": -3}, ValueError, r"dim must be an int in \[-2, 1\] for v of shape \(3, 4\), got -3"),
    ({"eps": -1e-3}, ValueError, r"eps must be a finite number > 0"),
], ids=["int-v", "empty-v", "int-rho", "negative-rho", "rho-shape", "dim", "eps"])
def test_functional_errors(kwargs, error, message):
    args = {"v": torch.randn(3, 4), "rho": torch.tensor(1.0), "dim": 0, "eps": 1e-12} | kwargs
    with pytest.raises(error, match=message):
        F.bounded_weight(args["v"], args["rho"], dim=args["dim"], eps=args["eps"])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_functional_rho_tensor_used_as_given(backend):
    """A tensor rho is never read on the host (a device sync on CUDA): a negative () rho
    flips every slice, as a negative (S,) scale flips its own, and NaN propagates."""
    v = torch.randn(3, 4)
    w = F.bounded_weight(v, 1.5, backend=backend)
    torch.testing.assert_close(F.bounded_weight(v, torch.tensor(-1.5), backend=backend), -w)
    assert F.bounded_weight(v, torch.tensor(math.nan), backend=backend).isnan().all()


# ----------------------------------------------------------------------------- learning-rate correction


def test_corrected_lr():
    norms = torch.tensor([2.0, 1.0, 3.0])
    wd_norms = torch.tensor([1.0, 2.0, 1.5])
    torch.testing.assert_close(tritonorm.corrected_lr(0.1, norms, wd_norms), torch.tensor([0.4, 0.025, 0.4]))
    per_layer = tritonorm.corrected_lr(0.1, norms, wd_norms, per_channel=False)
    assert per_layer.shape == () and per_layer.item() == pytest.approx(0.1 * 14 / 7.25)
    torch.testing.assert_close(tritonorm.corrected_lr(0.1, wd_norms, wd_norms), torch.full((3,), 0.1))


def test_slice_norms_match_the_layer():
    conv = nn.Conv2d(3, 5, 3)
    torch.testing.assert_close(tritonorm.slice_norms(conv.weight), conv.weight.detach().flatten(1).norm(dim=1))
    torch.testing.assert_close(tritonorm.slice_norms(conv.weight, dim=1),
                               conv.weight.detach().transpose(0, 1).flatten(1).norm(dim=1))
    assert not tritonorm.slice_norms(conv.weight).requires_grad
    rows = conv.weight.detach().flatten(1)
    torch.testing.assert_close(tritonorm.slice_norms(conv.weight, p=1), rows.abs().sum(1))
    torch.testing.assert_close(tritonorm.slice_norms(conv.weight, p=math.inf), rows.abs().amax(1))
    with pytest.raises(ValueError, match=r"p must be 2, 1 or float\('inf'\)"):
        tritonorm.slice_norms(conv.weight, p=3)


@pytest.mark.parametrize("args, error, message", [
    ((-0.1, torch.ones(3), torch.ones(3)), ValueError, r"lr must be a finite number >= 0, got -0.1"),
    ((0.1, torch.ones(3), torch.ones(2)), ValueError, r"norms and wd_norms must have the same shape"),
    ((0.1, torch.ones(3), torch.tensor([1.0, 0.0, 1.0])), ValueError, r"wd_norms must be finite and > 0"),
    ((0.1, torch.tensor([1.0, math.nan, 1.0]), torch.ones(3)), ValueError, r"norms must be finite and >= 0"),
    ((0.1, [1.0], torch.ones(1)), TypeError, r"norms must be a floating-point tensor"),
], ids=["lr", "shape", "zero-wd-norm", "nan-norm", "list"])
def test_corrected_lr_errors(args, error, message):
    with pytest.raises(error, match=message):
        tritonorm.corrected_lr(*args)


def test_meta_module_is_refused_with_a_clear_error():
    """rho and the gain come from the weight's values, which a meta module does not have."""
    linear = nn.Linear(3, 4, device="meta")
    with pytest.raises(ValueError, match=r"weight: Linear.weight is on the meta device; .* materialize the module"):
        tritonorm.bounded_weight_norm(linear)
    assert not parametrize.is_parametrized(linear)
