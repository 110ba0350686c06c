"""Synchronized L1 / L-inf / Top-k batch norm (``tritonorm.sync_batchnorm``).

In one process: the combine of per-process statistics equals the statistics of the whole
batch (ties included), the Triton stages equal the PyTorch ones, the layers without a
process group are the plain layers, and ``convert_sync_batchnorm``.  In 2 and 3 gloo
processes (``dist_utils.run_distributed``, every case in one spawn per world size): each
process's output, input and residual gradients, the sum of its parameter gradients and
its running statistics equal one process running the plain layer on the concatenated
batch, on both paths, with uneven batches (an empty one included), channels_last,
momentum=None, in eval (no collective) and under DDP; the collectives are those the docs
count.
"""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from lp_utils import random_input
from torch import nn

import tritonorm
from tritonorm.reference import lp_batchnorm as lp_ref
from tritonorm.reference import sync_lp_batchnorm as torch_stages

triton_stages = pytest.importorskip("tritonorm.kernels.sync_lp_batchnorm")

PLAIN = {"l1": tritonorm.L1BatchNorm2d, "linf": tritonorm.LinfBatchNorm2d, "topk": tritonorm.TopkBatchNorm2d}
SYNC = {"l1": tritonorm.SyncL1BatchNorm, "linf": tritonorm.SyncLinfBatchNorm, "topk": tritonorm.SyncTopkBatchNorm}
K = 3
STAGES = {"torch": torch_stages, "triton": triton_stages}


def _options(norm, **options):
    return {"k": K, **options} if norm == "topk" else options


# --- in one process ----------------------------------------------------------------------


def _assert_close(got, want, what, **tolerances):
    """torch.testing.assert_close, its message prefixed with ``what``."""
    try:
        torch.testing.assert_close(got, want, **tolerances)
    except AssertionError as err:
        raise AssertionError(f"{what}: {err}") from None


def _tied_input(shape, seed=0):
    """Few distinct values: many ties in x, so in |x - mu|, broken by the global index."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([-3.0, -1.0, 0.0, 2.0, 5.0])
    return values[torch.randint(0, len(values), shape, generator=g)]


def _gathered(x, sizes, pack, *args):
    """What every process of a batch split into ``sizes`` sends (W, words): a process with
    an empty batch packs with the PyTorch stages, as in ``sync_batchnorm._statistics``."""
    return torch.stack([(pack if p.numel() else getattr(torch_stages, pack.__name__))(p, *args)
                        for p in x.split(sizes)])


def _whole_batch(x, norm, k):
    """(mu, sigma, the selected indices (C, k), their signs) of one process on all of x."""
    view = lp_ref.channel_view(x)
    mean, a = lp_ref.centred(view)
    n = view.shape[0] * view.shape[2]
    dev = lp_ref.dispersion_coefficient(norm, n, k, True) * lp_ref.abs_sum(a, norm, k)
    if norm == "l1":
        return mean.view(-1), dev, None, None
    index = lp_ref.top_indices(a.abs(), 1 if norm == "linf" else k)
    s = view.shape[2]
    return mean.view(-1), dev, index, a[index // s, torch.arange(x.shape[1]).view(-1, 1), index % s].sign()


@pytest.mark.parametrize("stages", ["torch", "triton"])
@pytest.mark.parametrize("data", ["random", "tied"])
@pytest.mark.parametrize(("norm", "k"), [("linf", 1), ("topk", 3), ("topk", 7)])
@pytest.mark.parametrize("sizes", [(3, 2), (2, 0, 3), (1, 1, 1, 2)], ids=str)
def test_select_finds_what_one_process_finds(sizes, norm, k, data, stages):
    """The k largest |x - mu| of the whole batch from each part's 2k candidates: the same
    elements (ties to the lowest global index), sigma and signs, each element selected by
    the process that holds it and by no other; k=7 exceeds the 4 elements of a one-sample
    part (its hi and lo lists overlap: listed twice, counted once)."""
    shape = (sum(sizes), 2, 2, 2)
    x = _tied_input(shape) if data == "tied" else random_input(shape, torch.float32, "cpu")
    module = STAGES[stages]
    gathered = _gathered(x, sizes, module.pack_candidates, 1 if norm == "linf" else k)
    mean, dev, index, signs = _whole_batch(x, norm, k)
    found, found_signs = torch.full_like(index, -1), torch.zeros_like(signs)
    for rank in range(len(sizes)):
        got = module.select(gathered, rank, norm, k, None, None, 1e-5, True, torch.float32)
        torch.testing.assert_close(got[0], mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1], dev, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[6], torch.tensor([float(x.numel() // x.shape[1])]))
        mine = got[4] >= 0
        assert (found[mine] == -1).all(), "an element selected by two processes"
        found[mine] = got[4][mine] + sum(sizes[:rank]) * 4
        found_signs[mine] = got[5][mine]
    assert torch.equal(found.sort(1).values, index.sort(1).values)
    assert torch.equal(found_signs.gather(1, found.argsort(1)), signs.gather(1, index.argsort(1)))


@pytest.mark.parametrize("stages", ["torch", "triton"])
@pytest.mark.parametrize("sizes", [(3, 2), (2, 0, 3)], ids=str)
def test_l1_combine_finds_what_one_process_finds(sizes, stages):
    x = random_input((sum(sizes), 3, 2, 3), torch.float32, "cpu") + 100  # far from 0: the shift matters
    module = STAGES[stages]
    mean, n = module.combine_moments(_gathered(x, sizes, module.pack_moments), torch.float32)
    want_mean, want_dev, _, _ = _whole_batch(x, "l1", 0)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(n, torch.tensor([float(x.numel() // 3)]))
    sums = sum((module if p.numel() else torch_stages).abs_dev_sums(p, mean) for p in x.split(sizes))
    dev, wbar, affine = module.l1_statistics(sums, mean, n, None, None, 1e-5, True)
    torch.testing.assert_close(dev, want_dev, rtol=1e-5, atol=1e-6)
    a = lp_ref.channel_view(x) - mean.view(1, -1, 1)
    torch.testing.assert_close(wbar, lp_ref.C_L1 * a.sign().mean((0, 2)) / n, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(affine, torch.stack([(dev + 1e-5).reciprocal(), torch.zeros(3)]))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_triton_stages_equal_torch_stages(norm, channels_last):
    """Each per-process stage of the Triton path against the PyTorch one on the same batch,
    through a fused SiLU and a residual."""
    x = random_input((3, 4, 3, 5), torch.float32, "cpu", channels_last)
    residual, grad_out = torch.randn_like(x), torch.randn_like(x)
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    if norm == "l1":
        got, want = triton_stages.pack_moments(x), torch_stages.pack_moments(x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        mean = want[1:].float()
        torch.testing.assert_close(triton_stages.abs_dev_sums(x, mean), torch_stages.abs_dev_sums(x, mean),
                                   rtol=1e-6, atol=1e-5)
        sel_index, sel_sign = torch.empty(4, 0, dtype=torch.int64), torch.empty(4, 0)
    else:
        k = 1 if norm == "linf" else K
        got, want = triton_stages.pack_candidates(x, k), torch_stages.pack_candidates(x, k)
        torch.testing.assert_close(got[:5].view(torch.float64), want[:5].view(torch.float64), rtol=1e-6, atol=1e-6)
        lists = [(b[5:5 + 8 * k].view(torch.float64).view(2, 4, k), b[5 + 8 * k:].view(2, 4, k)) for b in (got, want)]
        (got_v, got_i), (want_v, want_i) = lists
        assert torch.equal(got_i.sort(2).values, want_i.sort(2).values)  # hi, lo: the same pairs, in any order
        assert torch.equal(got_v.gather(2, got_i.argsort(2)), want_v.gather(2, want_i.argsort(2)))
        mean = want[1:5].view(torch.float64).float()
        sel_index = want_i[0].flip(1).clone()  # elements of this process, and one of another (-1)
        sel_index[0, 0] = -1
        sel_sign = torch.randn(sel_index.shape).sign()
    dev = 0.5 + torch.rand(4)
    affine = torch.stack([weight / (dev + 1e-5), bias])
    options = (residual, "silu", 0.01)
    torch.testing.assert_close(triton_stages.normalize(x, mean, affine, *options),
                               torch_stages.normalize(x, mean, affine, *options), rtol=1e-5, atol=1e-6)
    got, want = (m.grad_sums(grad_out, x, mean, affine, *options, dev, 1e-5) for m in (triton_stages, torch_stages))
    for g, w in zip((got[0], *got[2:]), (want[0], *want[2:]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    sums, wbar, n = torch.randn(2, 4), torch.randn(4), torch.tensor([45.0])
    coefs = torch_stages.grad_coefficients(sums, dev, wbar, weight, n, norm, K, True, 1e-5)
    torch.testing.assert_close(triton_stages.grad_coefficients(sums, dev, wbar, weight, n, norm, K, True, 1e-5),
                               coefs, rtol=1e-6, atol=1e-6)
    dz = want[1]
    got = triton_stages.grad_input(grad_out, None, x, mean, affine, coefs, norm, sel_index, sel_sign, *options, True)
    want = torch_stages.grad_input(grad_out, dz, x, mean, affine, coefs, norm, sel_index, sel_sign, *options, True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("norm", ["l1", "linf", "topk"])
def test_without_a_process_group_it_is_the_plain_layer(norm, backend):
    """torch.distributed not initialized: the plain layer's output, gradients and running
    statistics, on 2-d to 5-d input (nn.SyncBatchNorm's shapes)."""
    assert not dist.is_initialized()
    name = PLAIN[norm].__name__[:-2]
    for shape, nd in (((6, 4), 1), ((3, 4, 5), 1), ((2, 4, 3, 3), 2), ((2, 4, 2, 2, 2), 3)):
        x = random_input(shape, torch.float32, "cpu").requires_grad_()
        plain = getattr(tritonorm, f"{name}{nd}d")(4, backend=backend, **_options(norm))
        sync = SYNC[norm](4, backend=backend, **_options(norm))
        outs = []
        for layer in (plain, sync):
            y = layer(x)
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
            outs.append((y, grad, layer.running_mean, layer.running_dev))
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_compiles_fullgraph_where_there_is_nothing_to_synchronize(world_of_one):
    """A converted model trained on one process: torch.compile(fullgraph=True) traces the
    plain layer (in 2 processes the layer is a graph break: ``_check_layers``)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), tritonorm.SyncL1BatchNorm(4, activation="relu"))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = random_input((2, 3, 6, 6), torch.float32, "cpu")
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_layer_checks_its_input():
    layer = tritonorm.SyncL1BatchNorm(4)
    with pytest.raises(ValueError, match=r"SyncL1BatchNorm expects 2-d or 3-d or 4-d or 5-d input, got 1-d"):
        layer(torch.randn(4))
    with pytest.raises(ValueError, match=r"SyncL1BatchNorm\(4\) expects 4 channels"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="k=9 is larger than the 8 values per channel"):
        tritonorm.SyncTopkBatchNorm(4, k=9)(torch.randn(2, 4, 4))  # one process: the plain layer's check


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d shape: an activation inside the batch norm."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(super().forward(x))


def _model():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), tritonorm.L1BatchNorm2d(4, activation="relu"),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), tritonorm.TopkBatchNorm2d(4, k=2, backend="torch")),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), tritonorm.LinfBatchNorm1d(4, momentum=None), nn.SyncBatchNorm(4),
    )


def test_convert_sync_batchnorm(world_of_one):
    model = _model().eval()
    plain = dict(model.named_modules())
    converted = tritonorm.convert_sync_batchnorm(model, process_group=world_of_one)
    assert converted is model  # in place, as torch's
    kinds = {name: type(m) for name, m in converted.named_modules() if name.count(".") <= 1 and name}
    assert kinds["1"] is tritonorm.SyncL1BatchNorm and kinds["2.1"] is tritonorm.SyncTopkBatchNorm
    assert kinds["4"] is nn.SyncBatchNorm and kinds["5"] is tritonorm.SyncLinfBatchNorm
    assert converted[6] is plain["6"]  # already synchronized: left as it was
    for name in ("1", "2.1", "5"):
        old, new = plain[name], converted.get_submodule(name)
        assert new.process_group is world_of_one and not new.training
        assert (new.eps, new.momentum, new.activation, new.backend) == (old.eps, old.momentum, old.activation,
                                                                         old.backend)
        assert new.weight is old.weight and new.running_dev is old.running_dev  # shared, as torch's
    assert converted[2][1].k == 2
    assert tritonorm.convert_sync_batchnorm(converted) is converted
    root = tritonorm.LinfBatchNorm2d(3)
    assert type(tritonorm.convert_sync_batchnorm(root)) is tritonorm.SyncLinfBatchNorm
    with pytest.raises(TypeError, match=r"module.1 \(BatchNormAct\) overrides forward and owns submodules \(act\)"):
        tritonorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct(4)))
    with pytest.raises(TypeError, match=r"process_group must be None \(the default group\) or a torch.distributed"):
        tritonorm.convert_sync_batchnorm(root, process_group="group")
    with pytest.raises(TypeError, match=r"process_group must be None \(the default group\)"):
        tritonorm.SyncL1BatchNorm(4, process_group=0)


def test_fold_and_recalibrate_take_the_synchronized_layers(world_of_one):
    """A trained synchronized model ships as the plain one does: recalibrate rebuilds the
    running statistics, fold absorbs the layers that follow a convolution (eval: no
    communication) and makes the others an nn.BatchNorm of their input's dimensions
    (nn.SyncBatchNorm, which takes any, where no example input shows them)."""
    model = nn.Sequential(*_model()[:3], nn.ReLU(), tritonorm.LinfBatchNorm2d(4))
    model = tritonorm.convert_sync_batchnorm(model, process_group=world_of_one)
    x = random_input((4, 3, 6, 6), torch.float32, "cpu")
    tritonorm.recalibrate(model, [x])
    assert [m.num_batches_tracked.item() for m in model.modules() if isinstance(m, tuple(SYNC.values()))] == [1] * 3
    model.eval()
    for example, batchnorm in ((None, nn.SyncBatchNorm), ((x,), nn.BatchNorm2d)):
        folded = tritonorm.fold(model, example)
        assert not any(isinstance(m, tuple(SYNC.values())) for m in folded.modules())
        assert [type(m) for m in folded.modules() if "BatchNorm" in type(m).__name__] == [batchnorm]
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


# --- in 2 and 3 processes ------------------------------------------------------------------


class _Collectives:
    """Counts the collectives of tritonorm.sync_batchnorm (and the elements they move)."""

    def __init__(self):
        self.calls = []
        for name in ("all_gather", "all_gather_into_tensor", "all_reduce"):
            setattr(dist, name, self._counted(name, getattr(dist, name)))

    def _counted(self, name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.calls.append((name, args[1].numel() if name.startswith("all_gather") else args[0].numel()))
            return fn(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _expected_collectives(norm, c, world):
    per_process = 1 + c if norm == "l1" else 1 + c + 4 * c * (1 if norm == "linf" else K)
    forward = [("all_gather", per_process)] + ([("all_reduce", 2 * c)] if norm == "l1" else [])
    return forward, [("all_reduce", 2 * c)]


def _check_layers(rank, world, sizes, backends):
    """Every (backend, norm, layout) case: two training steps and an eval step of the
    synchronized layer on this process's part of a batch, against the plain layer on the
    whole batch; the channels_last cases in bfloat16 with momentum=None, a fused SiLU and a
    residual."""
    counter = _Collectives()
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    c = 3
    for backend, norm, channels_last in itertools.product(backends, ("l1", "linf", "topk"), (False, True)):
        momentum = None if channels_last else 0.1
        fused = dict(activation="silu") if channels_last else {}
        dtype = torch.bfloat16 if channels_last else torch.float32  # bf16 data, fp32 parameters
        tolerance = dict(rtol=1e-2, atol=1e-2) if channels_last else dict(rtol=1e-5, atol=2e-6)
        layers = [cls(c, momentum=momentum, backend=backend, **_options(norm, **fused))
                  for cls in (PLAIN[norm], SYNC[norm])]
        with torch.no_grad():
            layers[0].weight.uniform_(0.5, 1.5)
            layers[0].bias.uniform_(-1, 1)
        layers[1].load_state_dict(layers[0].state_dict())
        for step in range(3):
            training = step < 2
            for layer in layers:
                layer.train(training)
            x = random_input((sum(sizes), c, 2, 3), dtype, "cpu", channels_last, seed=step)
            torch.manual_seed(step)  # the same whole batch on every process
            residual = torch.randn_like(x) if fused else None
            grad_out = torch.randn_like(x)
            results = []
            for layer, part in ((layers[0], slice(None)), (layers[1], slice(lo, hi))):
                counter.take()
                xs = x[part].detach().requires_grad_()
                rs = None if residual is None else residual[part].detach().requires_grad_()
                y = layer(xs, rs)
                y.backward(grad_out[part])
                results.append([y, xs.grad, *([] if rs is None else [rs.grad])])
                if layer is layers[1]:
                    calls = counter.take()
            where = f"{backend} {norm} channels_last={channels_last} step {step}"
            if training:
                forward, backward = _expected_collectives(norm, c, world)
                assert calls == forward + backward, where
            else:
                assert calls == [], where
            names = ("output", "input grad", "residual grad")[:len(results[0])]
            for what, got, want in zip(names, results[1], results[0], strict=True):
                _assert_close(got, want[lo:hi], f"{where} {what}", **tolerance)
            for name in ("weight", "bias"):
                grad = getattr(layers[1], name).grad.clone()
                dist.all_reduce(grad)
                _assert_close(grad, getattr(layers[0], name).grad, f"{where} {name}.grad", rtol=1e-5, atol=1e-5)
            for name in ("running_mean", "running_dev", "num_batches_tracked"):
                _assert_close(getattr(layers[1], name), getattr(layers[0], name), f"{where} {name}", rtol=1e-6,
                              atol=1e-7)
            for layer in layers:
                layer.zero_grad()
    if 0 not in sizes:  # a process with fewer values than a layer needs reads the total (_check_global)
        from test_no_host_sync import NoHostSync

        for backend, norm in itertools.product(backends, ("l1", "linf", "topk")):
            layer = SYNC[norm](c, backend=backend, **_options(norm, activation="relu"))
            x = random_input((sizes[rank], c, 2, 3), torch.float32, "cpu").requires_grad_()
            with NoHostSync():
                layer(x, torch.randn_like(x)).sum().backward()
    # torch.compile runs the synchronized layer eagerly (a graph break around it)
    layer = tritonorm.SyncTopkBatchNorm(c, k=K, activation="relu")
    compiled = torch.compile(nn.Sequential(nn.Conv2d(c, c, 1), layer), backend="eager")
    x = random_input((sum(sizes), c, 2, 3), torch.float32, "cpu")[lo:hi].requires_grad_()
    y = compiled(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    want_x = x.detach().requires_grad_()
    want = compiled._orig_mod(want_x)
    want.square().sum().backward()
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_x.grad, rtol=1e-6, atol=1e-7)
    if world == 2:  # too few values over the whole batch: the same error on every process
        layer = tritonorm.SyncTopkBatchNorm(1, k=3)
        with pytest.raises(ValueError, match="Expected k=3 or more values per channel over the synchronized batch"):
            layer(torch.randn(1, 1, 1))
    return rank


def _check_ddp(rank, world, sizes, backends):
    """Three SGD steps of a small residual CNN, converted with convert_sync_batchnorm and
    wrapped in DDP, against one process training a copy on the whole batch."""
    for backend in backends:
        _check_ddp_backend(rank, world, sizes, backend)
    return rank


def _check_ddp_backend(rank, world, sizes, backend):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), tritonorm.L1BatchNorm2d(4, activation="relu")
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), tritonorm.TopkBatchNorm2d(4, k=2, backend=backend)
            self.bn3 = tritonorm.LinfBatchNorm2d(4, backend=backend)

        def forward(self, x):
            y = self.bn1(self.conv1(x))
            return self.bn3(self.bn2(self.conv2(y), residual=y))

    single = Net()
    model = nn.parallel.DistributedDataParallel(tritonorm.convert_sync_batchnorm(copy.deepcopy(single)))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (single, model)]
    lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, target = torch.randn(sum(sizes), 3, 4, 4, generator=g), torch.randn(sum(sizes), 4, 4, 4, generator=g)
        # DDP averages the processes' gradients: the whole batch's loss over the world size
        (single(x) * target).sum().div(world).backward()
        (model(x[lo:hi]) * target[lo:hi]).sum().backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    for (name, want), got in zip(single.state_dict().items(), model.module.state_dict().values(), strict=True):
        _assert_close(got, want, f"{backend} {name}", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("world", "sizes"), [(2, (3, 2)), (3, (2, 0, 3))],
                         ids=["2-processes", "3-processes-one-empty"])
def test_synchronized_layers_equal_one_process_on_the_whole_batch(world, sizes):
    assert run_distributed(_check_layers, world, sizes, ("torch", "triton"), timeout=240) == list(range(world))


def test_ddp_training_equals_one_process():
    assert run_distributed(_check_ddp, 3, (3, 1, 2), ("torch", "triton"), timeout=180) == [0, 1, 2]


# The Triton path's budgets per process (passes over its x, launches), counted in the
# interpreter at 8 x 28 x 28 values per channel and process: the split passes (forward: 3
# reads and a write for L1, 2 reads and a write for L-inf / Top-k; backward: x and dout
# read twice for L1, x once and dout twice for L-inf / Top-k, dx written once) plus the
# per-channel vectors, partials, packs and combines (under 0.25 pass here; Top-k's 2k
# candidates per split of 1024, k=3: 0.55), with one launch per combine.  Outside the
# kernels only gloo's all_gather moves data: it copies each process's part into a list,
# which is stacked (NCCL gathers into one tensor).  The layers keep no running statistics
# here (their update is one more launch).
SYNC_BUDGETS = {
    "l1": {"forward": (4.25, 7), "backward": (5.2, 4)},
    "linf": {"forward": (3.3, 4), "backward": (4.25, 4)},
    "topk": {"forward": (3.6, 4), "backward": (4.25, 4)},
}


def _check_traffic(rank, world):
    from test_traffic import BUDGET_SAMPLING, _check

    from tritonorm.bench import traffic

    for norm in ("l1", "linf", "topk"):
        layer = SYNC[norm](8, backend="triton", track_running_stats=False, **_options(norm))
        x = random_input((8, 8, 28, 28), torch.float32, "cpu", seed=rank).requires_grad_()
        step = traffic.count_step(functools.partial(layer, x), (x, *layer.parameters()), torch.randn_like(x),
                                  sms=traffic.H100_SMS, sampling=BUDGET_SAMPLING)
        for direction, counted in zip(("forward", "backward"), step, strict=True):
            ops = ("aten.copy_",) * world + ("aten.stack",) if direction == "forward" else ()
            passes, launches = SYNC_BUDGETS[norm][direction]
            _check(counted, x.numel() * x.element_size(), passes, launches + len(ops), ops)
    return rank


def test_traffic_budgets_of_the_triton_path():
    assert run_distributed(_check_traffic, 2, timeout=180) == [0, 1]
