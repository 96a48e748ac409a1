"""cndiff: turn original ControlNet checkpoints into small difference models, and back.

>>> import cndiff
>>> result = cndiff.extract("control_sd15_canny.pth", "v1-5-pruned.ckpt")
>>> result.output
PosixPath('diff_control_sd15_canny_fp16.safetensors')
"""

from ._version import __version__
from .api import ExtractResult, extract
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .errors import (
    CheckpointError,
    CndiffError,
    IncompatibleBaseError,
    OutputError,
    OutputExistsError,
    UnsafeCheckpointError,
)

__all__ = [
    "__version__",
    "extract",
    "ExtractResult",
    "open_checkpoint",
    "Checkpoint",
    "TensorInfo",
    "CndiffError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "IncompatibleBaseError",
    "OutputError",
    "OutputExistsError",
]
