"""nn.Module wrappers, one file per method, named like torch.nn."""

from . import bounded_weight_norm as _bounded_weight_norm
from . import equinorm as _equinorm
from . import lp_batchnorm as _lp_batchnorm
from .bounded_weight_norm import *  # noqa: F401,F403
from .equinorm import *  # noqa: F401,F403
from .lp_batchnorm import *  # noqa: F401,F403

__all__ = [*_lp_batchnorm.__all__, *_equinorm.__all__, *_bounded_weight_norm.__all__]
