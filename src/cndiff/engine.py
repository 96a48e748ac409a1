"""The chunked difference engine: ``control - base`` in float32, cast, streamed out.

Every output tensor is produced in chunks of at most ``chunk_elems`` elements. A small
pool of worker threads reads the chunk of the control tensor and of its base tensor
straight from the files (``preadv`` releases the GIL), subtracts in float32 and casts to
the output dtype, while the caller's thread writes finished chunks in order. Memory is
bounded by ``slots x chunk size`` whatever the model size.

Arithmetic (the reference algorithm, bit for bit):

* ``d = float32(control) - float32(base)``, one IEEE subtraction, correctly rounded
  (float64 when an input is float64, then rounded to float32 first as torch does);
* ``out = d`` rounded to the output dtype, round-to-nearest-even (fp16, bf16), or kept.

The CPU kernels are numpy's; when torch is already imported (a notebook) its faster
vectorized casts are used on the same buffers. Both give the same bits. ``device="cuda"``
moves the chunks through pinned buffers and one CUDA stream per worker; elementwise
subtraction and the casts are correctly rounded there too, so the bytes are the same.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .dtypes import BF16, F16, F32, F64, DType
from .errors import CndiffError
from .inputs import Checkpoint
from .keys import PlanItem

__all__ = [
    "DEFAULT_CHUNK_MB",
    "Stream",
    "DiffStats",
    "run_streams",
    "to_float32",
    "cast_from_float32",
    "resolve_device",
    "UNCHANGED_TOL",
    "BaseMatchStats",
]

log = logging.getLogger(__name__)

#: default chunk: 4 MiB of float32 (1 Mi elements)
DEFAULT_CHUNK_MB = 4.0
#: the original script's "no difference" threshold on max |control - base|
UNCHANGED_TOL = 1e-6


# -- element conversions (numpy, bit-exact with torch) ---------------------------------------


def to_float32(raw: np.ndarray, dtype: DType, out: np.ndarray) -> np.ndarray:
    """Convert ``raw`` (values, or raw bits for bfloat16) of ``dtype`` to float32 in ``out``."""
    if dtype is F32:
        np.copyto(out, raw)
    elif dtype is BF16:
        u = out.view(np.uint32)
        np.copyto(u, raw, casting="unsafe")
        np.left_shift(u, 16, out=u)
    elif dtype.raw:
        raise CndiffError(f"cannot subtract tensors stored as {dtype.name}")
    else:  # float16 (exact), float64 (rounded to nearest, as torch does), integers
        np.copyto(out, raw, casting="unsafe")
    return out


def _bf16_round(d: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """float32 -> bfloat16 bits, round to nearest even (torch's rule); NaN -> 0x7FC0."""
    u = d.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, u, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")
    nan = np.isnan(d)
    if nan.any():
        out[nan] = 0x7FC0


def _loaded_torch():
    """torch, if something already imported it (its casts are faster); never imports it."""
    return sys.modules.get("torch")


def _f16_round(d: np.ndarray, out: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> None:
    """float32 -> float16, round to nearest even, in whole-array integer steps.

    numpy's own cast converts one element at a time (about 3 ns each); this is about
    twice as fast and gives the same bits for every finite value and infinity (checked
    over all 2^32 float32 bit patterns, see tests/test_engine.py). NaN keeps its sign
    and top payload bits and becomes quiet, as x86's F16C conversion (torch) does.
    """
    u = d.view(np.uint32)
    np.bitwise_and(u, 0x7FFFFFFF, out=t1)  # |d| as bits
    # normal results: add the exponent rebias and the rounding increment (0xFFF plus the
    # lowest kept bit: ties to even), carry into the exponent, shift down
    np.right_shift(t1, 13, out=t2)
    np.bitwise_and(t2, 1, out=t2)
    np.add(t2, t1, out=t2)
    np.add(t2, np.uint32(0xC8000FFF), out=t2)  # (15 - 127) << 23, plus 0xFFF, mod 2^32
    np.right_shift(t2, 13, out=t2)
    small = t1 < 0x38800000  # below fp16's smallest normal: let a float add round it
    if small.any():
        idx = np.flatnonzero(small)
        sub = t1.view(np.float32)[idx] + np.float32(0.5)
        t2[idx] = sub.view(np.uint32) - np.uint32(0x3F000000)
    big = t1 >= 0x477FF000  # rounds to 65520 or more: infinity (NaN: quiet, payload kept)
    if big.any():
        idx = np.flatnonzero(big)
        a = t1[idx]
        t2[idx] = np.where(a > 0x7F800000, 0x7E00 | ((a >> 13) & 0x3FF), 0x7C00)
    np.right_shift(u, 16, out=t1)
    np.bitwise_and(t1, 0x8000, out=t1)
    np.bitwise_or(t2, t1, out=t2)
    np.copyto(out.view(np.uint16), t2, casting="unsafe")


def cast_from_float32(
    d: np.ndarray, dtype: DType, out: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray | None = None
) -> None:
    """Round float32 ``d`` into ``out`` (values, or bits for bfloat16) of ``dtype``.

    ``tmp`` (and ``tmp2``, for float16) are uint32 scratch arrays of ``d``'s size.
    """
    torch = _loaded_torch()
    if torch is not None and dtype in (F16, BF16):
        src = torch.from_numpy(d)
        dst = torch.from_numpy(out).view(torch.float16 if dtype is F16 else torch.bfloat16)
        dst.copy_(src)
    elif dtype is BF16:
        _bf16_round(d, out, tmp)
    elif dtype is F16:
        _f16_round(d, out, tmp, tmp2 if tmp2 is not None else np.empty_like(tmp))
    else:
        np.copyto(out, d, casting="unsafe")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a CUDA GPU, else ``cpu``; checks ``cuda``.

    ``auto`` only imports torch when an NVIDIA device node exists, so CPU-only machines
    never pay torch's import.
    """
    device = (device or "auto").lower()
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise CndiffError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    if (
        device == "auto"
        and not os.path.exists("/dev/nvidia0")
        and not os.path.exists("/dev/nvidiactl")
    ):
        return "cpu"
    try:
        import torch
    except ImportError:
        if device == "auto":
            return "cpu"
        raise CndiffError(
            "--device cuda needs PyTorch with CUDA; install it or use --device cpu"
        ) from None
    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise CndiffError("--device cuda: no CUDA GPU is available here; use --device cpu")
    return "cuda" if device == "auto" else device


# -- plans as streams of chunks ---------------------------------------------------------------


@dataclass
class Stream:
    """One output file's worth of work: plan items read from ``control`` (and ``base``),
    produced as ``out_dtype``. ``sink`` receives each finished chunk, in order.

    Streams that share one ``base`` checkpoint object (a batch) read each base chunk
    once for all of them.
    """

    items: Sequence[PlanItem]
    control: Checkpoint
    base: Checkpoint | None
    out_dtype: DType
    sink: Callable[[PlanItem, np.ndarray], None] | None = None
    #: max |control - base| per subtracted key (NaN when a difference is NaN)
    max_abs: dict[str, float] = field(default_factory=dict)
    #: with ``isolate=True``: the exception that stopped this stream
    error: BaseException | None = None
    #: called with the stream when its last chunk went to the sink
    on_done: Callable[[Stream], None] | None = None
    #: ``"sub"``: control - base (extract); ``"add"``: control + base (apply a diff)
    op: str = "sub"
    #: when set, compare the base with the UNet copy embedded in the control file under
    #: this prefix (``model.diffusion_model.``), read chunk by chunk in the same pass
    embedded_prefix: str | None = None
    #: the result of that comparison
    base_match: BaseMatchStats | None = None


@dataclass
class BaseMatchStats:
    """How the base compares with the control file's embedded UNet, over mapped keys."""

    keys: int = 0
    elements: int = 0
    identical: bool = True
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_base: float = 0.0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.elements if self.elements else 0.0

    @property
    def rel_rms(self) -> float:
        """||base - embedded|| / ||base|| (Frobenius, over every compared element)."""
        return (self.sum_sq_diff / self.sum_sq_base) ** 0.5 if self.sum_sq_base else 0.0

    def add(self, other: tuple[bool, float, float, float, float, int], first: bool) -> None:
        eq, mx, sa, sd, sb, n = other
        self.identical &= eq
        self.max_abs = max(self.max_abs, mx) if mx == mx else float("nan")
        self.sum_abs += sa
        self.sum_sq_diff += sd
        self.sum_sq_base += sb
        self.elements += n
        self.keys += first


@dataclass
class DiffStats:
    """What a run did."""

    chunks: int = 0
    elements: int = 0
    bytes_out: int = 0


@dataclass
class _Task:
    """One chunk ``[start, start+count)`` of the same tensor position in several streams
    (one stream, outside batches). Members sharing a base tensor read it once."""

    members: list[tuple[Stream, PlanItem]]
    start: int
    count: int
    last: bool


class _Slot:
    """Scratch buffers for one chunk in flight, with one output buffer per member."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.c_raw = np.empty(chunk * 8, dtype=np.uint8)
        self.b_raw = np.empty(chunk * 8, dtype=np.uint8)
        self.cf = np.empty(chunk, dtype=np.float32)
        self.bf = np.empty(chunk, dtype=np.float32)
        self.tmp = np.empty(chunk, dtype=np.uint32)
        self.tmp2 = np.empty(chunk, dtype=np.uint32)
        self.outs: list[np.ndarray] = []
        self.e_raw = np.empty(chunk * 8, dtype=np.uint8)
        self.results: list[np.ndarray | BaseException] = []
        self.max_abs: list[float] = []
        self.matches: list[tuple | None] = []

    def out(self, j: int) -> np.ndarray:
        while len(self.outs) <= j:
            self.outs.append(np.empty(self.chunk * 4, dtype=np.uint8))
        return self.outs[j]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tasks(streams: Sequence[Stream], chunk: int) -> Iterator[_Task]:
    # Walk tensor positions in order; at each, group the streams that subtract the same
    # tensor of the same base checkpoint, so a batch reads each base chunk once.
    longest = max((len(s.items) for s in streams), default=0)
    for i in range(longest):
        groups: dict[tuple, list[tuple[Stream, PlanItem]]] = {}
        for s in streams:
            if s.error is not None or i >= len(s.items):
                continue
            item = s.items[i]
            if item.base_key is not None:
                gk: tuple = (id(s.base), item.base_key, item.shape)
            else:
                gk = (id(s), i)
            groups.setdefault(gk, []).append((s, item))
        for members in groups.values():
            n = _numel(members[0][1].shape)
            if n == 0:
                yield _Task(members, 0, 0, True)
                continue
            for start in range(0, n, chunk):
                count = min(chunk, n - start)
                yield _Task(members, start, count, start + count >= n)


def _read(ckpt: Checkpoint, key: str, raw: np.ndarray, start: int, count: int) -> np.ndarray:
    info = ckpt.info(key)
    arr = raw[: count * info.itemsize].view(info.dtype.numpy)
    ckpt.read_into(key, arr, start)
    return arr


def _max_abs(d: np.ndarray) -> float:
    if d.size == 0:
        return 0.0
    hi = float(d.max())
    lo = float(d.min())
    if hi != hi or lo != lo:
        return float("nan")
    return max(hi, -lo)


def _chunk_cpu(
    slot: _Slot, j: int, s: Stream, item: PlanItem, braw: np.ndarray | None, task: _Task
) -> tuple[np.ndarray, float]:
    """One member's chunk: returns (output values, max |difference|)."""
    n = task.count
    out_dt = s.out_dtype
    cinfo = s.control.info(item.control_key)
    craw = _read(s.control, item.control_key, slot.c_raw, task.start, n)
    out = slot.out(j)[: n * out_dt.itemsize].view(out_dt.numpy)
    if braw is None:  # a ControlNet-only tensor: stored as it is, cast
        if cinfo.dtype is out_dt:
            np.copyto(out, craw)
            return out, 0.0
        d = craw if cinfo.dtype is F32 else to_float32(craw, cinfo.dtype, slot.cf[:n])
        if out_dt is F32:
            np.copyto(out, d)
        else:
            cast_from_float32(d, out_dt, out, slot.tmp[:n], slot.tmp2[:n])
        return out, 0.0
    assert s.base is not None and item.base_key is not None
    binfo = s.base.info(item.base_key)
    d = out if out_dt is F32 else slot.cf[:n]
    op = np.subtract if s.op == "sub" else np.add
    if cinfo.dtype is F64 or binfo.dtype is F64:
        np.copyto(d, op(craw, braw, dtype=np.float64), casting="unsafe")
    else:
        c = craw if cinfo.dtype is F32 else to_float32(craw, cinfo.dtype, slot.cf[:n])
        b = braw if binfo.dtype is F32 else to_float32(braw, binfo.dtype, slot.bf[:n])
        op(c, b, out=d)
    m = _max_abs(d) if s.op == "sub" else 0.0
    if out_dt is not F32:
        cast_from_float32(d, out_dt, out, slot.tmp[:n], slot.tmp2[:n])
    return out, m


def _compare_embedded(slot: _Slot, s: Stream, item: PlanItem, braw, task: _Task) -> tuple | None:
    """Compare a base chunk with the same chunk of the control's embedded UNet copy."""
    assert s.embedded_prefix is not None and item.base_key is not None and s.base is not None
    ekey = s.embedded_prefix + item.control_key.split(".", 1)[1]
    if ekey not in s.control.tensors or s.control.info(ekey).shape != item.shape:
        return None
    n = task.count
    einfo, binfo = s.control.info(ekey), s.base.info(item.base_key)
    eraw = _read(s.control, ekey, slot.e_raw, task.start, n)
    eq = einfo.dtype is binfo.dtype and np.array_equal(eraw, braw)
    e = eraw if einfo.dtype is F32 else to_float32(eraw, einfo.dtype, np.empty(n, np.float32))
    b = braw if binfo.dtype is F32 else to_float32(braw, binfo.dtype, np.empty(n, np.float32))
    return compare_chunk(e, b, eq, slot.cf[:n])


def compare_chunk(e: np.ndarray, b: np.ndarray, eq: bool, scratch: np.ndarray | None = None):
    """Statistics of ``b - e`` for :meth:`BaseMatchStats.add`: (identical, max |d|,
    sum |d|, sum d^2, sum b^2, count). Sums of squares use float32 BLAS dots: this is a
    classification, not a measurement that needs every digit."""
    n = b.size
    sb = float(np.dot(b, b)) if n else 0.0
    if eq or n == 0:
        return (True, 0.0, 0.0, 0.0, sb, n)
    d = np.subtract(b, e, out=scratch) if scratch is not None else np.subtract(b, e)
    mx = _max_abs(d)
    np.abs(d, out=d)
    sa = float(np.add.reduce(d, dtype=np.float64))
    sd = float(np.dot(d, d))
    return (False, mx, sa, sd, sb, n)


def _compute_cpu(slot: _Slot, task: _Task) -> _Slot:
    slot.results = []
    slot.max_abs = []
    slot.matches = []
    braw = None
    first = task.members[0]
    if first[1].base_key is not None:
        assert first[0].base is not None
        braw = _read(first[0].base, first[1].base_key, slot.b_raw, task.start, task.count)
    for j, (s, item) in enumerate(task.members):
        try:
            out, m = _chunk_cpu(slot, j, s, item, braw, task)
            match = None
            if s.embedded_prefix is not None and braw is not None:
                match = _compare_embedded(slot, s, item, braw, task)
        except (CndiffError, OSError) as exc:
            if len(task.members) == 1:
                raise
            slot.results.append(exc)
            slot.max_abs.append(0.0)
            slot.matches.append(None)
            continue
        slot.results.append(out)
        slot.max_abs.append(m)
        slot.matches.append(match)
    return slot


def run_streams(
    streams: Sequence[Stream],
    *,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    device: str = "cpu",
    on_chunk: Callable[[int], None] | None = None,
    isolate: bool = False,
) -> DiffStats:
    """Compute every stream's tensors, chunk by chunk, and hand them to the sinks in order.

    ``chunk_mb`` bounds the float32 size of one chunk; ``workers`` threads compute while
    the calling thread runs the sinks (default: ``min(4, cpu count)``). ``on_chunk`` is
    called with the number of control bytes done after each chunk (for progress bars).
    With ``isolate=True`` an error in one stream (its file, its sink) is stored in
    ``stream.error`` and the other streams go on; otherwise it is raised.
    """
    chunk = max(1, int(chunk_mb * 1024 * 1024) // 4)
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    if device != "cpu":
        from .cuda import CudaCompute

        compute: Callable[[_Slot, _Task], _Slot] = CudaCompute(device, chunk)
        make_slot: Callable[[], _Slot] = compute.make_slot  # type: ignore[attr-defined]
    else:
        compute = _compute_cpu

        def make_slot() -> _Slot:
            return _Slot(chunk)

    nslots = workers * 2
    stats = DiffStats()
    free: list[_Slot] = []
    made = 0
    pending: deque[tuple[_Task, Future[_Slot], _Slot]] = deque()

    def fail(s: Stream, exc: BaseException) -> None:
        if not isolate:
            raise exc
        if s.error is None:
            s.error = exc

    def deliver(task: _Task, results: Sequence[np.ndarray | BaseException], maxes, matches) -> None:
        for (s, item), res, m, match in zip(task.members, results, maxes, matches):
            if s.error is not None:
                continue
            if isinstance(res, BaseException):
                fail(s, res)
                continue
            if match is not None:
                if s.base_match is None:
                    s.base_match = BaseMatchStats()
                s.base_match.add(match, first=task.start == 0)
            if item.base_key is not None and s.op == "sub":
                prev = s.max_abs.get(item.key, 0.0)
                s.max_abs[item.key] = m if (m != m or prev != prev) else max(prev, m)
            try:
                if s.sink is not None:
                    s.sink(item, res)
                    stats.bytes_out += res.nbytes
            except (CndiffError, OSError) as exc:
                fail(s, exc)
                continue
            if on_chunk is not None:
                on_chunk(task.count * s.control.info(item.control_key).itemsize)
            if task.last and item is s.items[-1] and s.on_done is not None:
                s.on_done(s)
        stats.chunks += 1
        stats.elements += task.count

    def finish(task: _Task, fut: Future[_Slot], slot: _Slot) -> None:
        try:
            fut.result()
        except (CndiffError, OSError) as exc:
            if not isolate:
                raise
            slot.results = [exc] * len(task.members)
            slot.max_abs = [0.0] * len(task.members)
            slot.matches = [None] * len(task.members)
        try:
            deliver(task, slot.results, slot.max_abs, slot.matches)
        finally:
            slot.results = []
            free.append(slot)

    # The loop makes many short-lived objects; the cyclic GC would otherwise keep walking
    # every object of the opened checkpoints. Reference counting frees what we make.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cndiff") as pool:
        try:
            for task in _tasks(streams, chunk):
                if task.count == 0:
                    # empty tensor: nothing to read; keep the order with what is in flight
                    while pending:
                        finish(*pending.popleft())
                    empties = [np.empty(0, dtype=s.out_dtype.numpy) for s, _ in task.members]
                    deliver(task, empties, [0.0] * len(empties), [None] * len(empties))
                    continue
                if not free:
                    if made < nslots:
                        free.append(make_slot())
                        made += 1
                    else:
                        finish(*pending.popleft())
                slot = free.pop()
                pending.append((task, pool.submit(compute, slot, task), slot))
            while pending:
                finish(*pending.popleft())
        except BaseException:
            for _, fut, _ in pending:
                fut.cancel()
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
    return stats
