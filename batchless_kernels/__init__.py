"""batchless_kernels: batchless normalization for PyTorch (see README.md and docs/method.md).

    y, nll = batchless_kernels.batchless_norm(x, mean, std_param, weight, bias)
    layer = batchless_kernels.BatchlessNorm2d(64)      # where nn.BatchNorm2d(64) was
    loss = task_loss + batchless_kernels.nll_loss(model)

Training toolkit: convert_batchnorm (migrate a BN model), init_from_data (data-dependent init),
fuse_for_inference (fold into conv/linear), BatchRenorm1d/2d/3d (the baseline).
"""

from . import reference
from .backends import BACKENDS, available_backends
from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .data_init import init_from_data
from .functional import batchless_norm
from .inference import ChannelAffine, fuse_for_inference
from .migration import convert_batchnorm
from .modules import BatchlessNorm, BatchlessNorm1d, BatchlessNorm2d, BatchlessNorm3d, BatchlessNormNd, nll_loss
from .parametrization import PARAMETRIZATIONS

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PARAMETRIZATIONS",
    "BatchlessNorm",
    "BatchlessNorm1d",
    "BatchlessNorm2d",
    "BatchlessNorm3d",
    "BatchlessNormNd",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelAffine",
    "available_backends",
    "batchless_norm",
    "convert_batchnorm",
    "fuse_for_inference",
    "init_from_data",
    "nll_loss",
    "reference",
]
