"""Optional dependencies: PyTorch is needed only for CUDA, the torch backend and the
drop-in script's torch-format output; everything else runs on numpy alone."""

from __future__ import annotations

import sys
from types import ModuleType

from .errors import NeedsTorchError

__all__ = ["require_torch", "torch_if_loaded"]


def require_torch(purpose: str) -> ModuleType:
    """Import torch, or raise :class:`NeedsTorchError` saying what needs it and how to get
    it (one line, no traceback)."""
    try:
        import torch
    except ImportError:
        raise NeedsTorchError(
            f"{purpose} needs PyTorch, which is not installed: pip install torch "
            "(or pip install 'cndiff[torch]')"
        ) from None
    return torch


def torch_if_loaded() -> ModuleType | None:
    """torch if something already imported it; never imports it (1.5 s and 200 MB)."""
    return sys.modules.get("torch")
