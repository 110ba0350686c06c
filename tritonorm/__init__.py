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
from .nn import __all__ as _nn_all
from .recalibrate import NORM_CLASSES, recalibrate
from .reference.activation import ACTIVATIONS
from .sync_batchnorm import convert_sync_batchnorm

__version__ = "0.1.0"
__all__ = [
    "functional", "convert", "convert_sync_batchnorm", "fold", "recalibrate", "NORM_CLASSES", "ENorm", "corrected_lr",
    "slice_norms", "ACTIVATIONS", *_nn_all,
]
