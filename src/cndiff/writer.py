"""Write outputs atomically; stream a safetensors file to disk.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype,
shape and byte range, then the tensor bytes back to back. When every output shape and
dtype is known before any data is computed (as it is for a difference model), the header
can be written first and the tensors appended as they are produced, so the output is
never held in memory.

Every output (:class:`AtomicFile`) is written under a temporary name beside the target
and moved into place only when it is complete and flushed to disk; on any error, or
Ctrl-C, the temporary file is removed and the target is untouched. Without ``overwrite``
the final move refuses to replace a file that appeared meanwhile. A temporary file holds
an exclusive ``flock`` while it is written, so that :func:`remove_stale_temp_files` (run
before writing) removes only those of killed runs, even when the writer's process id means
nothing here (another container sharing the folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import stat
import threading
import uuid
from collections.abc import Callable, Sequence
from math import prod
from pathlib import Path

import numpy as np

from .dtypes import DType
from .errors import CndiffError, OutputError, OutputExistsError
from .text import escape, escape_path

__all__ = [
    "OutputEntry",
    "AtomicFile",
    "SafetensorsWriter",
    "build_header",
    "temp_files_for",
    "temp_path",
    "remove_stale_temp_files",
    "check_writable_name",
    "output_error",
    "MAX_HEADER_BYTES",
]

log = logging.getLogger("cndiff")

_TMP_SUFFIX = ".cndiff-tmp"
#: start writeback every this many bytes written
_WRITEBACK_BYTES = 32 << 20
#: writes at least this long go through a reused buffer, shorter ones through a copy
_COPY_MIN = 64 << 10
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}" + re.escape(_TMP_SUFFIX) + "$")
#: safetensors readers refuse headers larger than this
MAX_HEADER_BYTES = 100_000_000
#: a file name's longest length where the file system does not say
_NAME_MAX = 255
# what a temporary name adds to the target's name: "." + ".<pid>.<8 hex>" + suffix
_TMP_EXTRA = 1 + 1 + 10 + 1 + 8 + len(_TMP_SUFFIX)


class OutputEntry:
    """One tensor of the output: key, dtype and shape (its bytes follow later). Treat it as
    read-only (a slotted class: an output may hold a million entries)."""

    __slots__ = ("key", "dtype", "shape", "nbytes")

    key: str
    dtype: DType
    shape: tuple[int, ...]
    #: the tensor's size in bytes
    nbytes: int

    def __init__(
        self, key: str, dtype: DType, shape: tuple[int, ...], numel: int | None = None
    ) -> None:
        self.key = key
        self.dtype = dtype
        self.shape = tuple(shape)
        self.nbytes = (prod(self.shape) if numel is None else numel) * dtype.itemsize

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OutputEntry) and (self.key, self.dtype, self.shape) == (
            other.key, other.dtype, other.shape)  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.key, self.dtype, self.shape))

    def __repr__(self) -> str:
        return f"OutputEntry({escape(self.key)!r}, {self.dtype.name}, {list(self.shape)})"


#: what json escapes in a string (with ensure_ascii=False)
_JSON_SPECIAL = re.compile(r'[\x00-\x1f"\\]')


def _unicode_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata_text(value: object) -> str:
    # names from a file system may hold lone surrogates (undecodable bytes): escape them,
    # a safetensors reader refuses a header that is not valid UTF-8
    text = str(value)
    return text if _unicode_ok(text) else text.encode("utf-8", "backslashreplace").decode()


def build_header(entries: Sequence[OutputEntry], metadata: dict[str, str] | None) -> bytes:
    """The header bytes (length prefix included), tensors laid out in ``entries`` order.

    Raises :class:`OutputError` for what a safetensors reader would refuse: a key that is
    not valid Unicode text (a lone surrogate), a duplicate key, a header over 100 MB.
    """
    # The JSON is assembled piece by piece (a million entries cost about a second, not
    # the dict-of-dicts json.dumps would take); keys go through json's encoder unless none
    # of them holds a character it would escape. The checks run over all keys at once.
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys) or "__metadata__" in keys:
        seen: set[str] = {"__metadata__"}
        for k in keys:
            if k in seen:
                raise OutputError(f"two output tensors are named {escape(k)!r}")
            seen.add(k)
    parts: list[str] = []
    if metadata:
        meta = {_metadata_text(k): _metadata_text(v) for k, v in metadata.items()}
        parts.append('"__metadata__":' + json.dumps(meta, separators=(",", ":"),
                                                     ensure_ascii=False))  # fmt: skip
    enc = json.JSONEncoder(ensure_ascii=False).encode
    plain = _JSON_SPECIAL.search("".join(keys)) is None
    pos = 0
    # the text between key and offsets, per (dtype, shape): an output has few of them
    middles: dict[tuple[str, tuple[int, ...]], str] = {}
    add = parts.append
    for e in entries:
        end = pos + e.nbytes
        key = f'"{e.key}"' if plain else enc(e.key)
        middle = middles.get((e.dtype.safetensors, e.shape))
        if middle is None:
            shape = ",".join(map(str, e.shape))
            middle = f':{{"dtype":"{e.dtype.safetensors}","shape":[{shape}],"data_offsets":['
            if len(middles) < 65536:
                middles[(e.dtype.safetensors, e.shape)] = middle
        add(f"{key}{middle}{pos},{end}]}}")
        pos = end
    try:
        raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    except UnicodeEncodeError:
        bad = next(k for k in keys if not _unicode_ok(k))
        raise OutputError(
            f"the key {escape(bad)!r} is not valid Unicode text (a lone surrogate), "
            "so no safetensors reader could open the output; the input file is corrupt "
            "or was written by a broken tool"
        ) from None
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise OutputError(
            f"the output's header would take {len(raw):,} bytes; safetensors readers refuse "
            f"headers over {MAX_HEADER_BYTES:,} (the input has too many or too long keys)"
        )
    return len(raw).to_bytes(8, "little") + raw


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return _NAME_MAX


def check_writable_name(target: Path) -> None:
    """Refuse an output file name the file system cannot hold."""
    limit = _name_max(target.parent if target.parent.exists() else Path("."))
    n = len(os.fsencode(target.name))
    if n > limit:
        raise OutputError(
            f"the output name {escape(target.name, 80)!r} is {n} bytes long; this file system "
            f"allows {limit}: choose a shorter -o"
        )


def _tmp_stem(name: str, limit: int) -> str:
    """The target's name as it appears in its temporary names: whole when it fits in the
    file system's name limit, else cut and tagged with a hash of the whole name."""
    if len(os.fsencode(name)) + _TMP_EXTRA <= limit:
        return name
    digest = hashlib.sha1(os.fsencode(name)).hexdigest()[:8]
    keep = max(1, limit - _TMP_EXTRA - 9)
    cut = os.fsencode(name)[:keep].decode("utf-8", "ignore")
    return f"{cut}~{digest}"


def temp_files_for(target: Path) -> list[Path]:
    """Temporary files left beside ``target`` by cndiff writers (finished or not)."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    stem = _tmp_stem(target.name, _name_max(target.parent))
    out = []
    for n in names:
        m = _TMP_RE.match(n)
        if not m:
            continue
        name = m.group("name")
        inner = _TMP_RE.match(name)  # a temporary file of a temporary file (the drop-in's)
        if name == stem or (inner is not None and inner.group("name") == stem):
            out.append(target.parent / n)
    return out


def temp_path(target: Path) -> Path:
    """A new temporary name for ``target`` (the same pattern as :class:`AtomicFile`'s, so
    :func:`remove_stale_temp_files` removes it when its process is gone)."""
    stem = _tmp_stem(target.name, _name_max(target.parent))
    return target.parent / f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
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
                log.info("removed leftover temporary file %s", escape_path(p))
            except OSError:
                pass
    return removed


def output_error(exc: OSError, target: Path) -> OutputError:
    """The one-line :class:`OutputError` for an ``OSError`` writing ``target``."""
    where = escape_path(target.parent)
    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the disk of {where}: free some and run again")
    if exc.errno == errno.EDQUOT:
        return OutputError(f"disk quota exceeded writing {escape_path(target)}: free some "
                           "space and run again")  # fmt: skip
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write to {where} ({exc.strerror}): choose another -o")
    if exc.errno == errno.ENOENT:
        return OutputError(f"folder {where} does not exist: create it or choose another -o")
    if exc.errno == errno.ENAMETOOLONG:
        return OutputError(f"the output name {escape(target.name, 80)!r} is too long for this "
                           "file system: choose a shorter -o")  # fmt: skip
    return OutputError(f"cannot write {escape_path(target)}: {exc.strerror or exc}")


def refuse_special(target: Path) -> None:
    """Refuse an existing output path that is not a regular file (a folder, a device such
    as /dev/null, a FIFO, a socket): replacing it would not do what the user means."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise output_error(exc, target) from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output {escape_path(target)} is a folder; name a file, or pass the "
                          "folder as -o")  # fmt: skip
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(
            f"output {escape_path(target)} exists and is not a regular file (a device, a pipe "
            "or a socket); cndiff never replaces those: choose another -o"
        )


class AtomicFile:
    """An output file written under a temporary name and moved into place by
    :meth:`commit` (flushed to disk first); :meth:`abort` (or leaving a ``with`` block
    without committing) removes it. ``path`` is the temporary file, for writers that need
    a path (``torch.save``); :meth:`write` appends bytes through the open descriptor.
    """

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.target = Path(target)
        self.overwrite = overwrite
        self.path: Path | None = None
        self.fd = -1
        self.committed = False
        self._flushed = 0
        self.written = 0

    def __enter__(self) -> AtomicFile:
        try:
            self.open()
        except BaseException:  # Ctrl-C while opening: __exit__ won't run
            self.abort()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.committed:
            self.abort()

    def open(self) -> None:
        t = self.target
        refuse_special(t)
        if t.exists() and not self.overwrite:
            raise OutputExistsError(f"{escape_path(t)} exists; pass --overwrite to replace it")
        self.path = temp_path(t)
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            self.path = None
            raise output_error(exc, t) from None
        with contextlib.suppress(OSError):  # not every filesystem locks; then pids decide
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def write(self, view: memoryview | bytes) -> None:
        """Append bytes."""
        if self.fd < 0:
            raise CndiffError("internal error: the output is not open")
        view = memoryview(view).cast("B")
        try:
            while len(view):
                n = os.write(self.fd, view)
                view = view[n:]
                self.written += n
        except OSError as exc:
            err = output_error(exc, self.target)
            self.abort()
            raise err from None
        self._start_writeback()

    def _start_writeback(self) -> None:
        # Ask the kernel to start writing what we wrote so far (POSIX_FADV_DONTNEED starts
        # asynchronous writeback of dirty pages on Linux), so the fsync at commit finds
        # little left to flush: the disk works while we compute.
        if self.written - self._flushed >= _WRITEBACK_BYTES and hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self._flushed, self.written - self._flushed,
                                 os.POSIX_FADV_DONTNEED)  # fmt: skip
            self._flushed = self.written

    def commit(self) -> Path:
        """Flush to disk and move the file into place. Returns the target path."""
        assert self.path is not None
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            refuse_special(self.target)
            if self.overwrite:
                os.replace(self.path, self.target)
            else:
                _move_no_replace(self.path, self.target)
            self.path = None
            _fsync_dir(self.target.parent)
        except OSError as exc:
            err = output_error(exc, self.target)
            self.abort()
            raise err from None
        except BaseException:
            self.abort()
            raise
        self.committed = True
        return self.target

    def abort(self) -> None:
        """Close and remove the temporary file. Safe to call more than once."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


class _WriteBehind:
    """Appends to an :class:`AtomicFile` and to the file's sha256 behind the caller, on two
    threads of its own: one writes, the other hashes what was written.

    :meth:`put` copies the bytes into one of ``depth`` reusable buffers (a few bytes: into
    a ``bytes``) and returns at once, so the caller may reuse its own buffer and never
    waits for the disk or the hash, only, when they are ``depth`` buffers behind, for a
    free one. Or, given ``release``, it takes the caller's buffer as it is, without a copy,
    and calls ``release()`` (on the hashing thread) once the buffer is written and hashed;
    the caller must not touch it before (at most ``depth`` such buffers are held: the
    next :meth:`put` waits). Each buffer is written, then hashed, in order; the write of
    one overlaps the hash of the one before (both release the GIL), beside the compute
    threads. An error (a full disk: the file is then already removed) is raised by the
    next :meth:`put` or by :meth:`finish`. :meth:`finish` waits for the rest and returns
    the hex digest; :meth:`cancel` makes the threads drop what is left and waits for them,
    so the file can then be closed safely (only the writing thread uses its descriptor).
    """

    def __init__(self, file: AtomicFile, depth: int = 4) -> None:
        self._file = file
        self._hash = hashlib.sha256()
        self._todo: queue.SimpleQueue = queue.SimpleQueue()  # to write
        self._written: queue.SimpleQueue = queue.SimpleQueue()  # to hash
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        # one token per caller's buffer that may be held (SimpleQueue: no Python-level lock
        # for Ctrl-C to leave held)
        self._tokens: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(depth):
            self._tokens.put(True)
        self._made = 0
        self._depth = depth
        self._threads: tuple[threading.Thread, threading.Thread] | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._stopping = False

    def _feed(
        self, fn: Callable[[memoryview], object], buf: bytes | bytearray | memoryview, n: int
    ) -> None:
        """``fn`` on the first ``n`` bytes of ``buf``, unless a step failed or the writer
        was cancelled; its error is kept for the caller's thread."""
        if self._error is None and not self._cancelled:
            try:
                with memoryview(buf) as whole, whole[:n] as view:
                    fn(view)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = exc

    def _write_loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                self._written.put(None)
                return
            self._feed(self._file.write, item[0], item[1])
            self._written.put(item)

    def _hash_loop(self) -> None:
        while True:
            item = self._written.get()
            if item is None:
                return
            buf, n, release = item
            self._feed(self._hash.update, buf, n)
            if release is not None:
                del buf, item  # (the caller's buffer is theirs again)
                release()
                self._tokens.put(True)
            elif isinstance(buf, bytearray):
                self._free.put(buf)

    def put(self, data: bytes | memoryview, release: Callable[[], None] | None = None) -> None:
        if self._error is not None:
            raise self._error
        if self._stopping:
            raise CndiffError("internal error: the output is not open")
        n = len(data)
        if self._threads is None:
            hasher = threading.Thread(target=self._hash_loop, name="cndiff-hash", daemon=True)
            hasher.start()
            writer = threading.Thread(target=self._write_loop, name="cndiff-write", daemon=True)
            writer.start()
            self._threads = (writer, hasher)  # (only once started: Ctrl-C may come between)
        if release is not None and n >= _COPY_MIN:
            self._tokens.get()  # (waits while depth of the caller's buffers are held)
            if self._error is not None:
                self._tokens.put(True)
                raise self._error
            self._todo.put((data, n, release))
            return
        if n < _COPY_MIN:
            self._todo.put((bytes(data), n, None))
            if release is not None:
                release()
            return
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            if self._made < self._depth:
                buf = bytearray()
                self._made += 1
            else:
                buf = self._free.get()
        if len(buf) < n:
            buf = bytearray(n)
        memoryview(buf)[:n] = data
        self._todo.put((buf, n, None))

    def _join(self) -> None:
        # (the threads are forgotten only once they have ended: a join cut short by Ctrl-C
        # is done again by the abort that follows, before the descriptor is closed)
        threads = self._threads
        if threads is None:
            return
        if not self._stopping:
            self._stopping = True
            self._todo.put(None)
        for thread in threads:
            thread.join()
        self._threads = None

    def finish(self) -> str:
        """Wait until everything is written and hashed; the sha256 of all of it."""
        self._join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def cancel(self) -> None:
        """Drop what is not written yet and wait for the threads. Safe to call twice."""
        self._cancelled = True
        self._join()


class SafetensorsWriter:
    """Write one safetensors file, tensor by tensor, in the order of ``entries``.

    Use as a context manager; call :meth:`write` with each tensor's bytes (in as many
    pieces as you like, in order), then :meth:`commit`. Leaving the block without a
    commit, or with an exception, removes the temporary file. The bytes go to disk, and
    into the file's sha256 (``sha256`` after the commit), on threads of the writer's own:
    :meth:`write` copies them and returns, and a write error (a full disk) is raised by a
    later :meth:`write` or by :meth:`commit`.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        entries: Sequence[OutputEntry],
        metadata: dict[str, str] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        self.target = Path(target)
        self.entries = list(entries)
        self._header = build_header(self.entries, metadata)
        self.size = len(self._header) + sum(e.nbytes for e in self.entries)
        self._file = AtomicFile(self.target, overwrite=overwrite)
        self._behind = _WriteBehind(self._file)
        self._written = 0
        self.sha256: str | None = None

    @property
    def committed(self) -> bool:
        return self._file.committed

    def __enter__(self) -> SafetensorsWriter:
        self._file.__enter__()
        try:
            self._behind.put(self._header)
        except BaseException:  # Ctrl-C while writing the header: __exit__ won't run
            self.abort()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._file.committed:
            self.abort()

    def write(
        self, data: np.ndarray | bytes | memoryview, release: Callable[[], None] | None = None
    ) -> None:
        """Append tensor bytes (a contiguous numpy array or a bytes-like object).

        Copied at once, unless ``release`` is given: the writer then keeps ``data`` as it
        is, and calls ``release()`` (on a thread of its own) when it no longer needs it;
        until then the caller must leave it alone."""
        view = (
            memoryview(data.reshape(-1).view(np.uint8))
            if isinstance(data, np.ndarray)
            else memoryview(data).cast("B")
        )
        if self._written + len(view) > self.size - len(self._header):
            self.abort()
            raise CndiffError("internal error: more tensor bytes than the header announced")
        self._behind.put(view, release)
        self._written += len(view)

    def commit(self) -> Path:
        """Flush to disk and move the file into place. Returns the target path."""
        expected = self.size - len(self._header)
        if self._written != expected:
            self.abort()
            raise CndiffError(
                f"internal error: wrote {self._written} tensor bytes, header announced {expected}"
            )
        try:
            self.sha256 = self._behind.finish()
        except BaseException:
            self.abort()
            raise
        return self._file.commit()

    def abort(self) -> None:
        """Stop writing and remove the temporary file. Safe to call twice."""
        # (the threads first: the descriptor is closed only once nothing writes to it)
        self._behind.cancel()
        self._file.abort()


# link() failing this way means the filesystem has no hard links (FAT, exFAT, some
# network and FUSE mounts), not that the folder is read-only
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _exists_error(target: Path) -> OutputExistsError:
    return OutputExistsError(
        f"{escape_path(target)} exists (it appeared while writing: another run?); pass "
        "--overwrite to replace it"
    )


def _move_no_replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``, refusing to replace a file that appeared meanwhile."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _exists_error(target) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: check, then rename (a file appearing in between is replaced).
        if os.path.lexists(target):
            raise _exists_error(target) from None
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
