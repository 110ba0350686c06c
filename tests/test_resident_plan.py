"""The on-chip path's planner (kernels/channel_resident.py): which layers it takes, the
switch that forces a path, and its errors.  Plans only: nothing is launched."""

import pytest
import torch

from tritonorm.kernels import channel_reduce, channel_resident

SMS = 132


@pytest.fixture
def h100(monkeypatch):
    """Plans made for an H100's 132 SMs."""
    monkeypatch.setattr(channel_resident, "_num_programs_per_wave", lambda device: SMS)
    monkeypatch.setattr(channel_reduce, "_num_programs_per_wave", lambda device: SMS)


def _view(shape, dtype=torch.float32, channels_last=False):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return channel_reduce.channel_view(torch.empty(shape, dtype=dtype, memory_format=memory_format))


def _paths(view, selected):
    return tuple(channel_resident.plan(view, selected, backward=b) is not None for b in (False, True))


# ResNet-50's activations at N = 32 and 256 on 132 SMs: (shape, layout, dtype) -> on chip
# (forward, backward) for L1, L-inf, Top-k (k = 10); every other activation takes the
# split path both ways (docs/lp_batchnorm.md says the same).
ON_CHIP = {
    ((32, 1024, 14, 14), False, torch.float32): ((True, True),) * 3,
    ((32, 1024, 14, 14), False, torch.bfloat16): ((True, True),) * 3,
    ((32, 2048, 7, 7), False, torch.float32): ((True, True),) * 3,
    ((32, 2048, 7, 7), False, torch.bfloat16): ((True, True),) * 3,
    ((32, 2048, 7, 7), True, torch.float32): ((True, True), (True, True), (False, True)),
    ((32, 2048, 7, 7), True, torch.bfloat16): ((True, False), (False, False), (False, False)),
    ((256, 2048, 7, 7), False, torch.float32): ((True, False), (False, False), (False, False)),
    ((256, 2048, 7, 7), False, torch.bfloat16): ((True, False), (False, False), (False, False)),
}
RESNET50 = [(n, *chw) for n in (32, 256) for chw in ((64, 112, 112), (256, 56, 56), (512, 28, 28), (1024, 14, 14),
                                                      (2048, 7, 7))]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet50_layers_on_chip(dtype, channels_last, h100):
    for shape in RESNET50:
        view = _view(shape, dtype, channels_last)
        expected = ON_CHIP.get((shape, channels_last, dtype), ((False, False),) * 3)
        assert tuple(_paths(view, k) for k in (0, 1, 10)) == expected, shape


def test_plans_hold_whole_channels_within_the_capacity(h100):
    for shape, channels_last, dtype in ON_CHIP:
        view = _view(shape, dtype, channels_last)
        for selected in (0, 1, 10):
            for backward in (False, True):
                p = channel_resident.plan(view, selected, backward=backward)
                if p is None:
                    continue
                n, c, s = p.args(view)[:3]
                assert p.block_n >= n and p.block_s >= s and p.programs * p.block_c >= c
                per_thread = channel_resident.elements_per_thread(view, p.group, selected, backward)
                assert p.block_c * p.block_n * p.block_s <= per_thread * 32 * p.num_warps
                assert p.num_warps <= channel_resident.MAX_WARPS and (selected <= 1 or backward or p.group == 1)


def test_small_channels_share_a_program_while_the_grid_fills_the_sms(h100):
    many = channel_resident.plan(_view((2, 4096, 8, 8)), 0, backward=False)  # 128 elements a channel
    assert many.block_c > 1 and many.programs >= SMS
    few = channel_resident.plan(_view((2, 64, 8, 8)), 0, backward=False)
    assert few.block_c == 1 and few.programs == 64  # small: on chip though SMs idle


def test_the_switch(monkeypatch):
    view = _view((4, 3, 5, 5))
    assert channel_resident.plan(view, 0, backward=False) is not None
    monkeypatch.setenv(channel_resident.PATH_VARIABLE, "split")
    assert channel_resident.plan(view, 0, backward=False) is None
    monkeypatch.setenv(channel_resident.PATH_VARIABLE, "onchip")
    with pytest.raises(ValueError, match=r"TRITONORM_LP_PATH=onchip: a channel of 65536 elements does not fit"):
        channel_resident.plan(_view((64, 2, 32, 32)), 0, backward=False)
    monkeypatch.setenv(channel_resident.PATH_VARIABLE, "registers")
    with pytest.raises(ValueError, match="TRITONORM_LP_PATH must be one of auto, onchip, split, got 'registers'"):
        channel_resident.plan(view, 0, backward=False)
