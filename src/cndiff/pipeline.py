"""The job pipeline every streaming command runs: inputs -> plan -> chunks -> writer -> result.

A :class:`Job` is one output: its open :class:`~cndiff.inputs.sources.Inputs`, its
:class:`~cndiff.plan.Plan` and its checked target path. :func:`run_jobs` runs jobs
together (a batch reads a shared base once): every plan item in chunks through the
:mod:`~cndiff.engine` with a :mod:`~cndiff.backends` kernel, each chunk appended to the
job's :class:`~cndiff.writer.SafetensorsWriter`, the output committed as soon as its last
chunk is written, and an :class:`~cndiff.results.ExtractResult` made for it.

Per-key figures gathered on the way: max ``|control - base|`` (keys below 1e-6 are
"unchanged"), keys whose output holds NaN or infinity, and the base check against the
control file's embedded UNet.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import Backend
from .dtypes import BF16, F16, F32, DType
from .engine import ChunkIn, Stream, run_streams
from .fingerprint import BaseMatchStats, classify_base
from .hashes import FileHashes, file_hashes
from .inputs.classify import UNET_PREFIX
from .inputs.sources import Inputs
from .options import Options
from .plan import Plan, PlanItem
from .progress import progress_bar
from .provenance import build_metadata, job_record
from .results import ExtractResult
from .targets import default_name, output_path, prepare_target
from .text import escape
from .writer import OutputEntry, SafetensorsWriter

__all__ = ["Job", "make_job", "run_jobs", "UNCHANGED_TOL", "describe_keys", "input_hashes"]

log = logging.getLogger("cndiff")

#: the original script's "no difference" threshold on max |control - base|
UNCHANGED_TOL = 1e-6
# |values| from which rounding to the dtype gives infinity
_OVERFLOW = {F16.name: 65520.0, BF16.name: 3.3961775292304611e38, F32.name: math.inf}


@dataclass
class Job:
    """One output of a streaming command (see the module documentation)."""

    inputs: Inputs
    plan: Plan
    target: Path
    record: dict
    started: float = field(default_factory=time.perf_counter)
    hashes: dict[str, FileHashes] = field(default_factory=dict)
    max_abs: dict[str, float] = field(default_factory=dict)
    match: BaseMatchStats | None = None
    writer: SafetensorsWriter | None = None
    result: ExtractResult | None = None
    error: BaseException | None = None
    #: called once the output is committed (convert: write diffusers' config.json)
    after: Callable[[Job], None] | None = None

    def __repr__(self) -> str:
        return f"<Job {escape(self.target.name)!r}: {self.plan!r}>"


def make_job(
    inputs: Inputs,
    plan: Plan,
    out: str | os.PathLike[str] | None,
    options: Options,
    *,
    many: bool = False,
    name: str | None = None,
) -> Job:
    """Decide and check a job's output path (raises :class:`~cndiff.targets.Skip` for a
    complete output of the same job; see :func:`cndiff.targets.prepare_target`)."""
    record = job_record(plan.kind, inputs, options)
    if name is None:
        base = inputs.base.path if inputs.base is not None and not inputs.base_is_self else None
        name = default_name(plan.kind, inputs.control.path, options, base)
    target = output_path(inputs.control.path, out, name, many=many)
    prepare_target(target, inputs.files, record, overwrite=options.overwrite)
    return Job(inputs, plan, target, record)


def describe_keys(keys: Sequence[str], limit: int = 8) -> str:
    """A printable list of keys for a message: the first ``limit`` and a count."""
    shown = ", ".join(escape(k, 120) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def input_hashes(jobs: Sequence[Job], progress: bool) -> None:
    """Hash every job's input files (each file once), for their outputs' metadata."""
    done: dict[Path, FileHashes] = {}
    for job in jobs:
        roles = [("source", job.inputs.control.path)]
        if job.inputs.base is not None and not job.inputs.base_is_self:
            roles.append(("base", job.inputs.base.path))
        for role, path in roles:
            if path not in done:
                done[path] = file_hashes(path, progress)
            job.hashes[role] = done[path]


def _kernel(backend: Backend, op: str, dtype: DType, compare: bool) -> Callable[[ChunkIn], tuple]:
    def kernel(ch: ChunkIn) -> tuple:
        out = ch.out[: ch.count * dtype.itemsize].view(dtype.numpy)
        o = op if ch.b is not None else None
        if ch.starts is not None:  # a pack of small tensors: a max per tensor
            return out, backend.combine_many(o, ch.c, ch.b, out, dtype, ch.starts), None
        m = backend.combine(o, ch.c, ch.b, out, dtype)
        match = backend.compare(ch.e, ch.b) if compare and ch.e is not None else None
        return out, m, match

    return kernel


def _note_max(job: Job, item: PlanItem, m: float) -> None:
    prev = job.max_abs.get(item.key, 0.0)
    job.max_abs[item.key] = m if (math.isnan(m) or math.isnan(prev)) else max(prev, m)


def _note_maxes(job: Job, item: PlanItem, m, ch: ChunkIn) -> None:
    """Record a chunk's max |d| (a pack's: one per tensor, each a whole tensor)."""
    if ch.items is None:
        _note_max(job, item, m)
    else:
        job.max_abs.update(zip((i.key for i in ch.items), m.tolist()))


def _nbytes(s: Stream) -> int:
    """The bytes a stream reads from its control file (the progress bar's total)."""
    tensors = s.control.tensors
    return sum(i.numel * tensors[i.control_key].dtype.itemsize for i in s.items)


def _scan_unchanged(jobs: Sequence[Job], options: Options, backend: Backend, isolate: bool):
    """``drop_unchanged``: find the keys to leave out before writing (the header comes
    first), with a pass over the paired tensors."""
    dt = options.out_dtype
    streams = []
    for job in jobs:
        items = [i for i in job.plan.items if i.base_key is not None]

        def sink(item: PlanItem, res: tuple, ch: ChunkIn, job: Job = job) -> None:
            _note_maxes(job, item, res[1], ch)

        streams.append(Stream(items, job.inputs.control, _kernel(backend, job.plan.op, dt, False),
                              base=job.inputs.base, sink=sink, packs=True))  # fmt: skip
    total = sum(_nbytes(s) for s in streams)
    label = "scan " + _label(jobs)
    with progress_bar(total, label, options.progress) as bar:
        run_streams(streams, backend, chunk=options.chunk_elems, workers=options.n_workers,
                    on_progress=bar.update, isolate=isolate)  # fmt: skip
    for job, s in zip(jobs, streams):
        if s.error is not None:
            job.error = s.error
            continue
        drop = {k for k, m in job.max_abs.items() if m < UNCHANGED_TOL}
        job.plan = job.plan.without(drop)
        job.max_abs = {}


def _label(jobs: Sequence[Job]) -> str:
    return jobs[0].inputs.name if len(jobs) == 1 else f"{len(jobs)} models"


def _marker(dt: DType) -> np.ndarray:
    """The scalar 1.0 of the ``difference`` marker, in the output dtype (raw bits for
    bfloat16)."""
    return np.array([0x3F80], np.uint16) if dt is BF16 else np.ones(1, dt.numpy)


def run_jobs(
    jobs: Sequence[Job],
    options: Options,
    backend: Backend,
    *,
    isolate: bool,
    on_result: Callable[[Job], None] | None = None,
) -> None:
    """Run the jobs together and commit each output when its last chunk is written.

    With ``isolate``, a failing job records its error in ``job.error`` (any exception)
    and the others go on; otherwise the error is raised. ``job.result`` is set for every
    job that was written.
    """
    dt = options.out_dtype
    if options.hash_inputs:
        # extraction reads only parts of the inputs, so hashing is a pass of its own
        # (before writing: the digests go into the header)
        input_hashes(jobs, options.progress)
    if options.drop_unchanged and any(j.plan.op == "sub" for j in jobs):
        _scan_unchanged([j for j in jobs if j.plan.op == "sub"], options, backend, isolate)
    live = [j for j in jobs if j.error is None]
    streams: list[Stream] = []
    by_stream: dict[int, Job] = {}

    def done(stream: Stream) -> None:
        job = by_stream[id(stream)]
        assert job.writer is not None
        job.inputs.check_unchanged()
        if job.plan.marker is not None:
            job.writer.write(_marker(dt))
        job.writer.commit()
        job.result = _result(job, options, backend)
        if job.after is not None:
            job.after(job)
        if on_result is not None:
            on_result(job)

    with ExitStack() as writers:
        for job in live:
            entries = [OutputEntry(i.key, dt, i.shape, i.numel) for i in job.plan.items]
            if job.plan.marker is not None:
                entries.append(OutputEntry(job.plan.marker, dt, ()))
            meta = build_metadata(job.plan.kind, job.inputs, options,
                                  dropped=job.plan.dropped, hashes=job.hashes)  # fmt: skip
            try:
                job.writer = writers.enter_context(
                    SafetensorsWriter(job.target, entries, meta, overwrite=job.target.exists())
                )
            except Exception as exc:
                if not isolate:
                    raise
                job.error = exc
                continue
            compare = (
                options.check_base
                and job.plan.op == "sub"
                and not job.inputs.base_is_self
                and job.inputs.has_embedded_unet
            )
            if compare:
                job.match = BaseMatchStats()

            def sink(item: PlanItem, res: tuple, ch: ChunkIn, job: Job = job) -> None:
                out, m, match = res
                assert job.writer is not None
                job.writer.write(out, ch.lend_out())  # (kept by the writer: no copy)
                _note_maxes(job, item, m, ch)
                if match is not None and job.match is not None:
                    job.match.add(match, first=ch.start == 0)

            stream = Stream(
                job.plan.items,
                job.inputs.control,
                _kernel(backend, job.plan.op, dt, compare),
                base=job.inputs.base,
                sink=sink,
                on_done=done,
                embedded_prefix=UNET_PREFIX if compare else None,
                packs=True,
            )
            streams.append(stream)
            by_stream[id(stream)] = job
        total = sum(_nbytes(s) for s in streams)
        with progress_bar(total, _label(live or jobs), options.progress) as bar:
            run_streams(streams, backend, chunk=options.chunk_elems,
                        workers=options.n_workers, on_progress=bar.update,
                        isolate=isolate)  # fmt: skip
        for stream in streams:
            job = by_stream[id(stream)]
            if stream.error is not None:
                job.error = stream.error
            elif job.result is None:
                # a plan with no tensors never reaches on_done
                try:
                    done(stream)
                except Exception as exc:
                    if not isolate:
                        raise
                    job.error = exc


def _result(job: Job, options: Options, backend: Backend) -> ExtractResult:
    assert job.writer is not None
    name = job.inputs.name
    dt = options.out_dtype
    unchanged: list[str] = []
    if job.plan.op == "sub":
        # (only subtracted keys: a copied key that is all zeros equals no base)
        unchanged = list(job.plan.dropped) if options.drop_unchanged else [
            i.key for i in job.plan.items
            if i.base_key is not None and job.max_abs.get(i.key, 1.0) < UNCHANGED_TOL
        ]  # fmt: skip
    if unchanged and not options.drop_unchanged:
        log.warning(
            "%s: %d key(s) equal the base (max |control - base| < 1e-6), kept as zeros so "
            "loaders rebuild them correctly: %s", name, len(unchanged), describe_keys(unchanged)
        )
    elif job.plan.dropped:
        log.warning("%s: dropped %d unchanged key(s): %s", name, len(job.plan.dropped),
                    describe_keys(job.plan.dropped))  # fmt: skip
    limit = _OVERFLOW[dt.name]
    nonfinite = [k for k, m in job.max_abs.items() if not (m < limit)]
    if nonfinite:
        log.warning(
            "%s: %d key(s) hold NaN or infinite values in the output (NaN/Inf in the inputs, "
            "or values too large for %s): %s", name, len(nonfinite), dt.name,
            describe_keys(nonfinite),
        )
    match = None
    if job.match is not None and job.match.keys:
        match = classify_base(job.match)
        (log.info if match.kind == "identical" else log.warning)("%s: %s", name, match.message)
    return ExtractResult(
        source=job.inputs.control.path,
        output=job.target,
        kind=job.plan.kind,
        dtype=dt.name,
        bytes=job.writer.size,
        seconds=time.perf_counter() - job.started,
        sha256=job.writer.sha256,
        keys_written=job.plan.keys_written,
        paired=job.plan.paired,
        copied=job.plan.copied,
        device=backend.device,
        backend=backend.name,
        unchanged=unchanged,
        dropped=list(job.plan.dropped),
        nonfinite=nonfinite,
        base_match=match,
    )
