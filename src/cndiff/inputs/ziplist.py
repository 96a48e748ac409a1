"""The entries of a zip archive's central directory, as :mod:`zipfile` lists them.

A torch checkpoint's archive is plain: no archive comment, nothing before the archive,
the central directory right before its end records (zip64 ones past 4 GB). Such an
archive is listed by a short loop over the directory (:func:`list_canonical`: 1.7 ms
for a ControlNet's 1,490 entries, zipfile 3.9 ms; a batch lists eight controls and a
base before it writes); any other archive, or anything in it that is not what that loop
expects, goes to ``zipfile``, whose reading (and refusals) stay the reference. Both give
the same :class:`Entry` list for the archives the loop reads; ``tests/test_ziplist.py``
holds them to it on torch-written files and on mutants of them.
"""

from __future__ import annotations

import os
import struct
import zipfile
from typing import NamedTuple

from ..errors import CheckpointError
from ..text import safe_repr

__all__ = ["Entry", "list_entries", "list_canonical", "list_by_zipfile"]

# the end records and a directory entry (APPNOTE 4.3.12-4.3.16), little-endian
_EOCD = struct.Struct("<4s4H2LH")  # 22 bytes
_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")  # 46 bytes
_U16_PAIR = struct.Struct("<HH").unpack_from
_U64 = struct.Struct("<Q").unpack_from
# zipfile refuses to list an entry needing a later zip version (its MAX_EXTRACT_VERSION)
_MAX_EXTRACT_VERSION = 63
_UTF8_NAME = 0x800
_FF32 = 0xFFFF_FFFF

_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    ValueError,
    EOFError,
    RuntimeError,
    NotImplementedError,  # a zip version zipfile does not read
    struct.error,
    UnicodeError,
)


class Entry(NamedTuple):
    """One central-directory entry: what the readers use of zipfile's ``ZipInfo``."""

    #: the name as stored (the bytes torch compares)
    raw: bytes
    flag_bits: int
    compress_type: int
    CRC: int
    compress_size: int
    file_size: int
    external_attr: int
    #: where its local header starts
    header_offset: int

    @property
    def orig_filename(self) -> str:
        """The name as zipfile decodes it (for messages)."""
        return self.raw.decode("utf-8" if self.flag_bits & _UTF8_NAME else "cp437")


def list_entries(name: str, fd: int, size: int) -> list[Entry]:
    """The entries of the zip archive in ``fd`` (``size`` bytes), in directory order;
    a :class:`~cndiff.errors.CheckpointError` naming ``name`` if zipfile cannot list it."""
    entries = list_canonical(fd, size)
    return entries if entries is not None else list_by_zipfile(name, fd, size)


def list_by_zipfile(name: str, fd: int, size: int) -> list[Entry]:
    """:func:`list_entries` through ``zipfile`` (any archive it reads)."""
    f = os.fdopen(os.dup(fd), "rb")
    zf = None
    try:
        try:
            zf = _ZipFile(f)
        except _ZIP_ERRORS as exc:
            raise CheckpointError(
                f"{name} is truncated or corrupt (not a readable zip archive: "
                f"{safe_repr(str(exc), 200)}); download it again"
            ) from None
        return [
            Entry(
                i.orig_filename.encode("utf-8" if i.flag_bits & _UTF8_NAME else "cp437"),
                i.flag_bits, i.compress_type, i.CRC, i.compress_size, i.file_size,
                i.external_attr, i.header_offset,
            )  # fmt: skip
            for i in zf.infolist()
        ]
    finally:
        # (closed here: _ZipFile has no finalizer to do it)
        if zf is not None:
            zf.close()
        f.close()


class _ZipFile(zipfile.ZipFile):
    """zipfile's reader without its Python-level finalizer: a signal handler's exception
    (Ctrl-C's) raised while a finalizer runs is dropped, and a reader opening files in a
    loop runs one per archive. :func:`list_by_zipfile` closes the archive itself."""

    # (a C function taking no arguments: no Python frame, so no signal is handled in it)
    __del__ = staticmethod(int)


def _pread(fd: int, n: int, at: int) -> bytes | None:
    try:
        data = os.pread(fd, n, at)
    except (OSError, OverflowError, ValueError):
        return None
    return data if len(data) == n else None


def list_canonical(fd: int, size: int) -> list[Entry] | None:
    """The entries of a plain archive (see the module documentation), as zipfile lists
    them; None for any other archive, or any doubt (zipfile then decides)."""
    eocd_at = size - _EOCD.size
    if eocd_at < 0:
        return None
    tail = _pread(fd, _EOCD.size, eocd_at)
    if tail is None:
        return None
    sig, disk, disk_cd, _, _, cd_size, cd_offset, comment = _EOCD.unpack(tail)
    if sig != b"PK\x05\x06" or comment:
        return None
    cd_end = eocd_at
    at = eocd_at - _LOCATOR.size
    locator = _pread(fd, _LOCATOR.size, at) if at >= 0 else None
    if locator is not None and locator[:4] == b"PK\x06\x07":
        _, loc_disk, record_at, disks = _LOCATOR.unpack(locator)
        cd_end = at - _EOCD64.size
        if loc_disk or disks > 1 or cd_end < 0 or record_at != cd_end:
            return None
        record = _pread(fd, _EOCD64.size, cd_end)
        if record is None:
            return None
        sig, _, _, _, disk, disk_cd, _, _, cd_size, cd_offset = _EOCD64.unpack(record)
        if sig != b"PK\x06\x06":
            return None
    if disk or disk_cd or cd_offset + cd_size != cd_end:
        return None  # spanned, or data before the archive: zipfile's "concat"
    data = _pread(fd, cd_size, cd_offset)
    if data is None:
        return None
    entries: list[Entry] = []
    append = entries.append
    unpack = _CENTRAL.unpack_from
    pos = 0
    while pos < cd_size:
        if pos + 46 > cd_size:
            return None
        (sig, _, _, version, _, flags, method, _, _, crc, csize, usize, n, e, c, _, _,
         external, offset) = unpack(data, pos)  # fmt: skip
        name_at = pos + 46
        pos = name_at + n + e + c
        if sig != b"PK\x01\x02" or version > _MAX_EXTRACT_VERSION or pos > cd_size:
            return None
        raw = data[name_at : name_at + n]
        if flags & _UTF8_NAME:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return None
        if e:
            got = _zip64(data[name_at + n : name_at + n + e], usize, csize, offset)
            if got is None:
                return None
            usize, csize, offset = got
        append(Entry(raw, flags, method, crc, csize, usize, external, offset))
    return entries


def _zip64(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int] | None:
    """The sizes and offset after an entry's extra fields, as zipfile's ``_decodeExtra``
    reads them; None where zipfile would refuse them, and for anything but one zip64 field
    (torch writes nothing else there; zipfile's versions differ on some other kinds).
    Fewer than 4 bytes left over are no field (zipfile ignores them)."""
    if len(extra) < 4:
        return usize, csize, offset
    kind, n = _U16_PAIR(extra, 0)
    if kind != 1 or len(extra) - 4 - n not in range(4):
        return None
    if 8 * ((usize == _FF32) + (csize == _FF32) + (offset == _FF32)) > n:
        return None  # zipfile: "Corrupt zip64 extra field"
    at = 4
    if usize == _FF32:
        (usize,), at = _U64(extra, at), at + 8
    if csize == _FF32:
        (csize,), at = _U64(extra, at), at + 8
    if offset == _FF32:
        (offset,) = _U64(extra, at)
    return usize, csize, offset
