"""The safetensors header: parsed against its schema, with memory and time bounded by
its size before any object is built.

A safetensors file starts with an 8-byte length and a JSON header::

    {"__metadata__": {"format": "pt"},
     "key": {"dtype": "F16", "shape": [320, 4], "data_offsets": [0, 2560]}, ...}

``json.loads`` builds every value of the header before anything can be checked: a
99 MB header of ``[[],[],...]`` is 33 million Python objects (2.5 GB). This parser walks
the top-level object member by member and never builds more than one member's value:

* an entry in the canonical form (any JSON whitespace) is matched by one regular
  expression, and costs about a microsecond;
* any other entry must be a flat JSON object (strings, numbers, flat arrays) of at most
  :data:`MAX_ENTRY_BYTES` bytes, found by a regular expression that builds nothing, and
  only then decoded by ``json``;
* ``__metadata__`` must map strings to strings, at most :data:`MAX_METADATA_ENTRIES`.

So opening costs O(header bytes) in time, and what it keeps is one
:class:`~cndiff.inputs.TensorInfo` per tensor (a few hundred bytes); the largest header
safetensors allows (100 MB, 1.4 million tensors) opens in seconds. Every loop is Python
or a regular expression, so Ctrl-C works throughout.
"""

from __future__ import annotations

import gc
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import DTYPES, DType, by_safetensors
from ..errors import CheckpointError
from ..text import safe_repr
from .checkpoint import SLOT_SETTERS, Checkpoint, TensorInfo, check_empty_shape
from .unpickle import MAX_NDIM

__all__ = ["MAX_HEADER_BYTES", "MAX_ENTRY_BYTES", "MAX_METADATA_ENTRIES", "open_safetensors"]

#: A safetensors header larger than this is refused (the format's own reader uses 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: the longest tensor entry accepted (a canonical one of 64 dimensions is under 1.5 KB)
MAX_ENTRY_BYTES = 64 * 1024
#: the most ``__metadata__`` entries accepted (real files have a few dozen)
MAX_METADATA_ENTRIES = 65_536

_WS = rb"[ \t\n\r]*"
_INT = rb"(?:0|[1-9][0-9]{0,18})"  # below 10**19: every offset of a file up to 2**63
# A JSON string: its body without escapes in group 1 (the common case), or with them.
_STR_PLAIN = rb'"([^"\\\x00-\x1f]*)"'
_STR_ANY = rb'"(?:[^"\\\x00-\x1f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'


def _canonical(ws: bytes) -> re.Pattern[bytes]:
    """An entry in the canonical form, ``ws`` between its tokens; groups: key, dtype,
    shape's digits, begin, end, and the separator after the entry."""
    return re.compile(
        ws + _STR_PLAIN + ws + rb":" + ws + rb"\{" + ws
        + rb'"dtype"' + ws + rb":" + ws + rb'"([A-Z0-9_]{1,16})"' + ws + rb"," + ws
        + rb'"shape"' + ws + rb":" + ws + rb"\[" + ws
        + rb"(" + _INT + rb"(?:" + ws + rb"," + ws + _INT + rb"){0,%d})?" % (MAX_NDIM - 1)
        + ws + rb"\]" + ws + rb"," + ws
        + rb'"data_offsets"' + ws + rb":" + ws + rb"\[" + ws + rb"(" + _INT + rb")" + ws
        + rb"," + ws + rb"(" + _INT + rb")" + ws + rb"\]" + ws + rb"\}" + ws + rb"([,}])"
    )  # fmt: skip


# what safetensors writes (twice as fast to match), and the same with any JSON whitespace
_COMPACT = _canonical(b"")
_CANONICAL = _canonical(_WS)
_KEY = re.compile(_WS + rb"(" + _STR_ANY + rb")" + _WS + rb":" + _WS)
_SEP = re.compile(_WS + rb"([,}])")
_SCALAR = rb'(?:[^{}\[\]"]|' + _STR_ANY + rb")"
# a JSON object of scalars, strings and flat arrays (nothing is built to find it)
_FLAT_OBJECT = re.compile(rb"\{(?:" + _SCALAR + rb"|\[" + _SCALAR + rb"*\])*\}")
_META_MEMBER = re.compile(
    _WS + rb"(" + _STR_ANY + rb")" + _WS + rb":" + _WS + rb"(" + _STR_ANY + rb")" + _WS
    + rb"([,}])"
)  # fmt: skip
_EMPTY_OBJECT = re.compile(_WS + rb"\{" + _WS + rb"\}")
_NULL = re.compile(_WS + rb"null")
_TRAILING = re.compile(_WS)
_OPEN = re.compile(_WS + rb"\{" + _WS + rb"(\}?)")
_DTYPE_CODES: dict[bytes, DType] = {d.safetensors.encode(): d for d in DTYPES}


class _Header:
    """One pass over a header's bytes; ``fail`` raises with the file's name."""

    def __init__(self, name: str, raw: bytes, data_start: int, size: int) -> None:
        self.name = name
        self.raw = raw
        self.data_start = data_start
        self.size = size
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] | None = None
        # the furthest any tensor reaches so far, and whether each started there or later
        # (then the header lists them in file order, none overlapping: safetensors does)
        self.reach = 0
        self.in_order = True
        # shape text -> (shape, elements): real files have a few hundred distinct shapes
        self.shapes: dict[bytes | None, tuple[tuple[int, ...], int]] = {None: ((), 1)}

    def fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.name}: corrupt safetensors header ({why})")

    def parse(self) -> None:
        raw = self.raw
        m = _OPEN.match(raw)
        if m is None:
            raise self.fail("not a JSON object")
        pos = m.end()
        end = len(raw)
        sep = b"}" if m.group(1) else b","
        while sep == b",":
            pos, sep = self.canonical_run(pos)
            if sep == b",":
                pos, sep = self.member(pos)
        m = _TRAILING.match(raw, pos)
        if m.end() != end:
            raise self.fail(f"data after the header's closing brace, at byte {m.end()}")

    def canonical_run(self, pos: int) -> tuple[int, bytes]:
        """Entries in the canonical form from ``pos`` on, as fast as Python allows (a few
        microseconds each): where the run stops and the separator there (``,`` when a
        member in another form follows)."""
        raw = self.raw
        tensors = self.tensors
        dtypes = _DTYPE_CODES
        shapes = self.shapes
        data_start, size = self.data_start, self.size
        new = object.__new__
        sk, sd, ss, so, st = SLOT_SETTERS
        TI = TensorInfo  # noqa: N806
        reach, in_order = self.reach, self.in_order
        sep = b","
        while sep == b",":
            m = _CANONICAL.match(raw, pos)
            if m is None:
                break
            # the first in any spacing; then as many compact ones as follow, each where
            # the previous one ended (a scanner matches at its position only)
            follow = _COMPACT.scanner(raw, m.end()).match
            while m is not None:
                key_raw, code, dims, b, e, sep = m.groups()
                pos = m.end()
                begin, end = int(b), int(e)
                try:
                    key = key_raw.decode("utf-8")
                    dtype = dtypes[code]
                    shape, numel = shapes[dims]
                    if (
                        end - begin != numel * dtype.itemsize
                        or data_start + end > size
                        or key in tensors
                        or key == "__metadata__"
                    ):
                        raise KeyError  # (add() says why)
                except (UnicodeDecodeError, KeyError):
                    self.reach, self.in_order = reach, in_order
                    self.add(self.decode_plain(key_raw), code, dims, begin, end)
                    reach, in_order = self.reach, self.in_order
                else:
                    # TensorInfo(key, dtype, shape, offset), without the frozen dataclass's
                    # object.__setattr__ calls: a third of the time for 1.4 million keys
                    info = new(TI)
                    sk(info, key)
                    sd(info, dtype)
                    ss(info, shape)
                    so(info, data_start + begin)
                    st(info, None)
                    tensors[key] = info
                    if begin >= reach:
                        reach = end
                    else:
                        in_order = False
                if sep == b"}":
                    break
                m = follow()
            else:
                continue
            break
        self.reach, self.in_order = reach, in_order
        return pos, sep

    def decode_plain(self, body: bytes) -> str:
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("a string is not UTF-8") from None

    def decode_string(self, token: bytes) -> str:
        if b"\\" not in token:
            return self.decode_plain(token[1:-1])
        try:  # (lone surrogates, as \ud800, are valid JSON and come back as they are)
            return json.loads(token.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise self.fail("a string is not valid JSON") from None

    def member(self, pos: int) -> tuple[int, bytes]:
        """A member not in the canonical form, at ``pos``: where the next one starts and
        the separator after it."""
        raw = self.raw
        m = _KEY.match(raw, pos)
        if m is None:
            raise self.fail(f"expected a quoted key at byte {pos}")
        key = self.decode_string(m.group(1))
        pos = m.end()
        if key == "__metadata__":
            pos = self.parse_metadata(pos)
        else:
            # the extent of the value, found without building anything (and never
            # searched further than an entry may reach)
            m = _FLAT_OBJECT.match(raw, pos, min(len(raw), pos + MAX_ENTRY_BYTES))
            if m is None:
                raise CheckpointError(
                    f"{self.name}: corrupt safetensors header entry for {safe_repr(key)} (not "
                    f"a flat JSON object of dtype, shape and data_offsets under "
                    f"{MAX_ENTRY_BYTES >> 10} KiB)"
                )
            try:
                entry = json.loads(m.group().decode("utf-8"), object_pairs_hook=_no_duplicates)
            except _DuplicateKey:
                raise CheckpointError(
                    f"{self.name}: corrupt safetensors header entry for {safe_repr(key)} (a "
                    "field appears twice)"
                ) from None
            except (UnicodeDecodeError, ValueError) as exc:
                raise CheckpointError(
                    f"{self.name}: corrupt safetensors header entry for {safe_repr(key)} "
                    f"({safe_repr(str(exc), 120)})"
                ) from None
            self.add_entry(key, entry)
            pos = m.end()
        m = _SEP.match(raw, pos)
        if m is None:
            raise self.fail(f"expected ',' or '}}' at byte {pos}")
        return m.end(), m.group(1)

    def parse_metadata(self, pos: int) -> int:
        raw = self.raw
        if self.metadata is not None:
            raise self.fail("key '__metadata__' appears twice")
        self.metadata = meta = {}
        m = _NULL.match(raw, pos)
        if m is not None:
            return m.end()
        m = _EMPTY_OBJECT.match(raw, pos)
        if m is not None:
            return m.end()
        m = _OPEN.match(raw, pos)
        if m is None:
            raise self.fail("__metadata__ must map str to str")
        pos = m.end()
        sep = b","
        while sep == b",":
            m = _META_MEMBER.match(raw, pos)
            if m is None:
                raise self.fail("__metadata__ must map str to str")
            key = self.decode_string(m.group(1))
            if key in meta:
                raise self.fail(f"__metadata__ key {safe_repr(key)} appears twice")
            if len(meta) >= MAX_METADATA_ENTRIES:
                raise self.fail(f"__metadata__ has more than {MAX_METADATA_ENTRIES} entries")
            meta[key] = self.decode_string(m.group(2))
            sep = m.group(3)
            pos = m.end()
        return pos

    def add_entry(self, key: str, entry: Any) -> None:
        """An entry in any form, already decoded: check it as :meth:`add` does."""
        name = safe_repr(key)
        if not isinstance(entry, dict):
            raise CheckpointError(f"{self.name}: corrupt safetensors header entry for {name}")
        code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or by_safetensors(code) is None:
            raise CheckpointError(f"{self.name}: tensor {name} has unknown dtype {safe_repr(code)}")
        # (the length first: the product of a million huge sizes would take hours)
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise CheckpointError(
                f"{self.name}: tensor {name} has invalid shape {safe_repr(shape)}"
            )
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise CheckpointError(
                f"{self.name}: tensor {name} has invalid data_offsets {safe_repr(offs)}"
            )
        self.add(key, code.encode(), None, offs[0], offs[1], tuple(shape))

    def add(
        self,
        key: str,
        code: bytes,
        dims: bytes | None,
        begin: int,
        end: int,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        dtype = _DTYPE_CODES.get(code) or by_safetensors(code.decode("ascii", "replace"))
        if dtype is None:
            raise CheckpointError(
                f"{self.name}: tensor {safe_repr(key)} has unknown dtype "
                f"{safe_repr(code.decode('ascii', 'replace'))}"
            )
        parsed = shape is None
        if shape is None:
            shape = tuple(int(d) for d in dims.split(b",")) if dims else ()
        numel = 1
        for d in shape:
            numel *= d
        if parsed and numel and len(self.shapes) < 4096:
            self.shapes[dims] = (shape, numel)
        if key == "__metadata__":
            raise self.fail("__metadata__ must map str to str")
        nbytes = numel * dtype.itemsize
        if begin > end:
            raise CheckpointError(
                f"{self.name}: tensor {safe_repr(key)} has invalid data_offsets "
                f"{safe_repr([begin, end])}"
            )
        if end - begin != nbytes:
            raise CheckpointError(
                f"{self.name}: tensor {safe_repr(key)} of shape {safe_repr(list(shape))} and "
                f"dtype {dtype.safetensors} needs {safe_repr(nbytes)} bytes but its "
                f"data_offsets span {safe_repr(end - begin)}; the file is corrupt"
            )
        if self.data_start + end > self.size:
            raise CheckpointError(
                f"{self.name} is truncated: tensor {safe_repr(key)} ends at byte "
                f"{safe_repr(self.data_start + end)} but the file has {self.size}; download it "
                "again"
            )
        if nbytes == 0 and len(shape) > 1:
            check_empty_shape(self.name, key, shape)
        if key in self.tensors:
            raise self.fail(f"key {safe_repr(key)} appears twice")
        self.tensors[key] = TensorInfo(key, dtype, shape, self.data_start + begin)
        if begin >= self.reach:
            self.reach = end
        else:
            self.in_order = False

    def in_file_order(self) -> dict[str, TensorInfo]:
        """The tensors sorted by offset (as a reader streaming the file sees them), after
        checking that no two overlap."""
        n = len(self.tensors)
        if n == 0:
            return {}
        if self.in_order:
            return self.tensors
        infos = self.tensors.values()
        begins = np.fromiter((i.offset for i in infos), np.int64, n) - self.data_start
        ends = begins + np.fromiter((i.nbytes for i in infos), np.int64, n)
        order = np.lexsort((np.arange(n), ends, begins))
        begins, ends = begins[order], ends[order]
        keys = list(self.tensors)
        # Any overlap shows between a tensor and the furthest-reaching one before it (empty
        # tensors overlap nothing, and must not hide an overlap of their neighbours).
        full = np.flatnonzero(begins < ends)
        if len(full) > 1:
            b, e = begins[full], ends[full]
            reach = np.maximum.accumulate(e)
            bad = np.flatnonzero(b[1:] < reach[:-1])
            if len(bad):
                i = int(bad[0]) + 1
                j = int(np.argmax(e[:i]))
                first, second = int(order[full[j]]), int(order[full[i]])
                raise CheckpointError(
                    f"{self.name}: tensors {safe_repr(keys[first])} and "
                    f"{safe_repr(keys[second])} overlap; the file is corrupt"
                )
        tensors = self.tensors
        return {keys[i]: tensors[keys[i]] for i in order.tolist()}


def open_safetensors(p: Path, name: str, fd: int, size: int) -> Checkpoint:
    """Open the safetensors file ``p`` (``name``: its name for messages), whose
    descriptor is ``fd`` and size ``size``."""
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{name}: safetensors header claims {n} bytes; the file is corrupt")
    if 8 + n > size:
        raise CheckpointError(
            f"{name} is truncated: its safetensors header needs {8 + n} bytes but the file has "
            f"{size}; download it again"
        )
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise CheckpointError(f"{name} ended early while reading its header; download it again")
    header = _Header(name, raw, 8 + n, size)
    # (a million objects, none of them in a cycle: the cyclic GC would only walk them)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        header.parse()
        tensors = header.in_file_order()
    finally:
        if gc_was_enabled:
            gc.enable()
    return Checkpoint(p, "safetensors", size, tensors, False, header.metadata or {}, [], fd)


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey()
    return out
