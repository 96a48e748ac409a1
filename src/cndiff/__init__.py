"""cndiff: turn original ControlNet checkpoints into small difference models, and back.

>>> import cndiff
>>> result = cndiff.extract("control_sd15_canny.pth", "v1-5-pruned.ckpt")
>>> result.output
PosixPath('diff_control_sd15_canny_fp16.safetensors')
"""

from ._version import __version__
from .api import ExtractResult, extract
from .apply import apply_diff
from .batch import ModelStatus, extract_many
from .errors import (
    CheckpointError,
    CndiffError,
    IncompatibleBaseError,
    OutputError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from .identify import FileReport, inspect_file
from .inputs import Checkpoint, TensorInfo, open_checkpoint
from .verify import VerifyReport, verify

__all__ = [
    "__version__",
    "extract",
    "ExtractResult",
    "extract_many",
    "ModelStatus",
    "apply_diff",
    "verify",
    "VerifyReport",
    "inspect_file",
    "FileReport",
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
