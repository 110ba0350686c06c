"""What an EquiNorm backward dispatches around its kernels on the Triton path, counted with
a TorchDispatchMode (``dispatch_utils``): no zero-filled gradient, no copy, and no pass
over the activation but the convolution's own backward and the one add that sums its
input gradient with the input sums' broadcast one (docs/equinorm.md, "What the kernels
move")."""

import pytest
import torch
from dispatch_utils import backward_ops, data_ops, fills_and_copies
from equinorm_utils import positive_input, random_weight

import tritonorm
from tritonorm.ops import equinorm as equi_ops

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gain", [True, False], ids=["gain", "no_gain"])
@pytest.mark.parametrize("single_pass", [True, False], ids=["single", "exact"])
def test_weight_op_backward_is_one_op(dtype, gain, single_pass, device):
    """s and b (outputs without a gradient) cost no aten.zeros; dL/dgain comes out of the
    kernel in the gain's dtype, dL/dmass in the mass's: the backward op is all there is."""
    w = random_weight((6, 2, 3, 3), dtype, device).requires_grad_()
    mass = (torch.rand(4, device=device) + 0.5).requires_grad_()
    g = (torch.rand(6, device=device) + 0.5).to(dtype).requires_grad_() if gain else None
    out, _, _ = equi_ops.equinorm_weight(w, mass, g, 2, single_pass)
    ops = backward_ops(out, [w, mass] + ([g] if gain else []), torch.randn_like(out))
    assert data_ops(ops) == ["tritonorm.equinorm_weight_backward"]


@pytest.mark.parametrize("rows", [None, 2])
def test_input_sums_backward_is_a_broadcast(rows, device):
    """dL/dx of the input sums is a stride-0 view of (1, C) values, or with ``rows`` of
    (N, C): nothing of the input's size is allocated, filled or copied."""
    x = positive_input((3, 4, 5, 6), device=device).requires_grad_()
    v = equi_ops.input_sums(x, rows)
    ops = backward_ops(v, x, torch.randn_like(v))
    assert all(op.numel <= x.shape[0] * x.shape[1] for op in ops if not op.view), ops
    assert not fills_and_copies(ops)
    (dx,) = torch.autograd.grad(equi_ops.input_sums(x, rows), x, torch.ones(4, device=device))
    assert dx.stride()[2:] == (0, 0)
    expected = torch.zeros_like(x)
    expected[: x.shape[0] if rows is None else rows] = 1
    torch.testing.assert_close(dx, expected)


# (layer, input shape, the backward's own data ops): the convolution's (or the linear's)
# backward, then the weight transform's op, the multiply of dL/dm by ratio / count, and the
# add of the input-sums gradient into the input gradient.
CONV_OPS = ["aten.convolution_backward", "tritonorm.equinorm_weight_backward", "aten.mul", "aten.add"]
LAYERS = {
    "conv2d": (lambda: tritonorm.EquiNormConv2d(4, 6, 3, padding=1, backend="triton"), (2, 4, 8, 8), CONV_OPS),
    "conv2d_exact_grouped_strided": (
        lambda: tritonorm.EquiNormConv2d(4, 6, 3, stride=2, padding=1, groups=2, single_pass=False,
                                         backend="triton"), (2, 4, 8, 8), CONV_OPS),
    "conv2d_no_affine": (lambda: tritonorm.EquiNormConv2d(4, 6, 3, padding=1, affine=False, backend="triton"),
                         (2, 4, 8, 8), CONV_OPS),
    "conv1d": (lambda: tritonorm.EquiNormConv1d(4, 6, 3, padding=1, backend="triton"), (3, 4, 40), CONV_OPS),
    "conv3d": (lambda: tritonorm.EquiNormConv3d(2, 3, 3, padding=1, backend="triton"), (2, 2, 4, 5, 6), CONV_OPS),
    # a quarter of the batch gives the statistics: the row indicator times dL/dv, (N, C)
    "stats_fraction": (
        lambda: tritonorm.EquiNormConv2d(4, 6, 3, padding=1, stats_fraction=0.25, backend="triton"),
        (8, 4, 6, 6), CONV_OPS[:3] + ["aten.arange", "aten.lt", "aten.mul", "aten.add"]),
    "linear": (lambda: tritonorm.EquiNormLinear(4, 6, backend="triton"), (32, 4),
               ["aten.mm", "aten.mm", "aten.sum", "tritonorm.equinorm_weight_backward", "aten.mul", "aten.add"]),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_backward_ops(name, device):
    """The whole list of data-moving ops of a layer's backward (Triton path, training):
    no aten.zeros (autograd used to fill 2 per layer for s and b), no slice_backward (an
    activation-sized zero gradient and a copy into it), no copy; activation-sized are only
    the convolution's (linear's) input gradient and the add that sums dL/dv into it."""
    make, shape, expected = LAYERS[name]
    torch.manual_seed(0)
    layer = make().to(device)
    x = positive_input(shape, device=device).requires_grad_()
    y = layer(x)
    ops = backward_ops(y, [x, *layer.parameters()], torch.randn_like(y))
    assert data_ops(ops) == expected
    dgrad = "aten.mm" if name == "linear" else "aten.convolution_backward"
    assert data_ops(ops, min_numel=x.numel()) == [dgrad, "aten.add"]


def test_layer_backward_ops_bf16_and_channels_last(device):
    """bf16 weights and a channels_last bf16 input: the same ops, plus the one cast of
    dL/dv (C_in values, fp32) to the input's dtype before it is broadcast."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(4, 6, 3, padding=1, backend="triton").to(device, torch.bfloat16)
    x = positive_input((2, 4, 8, 8), torch.bfloat16, device, channels_last=True).requires_grad_()
    y = layer(x)
    ops = backward_ops(y, [x, *layer.parameters()], torch.randn_like(y))
    assert [(op.name, op.numel) for op in fills_and_copies(ops)] == [("aten._to_copy", 4)]
    assert data_ops(ops, min_numel=x.numel()) == ["aten.convolution_backward", "aten.add"]


def test_eval_backward_has_no_input_sums(device):
    """Eval: the mass comes from running_mean (no gradient), so the backward is the
    convolution's and the weight transform's, nothing else."""
    torch.manual_seed(0)
    layer = tritonorm.EquiNormConv2d(4, 6, 3, padding=1, backend="triton").to(device).eval()
    x = positive_input((2, 4, 8, 8), device=device).requires_grad_()
    y = layer(x)
    ops = backward_ops(y, [x, *layer.parameters()], torch.randn_like(y))
    assert data_ops(ops) == ["aten.convolution_backward", "tritonorm.equinorm_weight_backward"]
