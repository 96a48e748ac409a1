"""The scheduler: every plan item in chunks, read on worker threads, delivered in order.

A :class:`Stream` is one job's plan items with the files they are read from and a
``kernel`` that turns one chunk's raw bytes into a result; its ``sink`` receives each
result, in plan order, on the calling thread (the writer appends it to the output).
Several streams that share a base checkpoint object (a batch) are walked together: each
base chunk is read once for all of them.

Memory is bounded by ``2 x workers`` chunks in flight whatever the model size: each
chunk's buffers (from the backend: pinned on CUDA) are reused; an output buffer lent to
a writer (:meth:`ChunkIn.lend_out`; a writer holds at most four) is used again once it
is given back. The arithmetic is not here: kernels call a :mod:`cndiff.backends` backend.
"""

from __future__ import annotations

import functools
import operator
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import Backend, Raw
from .errors import CndiffError
from .inputs import Checkpoint
from .plan import PlanItem
from .text import escape

__all__ = ["Stream", "ChunkIn", "run_streams", "parallel_map"]

@dataclass
class ChunkIn:
    """One chunk of one plan item, read and ready for a kernel: elements
    ``[start, start + count)`` of the control tensor (``c``), of the base tensor (``b``),
    of the control file's embedded UNet copy (``e``) and of the extra file (``x``) where
    the stream reads them; ``out`` is a reusable byte buffer of ``count * 8`` bytes."""

    item: PlanItem
    start: int
    count: int
    c: Raw
    b: Raw | None
    e: Raw | None
    x: Raw | None
    out: np.ndarray
    #: a pack: several small whole tensors read together (``item`` is the first), and
    #: where each starts in the chunk (int64, with the total at the end)
    items: list[PlanItem] | None = None
    starts: np.ndarray | None = None
    _lend: Callable[[], Callable[[], None] | None] | None = field(default=None, repr=False)

    def lend_out(self) -> Callable[[], None] | None:
        """Take ``out`` from the scheduler as it is (in a sink: a writer keeps it instead
        of copying it): it is not used again until the returned function is called, from
        any thread. None when it cannot be lent."""
        return self._lend() if self._lend is not None else None

    @property
    def last(self) -> bool:
        if self.items is not None:
            return True
        return self.start + self.count >= self.item.numel


@dataclass
class Stream:
    """One job's chunks (see the module documentation).

    ``kernel(chunk) -> result`` runs on a worker thread; ``sink(item, result, chunk)``
    on the calling thread, in order; ``on_done(stream)`` after the last item's last chunk.
    ``embedded_prefix``: also read the control file's tensor under this prefix (the UNet
    copy of an original ControlNet) for every item that has a base key. ``extra``: also
    read ``item.key`` from this checkpoint (``verify``: the file under test).

    ``packs``: the kernel and sink also take packs (a :class:`ChunkIn` with ``items``):
    runs of small whole tensors that lie back to back in the files, read and computed in
    one go, so that a file of a million tiny tensors costs seconds, not minutes.
    """

    items: Sequence[PlanItem]
    control: Checkpoint
    kernel: Callable[[ChunkIn], Any]
    base: Checkpoint | None = None
    sink: Callable[[PlanItem, Any, ChunkIn], None] | None = None
    on_done: Callable[[Stream], None] | None = None
    embedded_prefix: str | None = None
    extra: Checkpoint | None = None
    packs: bool = False
    #: with ``isolate=True``: the exception that stopped this stream
    error: BaseException | None = None

    def embedded_key(self, item: PlanItem) -> str | None:
        """The embedded UNet key compared with ``item``'s base chunk, if any."""
        if self.embedded_prefix is None or item.base_key is None:
            return None
        key = self.embedded_prefix + item.key.split(".", 1)[1]
        info = self.control.tensors.get(key)
        return key if info is not None and info.shape == item.shape else None


@dataclass
class _Task:
    """One chunk of the same tensor position in one or more streams (a batch); members
    sharing a base tensor read it once. Or a pack of one stream's small tensors."""

    members: list[tuple[Stream, PlanItem]]
    start: int
    count: int
    pack: list[PlanItem] | None = None


#: tensors of at most this many elements may be packed together
PACK_MAX = 4096
_NUMEL = operator.attrgetter("numel")


@dataclass
class _Slot:
    """The reusable buffers of one task in flight. Output buffers lent out (to a writer)
    come back to ``spare``, shared by the slots, where they are taken again."""

    backend: Backend
    chunk: int
    spare: queue.SimpleQueue
    c: np.ndarray = field(init=False)
    b: np.ndarray = field(init=False)
    e: np.ndarray = field(init=False)
    x: np.ndarray = field(init=False)
    outs: list[np.ndarray | None] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    chunks: list[ChunkIn | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        nbytes = self.chunk * 8
        self.c, self.b, self.e, self.x = (self.backend.host_buffer(nbytes) for _ in range(4))

    def out(self, j: int) -> np.ndarray:
        while len(self.outs) <= j:
            self.outs.append(None)
        buf = self.outs[j]
        if buf is None:
            try:
                buf = self.spare.get_nowait()
            except queue.Empty:
                buf = self.backend.host_buffer(self.chunk * 8)
            self.outs[j] = buf
        return buf

    def lend(self, j: int) -> Callable[[], None] | None:
        """Give output buffer ``j`` away until the returned function puts it with the
        spares (the slot takes another for its next task)."""
        buf = self.outs[j] if j < len(self.outs) else None
        if buf is None:
            return None
        self.outs[j] = None
        return functools.partial(self.spare.put, buf)


#: the elements of the first task at most: it is split where larger, so that the first
#: bytes are written (and the bar moves) about 3 ms after the workers start, and not
#: after a whole chunk of every model in a batch (SD1.5: 8 x 410k elements, 13 ms)
FIRST_TASK = 1 << 13


def _tasks(streams: Sequence[Stream], chunk: int) -> Iterator[_Task]:
    tasks = _all_tasks(streams, chunk)
    first = next(tasks, None)
    if first is None:
        return
    if first.pack is None and first.count > FIRST_TASK:
        yield _Task(first.members, first.start, FIRST_TASK)
        yield _Task(first.members, first.start + FIRST_TASK, first.count - FIRST_TASK)
    else:
        yield first
    yield from tasks


def _all_tasks(streams: Sequence[Stream], chunk: int) -> Iterator[_Task]:
    if len(streams) == 1 and streams[0].packs:
        yield from _packed_tasks(streams[0], chunk)
        return
    # Walk tensor positions in order; at each, group the streams that combine the same
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
            yield from _chunks(members, chunk)


def _chunks(members: list[tuple[Stream, PlanItem]], chunk: int) -> Iterator[_Task]:
    n = members[0][1].numel
    if n == 0:
        yield _Task(members, 0, 0)
        return
    for start in range(0, n, chunk):
        yield _Task(members, start, min(chunk, n - start))


def _packed_tasks(s: Stream, chunk: int) -> Iterator[_Task]:
    """One stream's tasks, runs of small back-to-back tensors packed together.

    A small whole tensor (at most ``PACK_MAX`` elements) joins the pack before it when it
    is stored contiguously right after it in the control file (and in the base), with
    the same dtypes, and has no embedded tensor to read. (One pass, with every lookup
    bound locally: a file may hold a million tensors.)"""
    # (the dicts' own lookups: every key comes from the plan, made from these files)
    cinfo = s.control.tensors.__getitem__
    binfo = s.base.tensors.__getitem__ if s.base is not None else None
    embedded = s.embedded_prefix is not None
    limit = min(PACK_MAX, chunk)
    pack: list[PlanItem] = []
    total = 0
    c_end = b_end = -1
    c_dt = b_dt = None

    def flush() -> Iterator[_Task]:
        if len(pack) == 1:
            yield from _chunks([(s, pack[0])], chunk)
        elif pack:
            yield _Task([(s, pack[0])], 0, total, list(pack))

    for item in s.items:
        if s.error is not None:
            return
        n = item.numel
        ci = bi = None
        ok = 0 < n <= limit and not (embedded and s.embedded_key(item) is not None)
        if ok:
            ci = cinfo(item.control_key)
            ok = ci.stride is None
            if ok and item.base_key is not None and binfo is not None:
                bi = binfo(item.base_key)
                ok = bi.stride is None
        if not ok:
            yield from flush()
            pack.clear()
            total = 0
            yield from _chunks([(s, item)], chunk)
            continue
        assert ci is not None
        joins = (
            pack
            and total + n <= chunk
            and ci.offset == c_end
            and ci.dtype is c_dt
            and (bi is None) == (b_dt is None)
            and (bi is None or (bi.offset == b_end and bi.dtype is b_dt))
        )
        if not joins:
            yield from flush()
            pack.clear()
            total = 0
        pack.append(item)
        total += n
        c_end, c_dt = ci.offset + n * ci.dtype.itemsize, ci.dtype
        if bi is not None:
            b_end, b_dt = bi.offset + n * bi.dtype.itemsize, bi.dtype
        else:
            b_end, b_dt = -1, None
    yield from flush()


def _read(ckpt: Checkpoint, key: str, buf: np.ndarray, start: int, count: int) -> Raw:
    info = ckpt.info(key)
    arr = buf[: count * info.itemsize].view(info.dtype.numpy)
    ckpt.read_into(key, arr, start)
    return Raw(arr, info.dtype)


def _name_error(exc: Exception, s: Stream, item: PlanItem, *, reading: bool = True) -> CndiffError:
    """A one-line cndiff error: while reading or computing, naming the file and key (an
    unexpected exception included); while writing (the sink), the writer's own message."""
    where = f"{escape(s.control.path.name)}: {escape(item.key)}"
    if isinstance(exc, CndiffError) and not reading:
        return exc
    if isinstance(exc, CndiffError):
        text = str(exc)
        if escape(item.key) in text or s.control.path.name in text:
            return exc
        return type(exc)(f"{where}: {text}")
    return CndiffError(f"{where}: internal error ({type(exc).__name__}: {escape(str(exc))})")


def _read_pack(ckpt: Checkpoint, keys: list[str], buf: np.ndarray, total: int) -> Raw:
    """Back-to-back tensors of one dtype, read as one flat array (one read)."""
    first = ckpt.info(keys[0])
    arr = buf[: total * first.itemsize].view(first.dtype.numpy)
    ckpt.read_run(keys, arr)
    return Raw(arr, first.dtype)


def _compute_pack(slot: _Slot, task: _Task) -> _Slot:
    s, item = task.members[0]
    items = task.pack
    assert items is not None
    try:
        starts = np.zeros(len(items) + 1, np.int64)
        np.cumsum(np.fromiter(map(_NUMEL, items), np.int64, len(items)), out=starts[1:])
        c = _read_pack(s.control, [i.control_key for i in items], slot.c, task.count)
        b = None
        if item.base_key is not None and s.base is not None:
            b = _read_pack(s.base, [i.base_key for i in items], slot.b, task.count)  # type: ignore[misc]
        chunk = ChunkIn(item, 0, task.count, c, b, None, None, slot.out(0), items, starts,
                        functools.partial(slot.lend, 0))  # fmt: skip
        slot.results = [s.kernel(chunk)]
        slot.chunks = [chunk]
    except Exception as exc:  # noqa: BLE001
        slot.results = [_name_error(exc, s, item)]
        slot.chunks = [None]
    return slot


def _compute(slot: _Slot, task: _Task) -> _Slot:
    """Read one task's chunks and run every member's kernel (on a worker thread)."""
    if task.pack is not None:
        return _compute_pack(slot, task)
    slot.results = []
    slot.chunks = []
    n, start = task.count, task.start
    first, item0 = task.members[0]
    b = None
    if item0.base_key is not None and first.base is not None:
        try:
            b = _read(first.base, item0.base_key, slot.b, start, n)
        except Exception as exc:
            err = _name_error(exc, first, item0)
            slot.results = [err] * len(task.members)
            slot.chunks = [None] * len(task.members)
            return slot
    for j, (s, item) in enumerate(task.members):
        try:
            c = _read(s.control, item.control_key, slot.c, start, n)
            ekey = s.embedded_key(item) if b is not None else None
            e = _read(s.control, ekey, slot.e, start, n) if ekey else None
            x = _read(s.extra, item.key, slot.x, start, n) if s.extra is not None else None
            chunk = ChunkIn(item, start, n, c, b, e, x, slot.out(j),
                            _lend=functools.partial(slot.lend, j))  # fmt: skip
            slot.results.append(s.kernel(chunk))
            slot.chunks.append(chunk)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per stream
            slot.results.append(_name_error(exc, s, item))
            slot.chunks.append(None)
    return slot


class _Pool:
    """Worker threads fed through C-level queues.

    The calling thread only puts tasks and takes results (``queue.SimpleQueue``: no
    Python-level lock), so Ctrl-C or SIGTERM, which raise in that thread at any bytecode,
    can never leave a lock held and deadlock the shutdown (``concurrent.futures`` can).
    """

    def __init__(self, workers: int, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"cndiff-{i}", daemon=True)
                        for i in range(workers)]  # fmt: skip
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while True:
            job = self.tasks.get()
            if job is None:
                return
            seq, args = job
            try:
                self.done.put((seq, self.fn(*args), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                self.done.put((seq, None, exc))

    def close(self) -> None:
        """Drop the tasks not started, stop the threads, wait for the running ones."""
        while True:
            try:
                self.tasks.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:
            self.tasks.put(None)
        for t in self.threads:
            t.join()


def run_streams(
    streams: Sequence[Stream],
    backend: Backend,
    *,
    chunk: int,
    workers: int,
    on_progress: Callable[[int], None] | None = None,
    isolate: bool = False,
) -> None:
    """Run every stream's items, ``chunk`` elements at a time, on ``workers`` threads; hand
    the results to the sinks in order.

    ``on_progress`` is called with the control bytes done after each chunk (progress bars).
    With ``isolate=True`` an error in one stream (its files, its kernel, its sink: any
    ``Exception``) is stored in ``stream.error`` and the other streams go on; otherwise it
    is raised. ``KeyboardInterrupt`` and ``SystemExit`` always stop everything, promptly.
    """
    nslots = workers * 2
    spare: queue.SimpleQueue = queue.SimpleQueue()  # output buffers back from writers
    free: list[_Slot] = []
    made = 0
    pending: deque[tuple[int, _Task]] = deque()
    arrived: dict[int, tuple[Any, BaseException | None]] = {}

    def fail(s: Stream, exc: BaseException) -> None:
        if not isolate:
            raise exc
        if s.error is None:
            s.error = exc

    def deliver(task: _Task, results: Sequence[Any], chunks: Sequence[ChunkIn | None]) -> None:
        for (s, item), res, chunk in zip(task.members, results, chunks):
            if s.error is not None:
                continue
            if isinstance(res, BaseException):
                fail(s, res)
                continue
            assert chunk is not None
            last = chunk.items[-1] if chunk.items is not None else item
            try:
                if s.sink is not None:
                    s.sink(item, res, chunk)
                if chunk.last and last is s.items[-1] and s.on_done is not None:
                    s.on_done(s)
            except Exception as exc:  # noqa: BLE001
                fail(s, _name_error(exc, s, item, reading=False))
                continue
            if on_progress is not None:
                on_progress(task.count * s.control.tensors[item.control_key].dtype.itemsize)

    def finish() -> None:
        """Wait for the oldest task in flight and deliver it."""
        seq, task = pending[0]
        while seq not in arrived:
            got, done, exc = pool.done.get()
            arrived[got] = (done, exc)
        pending.popleft()
        slot, exc = arrived.pop(seq)
        if exc is not None:
            raise exc
        try:
            deliver(task, slot.results, slot.chunks)
        finally:
            slot.results = []
            slot.chunks = []
            free.append(slot)

    pool = _Pool(workers, _compute)
    try:
        for seq, task in enumerate(_tasks(streams, chunk)):
            if not free:
                if made < nslots:
                    free.append(_Slot(backend, chunk, spare))
                    made += 1
                else:
                    finish()
            slot = free.pop()
            pending.append((seq, task))
            if task.count == 0:
                # an empty tensor: nothing to read; computed here, in order
                arrived[seq] = (_compute(slot, task), None)
            else:
                pool.tasks.put((seq, (slot, task)))
        while pending:
            finish()
    finally:
        pool.close()


def parallel_map(
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, ahead: int | None = None
) -> Iterator[Any]:
    """``fn(item)`` for every item on ``workers`` threads, yielded in order; an exception
    is raised when its item's turn comes. Safe to interrupt like :func:`run_streams`.

    At most ``ahead`` items (default ``2 x workers``) are handed out beyond the oldest
    one not yet yielded: when items take very different times, a larger ``ahead`` keeps
    the other workers busy behind a long one (their results wait, in memory, for their
    turn)."""
    window = max(workers, ahead if ahead is not None else 2 * workers)
    pool = _Pool(workers, fn)
    try:
        arrived: dict[int, tuple[Any, BaseException | None]] = {}
        sent = 0
        for i in range(len(items)):
            while sent < len(items) and sent < i + window:
                pool.tasks.put((sent, (items[sent],)))
                sent += 1
            while i not in arrived:
                got, res, exc = pool.done.get()
                arrived[got] = (res, exc)
            res, exc = arrived.pop(i)
            if exc is not None:
                raise exc
            yield res
    finally:
        pool.close()
