"""Triton (interpreted on CPU, compiled on CUDA) against the float64 PyTorch reference:
the input sums, the weight transform and whole layers, values and gradients."""

import pytest
import torch
from equinorm_utils import positive_input, random_weight, run_layer
from tolerances import assert_close

from tritonorm import functional as F
from tritonorm.ops import equinorm as equi_ops
from tritonorm.reference import equinorm as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (weight shape, groups): odd kernels, grouped and depthwise, linear, 3-d, a row longer
# than one tile (300 x 3 > 1024), a kernel longer than one tile (33 x 33 > 1024), and rows
# read several to a program: grouped 1x1 rows of 16 (one warp's 16-byte vectors need 8 of
# them; the program's rows span both convolution groups) and a stem conv's rows of 147
# (not a multiple of 16 bytes: 2 to 8 of them, by dtype).
WEIGHTS = [
    ((6, 4, 3, 3), 1),
    ((6, 3, 3, 2), 2),
    ((4, 1, 3, 3), 4),
    ((5, 37), 1),
    ((3, 2, 3, 3, 3), 1),
    ((3, 300, 3), 1),
    ((2, 2, 33, 33), 1),
    ((8, 16, 1, 1), 2),
    ((8, 3, 7, 7), 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(WEIGHTS)))
@pytest.mark.parametrize("single_pass", [True, False], ids=["single", "exact"])
def test_weight_transform(dtype, case, single_pass, device):
    shape, groups = WEIGHTS[case]
    with_gain = case % 2 == 0
    g = torch.Generator().manual_seed(case)
    w = random_weight(shape, dtype, device, seed=case)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    mass = (torch.rand(shape[1] * groups, generator=g) + 0.1).to(device, acc)
    gain = (torch.rand(shape[0], generator=g) + 0.5).to(device, dtype) if with_gain else None
    grad = torch.randn(shape, generator=g).to(device, dtype)

    def run(backend, w, mass, gain, grad):
        leaves = [t.detach().clone().requires_grad_() for t in (w, mass) + ((gain,) if with_gain else ())]
        out = F.equinorm_weight(*leaves[:2], leaves[2] if with_gain else None, groups=groups,
                                single_pass=single_pass, backend=backend)
        out.backward(grad.to(out.dtype))
        return [out.detach()] + [t.grad for t in leaves]

    tri = run("triton", w, mass, gain, grad)
    exp = run("torch", *(None if t is None else t.double() for t in (w, mass, gain, grad)))
    assert tri[0].dtype == dtype and tri[1].dtype == dtype and tri[2].dtype == mass.dtype
    row = w[0].numel()
    assert_close(tri[0], exp[0], dtype, "w''")
    assert_close(tri[1], exp[1], dtype, "dweight")
    # sums over a row, accumulated in fp32 (fp64) whatever the weight's dtype
    assert_close(tri[2], exp[2], acc, "dmass", scale=row**0.5)
    if with_gain:
        assert_close(tri[3], exp[3], dtype, "dgain", scale=row**0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "rows", "3d", "leading_slice"])
def test_input_sums(dtype, layout, device):
    shapes = {"contiguous": (3, 5, 7, 6), "channels_last": (3, 5, 7, 6), "rows": (37, 70), "3d": (2, 3, 4, 5, 3),
              "leading_slice": (6, 5, 7, 6)}
    x = positive_input(shapes[layout], dtype, device, channels_last=layout == "channels_last")
    if layout == "leading_slice":
        x = x[:4]  # what stats_fraction takes
    v = equi_ops.input_sums(x)
    assert v.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    n = x.numel() // x.shape[1]
    assert_close(v, ref.input_sums(x.double()), v.dtype, "v", scale=n**0.5)


# One entry per layer configuration: (input shape, weight shape, conv options or None
# for linear, extra options).
LAYERS = {
    "conv2d": ((3, 4, 7, 6), (6, 4, 3, 3), dict(nd=2, padding=1), {}),
    "conv2d_exact": ((3, 4, 7, 6), (6, 4, 3, 3), dict(nd=2, padding=1), dict(single_pass=False)),
    "conv2d_strided_grouped_circular": (
        (3, 4, 9, 8), (6, 2, 3, 3), dict(nd=2, stride=2, padding=2, dilation=2, groups=2, padding_mode="circular"), {}),
    "conv2d_channels_last": ((3, 4, 7, 6), (5, 4, 1, 1), dict(nd=2), dict(channels_last=True)),
    "conv2d_depthwise_valid": ((2, 3, 6, 7), (3, 1, 3, 2), dict(nd=2, groups=3, padding="valid"), {}),
    "conv1d_same_reflect": ((4, 3, 11), (5, 3, 4), dict(nd=1, padding="same", padding_mode="reflect"), {}),
    "conv3d": ((2, 2, 5, 4, 3), (3, 2, 3, 3, 3), dict(nd=3, stride=(1, 2, 1), padding=1), {}),
    "stats_fraction": ((5, 4, 6, 6), (6, 4, 3, 3), dict(nd=2, padding=1), dict(stats_fraction=0.5)),
    "linear": ((3, 5, 7), (4, 7), None, dict(stats_fraction=0.7)),
    "eval": ((3, 4, 7, 6), (6, 4, 3, 3), dict(nd=2, padding=1), dict(training=False)),
    "momentum_none": ((3, 4, 7, 6), (6, 4, 3, 3), dict(nd=2, padding=1), dict(momentum=None, affine=False)),
}
LAYER_DTYPES = {"conv2d": DTYPES, "linear": [torch.float32, torch.bfloat16]}


def _layer_cases():
    for name in LAYERS:
        for dtype in LAYER_DTYPES.get(name, [torch.float32]):
            yield pytest.param(name, dtype, id=f"{name}-{dtype}")


@pytest.mark.parametrize("name, dtype", list(_layer_cases()))
def test_layer(name, dtype, device):
    x_shape, w_shape, conv, options = LAYERS[name]
    options = dict(options)
    x = positive_input(x_shape, dtype, device, channels_last=options.pop("channels_last", False))
    kwargs = dict(conv=conv, linear=conv is None, **options)
    tri = run_layer(x, w_shape, "triton", **kwargs)
    exp = run_layer(x.double(), w_shape, "torch", grad_dtype=dtype, **kwargs)
    # y and the gradients go through a convolution in ``dtype``: errors are its rounding,
    # relative to each tensor's largest value
    for key in ("y", "dx", "dweight", "dgain", "dbias"):
        if key in tri:
            assert_close(tri[key], exp[key], dtype, key, scale=max(1.0, exp[key].abs().max().item()))
    assert_close(tri["running_mean"], exp["running_mean"], dtype, "running_mean")
    if options.get("training", True):
        assert not torch.equal(tri["running_mean"], torch.ones_like(tri["running_mean"]))
