"""nn.Module wrappers, one file per method, named like torch.nn."""

from .lp_batchnorm import *  # noqa: F401,F403
from .lp_batchnorm import __all__
