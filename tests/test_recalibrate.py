"""tritonorm.recalibrate: the running statistics of every layer that keeps them (tritonorm's
batch norms and EquiNorm, torch's batch norms) become the cumulative average
of the batch statistics, as torch.optim.swa_utils.update_bn computes for nn.BatchNorm;
momenta and training flags come back as they were; the batch forms, num_batches and the
errors.  And tritonorm.NORM_CLASSES."""

import copy
import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import tritonorm

STAT_TYPES = (nn.modules.batchnorm._BatchNorm, tritonorm.nn.lp_batchnorm._LpBatchNorm,
              tritonorm.nn.equinorm._EquiNorm)


def make_model():
    """Every kind of layer with running statistics, and layers without (Dropout is left
    out: its random mask would differ between the runs compared)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), tritonorm.L1BatchNorm2d(8, momentum=0.3), nn.ReLU(),
        tritonorm.EquiNormConv2d(8, 8, 3, padding=1), tritonorm.LinfBatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1), tritonorm.TopkBatchNorm2d(8, k=3, momentum=None),
        nn.SyncBatchNorm(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.BatchNorm1d(6),
        tritonorm.L1BatchNorm1d(6, track_running_stats=False),
    )


def make_data(batches=3, size=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 6, 6, generator=g) * (1 + b) + b, torch.zeros(size)) for b in range(batches)]


def stat_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, STAT_TYPES)
            and getattr(m, "track_running_stats", True)}


def buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def batch_statistics(model, batch):
    """Each layer's statistics of one batch in training: the running buffers after one
    step with momentum=1 (running = batch)."""
    model = copy.deepcopy(model).train()
    for layer in stat_layers(model).values():
        layer.momentum = 1.0
    with torch.no_grad():
        model(batch)
    return buffers(model)


def test_running_stats_are_the_average_of_the_batch_statistics():
    model, data = make_model(), make_data()
    per_batch = [batch_statistics(model, x) for x, _ in data]
    tritonorm.recalibrate(model, data)
    state = buffers(model)
    assert set(state) == set(per_batch[0])
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            assert value.item() == len(data), key
        else:
            torch.testing.assert_close(value, sum(b[key] for b in per_batch) / len(data), rtol=1e-5, atol=1e-6)


def test_same_as_update_bn_and_the_manual_recipe():
    """nn.BatchNorm's buffers exactly as update_bn leaves them; every layer's exactly as a
    pass over the data in training with momentum=None after a reset."""
    model, data = make_model(), make_data()
    by_update_bn, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    tritonorm.recalibrate(model, data)
    update_bn(data, by_update_bn)
    for name, layer in stat_layers(model).items():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            other = by_update_bn.get_submodule(name)
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                assert torch.equal(getattr(layer, buffer), getattr(other, buffer)), (name, buffer)
    for layer in stat_layers(by_hand).values():
        layer.reset_running_stats()
        layer.momentum = None
    by_hand.train()
    with torch.no_grad():
        for x, _ in data:
            by_hand(x)
    expected = buffers(by_hand)
    for key, value in buffers(model).items():
        assert torch.equal(value, expected[key]), key


def test_momenta_and_training_flags_restored():
    model, data = make_model(), make_data()
    model.eval()
    model[4].train()  # mixed flags: each module's own comes back
    model[11].momentum = 0.05
    flags = {name: m.training for name, m in model.named_modules()}
    momenta = {name: m.momentum for name, m in stat_layers(model).items()}
    tritonorm.recalibrate(model, data)
    assert flags == {name: m.training for name, m in model.named_modules()}
    assert momenta == {name: m.momentum for name, m in stat_layers(model).items()}
    assert momenta["4"] == 0.3 and momenta["10"] is None


def test_restored_when_a_batch_raises():
    model = make_model().eval()
    momenta = {name: m.momentum for name, m in stat_layers(model).items()}

    def data():
        yield torch.randn(4, 3, 6, 6)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        tritonorm.recalibrate(model, data())
    assert not any(m.training for m in model.modules())
    assert momenta == {name: m.momentum for name, m in stat_layers(model).items()}
    assert model[1].num_batches_tracked.item() == 1  # the statistics of the batch that ran


def test_lazy_batchnorm_not_yet_built():
    """Built by the first batch (its statistics reset then), averaged like the others."""
    data = [torch.randn(4, 3, 2, 2) + b for b in range(3)]
    model = nn.Sequential(nn.LazyBatchNorm2d())
    tritonorm.recalibrate(model, data)
    assert type(model[0]) is nn.BatchNorm2d and model[0].num_batches_tracked.item() == 3
    torch.testing.assert_close(model[0].running_mean, sum(x.mean((0, 2, 3)) for x in data) / 3)


def test_runs_without_grad_in_training_mode():
    model, seen = make_model(), []
    model[3].register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), m.training)))
    tritonorm.recalibrate(model.eval(), make_data(2))
    assert seen == [(False, True), (False, True)]
    assert all(p.grad is None for p in model.parameters())


def test_batch_forms():
    """A Tensor, an (input, target) tuple, an [input, target] list: the same statistics."""
    data = make_data()
    results = []
    for form in (lambda x, y: x, lambda x, y: (x, y), lambda x, y: [x, y]):
        model = make_model()
        tritonorm.recalibrate(model, [form(x, y) for x, y in data])
        results.append(buffers(model))
    for other in results[1:]:
        assert all(torch.equal(results[0][k], v) for k, v in other.items())


def test_dict_batch_is_a_type_error():
    model = make_model()
    before = buffers(model)
    with pytest.raises(TypeError, match=r"data: a batch is a dict \(keys 'image', 'label'\).*batch\['input'\]"):
        tritonorm.recalibrate(model, [{"image": torch.randn(4, 3, 6, 6), "label": torch.zeros(4)}])
    assert all(torch.equal(before[k], v) for k, v in buffers(model).items())  # nothing changed


def test_num_batches_stops_early():
    model, data = make_model(), make_data(4)
    taken = []

    def batches():
        for batch in data:
            taken.append(batch)
            yield batch

    tritonorm.recalibrate(model, batches(), num_batches=2)
    assert len(taken) == 2 and model[1].num_batches_tracked.item() == 2
    expected = make_model()
    tritonorm.recalibrate(expected, data[:2])
    assert all(torch.equal(buffers(expected)[k], v) for k, v in buffers(model).items())


def test_fewer_batches_than_num_batches_warns():
    model = make_model()
    with pytest.warns(UserWarning, match=r"data gave 3 batch\(es\), fewer than num_batches=5"):
        tritonorm.recalibrate(model, make_data(3), num_batches=5)
    assert model[1].num_batches_tracked.item() == 3


def test_device():
    model = make_model()
    tritonorm.recalibrate(model, make_data(2), device="cpu")
    assert model[1].num_batches_tracked.item() == 2
    with pytest.raises(TypeError, match="device: only a Tensor input can be moved to cpu, got str"):
        tritonorm.recalibrate(model, [("not a tensor", 0)], device="cpu")


@pytest.mark.parametrize("num_batches", [0, -1, 1.5, True, "2"])
def test_bad_num_batches(num_batches):
    with pytest.raises(ValueError, match="num_batches must be a positive integer"):
        tritonorm.recalibrate(make_model(), make_data(1), num_batches=num_batches)


def test_empty_data_is_an_error_and_changes_nothing():
    model = make_model()
    model(torch.randn(4, 3, 6, 6))  # statistics that a reset would lose
    before = buffers(model)
    with pytest.raises(ValueError, match="data: list gave no batch"):
        tritonorm.recalibrate(model, [])
    with pytest.raises(ValueError, match="data: a batch is an empty tuple"):
        tritonorm.recalibrate(model, [()])
    assert all(torch.equal(before[k], v) for k, v in buffers(model).items())


def test_bad_model_and_data():
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        tritonorm.recalibrate([nn.BatchNorm2d(3)], make_data(1))
    with pytest.raises(TypeError, match="data must be an iterable of batches .*, got int"):
        tritonorm.recalibrate(make_model(), 5)


def test_model_without_running_statistics_warns_and_reads_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4, track_running_stats=False),
                          tritonorm.TopkBatchNorm1d(4, k=2, track_running_stats=False),
                          nn.InstanceNorm1d(4, track_running_stats=True))

    def data():
        raise AssertionError("data was read")
        yield

    with pytest.warns(UserWarning, match="recalibrate: Sequential has no layer with running statistics"):
        tritonorm.recalibrate(model, data())


def test_recalibrates_a_batchnorm_checkpoint():
    """After loading nn.BatchNorm's statistics, recalibrate gives the layer its own sigma."""
    bn = nn.BatchNorm2d(4)
    data = make_data(1, size=16)
    x = nn.Conv2d(3, 4, 1)(data[0][0]).detach()
    bn(x)
    layer = tritonorm.L1BatchNorm2d(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.load_state_dict(bn.state_dict())
    tritonorm.recalibrate(layer, [x])
    mu = x.mean((0, 2, 3), keepdim=True)
    sigma = (torch.pi / 2) ** 0.5 * (x - mu).abs().mean((0, 2, 3))
    torch.testing.assert_close(layer.running_dev, sigma)
    torch.testing.assert_close(layer.running_mean, mu.flatten())


def test_norm_classes():
    lp = [getattr(tritonorm, f"{n}BatchNorm{d}d") for n, d in itertools.product(("L1", "Linf", "Topk"), (1, 2, 3))]
    lp += [tritonorm.SyncL1BatchNorm, tritonorm.SyncLinfBatchNorm, tritonorm.SyncTopkBatchNorm]
    lp += [tritonorm.MeanOnlyBatchNorm1d, tritonorm.MeanOnlyBatchNorm2d, tritonorm.MeanOnlyBatchNorm3d]
    assert isinstance(tritonorm.NORM_CLASSES, tuple) and set(tritonorm.NORM_CLASSES) == set(lp)
    assert "NORM_CLASSES" in tritonorm.__all__ and "recalibrate" in tritonorm.__all__
    # Weight-decay code in torchvision's style: every parameter of a norm layer undecayed;
    # EquiNorm's convolution weight stays with the decayed ones.
    model = make_model()
    norm_classes = (nn.modules.batchnorm._BatchNorm, *tritonorm.NORM_CLASSES)
    no_decay = {id(p) for m in model.modules() if isinstance(m, norm_classes) for p in m.parameters()}
    assert id(model[4].weight) in no_decay and id(model[6].weight) not in no_decay
