"""The Lp batch norms (L1, L-inf, Top-k) refuse bad input with an error that names the
argument and what was expected."""

import pytest
import torch
from lp_utils import NORMS, call

import tritonorm

BACKENDS = ("triton", "torch")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_wrong_ndim_for_the_module():
    with pytest.raises(ValueError, match=r"L1BatchNorm2d expects 4-d input, got 3-d"):
        tritonorm.L1BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"TopkBatchNorm1d expects 2-d or 3-d input, got 4-d"):
        tritonorm.TopkBatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"LinfBatchNorm3d expects 5-d input"):
        tritonorm.LinfBatchNorm3d(3)(torch.randn(2, 3, 4, 4))


def test_wrong_channel_count():
    with pytest.raises(ValueError, match=r"expects 3 channels \(dim 1\), got input of shape \(2, 4, 5, 5\)"):
        tritonorm.LinfBatchNorm2d(3)(torch.randn(2, 4, 5, 5))


@pytest.mark.parametrize("norm", NORMS)
def test_one_value_per_channel_in_training(norm, backend):
    with pytest.raises(ValueError, match=r"more than 1 value per channel when training, got input size \(1, 3\)"):
        call(norm, torch.randn(1, 3), backend=backend, training=True, k=1)
    # eval with one value per channel is fine, as in torch
    y = call(norm, torch.randn(1, 3), backend=backend, running_mean=torch.zeros(3), running_dev=torch.ones(3), k=1)
    assert y.shape == (1, 3)


def test_k_larger_than_n(backend):
    with pytest.raises(ValueError, match=r"k=7 is larger than the 6 values per channel"):
        tritonorm.functional.topk_batch_norm(torch.randn(2, 3, 3), training=True, k=7, backend=backend)
    with pytest.raises(ValueError, match=r"k must be a positive integer, got 0"):
        tritonorm.TopkBatchNorm2d(3, k=0)


@pytest.mark.parametrize("dtype", (torch.int64, torch.int32, torch.bool, torch.complex64))
def test_non_float_input(dtype, backend):
    with pytest.raises(TypeError, match=rf"input must be float16, bfloat16, float32 or float64, got {dtype}"):
        tritonorm.functional.l1_batch_norm(torch.ones(4, 3, dtype=dtype), training=True, backend=backend)


def test_parameter_shapes_and_types(backend):
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\) for input with 3 channels, got \(4,\)"):
        tritonorm.functional.l1_batch_norm(x, weight=torch.ones(4), training=True, backend=backend)
    with pytest.raises(ValueError, match=r"running_dev must have shape \(3,\)"):
        tritonorm.functional.l1_batch_norm(x, torch.zeros(3), torch.ones(3, 1), training=True, backend=backend)
    with pytest.raises(TypeError, match=r"bias must be a floating-point tensor, got torch.int64"):
        tritonorm.functional.l1_batch_norm(x, bias=torch.zeros(3, dtype=torch.long), training=True, backend=backend)
    with pytest.raises(ValueError, match=r"must be given together"):
        tritonorm.functional.l1_batch_norm(x, torch.zeros(3), None, training=True, backend=backend)


def test_missing_running_stats_in_eval(backend):
    with pytest.raises(ValueError, match=r"running_mean and running_dev are required when training=False"):
        tritonorm.functional.linf_batch_norm(torch.randn(4, 3), backend=backend)


def test_scalar_arguments(backend):
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got -1"):
        tritonorm.functional.l1_batch_norm(x, training=True, eps=-1, backend=backend)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\] or None, got 2"):
        tritonorm.functional.l1_batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=2, backend=backend)
    with pytest.raises(ValueError, match=r"momentum=None \(cumulative average\) needs num_batches_tracked"):
        tritonorm.functional.l1_batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=None,
                                           backend=backend)
    with pytest.raises(ValueError, match=r"num_features must be a positive integer, got 0"):
        tritonorm.L1BatchNorm1d(0)


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got list"):
        tritonorm.functional.l1_batch_norm([[1.0, 2.0]], training=True)


def test_topk_k_beyond_the_triton_limit():
    x = torch.randn(70, 2)
    with pytest.raises(ValueError, match=r"backend='triton' takes k <= 64, got k=65"):
        tritonorm.functional.topk_batch_norm(x, training=True, k=65, backend="triton")


@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_non_finite_input_gives_non_finite_output_not_garbage(norm, backend, lp_path):
    """As in torch's BatchNorm: a NaN in a channel makes that channel NaN, others are fine
    (forward and backward, on chip and split)."""
    x = torch.randn(6, 2, 3)
    x[0, 0, 0] = float("nan")
    x.requires_grad_()
    fn = getattr(tritonorm.functional, f"{norm}_batch_norm")
    y = fn(x, training=True, backend=backend, **({"k": 3} if norm == "topk" else {}))
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1]).all()
    y.backward(torch.randn_like(y))
    assert torch.isnan(x.grad[:, 0]).all() and torch.isfinite(x.grad[:, 1]).all()


# ----------------------------------------------------------------------------- issue 12


@pytest.mark.parametrize("layer", [tritonorm.L1BatchNorm2d, tritonorm.LinfBatchNorm1d, tritonorm.TopkBatchNorm3d])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\] or None, got 1.5"),
    (dict(momentum=True), ValueError, r"momentum must be a number in \[0, 1\] or None, got True"),
    (dict(eps=-1e-5), ValueError, r"eps must be a finite number >= 0, got -1e-05"),
    (dict(eps=float("nan")), ValueError, r"eps must be a finite number >= 0, got nan"),
    (dict(backend="cuda"), ValueError, r"backend must be one of 'auto', 'triton', 'torch', got 'cuda'"),
    (dict(backend=None), ValueError, r"backend must be one of 'auto', 'triton', 'torch', got None"),
    (dict(affine=1), TypeError, r"affine must be a bool, got 1"),
    (dict(normalized="yes"), TypeError, r"normalized must be a bool, got 'yes'"),
], ids=["momentum", "momentum-bool", "eps", "eps-nan", "backend", "backend-none", "affine", "normalized"])
def test_constructor_checks_its_arguments(layer, kwargs, error, match):
    """At construction, as EquiNorm does, not at the first forward."""
    with pytest.raises(error, match=match):
        layer(3, **kwargs)


def test_topk_k_is_an_int():
    with pytest.raises(ValueError, match=r"k must be a positive integer, got True"):
        tritonorm.TopkBatchNorm2d(3, k=True)


@pytest.mark.parametrize("norm", NORMS)
def test_bool_is_not_a_number(norm, backend):
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got True"):
        call(norm, torch.randn(4, 3), backend=backend, training=True, eps=True)


@pytest.mark.parametrize("norm", NORMS)
def test_eps_zero_is_refused_in_training_and_defined_in_eval(norm, backend):
    """As nn.BatchNorm: a batch's dispersion can be 0, so training needs eps > 0; in eval the
    running dispersion is the user's, and eps=0 gives the same result on both paths."""
    x = torch.randn(6, 3, 4)
    x[:, 0] = 2.0  # a constant channel: sigma = 0
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0"):
        call(norm, x, backend=backend, training=True, eps=0.0, k=2)
    rm, rd = torch.tensor([0.5, 0.1, -0.2]), torch.tensor([2.0, 0.5, 1.5])
    y = call(norm, x, backend=backend, running_mean=rm, running_dev=rd, eps=0.0, k=2)
    torch.testing.assert_close(y, (x - rm.view(1, 3, 1)) / rd.view(1, 3, 1))


@pytest.mark.parametrize("norm", NORMS)
def test_nothing_changes_before_the_checks_pass(norm, backend):
    """A layer in training counts the batch and updates its statistics only for a call that
    passes every check, including the checks of attributes reassigned after construction."""
    layer = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d,
             "topk": lambda c, **kw: tritonorm.TopkBatchNorm2d(c, k=10, **kw)}[norm](3, backend=backend)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad_inputs = [torch.ones(2, 3, 2, 2, dtype=torch.int32), torch.randn(1, 3, 1, 1)]
    if norm == "topk":
        bad_inputs.append(torch.randn(2, 3, 2, 2))  # 8 values per channel < k
    for bad in bad_inputs:
        with pytest.raises((TypeError, ValueError)):
            layer(bad)
    layer.eps = -1.0
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got -1.0"):
        layer(torch.randn(2, 3, 3, 3))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
