"""EquiNorm layers: the paper's invariants, eval mode, folding, initialisation, state_dict,
the guard and bad input.  Every test runs on both paths where the path matters."""

import copy

import pytest
import torch
from equinorm_utils import positive_input
from torch import nn

import tritonorm
from tritonorm import functional as F

BACKENDS = ["triton", "torch"]


def conv_of(layer, x, weight):
    """The convolution the layer runs, with another weight (no gain, no bias)."""
    return layer._geometry.conv(x, weight, None, layer.groups)


@pytest.mark.parametrize("backend", BACKENDS)
def test_figure1_single_channel(backend, device):
    """Paper, Figure 1: a 3x3 kernel on one 3x3 image with cyclic padding 1, exact form:
    the positive and the negative weights each contribute 9.0 in total, and the output
    has mean 0."""
    layer = tritonorm.EquiNormConv2d(1, 1, 3, padding=1, padding_mode="circular", single_pass=False,
                                     backend=backend).to(device)
    x = positive_input((1, 1, 3, 3), device=device)
    w = layer.normalized_weight(x).detach()
    positive = conv_of(layer, x, w.clamp(min=0)).sum()
    negative = conv_of(layer, x, w.clamp(max=0)).sum()
    torch.testing.assert_close(positive.item(), 9.0, rtol=1e-5, atol=0)
    torch.testing.assert_close(negative.item(), -9.0, rtol=1e-5, atol=0)
    assert abs(conv_of(layer, x, w).mean().item()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel, padding", [(3, 1), (5, 2), (1, 0)])
def test_figure1_many_channels(backend, kernel, padding, device):
    """The same with many channels: per output channel, the output's mean is 0 over the
    batch, and the positive / negative weights contribute +r / -r, r = N * H * W."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, kernel, padding=padding, padding_mode="circular", single_pass=False,
                                     backend=backend).to(device)
    x = positive_input((2, 3, 5, 6), device=device)
    w = layer.normalized_weight(x).detach()
    r = 2 * 5 * 6
    dims = (0, 2, 3)
    torch.testing.assert_close(conv_of(layer, x, w.clamp(min=0)).sum(dims), torch.full((4,), float(r), device=device))
    torch.testing.assert_close(conv_of(layer, x, w.clamp(max=0)).sum(dims), torch.full((4,), -float(r), device=device))
    torch.testing.assert_close(conv_of(layer, x, w).mean(dims), torch.zeros(4, device=device), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer_fn", [
    lambda b: tritonorm.EquiNormConv2d(3, 5, 3, stride=2, padding=1, backend=b),
    lambda b: tritonorm.EquiNormConv1d(3, 4, 3, dilation=2, backend=b, single_pass=False),
    lambda b: tritonorm.EquiNormLinear(6, 4, backend=b),
], ids=["conv2d", "conv1d", "linear"])
@pytest.mark.parametrize("alpha", [0.01, 7.0])
def test_scale_invariance(backend, layer_fn, alpha, device):
    """In training, y(alpha x) = y(x) for alpha > 0: b does not see the scale and s
    takes it out."""
    torch.manual_seed(0)
    layer = layer_fn(backend).to(device)
    shape = (4, 6) if isinstance(layer, tritonorm.EquiNormLinear) else (4, 3, 8, 7)[: 2 + layer._geometry.nd]
    x = positive_input(shape, device=device)
    torch.testing.assert_close(layer(alpha * x), layer(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pass_equals_exact_without_sign_change(backend, device):
    """The single-pass form assumes no weight changes sign when b is added; when none
    does, the two forms are the same, and when some do, they differ."""
    g = torch.Generator().manual_seed(0)
    magnitude = 1 + torch.rand(6, 4, 3, 3, generator=g)
    signs = torch.where(torch.arange(36).view(4, 3, 3) % 2 == 0, 1.0, -1.0)
    w = (magnitude * signs).to(device)  # |w| >= 1, about as many of each sign: |b| < 1
    mass = (torch.rand(4, generator=g) + 0.5).to(device)
    _, _, b = tritonorm.reference.equinorm.equinorm_transform(w, mass, 1, True)
    assert (b.abs() < 1).all()
    single = F.equinorm_weight(w, mass, single_pass=True, backend=backend)
    exact = F.equinorm_weight(w, mass, single_pass=False, backend=backend)
    torch.testing.assert_close(single, exact)
    # Adding a constant to every weight changes b by minus that constant: the exact form
    # does not move, the single-pass one does once signs flip (-2 < w < -1 -> 0 < w + 1.5).
    w_shifted = w + 1.5
    torch.testing.assert_close(F.equinorm_weight(w_shifted, mass, single_pass=False, backend=backend), exact)
    assert not torch.allclose(F.equinorm_weight(w_shifted, mass, single_pass=True, backend=backend), exact)


def _trained(layer, x, steps=3):
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    for i in range(steps):
        layer(x * (1 + i)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_mean_and_eval(backend, momentum, device):
    """running_mean follows the batch means with torch's momentum rule; eval uses it,
    scaled to the input size, for any batch size and resolution, one sample at a time."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, momentum=momentum, backend=backend).to(device)
    x = positive_input((4, 3, 8, 8), device=device)
    _trained(layer, x)
    means = [(x * (1 + i)).mean((0, 2, 3)) for i in range(3)]
    expected = torch.ones(3, device=device)
    for i, m in enumerate(means):
        f = 0.1 if momentum is not None else 1 / (i + 1)
        expected = (1 - f) * expected + f * m
    torch.testing.assert_close(layer.running_mean, expected)
    assert layer.num_batches_tracked.item() == 3

    layer.eval()
    for shape in [(1, 3, 8, 8), (5, 3, 12, 10)]:
        x_eval = positive_input(shape, device=device, seed=7)
        w = F.equinorm_weight(layer.weight, layer.running_mean, layer.gain, backend="torch")
        expected_y = conv_of(layer, x_eval, w) + layer.bias.view(1, -1, 1, 1)
        y = layer(x_eval)
        torch.testing.assert_close(y, expected_y, atol=1e-5, rtol=1e-5)
        one_by_one = torch.cat([layer(x_eval[i:i + 1]) for i in range(shape[0])])
        torch.testing.assert_close(one_by_one, y, atol=1e-5, rtol=1e-5)
    assert layer.num_batches_tracked.item() == 3
    torch.testing.assert_close(layer.running_mean, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_scales_running_mean_to_input_size(backend, device):
    """With 'valid' padding the output is smaller than the input; in training the mass is
    v / (N * H_out * W_out); eval gets the same mass from the running mean when the input
    is the training batch, so eval and training outputs agree there."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, stride=2, momentum=1.0, backend=backend).to(device)
    x = positive_input((4, 3, 9, 8), device=device)
    y_train = layer(x)
    layer.eval()
    torch.testing.assert_close(layer(x), y_train, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_fraction(backend, device):
    """Statistics come from the first samples only: the rest of the batch does not change
    the normalized weight, and gets no gradient through it."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, stats_fraction=0.25, backend=backend).to(device)
    x = positive_input((8, 3, 6, 6), device=device)
    x2 = x.clone()
    x2[2:] = x2[2:] * 3 + 1
    torch.testing.assert_close(layer.normalized_weight(x2), layer.normalized_weight(x))
    x = x.requires_grad_()
    w = layer.normalized_weight(x)
    w.square().sum().backward()
    assert x.grad[:2].abs().sum() > 0 and (x.grad[2:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_weight_is_what_forward_uses(backend, device):
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(4, 6, 3, padding=1, groups=2, backend=backend).to(device)
    nn.init.uniform_(layer.gain, 0.5, 1.5)
    nn.init.normal_(layer.bias)
    x = positive_input((3, 4, 7, 6), device=device)
    w = layer.normalized_weight(x) * layer.gain.view(-1, 1, 1, 1)
    before = layer.running_mean.clone()
    expected = conv_of(layer, x, w) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer.running_mean, before)  # normalized_weight leaves it
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


FOLD_CASES = {
    "conv2d_stride2": (lambda b: tritonorm.EquiNormConv2d(3, 5, 3, stride=2, padding=1, backend=b), (2, 3, 8, 6), None),
    "conv2d_circular": (lambda b: tritonorm.EquiNormConv2d(3, 5, 3, padding=1, padding_mode="circular",
                                                          single_pass=False, backend=b), (2, 3, 7, 5), None),
    "conv1x1_stride2": (lambda b: tritonorm.EquiNormConv2d(4, 6, 1, stride=2, backend=b), (2, 4, 8, 8), None),
    "conv3d_grouped": (lambda b: tritonorm.EquiNormConv3d(4, 4, 3, padding=1, groups=2, backend=b), (2, 4, 4, 4, 4),
                       None),
    "conv2d_valid": (lambda b: tritonorm.EquiNormConv2d(3, 5, 3, backend=b), (2, 3, 9, 7), (9, 7)),
    "linear": (lambda b: tritonorm.EquiNormLinear(6, 5, backend=b), (3, 4, 6), None),
    "no_affine": (lambda b: tritonorm.EquiNormConv1d(3, 5, 3, padding=1, affine=False, backend=b), (2, 3, 10), None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FOLD_CASES)
def test_fold_equals_eval(backend, name, device):
    torch.manual_seed(0)
    make, shape, input_size = FOLD_CASES[name]
    layer = make(backend).to(device)
    if layer.affine:
        nn.init.uniform_(layer.gain, 0.5, 1.5)
        nn.init.normal_(layer.bias)
    _trained(layer, positive_input(shape, device=device))
    layer.eval()
    plain = layer.fold(input_size)
    assert type(plain) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    assert (plain.bias is None) == (not layer.affine)
    x = positive_input(shape, device=device, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), atol=1e-5, rtol=1e-5)


def test_fold_needs_input_size_when_the_output_size_is_not_input_over_stride():
    layer = tritonorm.EquiNormConv2d(3, 5, 3)
    with pytest.raises(ValueError, match="fold\\(\\) needs input_size"):
        layer.fold()
    with pytest.raises(ValueError, match="input_size must give 2 spatial sizes"):
        layer.fold((9, 7, 3))


@pytest.mark.parametrize("make", [
    lambda: tritonorm.EquiNormConv2d(8, 16, 3),
    lambda: tritonorm.EquiNormConv2d(2, 64, 2),
    lambda: tritonorm.EquiNormConv3d(2, 4, (1, 2, 1)),
], ids=["3x3", "2x2", "3d_1x2x1"])
def test_init_balances_every_kernel(make):
    """No kernel w[d, c] is all positive or all negative (the paper's initialisation);
    2-weight kernels make the resampling certain to be needed."""
    torch.manual_seed(0)
    w = make().weight.detach()
    units = w.reshape(w.shape[0] * w.shape[1], -1)
    assert ((units > 0).any(1) & (units < 0).any(1)).all()


@pytest.mark.parametrize("make", [lambda: tritonorm.EquiNormLinear(2, 64), lambda: tritonorm.EquiNormConv2d(2, 64, 1)],
                         ids=["linear", "1x1"])
def test_init_balances_every_row_of_single_position_kernels(make):
    torch.manual_seed(0)
    w = make().weight.detach().reshape(64, 2)
    assert ((w > 0).any(1) & (w < 0).any(1)).all()


def test_balance_signs_keeps_magnitudes():
    torch.manual_seed(0)
    w = torch.rand(4, 3, 3, 3) + 0.1  # every kernel all positive
    magnitudes = w.abs().clone()
    tritonorm.balance_signs_(w)
    torch.testing.assert_close(w.abs(), magnitudes)
    units = w.reshape(12, 9)
    assert ((units > 0).any(1) & (units < 0).any(1)).all()
    with pytest.raises(ValueError, match="units of one weight"):
        tritonorm.balance_signs_(torch.ones(3, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip(backend, device):
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device)
    _trained(layer, positive_input((4, 3, 6, 6), device=device))
    state = layer.state_dict()
    assert set(state) == {"weight", "gain", "bias", "running_mean", "num_batches_tracked"}
    other = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device)
    other.load_state_dict(state)
    x = positive_input((2, 3, 6, 6), device=device, seed=3)
    torch.testing.assert_close(other.eval()(x), layer.eval()(x))


def test_repr():
    assert repr(tritonorm.EquiNormConv2d(3, 4, 3, stride=2, padding=1, groups=1, padding_mode="circular",
                                         single_pass=False, stats_fraction=0.25)) == (
        "EquiNormConv2d(3, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), padding_mode='circular', "
        "affine=True, momentum=0.1, single_pass=False, stats_fraction=0.25)"
    )
    assert repr(tritonorm.EquiNormLinear(3, 4, backend="torch")) == (
        "EquiNormLinear(in_features=3, out_features=4, affine=True, momentum=0.1, backend='torch')"
    )


# ----------------------------------------------------------------------------- the guard


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("single_pass", [True, False])
def test_guard_equal_weights(backend, single_pass, device):
    """A row whose weights are all equal has w + b = 0 and a zero denominator: that
    channel outputs its bias alone and its weights get no gradient; nothing is NaN, and
    the other channels are untouched."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, single_pass=single_pass, backend=backend).to(device)
    nn.init.normal_(layer.bias)
    with torch.no_grad():
        layer.weight[1] = 0.3
    x = positive_input((2, 3, 5, 5), device=device).requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    torch.testing.assert_close(y[:, 1], layer.bias[1].expand_as(y[:, 1]).detach())
    assert y[:, [0, 2, 3]].std() > 0
    for t in (y, x.grad, layer.weight.grad, layer.gain.grad, layer.bias.grad):
        assert torch.isfinite(t).all()
    assert (layer.weight.grad[1] == 0).all() and layer.weight.grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_all_positive_row_single_pass_only(backend, device):
    """Single-pass, a row with no negative weight has a zero denominator (guarded); the
    exact form handles it."""
    w = torch.rand(2, 3, 2, 2, device=device) + 0.1
    w[0, 0, 0, 0] = -1.0
    mass = torch.rand(3, device=device) + 0.5
    single = F.equinorm_weight(w, mass, single_pass=True, backend=backend)
    exact = F.equinorm_weight(w, mass, single_pass=False, backend=backend)
    assert single[0].abs().sum() > 0 and (single[1] == 0).all()
    assert exact[1].abs().sum() > 0 and torch.isfinite(exact).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_non_positive_input_sums(backend, device):
    """Inputs whose channel sums add up to <= 0 (the paper assumes positive inputs): every
    channel outputs its bias; gradients stay finite."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device)
    nn.init.normal_(layer.bias)
    x = -positive_input((2, 3, 5, 5), device=device)
    x.requires_grad_()
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer.bias.view(1, -1, 1, 1).expand_as(y).detach())
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_guard_is_relative_to_rounding(backend, device):
    """A degenerate row's denominator is rounding noise of either sign, not 0: the guard
    must catch every such row (random all-positive rows single-pass, random equal-weight
    rows exact), not only those whose noise came out <= 0."""
    g = torch.Generator().manual_seed(0)
    mass = (torch.rand(16, generator=g) + 0.1).to(device)
    all_positive = (torch.rand(64, 16, 3, 3, generator=g) + 0.01).to(device)
    equal = (torch.randn(64, 1, 1, 1, generator=g) * torch.ones(64, 16, 3, 3)).to(device)
    assert (F.equinorm_weight(all_positive, mass, single_pass=True, backend=backend) == 0).all()
    assert (F.equinorm_weight(equal, mass, single_pass=False, backend=backend) == 0).all()
    healthy = F.equinorm_weight(torch.randn(64, 16, 3, 3, generator=g).to(device), mass, backend=backend)
    assert (healthy.abs().amax((1, 2, 3)) > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend, device):
    """NaN is not a degenerate row: it propagates as in any torch op, and only where it
    belongs (a NaN weight spoils its own output channel)."""
    w = torch.randn(3, 4, 3, 3, device=device)
    w[1, 2, 0, 0] = float("nan")
    out = F.equinorm_weight(w, torch.rand(4, device=device) + 0.5, backend=backend)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()
    x = positive_input((2, 4, 5, 5), device=device)
    x[0, 1, 2, 2] = float("nan")
    y = F.equinorm_conv2d(x, torch.randn(3, 4, 3, 3, device=device), training=True, padding=1, backend=backend)
    assert y.isnan().all()  # the NaN reaches every input sum, so every s


# ----------------------------------------------------------------------------- bad input


def _conv_call(**overrides):
    args = dict(input=torch.rand(2, 4, 5, 5), weight=torch.randn(6, 4, 3, 3), gain=None, bias=None,
                running_mean=torch.ones(4), training=True)
    args.update(overrides)
    return F.equinorm_conv2d(**args)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(input=torch.rand(2, 3, 5, 5)), ValueError, r"expects input of shape \(N, 4, \*\)"),
    (dict(input=torch.rand(2, 4, 5)), ValueError, r"input must have shape \(N, C_in, \*2 spatial dims\)"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, r"expects input of shape"),
    (dict(weight=torch.randn(6, 2, 3, 3), groups=4), ValueError, r"C_out > 0 divisible by groups=4"),
    (dict(weight=torch.randn(0, 4, 3, 3)), ValueError, r"C_out > 0 divisible by groups=1"),
    (dict(weight=torch.randn(6, 1, 1, 1), input=torch.rand(2, 1, 5, 5), running_mean=None),
     ValueError, r"at least 2 weights per output channel"),
    (dict(gain=torch.ones(5)), ValueError, r"gain must have shape \(6,\)"),
    (dict(bias=torch.ones(6, 1)), ValueError, r"bias must have shape \(6,\)"),
    (dict(running_mean=torch.ones(3)), ValueError, r"running_mean must have shape \(4,\) \(one per input channel\)"),
    (dict(running_mean=None, training=False), ValueError, r"running_mean is required when training=False"),
    (dict(stats_fraction=0.0), ValueError, r"stats_fraction must be a number in \(0, 1\], got 0.0"),
    (dict(stats_fraction=1.5), ValueError, r"stats_fraction must be a number in \(0, 1\]"),
    (dict(momentum=2.0), ValueError, r"momentum must be a number in \[0, 1\] or None"),
    (dict(momentum=None), ValueError, r"momentum=None \(cumulative average\) needs num_batches_tracked"),
    (dict(input=torch.rand(2, 4, 5, 5).double()), TypeError, r"input \(torch.float64\) and weight \(torch.float32\)"),
    (dict(input=torch.rand(2, 4, 2, 2)), ValueError, r"too small for kernel size \(3, 3\)"),
    (dict(input=torch.rand(0, 4, 5, 5)), ValueError, r"training needs a non-empty batch"),
    (dict(stride=2, padding="same"), ValueError, r"padding='same' is not supported for strided convolutions"),
    (dict(padding_mode="mirror"), ValueError, r"padding_mode must be one of"),
    (dict(padding="full"), ValueError, r"padding must be 'same', 'valid'"),
    (dict(stride=0), ValueError, r"stride must be an int >= 1"),
    (dict(input=torch.ones(2, 4, 5, 5, dtype=torch.long)), TypeError, r"input must be float16"),
])
def test_bad_functional_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        _conv_call(**overrides)


def test_bad_linear_input():
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 7\)"):
        F.equinorm_linear(torch.rand(3, 6), torch.randn(4, 7), training=True)
    with pytest.raises(ValueError, match=r"mass must have shape \(7,\)"):
        F.equinorm_weight(torch.randn(4, 7), torch.ones(6))


@pytest.mark.parametrize("make, match", [
    (lambda: tritonorm.EquiNormConv2d(1, 4, 1), r"at least 2 weights per output channel"),
    (lambda: tritonorm.EquiNormConv2d(4, 6, 3, groups=4), r"divisible by groups \(4\)"),
    (lambda: tritonorm.EquiNormConv2d(0, 6, 3), r"in_channels must be a positive integer"),
    (lambda: tritonorm.EquiNormConv2d(4, 6, 0), r"kernel_size must be an int >= 1"),
    (lambda: tritonorm.EquiNormLinear(4, 6, stats_fraction=-1), r"stats_fraction must be a number in \(0, 1\]"),
    (lambda: tritonorm.EquiNormLinear(4, 6, momentum=-0.5), r"momentum must be a number in \[0, 1\]"),
    (lambda: tritonorm.EquiNormLinear(4, 6, backend="cuda"), r"backend must be one of"),
])
def test_bad_layer_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layer_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 3, \*\)"):
        tritonorm.EquiNormConv2d(3, 4, 3)(torch.rand(2, 5, 6, 6))


def test_linear_takes_1d_input_like_nn_linear():
    layer = tritonorm.EquiNormLinear(6, 4).eval()
    x = positive_input((1, 6))
    torch.testing.assert_close(layer(x[0]), layer(x)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16(backend, device):
    """fp32 parameters, bf16 compute under autocast, as for nn.Conv2d."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device)
    x = positive_input((2, 3, 6, 6), device=device)
    with torch.autocast(device, torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x).detach(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_equinorm_model(backend, device):
    """The model-level helper: a plain-torch copy with the eval outputs of the original,
    which it leaves untouched; a layer that needs an input size says so by name."""
    torch.manual_seed(0)
    model = nn.Sequential(
        tritonorm.EquiNormConv2d(3, 8, 3, padding=1, backend=backend), nn.ReLU(),
        nn.Sequential(tritonorm.EquiNormConv2d(8, 8, 3, stride=2, backend=backend), nn.ReLU()),
        nn.Flatten(), tritonorm.EquiNormLinear(8 * 3 * 3, 4, backend=backend),
    ).to(device)
    x = positive_input((4, 3, 8, 8), device=device)
    _trained(model, x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot fold '2.0': fold\\(\\) needs input_size"):
        tritonorm.fold_equinorm(model)
    plain = tritonorm.fold_equinorm(model, {"2.0": (8, 8)})
    assert not any(isinstance(m, tritonorm.nn.equinorm._EquiNorm) for m in plain.modules())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="names no EquiNorm layer"):
        tritonorm.fold_equinorm(model, {"2.0": (8, 8), "1": (8, 8)})
    single = tritonorm.EquiNormLinear(5, 3)
    assert type(tritonorm.fold_equinorm(single)) is nn.Linear


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make, shape", [
    (lambda backend: tritonorm.EquiNormConv2d(3, 4, 3, padding=1, backend=backend), (4, 3, 8, 8)),
    (lambda backend: tritonorm.EquiNormLinear(6, 4, backend=backend), (16, 6)),
], ids=["conv", "linear"])
def test_float16_gradients_of_a_large_input_are_finite(backend, make, shape, device):
    """EquiNorm's w'' is about 1 / (input magnitude x fan-in), so dL/dw'' = sum x dy is
    about the input's magnitude times a normal layer's and overflows float16 at 1e4; the
    layer computes it on the input scaled by a power of two, so every gradient is finite
    and matches the float64 computation."""
    torch.manual_seed(0)
    layer = make(backend).to(device)
    x = positive_input(shape, device=device) * 1e4
    dy = torch.randn(layer(x).shape, device=device)
    grads = {}
    for dtype in (torch.float16, torch.float64):
        half = copy.deepcopy(layer).to(dtype)
        xd = x.to(dtype).requires_grad_()
        y = half(xd)
        y.backward(dy.to(dtype))
        assert torch.isfinite(y).all()
        grads[dtype] = [xd.grad, *(p.grad for p in half.parameters())]
    for got, expected in zip(grads[torch.float16], grads[torch.float64], strict=True):
        assert torch.isfinite(got).all()
        scale = expected.abs().max().item()
        assert (got.double() - expected).abs().max().item() <= 2e-2 * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, error, match", [
    (lambda: torch.rand(2, 3, 6, 6, device="meta"), ValueError, r"input is on meta but weight is on cpu"),
    (lambda: torch.rand(2, 3, 2, 2), ValueError, r"too small for kernel size \(3, 3\)"),
    (lambda: torch.rand(2, 3, 6, 6).double(), TypeError, r"input \(torch.float64\) and weight \(torch.float32\)"),
], ids=["device", "too-small", "dtype"])
def test_bad_input_changes_nothing(backend, bad, error, match):
    """The checks, the device's included, run before the running mean or the batch count
    moves."""
    layer = tritonorm.EquiNormConv2d(3, 4, 3, backend=backend)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        layer(bad())
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_balance_signs_needs_floating_point_weights():
    with pytest.raises(TypeError, match=r"weight must be a floating-point tensor of shape \(C_out, C_in, \*\)"):
        tritonorm.balance_signs_(torch.ones(4, 3, 3, 3, dtype=torch.int64))
