"""Hostile and broken checkpoints, and the check every one of them must pass.

Shared by ``tests/test_fuzz.py`` (Hypothesis, bounded, in CI) and
``tests/fuzz/fuzz_readers.py`` (atheris, long runs). Needs numpy and cndiff only: the
files are assembled byte by byte (safetensors header, torch zip archive and its pickle,
torch's legacy format), so every field can be made to lie.

The check (:func:`check_file`): opening a file with :func:`cndiff.open_checkpoint` and
reading every tensor either ends in a :class:`cndiff.errors.CndiffError` with a one-line
message, or succeeds with every tensor lying inside the file and every read returning
its shape; no other exception, no code run (an audit hook watches ``os.system``,
``exec``, imports...), within a time bound and a memory bound (tracemalloc peak) set by
the file's size.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import sys
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cndiff import open_checkpoint
from cndiff.errors import CndiffError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# -- pickle assembly ----------------------------------------------------------------------

PROTO2 = b"\x80\x02"
STOP = b"."
MARK = b"("
NONE = b"N"
FALSE = b"\x89"
TRUE = b"\x88"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
EMPTY_TUPLE = b")"
SETITEM = b"s"
SETITEMS = b"u"
APPEND = b"a"
APPENDS = b"e"
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
EMPTY_SET = b"\x8f"
ADDITEMS = b"\x90"
FROZENSET = b"\x91"
NEWOBJ = b"\x81"
LIST = b"l"
REDUCE = b"R"
BUILD = b"b"
BINPERSID = b"Q"
POP = b"0"
DUP = b"2"


def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw  # LONG1
    return b"\x8b" + struct.pack("<i", len(raw)) + raw  # LONG4


def op_tuple(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE if items else EMPTY_TUPLE


def op_call(fn: bytes, *args: bytes) -> bytes:
    return fn + op_tuple(*args) + REDUCE


def op_put(i: int) -> bytes:
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def op_get(i: int) -> bytes:
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


def op_dict(items: list[tuple[bytes, bytes]]) -> bytes:
    if not items:
        return EMPTY_DICT
    return EMPTY_DICT + MARK + b"".join(k + v for k, v in items) + SETITEMS


def op_storage(
    key: str, numel: int, storage: str = "FloatStorage", location: str = "cpu", legacy=False
) -> bytes:
    parts = [op_str("storage"), op_global("torch", storage), op_str(key), op_str(location)]
    parts.append(op_int(numel))
    if legacy:
        parts.append(NONE)
    return op_tuple(*parts) + BINPERSID


def op_tensor(storage: bytes, offset: int, shape, stride) -> bytes:
    return op_call(
        op_global("torch._utils", "_rebuild_tensor_v2"),
        storage,
        op_int(offset),
        op_tuple(*map(op_int, shape)),
        op_tuple(*map(op_int, stride)),
        FALSE,
        op_call(op_global("collections", "OrderedDict")),
    )


def dag_tuple(depth: int, base: int = 0) -> bytes:
    """A tuple of ``depth`` levels, each level the previous one twice (through the memo,
    slots ``base`` to ``base + depth``): ``6 * depth`` bytes, ``2**depth`` leaves when
    walked (hashed, compared, printed)."""
    out = EMPTY_TUPLE + op_put(base) + POP
    for k in range(depth):
        out += op_get(base + k) + op_get(base + k) + TUPLE2 + op_put(base + k + 1) + POP
    return out + op_get(base + depth)


#: Python hashes an int as its value modulo this: k * HASH_MODULUS all hash to 0
HASH_MODULUS = 2**61 - 1


def colliding_ints(n: int) -> list[int]:
    """``n`` different ints with the same hash (a dict of them: n**2 / 2 comparisons)."""
    return [k * HASH_MODULUS for k in range(1, n + 1)]


def pickle_of(body: bytes) -> bytes:
    return PROTO2 + body + STOP


def contiguous(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


# -- containers ------------------------------------------------------------------------------


def torch_zip(
    pkl: bytes,
    storages: dict[str, bytes],
    *,
    prefix: str = "archive",
    pkl_compress: int = zipfile.ZIP_STORED,
    storage_compress: int = zipfile.ZIP_STORED,
    byteorder: bytes | None = b"little",
) -> bytes:
    """A torch ``zip`` checkpoint as ``torch.save`` lays it out (entries stored)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl, compress_type=pkl_compress)
        if byteorder is not None:
            z.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            z.writestr(f"{prefix}/data/{key}", data, compress_type=storage_compress)
        z.writestr(f"{prefix}/version", b"3\n")
    return buf.getvalue()


def zip_entries(entries: list[tuple[str, bytes]]) -> bytes:
    """A zip archive of exactly these (name, data) records, in this order, stored; names
    may repeat (zipfile warns, and writes them)."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for name, data in entries:
                z.writestr(name, data)
    return buf.getvalue()


def legacy_prelude() -> bytes:
    sys_info = {
        "protocol_version": 1001,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    return b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, 1001, sys_info))


def torch_legacy(obj_pkl: bytes, storages: list[tuple[str, int, bytes]]) -> bytes:
    """A pre-1.6 ``torch.save`` file: magic, version, sys info, the object, the storage
    keys, then each storage as an 8-byte element count and its bytes."""
    out = legacy_prelude() + obj_pkl + pickle.dumps([k for k, _, _ in storages], protocol=2)
    for _, numel, data in storages:
        out += struct.pack("<q", numel) + data
    return out


def safetensors_file(header: dict | str | bytes, data: bytes, *, header_len=None) -> bytes:
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


# -- seeds: small valid files of every kind ----------------------------------------------


def seed_arrays() -> dict[str, np.ndarray]:
    return {
        "control_model.a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "control_model.b": np.linspace(-1, 1, 4).astype(np.float16),
        "model.diffusion_model.a": np.ones((2, 3), dtype=np.float32),
        "control_model.empty": np.zeros((0, 3), dtype=np.float32),
        "control_model.scalar": np.array(2.5, dtype=np.float32),
    }


_ST_CODES = {np.float32: "F32", np.float16: "F16", np.int64: "I64", np.uint8: "U8"}
_STORAGES = {np.float32: "FloatStorage", np.float16: "HalfStorage", np.int64: "LongStorage"}


def seed_safetensors() -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    data = b""
    for k, a in seed_arrays().items():
        raw = a.tobytes()
        header[k] = {
            "dtype": _ST_CODES[a.dtype.type],
            "shape": list(a.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return safetensors_file(header, data)


def _torch_state(legacy: bool) -> tuple[bytes, list[tuple[str, int, bytes]]]:
    items, storages = [], []
    for i, (k, a) in enumerate(seed_arrays().items()):
        key = str(i)
        pid = op_storage(key, a.size, _STORAGES[a.dtype.type], legacy=legacy)
        items.append((op_str(k), op_tensor(pid, 0, a.shape, contiguous(a.shape))))
        storages.append((key, a.size, a.tobytes()))
    # a transposed view and an offset view of storage 0 (non-contiguous, shared)
    pid0 = op_storage("0", 6, legacy=legacy)
    items.append((op_str("control_model.t"), op_tensor(pid0, 0, (3, 2), (1, 3))))
    items.append((op_str("control_model.tail"), op_tensor(pid0, 2, (4,), (1,))))
    return pickle_of(op_dict(items)), storages


def seed_zip() -> bytes:
    pkl, storages = _torch_state(legacy=False)
    return torch_zip(pkl, {k: d for k, _, d in storages})


def seed_legacy() -> bytes:
    pkl, storages = _torch_state(legacy=True)
    return torch_legacy(pkl, storages)


def seed_wrapped_zip() -> bytes:
    """``{"state_dict": {...}, "epoch": 1, "callbacks": <Lightning object>}``."""
    pid = op_storage("0", 6)
    sd = op_dict([(op_str("control_model.a"), op_tensor(pid, 0, (2, 3), (3, 1)))])
    cb = op_global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    cb_obj = op_call(cb) + op_dict([(op_str("best_model_path"), op_str(""))]) + BUILD
    top = op_dict(
        [(op_str("state_dict"), sd), (op_str("epoch"), op_int(1)), (op_str("callbacks"), cb_obj)]
    )
    data = np.arange(6, dtype=np.float32).tobytes()
    return torch_zip(pickle_of(top), {"0": data})


SEEDS: dict[str, Callable[[], bytes]] = {
    "safetensors": seed_safetensors,
    "zip": seed_zip,
    "legacy": seed_legacy,
    "wrapped": seed_wrapped_zip,
}


# -- the check -----------------------------------------------------------------------------

#: audit events that mean code from a file ran (or was about to)
FORBIDDEN_EVENTS = frozenset(
    {
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "subprocess.Popen",
        "exec",
        "compile",
        "import",
        "ctypes.dlopen",
        "socket.connect",
        "os.remove",
        "os.rename",
        "shutil.rmtree",
        "builtins.input",
        "webbrowser.open",
    }
)

_events: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple) -> None:
    if _events is not None and event in FORBIDDEN_EVENTS:
        _events.append(f"{event}{args!r:.80}")


# codecs the readers look up by fixed names (zip member names, JSON's UTF detection,
# pickle strings): imported lazily by the standard library, so import them before watching
_CODECS = (
    "cp437",
    "utf-8",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "utf-32-le",
    "utf-32-be",
    "latin-1",
    "ascii",
    "raw-unicode-escape",
    "unicode-escape",
)


def install_audit_hook() -> None:
    global _hooked
    if not _hooked:
        import codecs

        for name in _CODECS:
            codecs.lookup(name)
        sys.addaudithook(_audit)
        _hooked = True


def memory_bound(size: int) -> int:
    """Most bytes opening and reading a file of ``size`` bytes may allocate at once:
    every tensor read whole (strided views twice: raw span and copy), plus the pickle's
    objects (cndiff budgets 16x the file, at least 64 MiB) with room for the estimate."""
    return 200 * 2**20 + 40 * size


@dataclass
class Outcome:
    #: "opened" (every tensor read) or "refused" (a CndiffError)
    kind: str
    message: str = ""
    tensors: int = 0
    seconds: float = 0.0
    peak: int | None = None


#: what may not appear in a message: control characters (ESC, BEL, CR, LF...), bidi
#: overrides, lone surrogates (not printable, not encodable as UTF-8)
UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
    "\ufeff\ud800-\udfff]"
)


def _check_message(exc: CndiffError) -> str:
    msg = str(exc)
    assert msg, f"{type(exc).__name__} without a message"
    assert "\n" not in msg, f"multi-line message: {msg!r:.300}"
    assert len(msg) < 1000, f"message of {len(msg)} characters: {msg[:200]!r}"
    assert not UNPRINTABLE.search(msg), f"unprintable message: {ascii(msg)[:300]}"
    return msg


def _extent(info) -> int:
    """Bytes from ``info.offset`` to the end of the last element it reads."""
    if info.numel == 0:
        return 0
    if info.stride is None:
        return info.nbytes
    return (1 + sum((d - 1) * s for d, s in zip(info.shape, info.stride))) * info.itemsize


def _open_and_read(path: Path, size: int) -> Outcome:
    try:
        ck = open_checkpoint(path)
    except CndiffError as exc:
        return Outcome("refused", _check_message(exc))
    with ck:
        assert ck.size == size
        for key, info in ck.tensors.items():
            assert isinstance(key, str), repr(key)[:80]
            assert len(info.shape) <= 64
            if info.numel:
                assert info.offset >= 0, (key, info)
                assert info.offset + _extent(info) <= size, f"{key}: {info} reaches past {size}"
            arr = ck.read(key)  # a successful open promises readable tensors
            assert arr.shape == info.shape and arr.dtype == info.dtype.numpy, key
            if info.numel > 1:  # the engine's path: a slice into a preallocated buffer
                half = np.empty(info.numel // 2, dtype=info.dtype.numpy)
                ck.read_into(key, half, info.numel - half.size)
                assert np.array_equal(
                    half.view(np.uint8), arr.reshape(-1)[info.numel - half.size :].view(np.uint8)
                ), key
        return Outcome("opened", tensors=len(ck.tensors))


def check_file(
    path: str | os.PathLike[str], *, max_seconds: float = 10.0, trace_memory: bool = True
) -> Outcome:
    """Open ``path`` with cndiff and read every tensor; assert the safety contract (see the
    module docstring). Returns what happened; raises AssertionError, or the unexpected
    exception itself, when the contract is broken."""
    global _events
    path = Path(path)
    size = path.stat().st_size
    install_audit_hook()
    if trace_memory:
        tracemalloc.start()
    _events = []
    t0 = time.perf_counter()
    try:
        outcome = _open_and_read(path, size)
    finally:
        seconds = time.perf_counter() - t0
        events, _events = _events, None
        peak = None
        if trace_memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert not events, f"{path.name}: opening it ran code: {events}"
    assert seconds < max_seconds, f"{path.name}: took {seconds:.1f} s"
    if peak is not None:
        assert peak <= memory_bound(size), f"{path.name}: allocated {peak} B for {size} B"
    outcome.seconds, outcome.peak = seconds, peak
    return outcome


def check_bytes(data: bytes, folder: Path, name: str = "fuzz.pth", **kw) -> Outcome:
    path = Path(folder) / name
    path.write_bytes(data)
    try:
        return check_file(path, **kw)
    finally:
        path.unlink()


# -- mutations -------------------------------------------------------------------------------

#: integers that break parsers: zero, sign and width boundaries, a terabyte, the maximum
INTERESTING_INTS = (
    0,
    1,
    2,
    7,
    8,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**40,
    2**62,
    2**63 - 1,
    2**64 - 1,
)


def mutate(data: bytes, kind: str, pos: int, arg: int, extra: bytes = b"") -> bytes:
    """One mutation of ``data``: ``flip`` a bit, ``set`` a byte, ``truncate``, ``insert``
    or ``delete`` bytes, or write an interesting ``int`` (1, 2, 4 or 8 bytes wide)."""
    if not data:
        return extra
    pos %= len(data)
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ (1 << (arg % 8))]) + data[pos + 1 :]
    if kind == "set":
        return data[:pos] + bytes([arg % 256]) + data[pos + 1 :]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + extra + data[pos:]
    if kind == "delete":
        return data[:pos] + data[pos + 1 + arg % 64 :]
    if kind == "int":
        width = (1, 2, 4, 8)[arg % 4]
        value = INTERESTING_INTS[(arg // 4) % len(INTERESTING_INTS)]
        if (arg // 256) % 2:
            value = (len(data) + (arg // 512) % 5 - 2) % 2**64  # around the file size
        raw = (value % 2 ** (8 * width)).to_bytes(width, "little")
        return data[:pos] + raw + data[pos + width :]
    raise ValueError(kind)


MUTATIONS = ("flip", "set", "truncate", "insert", "delete", "int")
