"""Open any checkpoint file: say which format it is and hand it to that format's reader.

:func:`open_checkpoint` checks the path, opens the file (never waiting on a FIFO), reads
its first bytes and gives it to :mod:`.torchfile` (zip or legacy) or :mod:`.safetensors`;
what comes back is a lazy :class:`~cndiff.inputs.checkpoint.Checkpoint`.
"""

from __future__ import annotations

import gc
import os
import stat
from pathlib import Path

from ..errors import CheckpointError
from ..text import escape, escape_path, safe_repr
from .checkpoint import Checkpoint
from .safetensors import open_safetensors
from .torchfile import open_torch_legacy, open_torch_zip

__all__ = ["open_checkpoint"]


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily and describe its tensors.

    Raises :class:`~cndiff.errors.CheckpointError` (with a message that says what to do)
    when the path is missing, is a folder, or is not a readable checkpoint, and
    :class:`~cndiff.errors.UnsafeCheckpointError` when its pickle would run code.
    """
    p = Path(path)
    shown = escape_path(p)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte...
        why = safe_repr(getattr(exc, "strerror", None) or type(exc).__name__, 60)
        raise CheckpointError(f"{shown}: not a usable path ({why})") from None
    if not exists:
        raise CheckpointError(f"{shown}: no such file; check the path")
    if is_dir:
        raise CheckpointError(f"{shown} is a folder, not a checkpoint file; name the file itself")
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise CheckpointError(f"{shown}: permission denied; check the file's permissions") from None
    except OSError as exc:
        raise CheckpointError(f"{shown}: cannot open ({exc.strerror})") from None
    name = escape(p.name)
    # The cyclic garbage collector is paused while the index is read: every object built
    # is kept, and the tens of thousands of them in a state dict's pickle (or millions in a
    # large safetensors header) would otherwise set off collections that walk them all
    # again and again, for nothing (SD1.5 pair: 94 collections, 8% of the opening).
    collecting = gc.isenabled()
    gc.disable()
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{shown} is not a regular file (a pipe or a device?); name the checkpoint file"
            )
        size = st.st_size
        head = os.pread(fd, 16, 0)
        if head[:4] == b"PK\x03\x04":
            ckpt = open_torch_zip(p, name, fd, size)
        elif len(head) >= 9 and head[8:9] == b"{" and head[:8] != bytes(8):
            ckpt = open_safetensors(p, name, fd, size)
        elif head[:1] == b"\x80":
            ckpt = open_torch_legacy(p, name, fd, size)
        elif size == 0:
            raise CheckpointError(f"{name} is empty (0 bytes): download it again")
        else:
            raise CheckpointError(
                f"{name} is not a checkpoint (neither safetensors nor a torch file); "
                "check that you named the right file"
            )
    except OSError as exc:  # EIO and the like, reading the index
        os.close(fd)
        raise CheckpointError(
            f"{shown}: cannot read ({exc.strerror or type(exc).__name__})"
        ) from None
    except BaseException:  # a refusal, Ctrl-C, SIGTERM (as an exception)...
        os.close(fd)
        raise
    finally:
        if collecting:
            gc.enable()
    ckpt._mtime_ns = st.st_mtime_ns
    return ckpt
