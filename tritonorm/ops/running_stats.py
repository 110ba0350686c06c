"""``tritonorm::update_running_stats`` and ``tritonorm::update_running_mean``: the in-place
running-statistics updates as ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.running_stats import update_running


@torch.library.custom_op(
    "tritonorm::update_running_stats", mutates_args=("running_mean", "running_dev", "num_batches_tracked")
)
def update_running_stats(
    running_mean: Tensor,
    running_dev: Tensor,
    mean: Tensor,
    dev: Tensor,
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    count: bool = False,
) -> None:
    """running = (1 - m) * running + m * batch for both buffers; m = momentum, or
    1 / num_batches_tracked when momentum is None; ``count``: num_batches_tracked += 1
    first (in the same launch for up to 4096 channels)."""
    update_running(
        ((running_mean, mean), (running_dev, dev)), num_batches_tracked=num_batches_tracked, momentum=momentum,
        count=count,
    )


@update_running_stats.register_fake
def _(running_mean, running_dev, mean, dev, num_batches_tracked, momentum, count=False):
    return None


@torch.library.custom_op("tritonorm::update_running_mean", mutates_args=("running_mean", "num_batches_tracked"))
def update_running_mean(
    running_mean: Tensor, mean: Tensor, num_batches_tracked: Optional[Tensor], momentum: Optional[float],
    count: bool = False,
) -> None:
    """running = (1 - m) * running + m * batch for one buffer (EquiNorm's input mean);
    ``count`` as in ``update_running_stats``."""
    update_running(((running_mean, mean),), num_batches_tracked=num_batches_tracked, momentum=momentum, count=count)


@update_running_mean.register_fake
def _(running_mean, mean, num_batches_tracked, momentum, count=False):
    return None
