"""ENorm.attach: the cycle as an optimizer step post-hook (every=, cycles=, gradient
accumulation, GradScaler skips, removal, the step count in state_dict).  Torch path, CPU."""

import copy

import pytest
import torch
from enorm_utils import mlp, weight_layers
from torch import nn

from tritonorm import ENorm

STEPS = 6


def batches(n=STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=generator), torch.randint(0, 3, (8,), generator=generator))
            for _ in range(n)]


class Run:
    """A small MLP with biases, its optimizer and an ENorm over it (torch path).  ``calls``
    counts the test's calls of the optimizer's step (skipped ones included); each cycle
    records it in ``cycles_at``."""

    def __init__(self, optimizer="sgd", enorm_optimizer=True):
        torch.manual_seed(0)
        self.model = mlp((6, 5, 4, 3), bias=True)
        if optimizer == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01, fused=optimizer == "adam-fused")
        self.enorm = ENorm(weight_layers(self.model), self.opt if enorm_optimizer else None, c=1.2, backend="torch")
        self.calls, self.cycles_at = 0, []
        cycle = self.enorm.step

        def recorded_cycle():
            self.cycles_at.append(self.calls)
            cycle()

        self.enorm.step = recorded_cycle

    def backward(self, x, y, scale=1.0):
        (nn.functional.cross_entropy(self.model(x), y) * scale).backward()

    def step(self, scaler=None):
        self.calls += 1
        if scaler is None:
            self.opt.step()
        else:
            scaler.step(self.opt)
            scaler.update()
        self.opt.zero_grad()

    def train(self, data, after_step=None):
        for x, y in data:
            self.backward(x, y)
            self.step()
            if after_step is not None:
                after_step()

    def assert_same(self, other):
        """The two runs hold the same parameters and optimizer state, bit for bit."""
        for p, q in zip(self.model.parameters(), other.model.parameters(), strict=True):
            assert torch.equal(p, q)
            for key, value in self.opt.state[p].items():
                assert torch.equal(value, other.opt.state[q][key]), key


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_attach_is_a_step_after_every_optimizer_step(optimizer):
    """With the defaults, one cycle after each optimizer step, and the same weights and
    state as calling enorm.step() by hand after each step."""
    run, manual = Run(optimizer), Run(optimizer)
    run.enorm.attach()
    run.train(batches())
    manual.train(batches(), after_step=manual.enorm.step)
    assert run.cycles_at == list(range(1, STEPS + 1))
    run.assert_same(manual)
    assert not torch.equal(run.model[0].weight, Run(optimizer).model[0].weight)


@pytest.mark.parametrize("every, cycles", [(1, 3), (2, 1), (3, 2)])
def test_every_and_cycles(every, cycles):
    """``cycles`` cycles after optimizer steps every, 2 every, ..., the same as by hand."""
    run, manual = Run(), Run()
    run.enorm.attach(every=every, cycles=cycles)
    run.train(batches())

    def by_hand():
        if manual.calls % every == 0:
            for _ in range(cycles):
                manual.enorm.step()

    manual.train(batches(), after_step=by_hand)
    assert run.cycles_at == manual.cycles_at == [n for n in range(every, STEPS + 1, every) for _ in range(cycles)]
    run.assert_same(manual)


def test_gradient_accumulation_cycles_once_per_step():
    """Three backward passes, then one optimizer step: every=2 counts optimizer steps, not
    backward passes, and the cycle comes after the step."""
    run = Run()
    run.enorm.attach(every=2)
    for k, (x, y) in enumerate(batches(3 * 4)):
        run.backward(x, y)
        assert len(run.cycles_at) == k // 6
        if k % 3 == 2:
            run.step()
    assert run.cycles_at == [2, 4]


@pytest.mark.parametrize("optimizer", ["adam", "adam-fused"])
def test_grad_scaler_skipped_step_runs_no_cycle(optimizer):
    """Steps 2 and 3 have an inf gradient: the GradScaler skips them (it does not call the
    optimizer's step, or calls the fused one with found_inf set).  No cycle and no count, so
    every=2 cycles after the fourth call, the second step taken."""
    run = Run(optimizer)
    run.enorm.attach(every=2)
    scaler = torch.amp.GradScaler("cpu")
    for k, (x, y) in enumerate(batches(5)):
        skipped = k in (1, 2)
        run.backward(x, y, scale=scaler.scale(torch.tensor(torch.inf if skipped else 1.0)))
        weight = run.model[0].weight.detach().clone()
        run.step(scaler)
        assert torch.equal(run.model[0].weight, weight) == skipped  # neither stepped nor rescaled
    assert run.cycles_at == [4]
    assert run.enorm.state_dict()["optimizer_steps"] == 3


def test_remove_stops_the_cycle():
    run = Run()
    handle = run.enorm.attach()
    run.train(batches(2))
    handle.remove()
    handle.remove()  # a second remove does nothing
    run.train(batches(2))
    assert run.cycles_at == [1, 2]
    with run.enorm.attach():  # attaching again after remove() is fine; the block removes it
        run.train(batches(1))
    run.train(batches(1))
    assert run.cycles_at == [1, 2, 5]


def test_attaching_twice_is_an_error():
    run = Run()
    handle = run.enorm.attach()
    with pytest.raises(RuntimeError, match=r"ENorm.attach: already attached to an optimizer; call remove\(\)"):
        run.enorm.attach(every=2)
    run.train(batches(1))
    assert run.cycles_at == [1]  # the first hook alone, with its own settings
    handle.remove()
    run.enorm.attach(every=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, r"every must be a positive integer, got 0"),
    ({"every": -2}, r"every must be a positive integer, got -2"),
    ({"every": True}, r"every must be a positive integer, got True"),
    ({"every": 2.0}, r"every must be a positive integer, got 2.0"),
    ({"cycles": 0}, r"cycles must be a positive integer, got 0"),
    ({"cycles": False}, r"cycles must be a positive integer, got False"),
    ({"cycles": "2"}, r"cycles must be a positive integer, got '2'"),
])
def test_bad_every_and_cycles(kwargs, message):
    run = Run()
    with pytest.raises(ValueError, match=message):
        run.enorm.attach(**kwargs)
    run.train(batches(1))
    assert run.cycles_at == []  # nothing was attached


def test_which_optimizer():
    """An ENorm built with an optimizer attaches to that one only; one built without takes
    an optimizer that holds the chain's parameters, and cycles without rescaling its state."""
    run = Run()
    with pytest.raises(ValueError, match=r"optimizer: this ENorm rescales the state of the SGD it was built with, "
                                         r"so its cycle must follow that optimizer's steps, not those of another Adam"):
        run.enorm.attach(torch.optim.Adam(run.model.parameters()))
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got str"):
        run.enorm.attach("sgd")
    run.enorm.attach(run.opt).remove()

    run, manual = Run(enorm_optimizer=False), Run(enorm_optimizer=False)
    with pytest.raises(ValueError, match=r"optimizer: this ENorm was built with optimizer=None; pass the optimizer"):
        run.enorm.attach()
    other = mlp((6, 5, 4, 3), bias=True)
    with pytest.raises(ValueError, match=r"optimizer: layers\[0\].weight is not among the optimizer's parameters"):
        run.enorm.attach(torch.optim.SGD(other.parameters(), lr=0.1))
    run.enorm.attach(run.opt)
    run.train(batches())
    manual.train(batches(), after_step=manual.enorm.step)
    assert run.cycles_at == list(range(1, STEPS + 1))
    run.assert_same(manual)


def test_resumed_run_keeps_the_count():
    """Six steps, a checkpoint, two more steps from it in a new model, optimizer and ENorm:
    with every=4, the same cycles and weights as eight steps in one run."""
    data = batches(8)
    whole, first, resumed = Run(), Run(), Run()
    whole.enorm.attach(every=4)
    whole.train(data)
    first.enorm.attach(every=4)
    first.train(data[:6])
    checkpoint = copy.deepcopy({"model": first.model.state_dict(), "optimizer": first.opt.state_dict(),
                                "enorm": first.enorm.state_dict()})
    assert checkpoint["enorm"]["optimizer_steps"] == 6

    resumed.model.load_state_dict(checkpoint["model"])
    resumed.opt.load_state_dict(checkpoint["optimizer"])
    resumed.enorm.load_state_dict(checkpoint["enorm"])
    resumed.enorm.attach(every=4)
    resumed.train(data[6:])
    assert whole.cycles_at == [4, 8]
    assert resumed.cycles_at == [2]  # the resumed run's second step is step 8
    whole.assert_same(resumed)


def test_state_dict_step_count():
    enorm = Run().enorm
    state = enorm.state_dict() | {"optimizer_steps": 5}
    enorm.load_state_dict(state)
    assert enorm.state_dict()["optimizer_steps"] == 5
    enorm.load_state_dict({key: value for key, value in state.items() if key != "optimizer_steps"})  # an old dict
    assert enorm.state_dict()["optimizer_steps"] == 0
    with pytest.raises(ValueError, match=r"optimizer_steps must be an integer >= 0, got -1"):
        enorm.load_state_dict(state | {"optimizer_steps": -1, "c": 2.0})
    assert enorm.c == 1.2  # checked before anything changes
