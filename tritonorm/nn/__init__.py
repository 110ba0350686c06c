"""nn.Module wrappers, one file per method, named like torch.nn."""

from .bounded_weight_norm import *  # noqa: F401,F403
from .equinorm import *  # noqa: F401,F403
from .lp_batchnorm import *  # noqa: F401,F403
from .mean_only_batchnorm import *  # noqa: F401,F403

# A literal list, which type checkers read (tritonorm ships py.typed); tests/test_docs.py
# checks that it is the union of the submodules' lists.
__all__ = [
    "L1BatchNorm1d", "L1BatchNorm2d", "L1BatchNorm3d",
    "LinfBatchNorm1d", "LinfBatchNorm2d", "LinfBatchNorm3d",
    "TopkBatchNorm1d", "TopkBatchNorm2d", "TopkBatchNorm3d",
    "SyncL1BatchNorm", "SyncLinfBatchNorm", "SyncTopkBatchNorm",
    "MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d", "MeanOnlyBatchNorm3d",
    "EquiNormConv1d", "EquiNormConv2d", "EquiNormConv3d", "EquiNormLinear", "balance_signs_", "fold_equinorm",
    "BoundedWeightNorm", "bounded_weight_norm", "remove_bounded_weight_norm", "BoundedWNLinear", "BoundedWNConv2d",
]
