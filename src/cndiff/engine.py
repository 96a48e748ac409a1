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

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .checkpoint import Checkpoint
from .dtypes import BF16, F16, F32, F64, DType
from .errors import CndiffError
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
    elif dtype is F64:
        np.copyto(out, raw, casting="unsafe")
    else:
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


def cast_from_float32(d: np.ndarray, dtype: DType, out: np.ndarray, tmp: np.ndarray) -> None:
    """Round float32 ``d`` into ``out`` (values, or bits for bfloat16) of ``dtype``.

    ``tmp`` is a uint32 scratch array of ``d``'s size (used for bfloat16).
    """
    torch = _loaded_torch()
    if torch is not None and dtype in (F16, BF16):
        src = torch.from_numpy(d)
        dst = torch.from_numpy(out).view(torch.float16 if dtype is F16 else torch.bfloat16)
        dst.copy_(src)
    elif dtype is BF16:
        _bf16_round(d, out, tmp)
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
    produced as ``out_dtype``. ``sink`` receives each finished chunk, in order."""

    items: Sequence[PlanItem]
    control: Checkpoint
    base: Checkpoint | None
    out_dtype: DType
    sink: Callable[[PlanItem, np.ndarray], None] | None = None
    #: max |control - base| per subtracted key (NaN when a difference is NaN)
    max_abs: dict[str, float] = field(default_factory=dict)


@dataclass
class DiffStats:
    """What a run did."""

    chunks: int = 0
    elements: int = 0
    bytes_out: int = 0


@dataclass
class _Task:
    stream: Stream
    item: PlanItem
    start: int
    count: int
    last: bool


class _Slot:
    """Scratch buffers for one chunk in flight."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.c_raw = np.empty(chunk * 8, dtype=np.uint8)
        self.b_raw = np.empty(chunk * 8, dtype=np.uint8)
        self.cf = np.empty(chunk, dtype=np.float32)
        self.bf = np.empty(chunk, dtype=np.float32)
        self.tmp = np.empty(chunk, dtype=np.uint32)
        self.out_raw = np.empty(chunk * 4, dtype=np.uint8)
        self.result: np.ndarray | None = None
        self.max_abs = 0.0


def _tasks(streams: Sequence[Stream], chunk: int) -> Iterator[_Task]:
    # Walk items in order; interleave streams item by item so that a batch reads each
    # base tensor once, then every control file's matching tensor.
    longest = max((len(s.items) for s in streams), default=0)
    for i in range(longest):
        for s in streams:
            if i >= len(s.items):
                continue
            item = s.items[i]
            n = 1
            for d in item.shape:
                n *= d
            if n == 0:
                yield _Task(s, item, 0, 0, True)
                continue
            for start in range(0, n, chunk):
                count = min(chunk, n - start)
                yield _Task(s, item, start, count, start + count >= n)


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


def _compute_cpu(slot: _Slot, task: _Task) -> _Slot:
    s, item, n = task.stream, task.item, task.count
    out_dt = s.out_dtype
    cinfo = s.control.info(item.control_key)
    craw = _read(s.control, item.control_key, slot.c_raw, task.start, n)
    out = slot.out_raw[: n * out_dt.itemsize].view(out_dt.numpy)
    slot.max_abs = 0.0
    if item.base_key is None:
        if cinfo.dtype is out_dt:
            slot.result = craw
            return slot
        if cinfo.dtype.raw or out_dt.raw:
            d = to_float32(craw, cinfo.dtype, slot.cf[:n])
        elif cinfo.dtype is F64:
            d = slot.cf[:n]
            np.copyto(d, craw, casting="unsafe")
        else:
            np.copyto(out, craw, casting="unsafe")
            slot.result = out
            return slot
        cast_from_float32(d, out_dt, out, slot.tmp[:n])
        slot.result = out
        return slot
    assert s.base is not None
    binfo = s.base.info(item.base_key)
    braw = _read(s.base, item.base_key, slot.b_raw, task.start, n)
    if cinfo.dtype is F64 or binfo.dtype is F64:
        d64 = np.subtract(craw, braw, dtype=np.float64)
        d = slot.cf[:n]
        np.copyto(d, d64, casting="unsafe")
    else:
        c = craw if cinfo.dtype is F32 else to_float32(craw, cinfo.dtype, slot.cf[:n])
        b = braw if binfo.dtype is F32 else to_float32(braw, binfo.dtype, slot.bf[:n])
        d = slot.cf[:n]
        np.subtract(c, b, out=d)
    slot.max_abs = _max_abs(d)
    if out_dt is F32:
        slot.result = d
    else:
        cast_from_float32(d, out_dt, out, slot.tmp[:n])
        slot.result = out
    return slot


def run_streams(
    streams: Sequence[Stream],
    *,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    device: str = "cpu",
    on_chunk: Callable[[int], None] | None = None,
) -> DiffStats:
    """Compute every stream's tensors, chunk by chunk, and hand them to the sinks in order.

    ``chunk_mb`` bounds the float32 size of one chunk; ``workers`` threads compute while
    the calling thread runs the sinks (default: ``min(4, cpu count)``). ``on_chunk`` is
    called with the number of control bytes done after each chunk (for progress bars).
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
    pending: deque[tuple[_Task, Future[_Slot]]] = deque()

    def finish(task: _Task, fut: Future[_Slot]) -> None:
        slot = fut.result()
        s = task.stream
        if task.item.base_key is not None:
            prev = s.max_abs.get(task.item.key, 0.0)
            m = slot.max_abs
            s.max_abs[task.item.key] = m if (m != m or prev != prev) else max(prev, m)
        if s.sink is not None:
            assert slot.result is not None
            s.sink(task.item, slot.result)
            stats.bytes_out += slot.result.nbytes
        slot.result = None
        stats.chunks += 1
        stats.elements += task.count
        if on_chunk is not None:
            on_chunk(task.count * s.control.info(task.item.control_key).itemsize)
        free.append(slot)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cndiff") as pool:
        try:
            for task in _tasks(streams, chunk):
                if task.count == 0:
                    # empty tensor: nothing to read; keep the order with what is in flight
                    while pending:
                        finish(*pending.popleft())
                    if task.stream.sink is not None:
                        empty = np.empty(0, dtype=task.stream.out_dtype.numpy)
                        task.stream.sink(task.item, empty)
                    continue
                if not free:
                    if made < nslots:
                        free.append(make_slot())
                        made += 1
                    else:
                        finish(*pending.popleft())
                slot = free.pop()
                pending.append((task, pool.submit(compute, slot, task)))
            while pending:
                finish(*pending.popleft())
        except BaseException:
            for _, fut in pending:
                fut.cancel()
            raise
    return stats
