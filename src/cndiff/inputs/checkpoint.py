"""An open checkpoint, read lazily: list keys, shapes and dtypes, read a tensor or a slice of it.

Supported containers:

* safetensors (``.safetensors``);
* torch's zip format (``torch.save`` since 1.6: ``.pth``, ``.ckpt``, ``.pt``);
* torch's legacy format (before 1.6).

Opening a file reads only its index (safetensors header or the pickle, through the
restricted unpickler, which never runs code). Tensor bytes are read on demand, straight
from their offsets in the file, so a 5.7 GB ControlNet costs a few hundred kilobytes to
open and only the bytes of the tensors actually read. A ``{"state_dict": {...}}`` wrapper
is unwrapped. Tensors saved from CUDA are described (and read) like any other.

:func:`~cndiff.inputs.opening.open_checkpoint` opens a file; the formats themselves are
read by :mod:`.safetensors` and :mod:`.torchfile`; both read a
file as its reference reader does (``safetensors``, ``torch.load``) or refuse it, with
work and memory bounded by the file's size. Every problem a file can cause is a
:class:`~cndiff.errors.CheckpointError` with a one-line, printable message (names from
the file are escaped); Ctrl-C and SIGTERM are answered in every phase.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..dtypes import DType
from ..errors import CheckpointError
from ..text import escape, safe_repr
from .unpickle import shape_too_large

__all__ = [
    "TensorInfo",
    "Checkpoint",
    "check_empty_shape",
    "contiguous_strides",
    "tensor_info",
    "SLOT_SETTERS",
]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in a checkpoint file and what it looks like."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    #: byte offset of element 0 in the file
    offset: int
    #: for a non-contiguous torch view: element strides; None when the data is contiguous
    stride: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


#: ``TensorInfo``'s slot setters, in field order (key, dtype, shape, offset, stride): for
#: readers building a million of them at once (the frozen dataclass's ``__init__`` goes
#: through ``object.__setattr__``, three times slower than setting the slots directly);
#: an instance to fill is ``object.__new__(TensorInfo)``
SLOT_SETTERS = tuple(
    TensorInfo.__dict__[f].__set__ for f in ("key", "dtype", "shape", "offset", "stride")
)
_set_key, _set_dtype, _set_shape, _set_offset, _set_stride = SLOT_SETTERS


def tensor_info(
    key: str,
    dtype: DType,
    shape: tuple[int, ...],
    offset: int,
    stride: tuple[int, ...] | None = None,
) -> TensorInfo:
    """``TensorInfo(key, dtype, shape, offset, stride)``, built without the frozen
    dataclass's ``__init__`` (a reader builds one per tensor of a file)."""
    info = object.__new__(TensorInfo)
    _set_key(info, key)
    _set_dtype(info, dtype)
    _set_shape(info, shape)
    _set_offset(info, offset)
    _set_stride(info, stride)
    return info


def _canonical_bools(arr: np.ndarray) -> None:
    """Stored booleans as 0 or 1: torch and numpy read any non-zero byte as True, but a
    byte of 0x30 copied as it is would not compare (or write) equal to True."""
    u8 = arr.view(np.uint8)
    np.minimum(u8, 1, out=u8)


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from the first to the last one a non-empty strided view touches."""
    return 1 + sum((d - 1) * s for d, s in zip(shape, stride))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element strides of a C-contiguous tensor of ``shape`` (as torch gives them:
    a dimension of size 0 counts as 1)."""
    strides = []
    acc = 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


@dataclass(repr=False)
class Checkpoint:
    """An open checkpoint file. Use :func:`open_checkpoint`; close it (or use ``with``).

    ``tensors`` maps every tensor key of the (unwrapped) state dict to its
    :class:`TensorInfo`, in the order the file lists them. ``wrapped`` says whether the
    state dict sat under a ``"state_dict"`` key. ``metadata`` holds the safetensors
    ``__metadata__`` (empty for torch files) and ``extras`` the names of top-level entries
    beside the state dict (``epoch``, ``callbacks``...). Keys, metadata and extras are as
    the file spells them (lone surrogates and control characters included): pass them
    through :func:`cndiff.text.escape` before showing them.
    """

    path: Path
    format: str
    size: int
    tensors: dict[str, TensorInfo]
    wrapped: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    extras: list[str] = field(default_factory=list)
    _fd: int = -1
    bytes_read: int = 0
    _mtime_ns: int = 0
    # the last non-contiguous tensor read, materialized once for all its chunks
    _strided: tuple[str, np.ndarray, list[int]] | None = field(default=None, repr=False)
    _strided_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:
        size = f"{self.size} B"
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if self.size >= scale * 0.995:
                size = f"{self.size / scale:.2f} {unit}"
                break
        n = len(self.tensors)
        state = "" if self._fd >= 0 else ", closed"
        return (
            f"<Checkpoint '{escape(self.path.name, 120)}' {self.format}, {n} "
            f"tensor{'s' if n != 1 else ''}, {size}{state}>"
        )

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. Safe to call twice."""
        self._strided = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def check_unchanged(self) -> None:
        """Raise :class:`CheckpointError` if the file changed on disk since it was opened
        (size or modification time): what was read may then be a mix of two files."""
        if self._fd < 0:
            return
        st = os.fstat(self._fd)
        if (st.st_size, st.st_mtime_ns) != (self.size, self._mtime_ns):
            raise CheckpointError(
                f"{escape(self.path.name)} changed on disk while it was being read; wait until "
                "it is completely written (or downloaded) and run again"
            )

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(
                f"{escape(self.path.name)} has no tensor {safe_repr(key)}"
            ) from None

    # -- reading -----------------------------------------------------------------------
    def _pread_into(self, buf: memoryview, offset: int) -> None:
        if self._fd < 0:
            raise CheckpointError(f"{escape(self.path.name)} is closed")
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as exc:  # EIO: a failing disk, a network or FUSE mount
                raise CheckpointError(
                    f"{escape(self.path.name)}: cannot read ({exc.strerror or exc}); check the "
                    "file and the drive it is on"
                ) from None
            if n <= 0:
                raise CheckpointError(
                    f"{escape(self.path.name)} ended early while reading (it shrank or changed on "
                    "disk?): check the file and run again"
                )
            done += n
        self.bytes_read += total

    def read_into(self, key: str, out: np.ndarray, start: int = 0) -> np.ndarray:
        """Read elements ``[start, start + out.size)`` of tensor ``key`` (flattened, in
        row-major order) into the 1-D array ``out``, whose dtype must be the stored one's
        ``DType.numpy``. Returns ``out``."""
        info = self.info(key)
        count = out.size
        if out.dtype != info.dtype.numpy or out.ndim != 1 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a 1-D contiguous array of {info.dtype.numpy}")
        if start < 0 or start + count > info.numel:
            raise ValueError(
                f"slice [{start}, {start + count}) is outside {safe_repr(key)} ({info.numel})"
            )
        if count == 0:
            return out
        if info.stride is not None:
            self._read_strided_into(info, out, start)
            return out
        self._pread_into(memoryview(out.view(np.uint8)), info.offset + start * info.itemsize)
        if out.dtype == np.bool_:
            _canonical_bools(out)
        return out

    def read_run(self, keys: list[str], out: np.ndarray) -> np.ndarray:
        """Read whole tensors that lie back to back in the file, all of ``out``'s dtype and
        contiguous, into the 1-D array ``out`` in one read (many small tensors at the
        cost of one). Returns ``out``."""
        tensors = self.tensors
        try:
            infos = [tensors[k] for k in keys]  # (a pack may hold a million keys)
        except KeyError as exc:
            self.info(exc.args[0])  # raises the usual message
            raise
        first = infos[0]
        end = first.offset
        total = 0
        for info in infos:
            if info.stride is not None or info.offset != end or info.dtype.numpy != out.dtype:
                raise ValueError("read_run needs contiguous tensors of one dtype, in file order")
            end += info.nbytes
            total += info.numel
        if total != out.size or out.ndim != 1 or not out.flags.c_contiguous:
            raise ValueError("out must be a 1-D contiguous array of the tensors' total size")
        if total:
            self._pread_into(memoryview(out.view(np.uint8)), first.offset)
        return out

    def read(self, key: str, start: int = 0, count: int | None = None) -> np.ndarray:
        """Read tensor ``key`` as a numpy array (or elements ``[start, start+count)`` of it,
        flattened). Without ``start``/``count`` the result has the tensor's shape.

        bfloat16 and float8 tensors come back as their raw bits (uint16/uint8); use
        :func:`cndiff.engine.to_float32` or :meth:`read_torch` for values.
        """
        info = self.info(key)
        whole = start == 0 and count is None
        n = info.numel - start if count is None else count
        if info.stride is not None:
            full = self._read_strided(info)
            return full if whole else full.reshape(-1)[start : start + n].copy()
        out = np.empty(n, dtype=info.dtype.numpy)
        self.read_into(key, out, start)
        return out.reshape(info.shape) if whole else out

    def read_torch(self, key: str):  # -> torch.Tensor; imports torch
        """Read tensor ``key`` as a ``torch.Tensor`` of its stored dtype and shape."""
        import torch

        info = self.info(key)
        arr = self.read(key)
        t = torch.from_numpy(np.ascontiguousarray(arr).reshape(-1))
        if info.dtype.raw:
            t = t.view(info.dtype.to_torch())
        return t.reshape(info.shape)

    def _read_strided(self, info: TensorInfo) -> np.ndarray:
        assert info.stride is not None
        span = _span(info.shape, info.stride) if info.numel else 0
        raw = np.empty(span, dtype=info.dtype.numpy)
        if span:
            self._pread_into(memoryview(raw.view(np.uint8)), info.offset)
            if raw.dtype == np.bool_:
                _canonical_bools(raw)
        strides = tuple(s * info.itemsize for s in info.stride)
        return np.lib.stride_tricks.as_strided(raw, info.shape, strides).copy()

    def _read_strided_into(self, info: TensorInfo, out: np.ndarray, start: int) -> None:
        # Chunks of a non-contiguous tensor come one after the other (from several
        # threads): materialize it once, not once per chunk (quadratic in its size), and
        # drop it when every element was handed out.
        with self._strided_lock:
            cached = self._strided
            if cached is None or cached[0] != info.key:
                cached = (info.key, self._read_strided(info).reshape(-1), [0])
                self._strided = cached
            _, flat, served = cached
            out[:] = flat[start : start + out.size]
            served[0] += out.size
            if served[0] >= info.numel:
                self._strided = None


def check_empty_shape(name: str, key: str, shape: tuple[int, ...]) -> None:
    """Refuse a tensor with a 0 in its shape whose other sizes are absurd: it holds
    nothing, but numpy refuses to even describe (0, 2**70)."""
    if shape_too_large(shape):
        raise CheckpointError(
            f"{name}: tensor {safe_repr(key)} has an impossible shape {safe_repr(list(shape))}"
        )

