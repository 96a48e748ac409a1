"""The exceptions cndiff raises for problems a user can cause and fix.

Every message says what went wrong and what to do about it, in one line, so the
command line can print it as it is.
"""

from __future__ import annotations

__all__ = [
    "CndiffError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "IncompatibleBaseError",
    "OutputExistsError",
    "OutputError",
    "OptionError",
    "WrongKindError",
    "NeedsTorchError",
]


class CndiffError(Exception):
    """Base class of every error cndiff raises on purpose."""


class CheckpointError(CndiffError):
    """A file could not be read as a checkpoint (missing, truncated, corrupt, wrong kind)."""


class WrongKindError(CheckpointError):
    """A readable file that is not what the command needs (a difference model given to
    ``extract``, a base given as a ControlNet...). ``kind`` says what it is."""

    def __init__(self, message: str, kind: str = "unknown") -> None:
        super().__init__(message)
        self.kind = kind


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked for something cndiff refuses to run (a global outside the allow-list)."""


class IncompatibleBaseError(CndiffError):
    """The base checkpoint does not match the UNet the control model was built on."""


class OutputExistsError(CndiffError):
    """The output file exists and overwriting was not asked for."""


class OutputError(CndiffError):
    """The output could not be written (no space, no permission, not a file path...)."""


class OptionError(CndiffError):
    """An option is unknown, out of range, or does not go with another one."""


class NeedsTorchError(CndiffError):
    """The operation needs PyTorch, which is not installed."""
