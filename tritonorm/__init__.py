"""tritonorm: Triton kernels for normalization schemes PyTorch does not ship.

Layers (``tritonorm.nn``, re-exported here) behave like their torch.nn counterparts and
run Triton kernels on CUDA tensors, plain PyTorch elsewhere; every layer and function
takes ``backend="auto" | "triton" | "torch"`` and the environment variable
``TRITONORM_BACKEND`` overrides "auto".
"""

from . import functional
from .convert import convert
from .enorm import ENorm
from .fold import fold
from .lr_correction import corrected_lr, slice_norms
from .nn import *  # noqa: F401,F403
from .recalibrate import NORM_CLASSES, recalibrate
from .reference.activation import ACTIVATIONS
from .sync_batchnorm import convert_sync_batchnorm

__version__ = "0.1.0"
# A literal list, which type checkers read (tritonorm ships py.typed): tritonorm.nn's
# names too, as tests/test_docs.py checks.
__all__ = [
    "functional", "convert", "convert_sync_batchnorm", "fold", "recalibrate", "NORM_CLASSES", "ENorm", "corrected_lr",
    "slice_norms", "ACTIVATIONS",
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "TopkBatchNorm1d", "TopkBatchNorm2d", "TopkBatchNorm3d",
    "SyncL1BatchNorm", "SyncLinfBatchNorm", "SyncTopkBatchNorm",
    "EquiNormConv1d", "EquiNormConv2d", "EquiNormConv3d", "EquiNormLinear", "balance_signs_", "fold_equinorm",
    "BoundedWeightNorm", "bounded_weight_norm", "remove_bounded_weight_norm", "BoundedWNLinear", "BoundedWNConv2d",
]
