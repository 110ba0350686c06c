"""The traffic counter (``tritonorm.bench.traffic``) and the traffic budgets of every op (issue 13).

The counter: the bytes of hand-written kernels against what they must move, the torch ops
outside the kernels, the SM count reaching the planners, and sampled counts against full
ones.  The budgets: per op and pass, the bytes in passes over the activation (or weight),
the launches and the torch ops outside the kernels, each budget written next to its op.
Everything runs in Triton's interpreter (the root conftest sets TRITON_INTERPRET=1).
"""

import functools
import math

import pytest
import torch
import triton
import triton.language as tl

import tritonorm
from tritonorm.bench import enorm_cases, traffic
from tritonorm.bench.traffic import AVERAGED, COPY, FILL, OUTSIDE, SYNC, Sampling, count, count_step
from tritonorm.cli import main
from tritonorm.kernels import channel_reduce, channel_resident

pytestmark = pytest.mark.skipif(not channel_reduce.INTERPRETED, reason="the counter runs Triton's interpreter")

# ----------------------------------------------------------------------------- the counter


@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, (x * 2).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(x_ptr + offs, 1.0, mask=offs < n)


@triton.jit
def _gather_kernel(x_ptr, index_ptr, y_ptr, BLOCK: tl.constexpr):
    """y[i] = x[index[i]]: an index outside x reads memory outside the arguments."""
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + tl.load(index_ptr + i)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked_lanes_of_each_argument(dtype):
    n, block = 1000, 128  # 8 programs, the last with 104 of 128 lanes
    x = torch.randn(n, dtype=dtype)
    y = torch.empty_like(x)
    _, counted = count(lambda: _double_kernel[(triton.cdiv(n, block),)](x, y, n, BLOCK=block))
    nbytes = n * x.element_size()
    (launch,) = counted.launches
    assert (launch.kernel, launch.grid, launch.programs) == ("test_traffic._double_kernel", (8, 1, 1), 8)
    assert (launch.read, launch.written, launch.method) == (nbytes, nbytes, traffic.COUNTED)
    assert launch.arguments == {"x_ptr": (nbytes, 0), "y_ptr": (0, nbytes)}
    assert counted.torch_ops == () and counted.launch_count == 1
    torch.testing.assert_close(y, x * 2)  # the kernel ran


def test_overlapping_arguments_share_an_entry_and_atomics_read_and_write():
    x = torch.zeros(300)
    _, in_place = count(lambda: _double_kernel[(3,)](x, x, 300, BLOCK=128))
    assert in_place.launches[0].arguments == {"x_ptr=y_ptr": (1200, 1200)}
    _, atomic = count(lambda: _add_one_kernel[(3,)](x[:250], 250, BLOCK=128))
    assert atomic.launches[0].arguments == {"x_ptr": (1000, 1000)}
    assert x[:250].eq(1).all() and x[250:].eq(0).all()


def test_addresses_outside_the_arguments():
    table = torch.randn(64)
    x, y = table[:32], torch.empty(16)
    index = torch.tensor([0, 40] * 8)  # 40: in the table, past x
    _, counted = count(lambda: _gather_kernel[(1,)](x, index, y, BLOCK=16))
    assert counted.launches[0].arguments == {"x_ptr": (32, 0), OUTSIDE: (32, 0), "index_ptr": (128, 0),
                                             "y_ptr": (0, 64)}
    torch.testing.assert_close(y, table[index])


def test_torch_ops_outside_the_kernels():
    x, z = torch.randn(10), torch.empty(10)

    def ops():
        torch.zeros(4)  # fill: writes 16 bytes
        x.view(2, 5).t()  # views: nothing
        torch.empty(1000)  # allocation: nothing
        z.copy_(x)  # copy: reads 40, writes 40
        x.add(z)  # compute: reads 80, writes 40
        return x.sum().item()  # compute (the sum), then a host sync

    _, counted = count(ops)
    assert [(op.name, op.kind, op.numel, op.read, op.written) for op in counted.torch_ops] == [
        ("aten.zeros", FILL, 4, 0, 16), ("aten.copy_", COPY, 10, 40, 40), ("aten.add", traffic.COMPUTE, 10, 80, 40),
        ("aten.sum", traffic.COMPUTE, 1, 40, 4), ("aten._local_scalar_dense", SYNC, 0, 4, 0),
    ]
    assert counted.launches == () and counted.launch_count == 5 and counted.bytes == 16 + 80 + 120 + 44 + 4


def test_ops_inside_custom_ops_and_none_from_the_interpreter():
    """A layer's forward: the launcher's allocations are not ops, and the interpreter's own
    copies of the arguments (made while a kernel runs) are not recorded."""
    layer = tritonorm.L1BatchNorm2d(4, backend="triton")
    x = torch.randn(2, 4, 5, 5)
    _, counted = count(functools.partial(layer, x))
    assert "tritonorm.lp_batch_norm" in counted.custom_ops
    assert counted.torch_ops == () and counted.launch_count == len(counted.launches) > 0


def test_launches_planned_for_the_sm_count(monkeypatch):
    x = torch.randn(16, 8, 12, 12)
    view = channel_reduce.channel_view(x)
    grids = {}
    for sms in (1, traffic.H100_SMS):
        _, counted = count(lambda: channel_reduce.partial_sums(view, "sum"), sms=sms)
        grids[sms] = counted.launches[0].grid
    monkeypatch.setattr(channel_reduce, "_num_programs_per_wave", lambda device: traffic.H100_SMS)
    assert grids[traffic.H100_SMS] == (*channel_reduce.plan(view).grid, 1)
    assert grids[1][1] < grids[traffic.H100_SMS][1]  # fewer splits for one SM


def test_the_per_channel_grids_plan_with_the_sm_count():
    """The per-channel (finalize) kernels' grids plan with the SM count too: 1000 channels
    on 77 SMs take blocks of 16 (13 per SM, rounded up to a power of two)."""
    from tritonorm.kernels import lp_batchnorm

    result, _ = count(lambda: lp_batchnorm._finalize_grid(1000, torch.device("cpu")), sms=77)
    assert result == ((63,), 16)


def test_count_errors():
    for sms in (0, True, 1.5):
        with pytest.raises(ValueError, match="sms must be a positive int"):
            count(lambda: None, sms=sms)
    with pytest.raises(RuntimeError, match="do not nest"):
        count(lambda: count(lambda: None))
    for field, value in (("programs", 0), ("window", 1), ("ends", 0), ("ends", 1.0)):
        with pytest.raises(ValueError, match=f"Sampling.{field} must be an int"):
            Sampling(**{field: value})


# Sampled counts against full ones: L1 (two reduction passes, an elementwise one) and Top-k
# (candidates, a per-channel finalize, the selected elements' scatter in the backward), on
# NCHW rows with a partial last tile (20x20: 6 tiles of 64, then 16), odd channel counts (a
# partial channel block), channels_last, several splits; loops long enough to learn their
# period within a program (16x6x20x20 on one SM) and short ones learnt along a line of
# programs.  Sampling with a small window so that it engages at these sizes.
SAMPLING = Sampling(programs=1, window=16)
SAMPLED_CASES = [  # (norm, shape, memory format, SMs)
    ("l1", (16, 6, 20, 20), torch.contiguous_format, 1),
    ("l1", (3, 70, 33, 9), torch.channels_last, 3),
    ("topk", (24, 40, 7, 7), torch.contiguous_format, 2),
    pytest.param("topk", (16, 6, 20, 20), torch.contiguous_format, 1, marks=pytest.mark.slow),
    pytest.param("topk", (3, 70, 33, 9), torch.channels_last, 3, marks=pytest.mark.slow),
]
# The bound on an averaged launch (data-dependent traffic: the selected elements that L-inf
# and Top-k add in the backward elementwise pass), relative to its bytes; measured: 3e-4.
AVERAGED_BOUND = 5e-3


@pytest.mark.parametrize("norm, shape, memory_format, sms", SAMPLED_CASES)
def test_sampled_count_equals_the_full_count(norm, shape, memory_format, sms, split_path):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(memory_format=memory_format)
    x.requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    layer = _bn(norm, shape[1], torch.float32)
    steps = [count_step(functools.partial(layer, x), (x, *layer.parameters()), dy, sms=sms, sampling=sampling)
             for sampling in (None, SAMPLING)]
    for full, sampled in zip(*steps, strict=True):
        assert [op.name for op in sampled.torch_ops] == [op.name for op in full.torch_ops]
        assert [(s.kernel, s.grid) for s in sampled.launches] == [(f.kernel, f.grid) for f in full.launches]
        for f, s in zip(full.launches, sampled.launches, strict=True):
            assert f.method == traffic.COUNTED
            if s.method == AVERAGED:
                assert abs(s.bytes - f.bytes) <= AVERAGED_BOUND * f.bytes, (s, f)
            else:
                assert (s.read, s.written) == (f.read, f.written), (s, f)
    launches = [launch for step in steps[1] for launch in step.launches]
    assert sum(launch.programs for launch in launches) < sum(launch.grid[0] * launch.grid[1] for launch in launches)
    assert any(launch.iterations_predicted for launch in launches)


# ----------------------------------------------------------------------------- budgets

# Launches are planned for one SM: each program of the shapes below then walks 25 to 100
# tiles, about as on 132 SMs at ResNet-50 sizes, so the per-split traffic (partial sums,
# candidates, per-channel loads) weighs about what it weighs there.  Counted with sampling
# (exact but for the selected elements' scatter, see test_sampled_count_equals_the_full_count).
SMS = 1
BUDGET_SAMPLING = Sampling()
# Every op runs at NCHW fp32 and channels_last bf16; the other two pairs are slow.
LAYOUTS = [
    (torch.contiguous_format, torch.float32), (torch.channels_last, torch.bfloat16),
    pytest.param(torch.contiguous_format, torch.bfloat16, marks=pytest.mark.slow),
    pytest.param(torch.channels_last, torch.float32, marks=pytest.mark.slow),
]
DIRECTIONS = ("forward", "backward")


def _bn(norm: str, channels: int, dtype: torch.dtype, **options) -> torch.nn.Module:
    layers = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d,
              "mean_only": tritonorm.MeanOnlyBatchNorm2d}
    return layers[norm](channels, backend="triton", **({"k": 10} if norm == "topk" else {}), **options)


def _step(module, x, dy, inputs=None) -> traffic.Step:
    inputs = (x, *module.parameters()) if inputs is None else inputs
    return count_step(functools.partial(module, x), inputs, dy, sms=SMS, sampling=BUDGET_SAMPLING)


def _inputs(shape, memory_format, dtype, nonnegative=False):
    """(x, dy), both in ``memory_format`` (a dy in another layout would be copied to x's)."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    x = (x.relu() if nonnegative else x).to(dtype=dtype, memory_format=memory_format).requires_grad_()
    return x, dy.to(dtype=dtype, memory_format=memory_format)


def _check(counted: traffic.Traffic, tensor_bytes: int, passes: float, launches: int, ops=()):
    """``counted`` within a budget: at most ``passes`` over ``tensor_bytes``, ``launches``
    launches, and exactly the torch ops ``ops`` (names) outside the kernels."""
    report = traffic.describe(counted, tensor_bytes)
    assert counted.passes(tensor_bytes) <= passes, report
    assert counted.launch_count <= launches, report
    assert sorted(op.name for op in counted.torch_ops) == sorted(ops), report


# The split path's budgets, per norm and pass: (passes over x, launches); no torch op outside
# the kernels in either pass (so no zero-fill or copy in the backward).  The running
# statistics are aside: the layers here have none, test_running_statistics_cost counts them.
# MeanOnlyBatchNorm2d (split path only) at its floor of 3 passes each way: forward one read
# of x for the sum, one read and one write for y = x - mu + beta; backward one read of dy
# for sum(dy) (dbeta and the mean), one read and one write for dx = dy - mean(dy); 3
# launches each way (partial sums, a per-channel finalize that also stores the normalize
# pass's coefficients, the elementwise pass); measured 3.002 fp32 and 3.003 bf16 both ways.
BN_SHAPE = (32, 32, 28, 28)
BN_BUDGETS = {
    "l1": {"forward": (4.1, 4), "backward": (5.1, 3)},
    "linf": {"forward": (3.1, 4), "backward": (4.1, 3)},
    "topk": {"forward": (3.1, 4), "backward": (4.1, 3)},
    "mean_only": {"forward": (3.01, 3), "backward": (3.01, 3)},
}


@pytest.mark.parametrize("memory_format, dtype", LAYOUTS)
@pytest.mark.parametrize("norm", list(BN_BUDGETS))
def test_batch_norm_budgets(norm, memory_format, dtype, monkeypatch):
    monkeypatch.setenv(channel_resident.PATH_VARIABLE, "split")
    x, dy = _inputs(BN_SHAPE, memory_format, dtype)
    step = _step(_bn(norm, BN_SHAPE[1], dtype, track_running_stats=False), x, dy)
    for direction, counted in zip(DIRECTIONS, step, strict=True):
        _check(counted, x.numel() * x.element_size(), *BN_BUDGETS[norm][direction])


# The on-chip path (kernels/channel_resident.py), every norm: the floor of any batch norm,
# forward 1 read + 1 write in 1 launch, backward 2 reads + 1 write in 1 launch, plus the
# per-channel vectors (statistics, x_0: under 0.1 pass here) and Top-k's C * k selected
# elements, counted apart (forward: index and sign stored, 12 bytes; backward: loaded, and
# dx read and written there); n = 512 a channel, the most Top-k's channels_last bf16
# forward holds (8 channels a program).
ONCHIP_SHAPE = (2, 16, 16, 16)
ONCHIP_BUDGETS = {"forward": (2.1, 1), "backward": (3.1, 1)}


def _selected_bytes(norm: str, direction: str, channels: int, element_size: int) -> int:
    k = {"l1": 0, "linf": 1, "topk": 10}[norm]
    return channels * k * (12 if direction == "forward" else 12 + 2 * element_size)


@pytest.mark.parametrize("memory_format, dtype", LAYOUTS)
@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_on_chip_budgets(norm, memory_format, dtype):
    """Planned for 132 SMs, as the automatic choice makes it on an H100."""
    x, dy = _inputs(ONCHIP_SHAPE, memory_format, dtype)
    layer = _bn(norm, ONCHIP_SHAPE[1], dtype, track_running_stats=False)
    step = count_step(functools.partial(layer, x), (x, *layer.parameters()), dy, sms=traffic.H100_SMS)
    x_bytes = x.numel() * x.element_size()
    for direction, counted in zip(DIRECTIONS, step, strict=True):
        assert all("_resident_" in launch.kernel for launch in counted.launches), traffic.describe(counted, x_bytes)
        passes, launches = ONCHIP_BUDGETS[direction]
        selected = _selected_bytes(norm, direction, ONCHIP_SHAPE[1], x.element_size())
        _check(counted, x_bytes, passes + selected / x_bytes, launches)


# Fused epilogues: out = relu(bn(x)) moves no more than the BN alone on the on-chip path
# (the backward rebuilds the pre-activation from x, which it reads anyway) and on L1's split
# path (whose elementwise backward reads x for sign(a)); L-inf / Top-k's split backward reads
# x once more for it (+1 pass: an unfused ReLU's backward costs 3).  With a residual:
# forward +1 read (the residual), backward +1 read (the residual, to rebuild z) and +1
# write (its gradient), in the same launches.
FUSED_EXTRA = {  # (path, residual) -> extra passes over x: (forward, backward)
    ("onchip", False): (0, 0), ("split", False): (0, 0), ("onchip", True): (1, 2), ("split", True): (1, 3),
}


@pytest.mark.parametrize("residual", [False, True], ids=["relu", "residual-relu"])
@pytest.mark.parametrize("path", ["onchip", "split"])
@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_fused_relu_budgets(norm, path, residual, monkeypatch):
    monkeypatch.setenv(channel_resident.PATH_VARIABLE, path)
    shape = ONCHIP_SHAPE if path == "onchip" else BN_SHAPE
    x, dy = _inputs(shape, torch.contiguous_format, torch.float32)
    res = torch.randn(shape, generator=torch.Generator().manual_seed(2)).requires_grad_() if residual else None
    plain = _bn(norm, shape[1], torch.float32, track_running_stats=False)
    fused = _bn(norm, shape[1], torch.float32, track_running_stats=False, activation="relu")
    alone = _step(plain, x, dy)
    inputs = (x, *fused.parameters(), *([res] if residual else []))
    step = count_step(functools.partial(fused, x, residual=res), inputs, dy, sms=SMS, sampling=BUDGET_SAMPLING)
    x_bytes = x.numel() * x.element_size()
    extra = FUSED_EXTRA[(path, residual)]
    for i, (counted, reference) in enumerate(zip(step, alone, strict=True)):
        more = extra[i] + (i == 1 and path == "split" and norm != "l1")
        report = traffic.describe(counted, x_bytes) + "\nalone:\n" + traffic.describe(reference, x_bytes)
        assert counted.bytes <= reference.bytes + (more + 0.01) * x_bytes, report
        assert counted.launch_count == reference.launch_count and counted.torch_ops == (), report


def test_running_statistics_cost():
    """The running statistics add one launch to a training forward (both buffers and the
    batch count), of a few per-channel vectors, and nothing to the backward."""
    x, dy = _inputs((4, 8, 6, 6), torch.contiguous_format, torch.float32)
    with_stats, without = (_step(_bn("l1", 8, torch.float32, track_running_stats=on), x, dy) for on in (True, False))
    (update,) = [launch for launch in with_stats.forward.launches if launch not in without.forward.launches]
    assert update.kernel.startswith("running_stats.") and update.bytes < 16 * 8 * 4
    assert with_stats.forward.launch_count == without.forward.launch_count + 1
    assert with_stats.forward.torch_ops == without.forward.torch_ops == ()
    assert with_stats.backward == without.backward


# EquiNormConv2d, normalization only (the convolution's own ops aside).
# Forward: the input sums read x once (at most 1.01 passes outside the weight transform) in
# at most 7 launches (partial sums, combine, running mean, weight transform, and 3
# per-channel torch ops).
# Backward: at most 5 launches, no fill and no copy larger than a per-channel vector, and one
# activation-sized op: autograd's add of the input sums' broadcast gradient (stride 0, C
# values) into the convolution's dx, 2 passes (with the sum of the dL/dm terms: 2.02).
# cuDNN's input gradient cannot accumulate into a buffer and no kernel of ours touches dx, so
# eager keeps that add (docs/equinorm.md); torch.compile fuses it into the neighbouring
# pointwise op.  The 5th launch in bf16 is a cast of the C_in mass gradient.
# The weight transform on its weight-sized tensors (forward: read w twice, write w'';
# backward: read dL/dw'' and w twice, write dL/dw) and, apart, the input mass it gathers per
# lane (m[r // K], C_in values that stay in cache, counted at 4 bytes a lane and pass) and
# the backward's (C_out, C_in) fp32 dL/dm terms (summed over C_out by a torch op); the
# per-channel vectors (s, b, gain and its gradient, fp32) add 0.02 weight passes in bf16.
EQUINORM_SHAPE = (8, 32, 28, 28)
EQUINORM_CONV_OPS = {"aten.convolution", "aten.convolution_backward"}
# direction: (x passes, launches, weight passes)
EQUINORM_BUDGETS = {"forward": (1.01, 7, 3.02), "backward": (2.02, 5, 5.03)}
EQUINORM_MASS, EQUINORM_MASS_TERMS = "m_ptr", "dm_ptr"


@pytest.mark.parametrize("memory_format, dtype", LAYOUTS)
def test_equinorm_budgets(memory_format, dtype):
    """A bf16 layer has bf16 parameters (autocast would add the convolution's casts)."""
    x, dy = _inputs(EQUINORM_SHAPE, memory_format, dtype, nonnegative=True)
    layer = tritonorm.EquiNormConv2d(32, 32, 3, padding=1, backend="triton", dtype=dtype)
    step = _step(layer, x, dy)
    x_bytes, w_bytes = x.numel() * x.element_size(), layer.weight.numel() * layer.weight.element_size()
    for direction, counted in zip(DIRECTIONS, step, strict=True):
        x_passes, launches, w_passes = EQUINORM_BUDGETS[direction]
        report = traffic.describe(counted, x_bytes)
        transform = [launch for launch in counted.launches if "weight" in launch.kernel]
        assert len(transform) == 1, report
        arguments = dict(transform[0].arguments)
        mass_read, _ = arguments.pop(EQUINORM_MASS)
        _, terms_written = arguments.pop(EQUINORM_MASS_TERMS, (0, 0))
        assert sum(read + written for read, written in arguments.values()) <= w_passes * w_bytes, report
        assert mass_read <= 2 * layer.weight.numel() * 4, report  # one fp32 a lane, twice
        assert terms_written <= layer.weight.shape[0] * layer.weight.shape[1] * 4, report
        norm_ops = [op for op in counted.torch_ops if op.name not in EQUINORM_CONV_OPS]
        others = sum(launch.bytes for launch in counted.launches if launch not in transform)
        assert others + sum(op.bytes for op in norm_ops) <= x_passes * x_bytes, report
        assert len(counted.launches) + len(norm_ops) <= launches, report
        big = [op.name for op in norm_ops if op.numel >= x.numel()]
        assert big == ([] if direction == "forward" else ["aten.add"]), report
        assert not [op for op in norm_ops if op.kind in (FILL, COPY) and op.numel > layer.weight.shape[0]], report


# Bounded weight norm on a 3x3 conv weight: forward 1 launch and at most 3.02 weight passes
# (floor 2: read v twice, the second from L2, write w; and the per-slice norms); backward 1
# launch and at most 5.02 (floor 3: read dL/dw and v twice, write dL/dv), no fill or copy.
# The same for every norm order p: only the per-slice reduction differs (measured, p = 2, 1
# and inf alike: 3.004 and 5.005 in fp32, 3.005 and 5.009 in bf16).
BWN_BUDGETS = {"forward": (3.02, 1), "backward": (5.02, 1)}


@pytest.mark.parametrize("memory_format, dtype", LAYOUTS)
@pytest.mark.parametrize("p", [2, 1, math.inf])
def test_bounded_weight_norm_budgets(p, memory_format, dtype):
    conv = torch.nn.Conv2d(64, 64, 3, bias=False).to(dtype=dtype, memory_format=memory_format)
    tritonorm.bounded_weight_norm(conv, backend="triton", p=p)
    grad = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    step = count_step(lambda: conv.weight, tuple(conv.parameters()), grad, sms=SMS)
    w_bytes = conv.weight.numel() * conv.weight.element_size()
    for direction, counted in zip(DIRECTIONS, step, strict=True):
        _check(counted, w_bytes, *BWN_BUDGETS[direction])


# The ENorm cycle on the small nets of the benchmarks (fp32, SGD momentum buffers), against
# the floor of enorm_cases.cycle_bytes: parallel at most 1.4 times (counted: 1.33 to 1.38;
# every hidden weight is read twice for the norms, as its pair's rows and the previous
# pair's columns), sequential at most 1.6 (counted: 1.54 to 1.55: a program takes 4 hidden
# units, twice the programs of 8, to fill the SMs, and each re-reads the shared rows);
# 2 launches in parallel mode and one per pair and one in sequential mode, no torch op.
ENORM_FLOOR_RATIO = {enorm_cases.TRITON_PARALLEL: 1.4, enorm_cases.TRITON_SEQUENTIAL: 1.6}


@pytest.mark.parametrize("net", enorm_cases.SMALL_NETS, ids=lambda net: net.kind)
@pytest.mark.parametrize("name", enorm_cases.TRITON_CONTENDERS)
def test_enorm_budgets(net, name):
    chain = enorm_cases.build(net, "cpu")
    _, counted = count(enorm_cases.contender(name, chain), sms=SMS)
    pairs = len(chain.layers) - 2  # the last pair is left alone
    launches = 2 if name == enorm_cases.TRITON_PARALLEL else pairs + 1
    _check(counted, enorm_cases.cycle_bytes(chain), ENORM_FLOOR_RATIO[name], launches)


# ----------------------------------------------------------------------------- the command


def test_cli_traffic_estimate(capsys, tmp_path):
    argv = ["bench", "--traffic", "--estimate", "--shape", "2x4x4x4", "--sms", "2"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header, _, table = out.partition("\n\n")
    assert "launches planned for 2 SMs" in header
    lines = table.splitlines()
    assert lines[0].split() == ["norm", "shape", "layout", "dtype", "pass", "path", "launches", "MB", "passes", "floor",
                                "cuDNN", "bytes", "torch", "ops", "outside", "the", "kernels", "est.", "us", "cuDNN",
                                "est.", "us", "/", "cuDNN"]
    rows = [line.split() for line in lines[2:2 + 32]]  # 4 norms x 2 layouts x 2 dtypes x 2 passes
    assert {(r[0], r[2], r[3], r[4]) for r in rows} == {
        (norm, layout, dtype, direction) for norm in ("l1", "linf", "topk", "mean_only") for layout in ("nchw", "nhwc")
        for dtype in ("fp32", "bf16") for direction in DIRECTIONS}
    # the mean-only layer has the split path only: 3 launches each way, and the running mean's update forward
    assert all(r[1] == "2x4x4x4" and r[5] == ("split" if r[0] == "mean_only" else "on-chip")
               and r[11] == traffic.COUNTED for r in rows)
    assert all(r[6] == ("4" if r[4] == "forward" else "3") for r in rows if r[0] == "mean_only")
    assert "On-chip layers: forward+backward >= 1.4 x faster than cuDNN: 12 of 12 cases" in out
    assert "a MODEL, not a measurement" in out and "Targets (estimated):" in out
    page = next(tmp_path.glob("traffic-*.md")).read_text()
    assert "ESTIMATED (a model, not a measurement)" in page
    assert "`tritonorm bench --traffic --sms 2 --estimate --shape 2x4x4x4`" in page


def test_cli_traffic_options_need_traffic(capsys):
    assert main(["bench", "--estimate", "--sms", "4"]) == 2
    assert "--estimate, --sms only go with --traffic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--traffic", "--shape", "2x4x4"])
    assert "expected a shape NxCxHxW" in capsys.readouterr().err
