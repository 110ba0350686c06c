"""EquiNorm's ``process_group``: in training, statistics summed over gloo processes.

Each world size is one spawn (``dist_utils``: startup dominates), every case inside it.
Every rank builds the same layer and the same global batch, takes its slice of the batch
(uneven, one rank's empty with 3 processes) and runs the synchronized layer; the oracle is
the plain layer run on the whole batch in the same process.
"""

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from tolerances import assert_close

import tritonorm
from tritonorm import functional as F

# (layer class, constructor arguments, input shape after N): tiny, for the interpreter.
CASES = [
    (tritonorm.EquiNormConv2d, {"in_channels": 3, "out_channels": 4, "kernel_size": 3, "padding": 1}, (3, 4, 4)),
    (tritonorm.EquiNormConv1d, {"in_channels": 2, "out_channels": 3, "kernel_size": 3, "stride": 2}, (2, 7)),
    (tritonorm.EquiNormLinear, {"in_features": 4, "out_features": 3, "momentum": None}, (4,)),
]
BACKENDS = ["torch", "triton"]


def _layer(cls, kwargs, backend, process_group=None):
    torch.manual_seed(0)  # the same weights on every rank and for the oracle
    return cls(**kwargs, backend=backend, process_group=process_group)


def _counting_all_reduce():
    """A patch of torch.distributed.all_reduce that records the shape of each call."""
    calls = []

    def all_reduce(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    original = dist.all_reduce
    return mock.patch.object(dist, "all_reduce", all_reduce), calls


def _check_rank(rank, world_size, sizes):
    """Every case on this rank; returns, per case, the parameter gradients of the synced
    layer on this rank and the oracle's (summed over ranks by the parent)."""
    group = dist.group.WORLD
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    results = []
    for cls, kwargs, shape in CASES:
        for backend in BACKENDS:
            where = f"{cls.__name__}, backend={backend}, rank {rank}, sizes {sizes}"
            gen = torch.Generator().manual_seed(1)
            x = torch.rand(sum(sizes), *shape, generator=gen) + 0.5
            oracle = _layer(cls, kwargs, backend)
            xo = x.clone().requires_grad_()
            yo = oracle(xo)
            dy = torch.randn(yo.shape, generator=gen)
            (yo * dy).sum().backward()

            layer = _layer(cls, kwargs, backend, group)
            assert set(layer.state_dict()) == set(oracle.state_dict()), where
            assert "process_group=" in repr(layer) and "process_group=" not in repr(oracle), where
            xs = x[start:stop].clone().requires_grad_()
            patch, calls = _counting_all_reduce()
            with patch:
                y = layer(xs)
                (y * dy[start:stop]).sum().backward()
            # One all_reduce of [v, count] forward, one of its gradient backward.
            assert calls == [(layer.in_channels + 1,)] * 2, (where, calls)
            assert_close(y, yo[start:stop], torch.float32, f"{where}: output")
            assert_close(xs.grad, xo.grad[start:stop], torch.float32, f"{where}: dx")
            for name in ("running_mean", "num_batches_tracked"):
                assert_close(getattr(layer, name), getattr(oracle, name), torch.float32, f"{where}: {name}")
            results.append(({n: p.grad for n, p in layer.named_parameters()},
                            {n: p.grad for n, p in oracle.named_parameters()}))

            # Without a process group the statistics are this process's own.
            if stop > start:
                alone = _layer(cls, kwargs, backend)(x[start:stop])
                with pytest.raises(AssertionError):
                    assert_close(alone, y, torch.float32, where)
            # Eval does not communicate: the synced layer, on this rank alone, with its
            # normalized weight and its fold.
            layer.eval()
            with patch:
                if rank == 0:
                    assert_close(layer(x), oracle.eval()(x), torch.float32, f"{where}: eval")
                    layer.normalized_weight(x)
                    tritonorm.fold_equinorm(torch.nn.Sequential(layer), {"0": shape[1:]} if shape[1:] else None)
            assert calls == [(layer.in_channels + 1,)] * 2, (where, calls)

    # A group of one process does not communicate either (every rank makes the group).
    solo = dist.new_group([0])
    if rank == 0:
        cls, kwargs, shape = CASES[0]
        patch, calls = _counting_all_reduce()
        x = torch.rand(2, *shape) + 0.5
        with patch:
            y = _layer(cls, kwargs, "torch", solo)(x)
        assert calls == []
        assert_close(y, _layer(cls, kwargs, "torch")(x), torch.float32, "a group of one")
    return results


@pytest.mark.parametrize("sizes", [[2, 3], [3, 0, 2]], ids=["2 processes", "3 processes, one empty"])
def test_synced_training_equals_one_process_on_the_whole_batch(sizes):
    per_rank = run_distributed(_check_rank, len(sizes), sizes)
    for i, (_, oracle) in enumerate(per_rank[0]):
        for name, grad in oracle.items():
            total = sum(results[i][0][name] for results in per_rank)
            assert_close(total, grad, torch.float32, f"case {i}, d{name}")


def test_process_group_must_be_a_process_group():
    with pytest.raises(TypeError, match=r"process_group must be None .* or a torch\.distributed\.ProcessGroup"):
        tritonorm.EquiNormConv2d(2, 2, 3, process_group="WORLD")
    layer = tritonorm.EquiNormLinear(3, 2)
    layer.process_group = 1  # reassigned: checked again at call
    with pytest.raises(TypeError, match="process_group must be None"):
        layer(torch.rand(2, 3))
    with pytest.raises(TypeError, match="process_group must be None"):
        F.equinorm_linear(torch.rand(2, 3), layer.weight, training=True, process_group=True)


def test_without_a_process_group_training_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="training needs a non-empty batch"):
        tritonorm.EquiNormLinear(3, 2)(torch.rand(0, 3))
