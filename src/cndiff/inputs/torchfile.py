"""torch's two file formats: the zip archive (``torch.save`` since 1.6) and the legacy
stream of pickles (before 1.6), read the way torch 2.x reads them, or refused.

One meaning for every byte: where torch would read something other than what cndiff
reads, the file is refused rather than read differently.

* zip: the archive's folder is the first entry's (as torch's reader decides it); names are
  compared as the raw bytes torch compares; two entries with one name, a local header
  naming another entry, or records sharing bytes are refused; ``version`` must be one
  torch reads; a storage's record must hold exactly the bytes its pickle claims (torch
  refuses any other size); ``byteorder`` must say ``little``;
* both: a storage has one dtype and one size, however often the pickle names it (torch
  would silently use the first), and every view lies inside its own storage;
* legacy: every storage the pickle names must be listed once (torch would otherwise hand
  out uninitialized memory, or read a storage twice).
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..text import safe_repr
from .checkpoint import (
    Checkpoint,
    TensorInfo,
    check_empty_shape,
    contiguous_strides,
    tensor_info,
)
from .unpickle import (
    Opaque,
    PickleEndsError,
    StorageRef,
    TensorRef,
    Unpickled,
    restricted_load,
)
from .ziplist import Entry, list_entries

__all__ = ["open_torch_zip", "open_torch_legacy", "MAX_PICKLE_BYTES"]

# The pickle of a state dict is small (about 200 KB for SD1.5); cap what we unpickle.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
# Objects a pickle may make the unpickler build (estimated bytes): 16x the file, at least
# 64 MiB, at most 1 GiB. A state dict's pickle builds a few MB.
_PICKLE_BUDGET_MIN = 64 << 20
_PICKLE_BUDGET_MAX = 1 << 30
# A legacy file's pickles are read in windows this large at first, growing as needed.
_LEGACY_WINDOW = 1 << 20

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# local headers whose reading is started at once (see _Archive.prefetch_headers), and the
# bytes of each: the fixed part and a name of up to a few hundred bytes
_PREFETCH_MAX = 1 << 16
_PREFETCH_BYTES = 512
# the zip format versions torch 2.13 reads (caffe2/serialize/versions.h)
_ZIP_VERSIONS = range(1, 11)


def _pickle_budget(size: int) -> int:
    return min(_PICKLE_BUDGET_MAX, max(_PICKLE_BUDGET_MIN, 16 * size))


def _load(name: str, data: bytes, pids: str | None, size: int) -> Unpickled:
    """:func:`restricted_load`, its errors naming the file (the control or the base?)."""
    try:
        return restricted_load(data, pids=pids, budget=_pickle_budget(size))
    except CheckpointError as exc:
        raise type(exc)(f"{name}: {exc}") from None


def _key_name(key: Any) -> str:
    return key if isinstance(key, str) else safe_repr(key, 60)


def _unwrap(
    name: str, obj: Any, starts: dict[str, int], size: int
) -> tuple[dict[str, TensorInfo], bool, list[str]]:
    """The state dict in ``obj`` (a dict, or one under ``"state_dict"``): its tensors
    where they lie in the file (their storages' data starting at ``starts``), whether it
    was wrapped, and the names of the other entries."""
    if not isinstance(obj, dict):
        what = "list" if isinstance(obj, list) else type(obj).__name__
        raise CheckpointError(f"{name} holds a pickled {what}, not a state dict of tensors")
    wrapped = isinstance(obj.get("state_dict"), dict)
    sd = obj["state_dict"] if wrapped else obj
    extras = [_key_name(k) for k in obj if k != "state_dict"] if wrapped else []
    tensors: dict[str, TensorInfo] = {}
    shapes: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
    for key, value in sd.items():
        if isinstance(value, TensorRef):
            if not isinstance(key, str):
                raise CheckpointError(
                    f"{name}: a tensor key is not a string ({safe_repr(key, 40)})"
                )
            tensors[key] = _tensor_info(
                name, key, value, starts[value.storage.key], size, shapes
            )
        elif not wrapped and not isinstance(value, (int, float, str, Opaque, type(None))):
            extras.append(_key_name(key))
    return tensors, wrapped, extras


def _tensor_info(
    name: str,
    key: str,
    ref: TensorRef,
    storage_offset: int,
    size: int,
    shapes: dict[tuple[int, ...], tuple[tuple[int, ...], int]],
) -> TensorInfo:
    """Where tensor ``key`` lies in the file, its storage's data starting at byte
    ``storage_offset`` of a file of ``size`` bytes. The view was checked against its
    storage when unpickled, and the storage against the file by the caller. ``shapes``
    remembers each shape's contiguous strides and element count (a state dict has a few
    dozen shapes for a thousand tensors)."""
    shape = ref.shape
    known = shapes.get(shape)
    if known is None:
        numel = 1
        for d in shape:
            numel *= d
        known = shapes[shape] = (contiguous_strides(shape), numel)
    strides, numel = known
    itemsize = ref.storage.dtype.itemsize
    if numel == 0:
        check_empty_shape(name, key, shape)
        return tensor_info(key, ref.storage.dtype, shape, storage_offset)
    # Views may overlap themselves (an expanded tensor: stride 0); materializing one
    # costs its full size, which must not exceed what the file could hold.
    if numel * itemsize > size:
        raise CheckpointError(
            f"{name}: tensor {safe_repr(key)} of shape {safe_repr(list(shape))} would "
            f"take {numel * itemsize} bytes, more than the whole file ({size}); the file is "
            "corrupt"
        )
    return tensor_info(
        key,
        ref.storage.dtype,
        shape,
        storage_offset + ref.offset * itemsize,
        None if ref.stride == strides else ref.stride,
    )


# -- zip -----------------------------------------------------------------------------------

# encrypted, strong encryption, "compressed patched data": torch's reader refuses them
_ZIP_FLAGS_REFUSED = 0x1 | 0x40 | 0x20
_U16_PAIR = struct.Struct("<HH").unpack_from


class _Archive:
    def __init__(self, name: str, fd: int, size: int, infos: list[Entry]) -> None:
        self.name = name
        self.fd = fd
        self.size = size
        self.ranges: list[tuple[int, int, Entry]] = []
        # torch's reader (miniz) finds records by name ignoring ASCII case: "daTa.pkl" is
        # its "data.pkl", and two names differing in case are one record to it
        by_name: dict[bytes, Entry] = {}
        for info in infos:
            raw = info.raw
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                # torch.load lists the records as str and fails on it
                raise CheckpointError(
                    f"{name} is corrupt: its archive has an entry whose name is not UTF-8"
                ) from None
            folded = raw.lower()
            if folded in by_name:
                # zipfile would read the last copy, torch's reader either one
                raise CheckpointError(
                    f"{name} is corrupt: its archive has two entries named "
                    f"{safe_repr(raw.decode('utf-8', 'replace'))} (ignoring case, as torch "
                    "does); torch and cndiff could read different ones"
                )
            by_name[folded] = info
        self.by_name = by_name
        # torch's reader: the folder of the first entry is the archive's
        first = infos[0].raw if infos else b""
        if b"/" not in first:
            raise CheckpointError(f"{name} is a zip archive but not a torch checkpoint")
        self.prefix = prefix = first[: first.index(b"/") + 1]
        if not all(info.raw.startswith(prefix) for info in infos):
            # torch refuses it: "file in archive is not in a subdirectory"
            raise CheckpointError(
                f"{name} is corrupt: its archive holds entries outside its folder "
                f"{safe_repr(prefix.decode('utf-8', 'replace'))}"
            )

    def prefetch_headers(self) -> None:
        """Ask the kernel to start reading every entry's local header now (they lie
        scattered over the file: cold, a few thousand waits of a disk seek one after the
        other), so that :meth:`data_start` finds them read. Only a hint: no error, at most
        ``_PREFETCH_MAX`` entries."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for info in itertools.islice(self.by_name.values(), _PREFETCH_MAX):
            try:
                advise(self.fd, info.header_offset, _PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)
            except (OSError, ValueError, OverflowError):
                return

    def get(self, record: str) -> Entry | None:
        """The entry torch reads for ``record`` (of the archive's folder), or None."""
        return self.by_name.get((self.prefix + record.encode("utf-8")).lower())

    def describe(self, info: Entry) -> str:
        return safe_repr(info.orig_filename)

    def check_member(self, info: Entry) -> None:
        if info.external_attr & 0x10 or info.raw.endswith(b"/"):
            # torch's reader (miniz) skips a folder's bytes: torch.load would hand out
            # uninitialized memory for it
            raise CheckpointError(
                f"{self.name} is corrupt: {self.describe(info)} is marked as a folder"
            )
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & _ZIP_FLAGS_REFUSED:
            raise CheckpointError(
                f"{self.name}: {self.describe(info)} is compressed or encrypted; torch never "
                "writes that: the file is corrupt or not a torch checkpoint"
            )
        if info.compress_size != info.file_size:
            raise CheckpointError(
                f"{self.name} is corrupt: {self.describe(info)} is stored in "
                f"{info.compress_size} bytes but claims {info.file_size}"
            )

    def read_small(self, info: Entry, limit: int) -> bytes:
        """The bytes of a small record (the pickle, version, byteorder)."""
        self.check_member(info)
        if info.file_size > limit:
            raise CheckpointError(
                f"{self.name}: {self.describe(info)} is {info.file_size} bytes; refusing"
            )
        start = self.data_start(info)
        data = os.pread(self.fd, info.file_size, start)
        if len(data) != info.file_size:
            raise CheckpointError(f"{self.name} ended early while reading; download it again")
        # (read here, not through zipfile, whose error texts quote whole names)
        if zlib.crc32(data) != info.CRC:
            raise CheckpointError(
                f"{self.name} is corrupt (bad CRC-32 of {self.describe(info)}); download it again"
            )
        return data

    def data_start(self, info: Entry) -> int:
        """Where the record's bytes start in the file, from its local header (which must
        name it); remembers its extent for the overlap check."""
        name, size = self.name, self.size
        off = info.header_offset
        if not 0 <= off <= size - 30:
            raise CheckpointError(f"{name} is corrupt: bad zip entry for {self.describe(info)}")
        raw = info.raw
        # (the header and the name it must hold, in one read)
        hdr = os.pread(self.fd, 30 + len(raw), off)
        if len(hdr) < 30 or hdr[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{name} is corrupt: bad zip entry for {self.describe(info)}")
        name_len, extra_len = _U16_PAIR(hdr, 26)
        if name_len != len(raw) or hdr[30:] != raw:
            raise CheckpointError(
                f"{name} is corrupt: the zip entry for {self.describe(info)} has another "
                "name in its local header"
            )
        start = off + 30 + name_len + extra_len
        if start + info.file_size > size:
            raise CheckpointError(
                f"{name} is truncated: {self.describe(info)} ends at byte "
                f"{start + info.file_size} but the file has {size}; download it again"
            )
        self.ranges.append((off, start + info.file_size, info))
        return start

    def storage_starts(self, storages: dict[str, StorageRef]) -> dict[str, int]:
        """Where each storage's bytes start, after checking its record against the pickle
        (present, stored, exactly the size the pickle gives it) and its local header."""
        name, by_name, data_prefix = self.name, self.by_name, self.prefix + b"data/"
        check_member, data_start = self.check_member, self.data_start
        starts: dict[str, int] = {}
        for key, ref in storages.items():
            try:
                member = by_name.get((data_prefix + key.encode("utf-8")).lower())
            except UnicodeEncodeError:
                member = None
            if member is None:
                raise CheckpointError(
                    f"{name} is corrupt: storage {safe_repr(key)} is missing from the archive"
                )
            if member.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"{name}: storage {safe_repr(key)} is compressed; not supported"
                )
            check_member(member)
            need = ref.numel * ref.dtype.itemsize
            length = member.file_size
            if need != length:
                # torch refuses any other size: "record size does not match expected size"
                raise CheckpointError(
                    f"{name} is corrupt: storage {safe_repr(key)} claims {need} bytes but the "
                    f"archive holds {length}"
                )
            if not need:
                # (torch never looks at an empty record's header: it holds no bytes)
                starts[key] = 0
                continue
            starts[key] = data_start(member)
        return starts

    def check_no_overlap(self) -> None:
        self.ranges.sort()
        for (_, end, a), (begin, _, b) in zip(self.ranges, self.ranges[1:]):
            if begin < end:
                raise CheckpointError(
                    f"{self.name} is corrupt: zip entries {self.describe(a)} and "
                    f"{self.describe(b)} share bytes"
                )


def open_torch_zip(p: Path, name: str, fd: int, size: int) -> Checkpoint:
    ar = _Archive(name, fd, size, list_entries(name, fd, size))
    ar.prefetch_headers()  # read by the kernel while the pickle is parsed
    pkl = ar.get("data.pkl")
    if pkl is None:
        raise CheckpointError(f"{name} is a zip archive but not a torch checkpoint")
    version = ar.get(".data/version") or ar.get("version")
    if version is None:
        raise CheckpointError(
            f"{name} is corrupt or not a torch checkpoint: its archive has no version record"
        )
    text = ar.read_small(version, 64)
    m = re.match(rb"[ \t\n\r\f\v]*([0-9]+)", text)
    if m is None or int(m.group(1)) not in _ZIP_VERSIONS:
        raise CheckpointError(
            f"{name}: unsupported torch file version {safe_repr(text, 20)} (torch 2.13 reads "
            "1 to 10)"
        )
    byteorder = ar.get("byteorder")
    if byteorder is not None:
        order = ar.read_small(byteorder, 64)
        if order == b"big":
            raise CheckpointError(
                f"{name} was saved big-endian; cndiff reads little-endian only"
            )
        if order != b"little":
            raise CheckpointError(
                f"{name} is corrupt: its byteorder record says {safe_repr(order, 20)}"
            )
    data = ar.read_small(pkl, MAX_PICKLE_BYTES)
    loaded = _load(name, data, "zip", size)
    starts = ar.storage_starts(loaded.storages)
    ar.check_no_overlap()

    tensors, wrapped, extras = _unwrap(name, loaded.obj, starts, size)
    return Checkpoint(p, "torch-zip", size, tensors, wrapped, {}, extras, fd)


# -- legacy ----------------------------------------------------------------------------------


def _legacy_pickle(name: str, fd: int, pos: int, size: int, pids: str | None) -> Unpickled:
    """The pickle starting at byte ``pos`` of a legacy file, unpickled.

    Read in growing windows (a legacy file's pickles come first, its tensor data after),
    never more than :data:`MAX_PICKLE_BYTES` and never more than the file holds."""
    limit = min(size - pos, MAX_PICKLE_BYTES)
    n = min(limit, _LEGACY_WINDOW)
    while True:
        data = os.pread(fd, n, pos)
        try:
            return _load(name, data, pids, size)
        except PickleEndsError:
            if len(data) < n or n >= limit:
                raise
            n = min(limit, n * 8)


def open_torch_legacy(p: Path, name: str, fd: int, size: int) -> Checkpoint:
    pos = 0

    def load_next(pids: str | None = None) -> Unpickled:
        nonlocal pos
        out = _legacy_pickle(name, fd, pos, size, pids)
        pos += out.end
        return out

    magic = load_next().obj
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise CheckpointError(
            f"{name} is a bare pickle, not a torch checkpoint; refusing to load it"
        )
    version = load_next().obj
    if type(version) is not int or version != _LEGACY_PROTOCOL:
        raise CheckpointError(
            f"{name}: unsupported legacy torch file version {safe_repr(version, 30)}"
        )
    load_next()  # sys info
    loaded = load_next("legacy")
    keys = load_next().obj
    if not isinstance(keys, list) or not all(type(k) is str for k in keys):
        raise CheckpointError(f"{name} is corrupt: bad storage key list")
    starts: dict[str, int] = {}
    for key in keys:
        head = os.pread(fd, 8, pos)
        if len(head) < 8:
            raise CheckpointError(f"{name} is truncated; download it again")
        (numel,) = struct.unpack("<q", head)
        ref = loaded.storages.get(key)
        if ref is None or numel != ref.numel or key in starts:
            raise CheckpointError(f"{name} is corrupt: storage {safe_repr(key)} does not match")
        starts[key] = pos + 8
        pos += 8 + numel * ref.dtype.itemsize
        if pos > size:
            raise CheckpointError(f"{name} is truncated; download it again")
    for key in loaded.storages:
        if key not in starts:
            # torch.load would hand out uninitialized memory for it
            raise CheckpointError(f"{name} is corrupt: storage {safe_repr(key)} missing")

    tensors, wrapped, extras = _unwrap(name, loaded.obj, starts, size)
    return Checkpoint(p, "torch-legacy", size, tensors, wrapped, {}, extras, fd)
