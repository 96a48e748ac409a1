"""cndiff: turn original ControlNet checkpoints into small difference models, and back.

>>> import cndiff
>>> result = cndiff.extract("control_sd15_canny.pth", "v1-5-pruned.ckpt")  # doctest: +SKIP
>>> result.output                                                          # doctest: +SKIP
PosixPath('diff_control_sd15_canny_fp16.safetensors')

The layers every command goes through, in the order the data flows:

* :mod:`cndiff.inputs` — open files lazily and safely, say what they are, open a job's
  control and base (``"self"`` included);
* :mod:`cndiff.options` — every option in one validated :class:`Options`;
* :mod:`cndiff.plan` — map keys: which output tensor comes from which inputs;
* :mod:`cndiff.engine` and :mod:`cndiff.backends` — read in chunks on worker threads,
  compute with numpy or torch;
* :mod:`cndiff.writer` — stream a safetensors file to disk, atomically;
* :mod:`cndiff.results` — what every command returns;

composed by :mod:`cndiff.pipeline` and the :mod:`cndiff.commands`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# The public names, and the module each lives in: imported on first use, so that the
# command line (and ``import cndiff``) pays only for what a command needs.
_LAZY = {
    "apply_diff": "commands.apply",
    "convert": "commands.convert",
    "convert_many": "commands.convert",
    "extract": "commands.extract",
    "extract_many": "commands.extract",
    "FileReport": "commands.inspect",
    "inspect_file": "commands.inspect",
    "prune": "commands.prune",
    "prune_many": "commands.prune",
    "VerifyReport": "commands.verify",
    "verify": "commands.verify",
    "CheckpointError": "errors",
    "CndiffError": "errors",
    "IncompatibleBaseError": "errors",
    "NeedsTorchError": "errors",
    "OptionError": "errors",
    "OutputError": "errors",
    "OutputExistsError": "errors",
    "UnsafeCheckpointError": "errors",
    "WrongKindError": "errors",
    "FileHashes": "hashes",
    "file_hashes": "hashes",
    "Checkpoint": "inputs",
    "TensorInfo": "inputs",
    "open_checkpoint": "inputs",
    "Options": "options",
    "BatchResult": "results",
    "ExtractResult": "results",
    "LoraSummary": "results",
    "Result": "results",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cndiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .commands.apply import apply_diff
    from .commands.convert import convert, convert_many
    from .commands.extract import extract, extract_many
    from .commands.inspect import FileReport, inspect_file
    from .commands.prune import prune, prune_many
    from .commands.verify import VerifyReport, verify
    from .errors import (
        CheckpointError,
        CndiffError,
        IncompatibleBaseError,
        NeedsTorchError,
        OptionError,
        OutputError,
        OutputExistsError,
        UnsafeCheckpointError,
        WrongKindError,
    )
    from .hashes import FileHashes, file_hashes
    from .inputs import Checkpoint, TensorInfo, open_checkpoint
    from .options import Options
    from .results import BatchResult, ExtractResult, LoraSummary, Result

__all__ = [
    "__version__",
    "extract",
    "extract_many",
    "apply_diff",
    "prune",
    "prune_many",
    "convert",
    "convert_many",
    "verify",
    "inspect_file",
    "file_hashes",
    "open_checkpoint",
    "Options",
    "Result",
    "ExtractResult",
    "BatchResult",
    "LoraSummary",
    "VerifyReport",
    "FileReport",
    "FileHashes",
    "Checkpoint",
    "TensorInfo",
    "CndiffError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "WrongKindError",
    "IncompatibleBaseError",
    "OptionError",
    "NeedsTorchError",
    "OutputError",
    "OutputExistsError",
]
