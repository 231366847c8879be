"""batchless_kernels: batchless normalization for PyTorch (see README.md and PAPER.md).

    y, nll = batchless_kernels.batchless_norm(x, mean, std_param, weight, bias)
    layer = batchless_kernels.BatchlessNorm2d(64)      # where nn.BatchNorm2d(64) was
    loss = task_loss + batchless_kernels.nll_loss(model)
"""

from . import reference
from .backends import BACKENDS, available_backends
from .functional import batchless_norm
from .modules import BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, nll_loss
from .parametrization import PARAMETRIZATIONS

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PARAMETRIZATIONS",
    "BatchlessNorm1d",
    "BatchlessNorm2d",
    "BatchlessNorm3d",
    "available_backends",
    "batchless_norm",
    "nll_loss",
    "reference",
]
