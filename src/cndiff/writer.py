"""Stream a safetensors file to disk, atomically.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype,
shape and byte range, then the tensor bytes back to back. When every output shape and
dtype is known before any data is computed (as it is for a difference model), the header
can be written first and the tensors appended as they are produced, so the output is
never held in memory.

The file is written under a temporary name beside the target and moved into place only
when it is complete and flushed to disk; on any error, or Ctrl-C, the temporary file is
removed and the target is untouched. Without ``overwrite`` the final move refuses to
replace a file that appeared meanwhile. A temporary file holds an exclusive ``flock``
while it is written, so that :func:`remove_stale_temp_files` (run before writing) removes
only those of killed runs, even when the writer's process id means nothing here (another
container sharing the folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dtypes import DType
from .errors import CndiffError, OutputError, OutputExistsError

__all__ = ["OutputEntry", "SafetensorsWriter", "temp_files_for", "remove_stale_temp_files"]

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".cndiff-tmp"
#: start writeback every this many bytes written
_WRITEBACK_BYTES = 32 << 20
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}" + re.escape(_TMP_SUFFIX) + "$")


@dataclass(frozen=True)
class OutputEntry:
    """One tensor of the output: key, dtype and shape (its bytes follow later)."""

    key: str
    dtype: DType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def build_header(entries: Sequence[OutputEntry], metadata: dict[str, str] | None) -> bytes:
    """The header bytes (length prefix included), tensors laid out in ``entries`` order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for e in entries:
        if e.key in header or e.key == "__metadata__":
            raise CndiffError(f"duplicate output key {e.key!r}")
        header[e.key] = {
            "dtype": e.dtype.safetensors,
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def temp_files_for(target: Path) -> list[Path]:
    """Temporary files left beside ``target`` by cndiff writers (finished or not)."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    out = []
    for n in names:
        m = _TMP_RE.match(n)
        if m and m.group("name") == target.name:
            out.append(target.parent / n)
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(path: Path) -> bool:
    """True when a writer holds ``path``'s lock (it is being written right now)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # (closing releases the lock we may have taken)
    return False


def remove_stale_temp_files(target: Path) -> list[Path]:
    """Remove temporary files of ``target`` whose writing process is gone (killed runs)."""
    removed = []
    for p in temp_files_for(target):
        m = _TMP_RE.match(p.name)
        if m and not _pid_alive(int(m.group("pid"))) and not _locked(p):
            try:
                p.unlink()
                removed.append(p)
                log.info("removed leftover temporary file %s", p)
            except OSError:
                pass
    return removed


def _os_error(exc: OSError, target: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the disk of {target.parent}: free some and run again")
    if exc.errno == errno.EDQUOT:
        return OutputError(f"disk quota exceeded writing {target}: free some space and run again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {target.parent} ({exc.strerror}): choose another -o")
    if exc.errno == errno.ENOENT:
        return OutputError(f"folder {target.parent} does not exist: create it or choose another -o")
    return OutputError(f"cannot write {target}: {exc.strerror or exc}")


class SafetensorsWriter:
    """Write one safetensors file, tensor by tensor, in the order of ``entries``.

    Use as a context manager; call :meth:`write` with each tensor's bytes (in as many
    pieces as you like, in order), then :meth:`commit`. Leaving the block without a
    commit, or with an exception, removes the temporary file.

    ``sha256`` of the whole file is computed as it is written when ``hash=True``.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        entries: Sequence[OutputEntry],
        metadata: dict[str, str] | None = None,
        *,
        overwrite: bool = False,
        hash: bool = False,
    ) -> None:
        self.target = Path(target)
        self.entries = list(entries)
        self.overwrite = overwrite
        self._header = build_header(self.entries, metadata)
        self.size = len(self._header) + sum(e.nbytes for e in self.entries)
        self._hash = hashlib.sha256() if hash else None
        self._fd = -1
        self.tmp: Path | None = None
        self._written = 0
        self._flushed = 0
        self.committed = False
        self.sha256: str | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> SafetensorsWriter:
        try:
            self.open()
        except BaseException:  # Ctrl-C while writing the header: __exit__ won't run
            self.abort()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.committed:
            self.abort()

    def open(self) -> None:
        t = self.target
        if t.is_dir():
            raise OutputError(f"output {t} is a folder; name a file, or pass the folder as -o")
        if t.exists() and not self.overwrite:
            raise OutputExistsError(f"{t} exists; pass --overwrite to replace it")
        name = f".{t.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        self.tmp = t.parent / name
        try:
            self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            self.tmp = None
            raise _os_error(exc, t) from None
        with contextlib.suppress(OSError):  # not every filesystem locks; then pids decide
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._raw_write(memoryview(self._header))

    def _raw_write(self, view: memoryview) -> None:
        try:
            while len(view):
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            err = _os_error(exc, self.target)
            self.abort()
            raise err from None

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append tensor bytes (a contiguous numpy array or a bytes-like object)."""
        if self._fd < 0:
            raise CndiffError("writer is not open")
        view = (
            memoryview(data.reshape(-1).view(np.uint8))
            if isinstance(data, np.ndarray)
            else memoryview(data).cast("B")
        )
        if self._written + len(view) > self.size - len(self._header):
            self.abort()
            raise CndiffError("internal error: more tensor bytes than the header announced")
        if self._hash is not None:
            if self._written == 0:
                self._hash.update(self._header)
            self._hash.update(view)
        self._raw_write(view)
        self._written += len(view)
        self._start_writeback()

    def _start_writeback(self) -> None:
        # Ask the kernel to start writing what we wrote so far (POSIX_FADV_DONTNEED starts
        # asynchronous writeback of dirty pages on Linux), so the fsync at commit finds
        # little left to flush: the disk works while we compute.
        end = len(self._header) + self._written
        if end - self._flushed >= _WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd, self._flushed, end - self._flushed,
                                 os.POSIX_FADV_DONTNEED)  # fmt: skip
            self._flushed = end

    def commit(self) -> Path:
        """Flush to disk and move the file into place. Returns the target path."""
        expected = self.size - len(self._header)
        if self._written != expected:
            self.abort()
            raise CndiffError(
                f"internal error: wrote {self._written} tensor bytes, header announced {expected}"
            )
        if self._hash is not None:
            if expected == 0:
                self._hash.update(self._header)
            self.sha256 = self._hash.hexdigest()
        assert self.tmp is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            if self.overwrite:
                os.replace(self.tmp, self.target)
            else:
                _move_no_replace(self.tmp, self.target)
            self.tmp = None
            _fsync_dir(self.target.parent)
        except OSError as exc:
            err = _os_error(exc, self.target)
            self.abort()
            raise err from None
        except BaseException:
            self.abort()
            raise
        self.committed = True
        return self.target

    def abort(self) -> None:
        """Close and remove the temporary file. Safe to call more than once."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


# link() failing this way means the filesystem has no hard links (FAT, exFAT, some
# network and FUSE mounts), not that the folder is read-only
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _move_no_replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``, refusing to replace a file that appeared meanwhile."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExistsError(
            f"{target} exists (it appeared while writing: another run?); pass --overwrite to "
            "replace it"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: check, then rename (a file appearing in between is replaced).
        if os.path.lexists(target):
            raise OutputExistsError(
                f"{target} exists (it appeared while writing: another run?); pass --overwrite to "
                "replace it"
            ) from None
        os.rename(tmp, target)
        return
    os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
