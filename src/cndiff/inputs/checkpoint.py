"""Open any checkpoint lazily: list keys, shapes and dtypes, read a tensor or a slice of it.

Supported containers:

* safetensors (``.safetensors``);
* torch's zip format (``torch.save`` since 1.6: ``.pth``, ``.ckpt``, ``.pt``);
* torch's legacy format (before 1.6).

Opening a file reads only its index (safetensors header or the pickle, through the
restricted unpickler, which never runs code). Tensor bytes are read on demand, straight
from their offsets in the file, so a 5.7 GB ControlNet costs a few hundred kilobytes to
open and only the bytes of the tensors actually read. A ``{"state_dict": {...}}`` wrapper
is unwrapped. Tensors saved from CUDA are described (and read) like any other.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DType, by_safetensors
from ..errors import CheckpointError
from ..text import escape_path, safe_repr
from .unpickle import (
    MAX_NDIM,
    Opaque,
    PickleEndsError,
    StorageRef,
    TensorRef,
    restricted_load,
    scan_pickle,
    shape_too_large,
    storage_from_pid,
)

__all__ = ["TensorInfo", "Checkpoint", "open_checkpoint"]

# A safetensors header larger than this is refused (the format's own reader uses 100 MB).
MAX_HEADER_BYTES = 100_000_000
# The pickle of a state dict is small (about 200 KB for SD1.5); cap what we unpickle.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
# Objects a pickle may make the unpickler build (estimated bytes): 16x the file, at least
# 64 MiB, at most 1 GiB. A state dict's pickle builds a few MB.
_PICKLE_BUDGET_MIN = 64 << 20
_PICKLE_BUDGET_MAX = 1 << 30
# A legacy file's pickles are read in windows this large at first, growing as needed.
_LEGACY_WINDOW = 1 << 20

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
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


def _span(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Elements from the first to the last one a non-empty strided view touches."""
    return 1 + sum((d - 1) * s for d, s in zip(shape, stride))


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


@dataclass
class Checkpoint:
    """An open checkpoint file. Use :func:`open_checkpoint`; close it (or use ``with``).

    ``tensors`` maps every tensor key of the (unwrapped) state dict to its
    :class:`TensorInfo`, in the order the file lists them. ``wrapped`` says whether the
    state dict sat under a ``"state_dict"`` key. ``metadata`` holds the safetensors
    ``__metadata__`` (empty for torch files) and ``extras`` the names of top-level entries
    beside the state dict (``epoch``, ``callbacks``...).
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
    reads: int = 0
    _mtime_ns: int = 0
    # the last non-contiguous tensor read, materialized once for all its chunks
    _strided: tuple[str, np.ndarray, list[int]] | None = field(default=None, repr=False)
    _strided_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else "open"
        return (f"<Checkpoint {escape_path(self.path.name, 60)} {self.format}, "
                f"{len(self.tensors)} tensors, {self.size:,} bytes, {state}>")  # fmt: skip

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
                f"{self.path.name} changed on disk while it was being read; wait until it is "
                "completely written (or downloaded) and run again"
            )

    def __contains__(self, key: object) -> bool:
        return key in self.tensors

    def keys(self) -> list[str]:
        """Tensor keys, in file order."""
        return list(self.tensors)

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path.name} has no tensor {key!r}") from None

    # -- reading -----------------------------------------------------------------------
    def _pread_into(self, buf: memoryview, offset: int) -> None:
        if self._fd < 0:
            raise CheckpointError(f"{self.path.name} is closed")
        done = 0
        total = len(buf)
        while done < total:
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except OSError as exc:  # EIO: a failing disk, a network or FUSE mount
                raise CheckpointError(
                    f"{self.path.name}: cannot read ({exc.strerror or exc}); check the file and "
                    "the drive it is on"
                ) from None
            if n <= 0:
                raise CheckpointError(
                    f"{self.path.name} ended early while reading (it shrank or changed on "
                    "disk?): check the file and run again"
                )
            done += n
        self.bytes_read += total
        self.reads += 1

    def read_into(self, key: str, out: np.ndarray, start: int = 0) -> np.ndarray:
        """Read elements ``[start, start + out.size)`` of tensor ``key`` (flattened, in
        row-major order) into the 1-D array ``out``, whose dtype must be the stored one's
        ``DType.numpy``. Returns ``out``."""
        info = self.info(key)
        count = out.size
        if out.dtype != info.dtype.numpy or out.ndim != 1 or not out.flags.c_contiguous:
            raise ValueError(f"out must be a 1-D contiguous array of {info.dtype.numpy}")
        if start < 0 or start + count > info.numel:
            raise ValueError(f"slice [{start}, {start + count}) is outside {key} ({info.numel})")
        if count == 0:
            return out
        if info.stride is not None:
            self._read_strided_into(info, out, start)
            return out
        self._pread_into(memoryview(out.view(np.uint8)), info.offset + start * info.itemsize)
        return out

    def read_run(self, keys: list[str], out: np.ndarray) -> np.ndarray:
        """Read whole tensors that lie back to back in the file, all of ``out``'s dtype and
        contiguous, into the 1-D array ``out`` in one read (many small tensors at the
        cost of one). Returns ``out``."""
        infos = [self.info(k) for k in keys]
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


# -- opening -------------------------------------------------------------------------------


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint lazily and describe its tensors.

    Raises :class:`~cndiff.errors.CheckpointError` (with a message that says what to do)
    when the path is missing, is a folder, or is not a readable checkpoint, and
    :class:`~cndiff.errors.UnsafeCheckpointError` when its pickle would run code.
    """
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte...
        raise CheckpointError(f"{safe_repr(str(p))}: not a usable path ({exc})") from None
    if not exists:
        raise CheckpointError(f"{p}: no such file; check the path")
    if is_dir:
        raise CheckpointError(f"{p} is a folder, not a checkpoint file; name the file itself")
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer forever
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise CheckpointError(f"{p}: permission denied; check the file's permissions") from None
    except OSError as exc:
        raise CheckpointError(f"{p}: cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"{p} is not a regular file (a pipe or a device?); name the checkpoint file"
            )
        size = st.st_size
        head = os.pread(fd, 16, 0)
        if head[:4] == b"PK\x03\x04":
            ckpt = _open_torch_zip(p, fd, size)
        elif _looks_like_safetensors(head, size):
            ckpt = _open_safetensors(p, fd, size)
        elif head[:1] == b"\x80":
            ckpt = _open_torch_legacy(p, fd, size)
        elif size == 0:
            raise CheckpointError(f"{p.name} is empty (0 bytes): download it again")
        else:
            raise CheckpointError(
                f"{p.name} is not a checkpoint (neither safetensors nor a torch file); "
                "check that you named the right file"
            )
    except OSError as exc:  # EIO and the like, reading the index
        os.close(fd)
        raise CheckpointError(f"{p}: cannot read ({exc.strerror or exc})") from None
    except BaseException:
        os.close(fd)
        raise
    ckpt._mtime_ns = st.st_mtime_ns
    return ckpt


def _pickle_budget(size: int) -> int:
    return min(_PICKLE_BUDGET_MAX, max(_PICKLE_BUDGET_MIN, 16 * size))


def _load(p: Path, data: bytes, storage=None, *, size: int) -> Any:
    """:func:`restricted_load`, its errors naming the file (the control or the base?)."""
    try:
        return restricted_load(data, storage, budget=_pickle_budget(size))
    except CheckpointError as exc:
        if str(exc).startswith(p.name):
            raise
        raise type(exc)(f"{p.name}: {exc}") from None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return n > 0 and head[8:9] == b"{"


def _open_safetensors(p: Path, fd: int, size: int) -> Checkpoint:
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{p.name}: safetensors header claims {n} bytes; the file is corrupt")
    if 8 + n > size:
        raise CheckpointError(
            f"{p.name} is truncated: its safetensors header needs {8 + n} bytes but the file has "
            f"{size}; download it again"
        )
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise CheckpointError(f"{p.name} ended early while reading its header; download it again")
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise CheckpointError(
            f"{p.name}: corrupt safetensors header (key {safe_repr(exc.args[0])} appears twice)"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{p.name}: corrupt safetensors header (nested too deeply)") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"{p.name}: corrupt safetensors header ({safe_repr(str(exc), 200)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p.name}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + n
    metadata_raw = header.pop("__metadata__", None)
    if metadata_raw is None:
        metadata_raw = {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise CheckpointError(
            f"{p.name}: corrupt safetensors header (__metadata__ must map str to str)"
        )
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        name = safe_repr(key)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{p.name}: corrupt safetensors header entry for {name}")
        code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        dtype = by_safetensors(code) if isinstance(code, str) else None
        if dtype is None:
            raise CheckpointError(f"{p.name}: tensor {name} has unknown dtype {safe_repr(code)}")
        # (the length first: the product of a million huge sizes would take hours)
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CheckpointError(f"{p.name}: tensor {name} has invalid shape {safe_repr(shape)}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(
                f"{p.name}: tensor {name} has invalid data_offsets {safe_repr(offs)}"
            )
        info = TensorInfo(key, dtype, tuple(shape), data_start + offs[0])
        if offs[1] - offs[0] != info.nbytes:
            raise CheckpointError(
                f"{p.name}: tensor {name} of shape {safe_repr(shape)} and dtype {code} needs "
                f"{safe_repr(info.nbytes)} bytes but its data_offsets span "
                f"{safe_repr(offs[1] - offs[0])}; the file is corrupt"
            )
        if data_start + offs[1] > size:
            raise CheckpointError(
                f"{p.name} is truncated: tensor {name} ends at byte "
                f"{safe_repr(data_start + offs[1])} but the file has {size}; download it again"
            )
        _check_empty_shape(p, key, info.shape)
        tensors[key] = info
        spans.append((offs[0], offs[1], key))
    spans.sort()
    # Any overlap shows between a tensor and the furthest-reaching one before it (empty
    # tensors overlap nothing, and must not hide an overlap of their neighbours).
    reach, reach_key = 0, ""
    for b, e, k in spans:
        if b == e:
            continue
        if b < reach:
            raise CheckpointError(
                f"{p.name}: tensors {safe_repr(reach_key)} and {safe_repr(k)} overlap; "
                "the file is corrupt"
            )
        reach, reach_key = e, k
    # Present tensors in file order, as a reader streaming the file sees them.
    ordered = {k: tensors[k] for _, _, k in spans}
    return Checkpoint(p, "safetensors", size, ordered, False, dict(metadata_raw), [], fd)


def _check_empty_shape(p: Path, key: str, shape: tuple[int, ...]) -> None:
    # A tensor with a 0 in its shape holds nothing, but numpy refuses to even describe
    # (0, 2**70); refuse it here rather than fail when it is read.
    if shape_too_large(shape):
        raise CheckpointError(
            f"{p.name}: tensor {safe_repr(key)} has an impossible shape {safe_repr(list(shape))}"
        )


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else safe_repr(key, 60)


def _unwrap(p: Path, obj: Any, refs_to_info) -> tuple[dict[str, TensorInfo], bool, list[str]]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{p.name} holds a pickled {type(obj).__name__}, not a state dict of tensors"
        )
    wrapped = isinstance(obj.get("state_dict"), dict)
    sd = obj["state_dict"] if wrapped else obj
    extras = [_key_name(k) for k in obj if k != "state_dict"] if wrapped else []
    tensors: dict[str, TensorInfo] = {}
    for key, value in sd.items():
        if isinstance(value, TensorRef):
            if not isinstance(key, str):
                raise CheckpointError(
                    f"{p.name}: a tensor key is not a string ({safe_repr(key, 40)})"
                )
            tensors[key] = refs_to_info(key, value)
        elif not wrapped and not isinstance(value, (int, float, str, Opaque, type(None))):
            extras.append(_key_name(key))
    return tensors, wrapped, extras


def _tensor_info(p: Path, key: str, ref: TensorRef, storage_offset: int, size: int) -> TensorInfo:
    """Where tensor ``key`` lies in the file, its storage's data starting at byte
    ``storage_offset`` of a file of ``size`` bytes. The view was checked against its
    storage when unpickled, and the storage against the file by the caller."""
    itemsize = ref.storage.dtype.itemsize
    numel = 1
    for d in ref.shape:
        numel *= d
    if numel == 0:
        _check_empty_shape(p, key, ref.shape)
        return TensorInfo(key, ref.storage.dtype, ref.shape, storage_offset)
    # Views may overlap themselves (an expanded tensor: stride 0); materializing one
    # costs its full size, which must not exceed what the file could hold.
    if numel * itemsize > size:
        raise CheckpointError(
            f"{p.name}: tensor {safe_repr(key)} of shape {safe_repr(list(ref.shape))} would "
            f"take {numel * itemsize} bytes, more than the whole file ({size}); the file is "
            "corrupt"
        )
    contiguous = ref.stride == _contiguous_strides(ref.shape)
    return TensorInfo(
        key,
        ref.storage.dtype,
        ref.shape,
        storage_offset + ref.offset * itemsize,
        None if contiguous else ref.stride,
    )


def _open_torch_zip(p: Path, fd: int, size: int) -> Checkpoint:
    f = os.fdopen(os.dup(fd), "rb")
    try:
        try:
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
        except _ZIP_ERRORS as exc:
            raise CheckpointError(
                f"{p.name} is truncated or corrupt (not a readable zip archive: "
                f"{safe_repr(str(exc), 200)}); download it again"
            ) from None
        by_name = {i.filename: i for i in infos}
        pkl = [n for n in by_name if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{p.name} is a zip archive but not a torch checkpoint")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = by_name.get(prefix + "byteorder")
        if byteorder is not None:
            order = _read_member(p, zf, byteorder, 64)
            if order.strip() not in (b"little", b""):
                raise CheckpointError(
                    f"{p.name} was saved big-endian; cndiff reads little-endian only"
                )
        data = _read_member(p, zf, by_name[pkl[0]], MAX_PICKLE_BYTES)

        storages: dict[str, StorageRef] = {}

        def storage(pid: tuple) -> StorageRef:
            ref = storage_from_pid(pid)
            storages.setdefault(ref.key, ref)
            return ref

        obj = _load(p, data, storage, size=size)
        starts: dict[str, int] = {}
        sizes: dict[str, int] = {}
        for key in storages:
            member = by_name.get(f"{prefix}data/{key}")
            if member is None:
                raise CheckpointError(
                    f"{p.name} is corrupt: storage {safe_repr(key)} is missing from the archive"
                )
            if member.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"{p.name}: storage {safe_repr(key)} is compressed; not supported"
                )
            starts[key] = _zip_data_start(p, fd, member, size)
            sizes[key] = member.file_size
        f.close()

        def to_info(key: str, ref: TensorRef) -> TensorInfo:
            if ref.storage.key not in starts:
                raise CheckpointError(
                    f"{p.name} is corrupt: unknown storage {safe_repr(ref.storage.key)}"
                )
            have = sizes[ref.storage.key]
            need = ref.storage.numel * ref.storage.dtype.itemsize
            if need > have:
                raise CheckpointError(
                    f"{p.name} is corrupt: storage {safe_repr(ref.storage.key)} of tensor "
                    f"{safe_repr(key)} claims {safe_repr(need)} bytes but the archive holds {have}"
                )
            return _tensor_info(p, key, ref, starts[ref.storage.key], size)

        tensors, wrapped, extras = _unwrap(p, obj, to_info)
    finally:
        f.close()
    return Checkpoint(p, "torch-zip", size, tensors, wrapped, {}, extras, fd)


_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    ValueError,
    EOFError,
    RuntimeError,  # an encrypted member
    NotImplementedError,  # an unknown compression method
    struct.error,
)


def _read_member(p: Path, zf: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int) -> bytes:
    """The bytes of a small, uncompressed archive member (torch never compresses)."""
    if member.compress_type != zipfile.ZIP_STORED or member.flag_bits & 0x1:
        raise CheckpointError(
            f"{p.name}: {safe_repr(member.filename)} is compressed or encrypted; torch never "
            "writes that: the file is corrupt or not a torch checkpoint"
        )
    if member.file_size > limit:
        raise CheckpointError(
            f"{p.name}: {safe_repr(member.filename)} is {member.file_size} bytes; refusing"
        )
    try:
        return zf.read(member)
    except _ZIP_ERRORS as exc:
        raise CheckpointError(
            f"{p.name} is corrupt ({safe_repr(str(exc), 200)}); download it again"
        ) from None


def _zip_data_start(p: Path, fd: int, member: zipfile.ZipInfo, size: int) -> int:
    if not 0 <= member.header_offset <= size - 30:
        raise CheckpointError(f"{p.name} is corrupt: bad zip entry for {member.filename}")
    hdr = os.pread(fd, 30, member.header_offset)
    if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{p.name} is corrupt: bad zip entry for {member.filename}")
    name_len, extra_len = struct.unpack("<HH", hdr[26:30])
    start = member.header_offset + 30 + name_len + extra_len
    if start + member.file_size > size:
        raise CheckpointError(
            f"{p.name} is truncated: {member.filename} ends at byte {start + member.file_size} "
            f"but the file has {size}; download it again"
        )
    return start


def _legacy_pickle(p: Path, fd: int, pos: int, size: int) -> tuple[bytes, int]:
    """The bytes of the pickle starting at byte ``pos`` of a legacy file, and where it ends.

    Read in growing windows (a legacy file's pickles come first, its tensor data after),
    never more than :data:`MAX_PICKLE_BYTES` and never more than the file holds."""
    limit = min(size - pos, MAX_PICKLE_BYTES)
    n = min(limit, _LEGACY_WINDOW)
    budget = _pickle_budget(size)
    while True:
        data = os.pread(fd, n, pos)
        try:
            end = scan_pickle(data, budget)
        except PickleEndsError as exc:
            if len(data) < n or n >= limit:
                raise PickleEndsError(f"{p.name}: {exc}") from None
            n = min(limit, n * 8)
            continue
        except CheckpointError as exc:
            raise type(exc)(f"{p.name}: {exc}") from None
        return data[:end], pos + end


def _open_torch_legacy(p: Path, fd: int, size: int) -> Checkpoint:
    pos = 0

    def load_next(storage=None) -> Any:
        nonlocal pos
        data, pos = _legacy_pickle(p, fd, pos, size)
        return _load(p, data, storage, size=size)

    magic = load_next()
    if not isinstance(magic, int) or magic != _LEGACY_MAGIC:
        raise CheckpointError(
            f"{p.name} is a bare pickle, not a torch checkpoint; refusing to load it"
        )
    load_next()  # protocol version
    load_next()  # sys info
    storages: dict[str, StorageRef] = {}

    def storage(pid: tuple) -> StorageRef:
        ref = storage_from_pid(pid)
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError(f"{p.name}: legacy storage views are not supported")
        storages.setdefault(ref.key, ref)
        return ref

    obj = load_next(storage)
    keys = load_next()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CheckpointError(f"{p.name} is corrupt: bad storage key list")
    starts: dict[str, int] = {}
    for key in keys:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise CheckpointError(f"{p.name} is truncated; download it again")
        (numel,) = struct.unpack("<q", head)
        ref = storages.get(key)
        if ref is None or numel != ref.numel or key in starts:
            raise CheckpointError(f"{p.name} is corrupt: storage {safe_repr(key)} does not match")
        starts[key] = pos + 8
        pos += 8 + numel * ref.dtype.itemsize
        if pos > size:
            raise CheckpointError(f"{p.name} is truncated; download it again")

    def to_info(key: str, ref: TensorRef) -> TensorInfo:
        if ref.storage.key not in starts:
            raise CheckpointError(
                f"{p.name} is corrupt: storage {safe_repr(ref.storage.key)} missing"
            )
        return _tensor_info(p, key, ref, starts[ref.storage.key], size)

    tensors, wrapped, extras = _unwrap(p, obj, to_info)
    return Checkpoint(p, "torch-legacy", size, tensors, wrapped, {}, extras, fd)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out
