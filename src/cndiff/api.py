"""cndiff's public functions: what a notebook or the command line calls."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .dtypes import DType, output_dtype, short_name
from .engine import DEFAULT_CHUNK_MB, UNCHANGED_TOL, Stream, resolve_device, run_streams
from .errors import CndiffError, OutputError, OutputExistsError
from .fingerprint import BaseMatch, classify_base
from .inputs import Checkpoint, open_checkpoint
from .keys import (
    DIFFERENCE_KEY,
    UNET_PREFIX,
    PlanItem,
    plan_diff,
    require_control_keys,
    unet_prefix,
)
from .progress import progress_bar
from .provenance import build_metadata, sha256_file
from .writer import OutputEntry, SafetensorsWriter, remove_stale_temp_files

if TYPE_CHECKING:
    from .lora import LoraResult

__all__ = ["ExtractResult", "extract", "default_output_name", "FORMATS"]

#: output formats of :func:`extract`
FORMATS = ("difference", "control-lora")

log = logging.getLogger("cndiff")


@dataclass
class ExtractResult:
    """What :func:`extract` wrote.

    ``subtracted`` and ``copied`` count the ``control_model.*`` tensors stored as
    ``control - base`` and as they are; ``unchanged`` lists subtracted keys whose difference
    is below 1e-6 everywhere (kept as zeros, or dropped with ``drop_unchanged=True``, in
    which case they are also in ``dropped``).
    """

    output: Path
    keys_written: int
    subtracted: int
    copied: int
    dtype: str
    device: str
    bytes: int
    seconds: float
    unchanged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    sha256: str | None = None
    #: how the base compares with the UNet embedded in the control file (None: not checked)
    base_match: BaseMatch | None = None
    #: ``difference`` (extract) or ``standalone`` (apply: ``subtracted`` counts additions)
    kind: str = "difference"

    def __str__(self) -> str:
        verb = "subtracted" if self.kind == "difference" else "added"
        return (
            f"{self.output}: {self.keys_written} tensors ({self.subtracted} {verb}, "
            f"{self.copied} copied), {self.dtype}, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.2f} s"
        )


def default_output_name(control: str | os.PathLike[str], dtype: str | DType = "fp16") -> str:
    """``diff_<control stem>_<dtype>.safetensors``, the name sd-webui-controlnet users know."""
    return f"diff_{Path(control).stem}_{short_name(output_dtype(dtype))}.safetensors"


def resolve_output(source: Path, out: str | os.PathLike[str] | None, name: str) -> Path:
    """Where an output named ``name`` goes: beside ``source``, in folder ``out``, or at
    ``out`` itself."""
    if out is None:
        return source.parent / name
    o = Path(out)
    if o.is_dir() or str(out).endswith(("/", os.sep)):
        if not o.exists():
            raise OutputError(f"output folder {o} does not exist; create it first")
        return o / name
    if not o.parent.exists():
        raise OutputError(f"folder {o.parent} does not exist; create it or choose another -o")
    return o


def prepare_target(
    source: Path,
    out: str | os.PathLike[str] | None,
    name: str,
    inputs: list[Path],
    *,
    overwrite: bool,
    skip_complete: bool = False,
) -> Path:
    """Decide and check an output path before any work: not a folder, not an input,
    leftover temporary files of killed runs removed, and an existing file refused unless
    ``overwrite`` (or skipped, with ``skip_complete``, when it is a complete diff)."""
    target = resolve_output(source, out, name)
    check_target(target, inputs)
    remove_stale_temp_files(target)
    if target.exists() and not overwrite:
        if skip_complete and is_complete_difference(target):
            raise _Skip(target)
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    return target


def check_target(target: Path, inputs: list[Path]) -> None:
    """Refuse an output path that is a folder or one of the input files."""
    if target.is_dir():
        raise OutputError(f"output {target} is a folder; remove it or choose another -o")
    if target.exists():
        for src in inputs:
            if os.path.samefile(target, src):
                raise OutputError(f"output {target} is the input {src.name}; choose another -o")


def open_base(base: str | os.PathLike[str], control: Checkpoint) -> tuple[Checkpoint, str]:
    """Open the base checkpoint, or use the control file's own UNet copy for ``"self"``.

    Returns the checkpoint and the prefix of its UNet keys.
    """
    if str(base) == "self":
        if not any(k.startswith(UNET_PREFIX) for k in control.tensors):
            raise CndiffError(
                f"--base self: {control.path.name} has no embedded SD UNet "
                "(model.diffusion_model.*); pass the SD base checkpoint instead"
            )
        return control, UNET_PREFIX
    ckpt = open_checkpoint(base)
    return ckpt, unet_prefix(ckpt.tensors)


def extract(
    control: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
    drop_unchanged: bool = False,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    hash: bool = False,
    hash_inputs: bool = False,
    check_base: bool = True,
    format: str = "difference",
    rank: int | None = None,
    max_error: float | None = None,
    stability_compatible: bool = False,
    svd: str = "auto",
    progress: bool = False,
) -> ExtractResult | LoraResult:
    """Turn an original ControlNet checkpoint into a difference model.

    For every ``control_model.X`` tensor of ``control`` whose UNet counterpart
    ``model.diffusion_model.X`` exists in ``base``, the file stores ``control - base``
    (computed in float32, then rounded to ``dtype``); the ControlNet's own tensors
    (``input_hint_block``, ``zero_convs``, ``middle_block_out``) are stored as they are.
    A scalar ``difference`` = 1 marks the file, so sd-webui-controlnet and ComfyUI add
    the user's own UNet back when they load it. Everything else in ``control`` (the
    locked UNet copy, VAE, text encoder) is left out and never read.

    Args:
        control: an original ``control_sd15_*.pth`` (or ``.ckpt``/``.safetensors``).
        base: the SD checkpoint the ControlNet was built on (e.g. ``v1-5-pruned.ckpt``),
            ``.ckpt``/``.pth``/``.safetensors``; or ``"self"`` to use the SD UNet copy
            embedded in ``control`` itself (no base file needed).
        out: output file or existing folder; default: ``diff_<name>_<dtype>.safetensors``
            beside ``control``.
        dtype: ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        overwrite: replace an existing output (otherwise that is an error).
        drop_unchanged: leave out keys whose difference is below 1e-6 everywhere, as the
            original script does. Loaders then load those keys without the UNet added,
            which is wrong; by default they are kept (as zeros) and a warning names them.
        chunk_mb: float32 megabytes processed per chunk (bounds memory).
        workers: compute threads (default ``min(4, cpus)``).
        hash: compute the output's sha256 while writing (``result.sha256``).
        hash_inputs: record the inputs' sha256 in the output's metadata (a separate
            read of both whole files: costs time).
        check_base: compare the base with the SD UNet embedded in an original control
            file, in the same pass (``result.base_match``; a warning when they differ).
        format: ``"difference"`` (default) or ``"control-lora"``: a Control-LoRA
            (about 136 MB for SD1.5 at rank 128, lossy; every loader, Forge included,
            takes it) written by :func:`cndiff.lora.extract_control_lora`, which the
            next four arguments configure.
        rank: Control-LoRA rank per layer (default 128).
        max_error: Control-LoRA: instead of a rank, the smallest rank per layer whose
            relative error ``||D - up@down|| / ||D||`` is at most this.
        stability_compatible: Control-LoRA: reproduce the layout of Stability's
            published SD1.5 rank-128 files.
        svd: Control-LoRA: ``auto``, ``gram``, ``exact`` or ``lowrank``.
        progress: show a tqdm progress bar on stderr.

    Returns:
        An :class:`ExtractResult` (output path, counts, bytes, seconds), or a
        :class:`cndiff.lora.LoraResult` for ``format="control-lora"``.

    Raises:
        CndiffError: missing or corrupt input, a control file without ``control_model.*``
            keys, a base that does not match, an existing output, a full disk... The
            message says what to do. No output file is left behind.
    """
    if format not in FORMATS:
        raise CndiffError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    if format == "control-lora":
        if drop_unchanged or hash or hash_inputs:
            raise CndiffError("--drop-unchanged and --hash apply to difference models only")
        from .lora import extract_control_lora

        return extract_control_lora(control, base, out, rank=rank, max_error=max_error,
                                    stability_compatible=stability_compatible, dtype=dtype,
                                    device=device, overwrite=overwrite, svd=svd,
                                    progress=progress)  # type: ignore[arg-type]  # fmt: skip
    if rank is not None or max_error is not None or stability_compatible or svd != "auto":
        raise CndiffError("--rank, --max-error, --stability-compatible and --svd need "
                          "--format control-lora")  # fmt: skip
    t0 = time.perf_counter()
    dt = output_dtype(dtype)
    dev = resolve_device(device)
    with ExitStack() as stack:
        job = _prepare(Path(control), base, out, dt, overwrite, stack, skip_complete=False)
        _execute([job], dt, dev, drop_unchanged, chunk_mb, workers, hash, progress, t0,
                 isolate=False, check_base=check_base, hash_inputs=hash_inputs)  # fmt: skip
        assert job.result is not None
        return job.result


@dataclass
class _Job:
    """One control file on its way to an output file."""

    control_path: Path
    ctl: Checkpoint
    base: Checkpoint
    base_is_self: bool
    plan: list[PlanItem]
    target: Path
    #: ``sub`` (extract: control - base) or ``add`` (apply: diff + base)
    op: str = "sub"
    #: what the output is: ``difference`` (gets the marker key) or ``standalone``
    kind: str = "difference"
    stream: Stream | None = None
    writer: SafetensorsWriter | None = None
    dropped: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    result: ExtractResult | None = None
    error: BaseException | None = None


def _base_for(
    base: str | os.PathLike[str] | Checkpoint, ctl: Checkpoint, stack: ExitStack
) -> tuple[Checkpoint, str, bool]:
    if isinstance(base, Checkpoint):
        return base, unet_prefix(base.tensors), False
    if str(base) == "self":
        b, prefix = open_base("self", ctl)
        return b, prefix, True
    b, prefix = open_base(base, ctl)
    stack.callback(b.close)
    return b, prefix, False


def _prepare(
    control: Path,
    base: str | os.PathLike[str] | Checkpoint,
    out: str | os.PathLike[str] | None,
    dt: DType,
    overwrite: bool,
    stack: ExitStack,
    *,
    skip_complete: bool,
) -> _Job:
    """Open and check one control file against the base; decide its output path.

    Raises :class:`_Skip` for a complete existing output when ``skip_complete``."""
    ctl = open_checkpoint(control)
    stack.callback(ctl.close)
    require_control_keys(ctl.tensors, ctl.path.name)
    bse, prefix, is_self = _base_for(base, ctl, stack)
    plan = plan_diff(
        ctl.tensors,
        bse.tensors,
        control_name=ctl.path.name,
        base_name="the embedded UNet" if is_self else bse.path.name,
        base_prefix=prefix,
    )
    target = prepare_target(ctl.path, out, default_output_name(ctl.path, dt),
                            [ctl.path, bse.path], overwrite=overwrite,
                            skip_complete=skip_complete)  # fmt: skip
    return _Job(control, ctl, bse, is_self, plan, target)


class _Skip(Exception):
    def __init__(self, target: Path) -> None:
        self.target = target


def is_complete_difference(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a whole difference model: its safetensors header parses, the
    file is exactly as long as the header says, and the ``difference`` key is there."""
    try:
        with open_checkpoint(path) as ck:
            if ck.format != "safetensors" or DIFFERENCE_KEY not in ck.tensors:
                return False
            end = max((t.offset + t.nbytes for t in ck.tensors.values()), default=0)
            return end == ck.size
    except CndiffError:
        return False


def _execute(
    jobs: list[_Job],
    dt: DType,
    dev: str,
    drop_unchanged: bool,
    chunk_mb: float,
    workers: int | None,
    hash: bool,
    progress: bool,
    t0: float,
    *,
    isolate: bool,
    on_result: Callable[[_Job], None] | None = None,
    check_base: bool = True,
    hash_inputs: bool = False,
) -> None:
    """Run the jobs together (a shared base is read once) and commit each output as soon
    as its last chunk is written. With ``isolate``, a failing job records its error in
    ``job.error`` and the others go on; otherwise the error is raised."""
    label = jobs[0].ctl.path.name if len(jobs) == 1 else f"{len(jobs)} models"
    if hash_inputs:
        # Extraction reads only parts of the inputs, so hashing is a pass of its own
        # (before writing: the digests go into the header).
        digests: dict[Path, str] = {}
        for job in jobs:
            for name, ck in (("source", job.ctl), ("base", job.base)):
                if name == "base" and job.base_is_self:
                    continue
                if ck.path not in digests:
                    digests[ck.path] = sha256_file(ck.path, progress)
                job.hashes[name] = digests[ck.path]
    if drop_unchanged:
        # The header comes first, so find the keys to drop before writing anything.
        probes = []
        for job in jobs:
            subtracted = [i for i in job.plan if i.base_key is not None]
            job.stream = Stream(subtracted, job.ctl, job.base, dt)
            probes.append(job.stream)
        total = sum(job.ctl.info(i.control_key).nbytes for p in probes for i in p.items)
        with progress_bar(total, "scan " + label, progress) as bar:
            run_streams(probes, chunk_mb=chunk_mb, workers=workers, device=dev,
                        on_chunk=bar.update, isolate=isolate)  # fmt: skip
        for job in jobs:
            assert job.stream is not None
            job.error = job.stream.error
            job.dropped = [k for k, m in job.stream.max_abs.items() if m < UNCHANGED_TOL]
            drop = set(job.dropped)
            job.plan = [i for i in job.plan if i.key not in drop]
    live = [j for j in jobs if j.error is None]
    by_stream: dict[int, _Job] = {}
    with ExitStack() as writers:
        for job in live:
            entries = [OutputEntry(i.key, dt, i.shape) for i in job.plan]
            if job.kind == "difference":
                entries.append(OutputEntry(DIFFERENCE_KEY, dt, ()))
            meta = build_metadata(kind=job.kind, control=job.ctl, base=job.base,
                                  base_is_self=job.base_is_self, dtype=dt.name,
                                  dropped=job.dropped, hashes=job.hashes)  # fmt: skip
            # an existing target was accepted (overwrite) in prepare_target; a target that
            # appears meanwhile is refused
            w = SafetensorsWriter(job.target, entries, meta, overwrite=job.target.exists(),
                                  hash=hash)  # fmt: skip
            writers.enter_context(w)
            job.writer = w

            def sink(item: PlanItem, data, w: SafetensorsWriter = w) -> None:
                w.write(data)

            job.stream = Stream(job.plan, job.ctl, job.base, dt, sink, op=job.op)
            if (
                check_base
                and job.op == "sub"
                and not job.base_is_self
                and any(k.startswith(UNET_PREFIX) for k in job.ctl.tensors)
            ):
                job.stream.embedded_prefix = UNET_PREFIX
            by_stream[id(job.stream)] = job

        def done(stream: Stream) -> None:
            job = by_stream[id(stream)]
            try:
                assert job.writer is not None
                job.ctl.check_unchanged()
                job.base.check_unchanged()
                if job.kind == "difference":
                    job.writer.write(_difference_marker(dt))
                job.writer.commit()
            except CndiffError as exc:
                if not isolate:
                    raise
                job.error = exc
                return
            job.result = _result(job, dt, dev, time.perf_counter() - t0, drop_unchanged)
            if on_result is not None:
                on_result(job)

        streams = [j.stream for j in live if j.stream is not None]
        for st in streams:
            st.on_done = done
        total = sum(j.ctl.info(i.control_key).nbytes for j in live for i in j.plan)
        with progress_bar(total, label, progress) as bar:
            run_streams(streams, chunk_mb=chunk_mb, workers=workers, device=dev,
                        on_chunk=bar.update, isolate=isolate)  # fmt: skip
        for job in live:
            if job.error is None and job.stream is not None and job.stream.error is not None:
                job.error = job.stream.error
            if job.error is None and job.result is None:
                # a plan with no tensors at all never reaches on_done
                done(job.stream)  # type: ignore[arg-type]


def _result(job: _Job, dt: DType, dev: str, seconds: float, drop_unchanged: bool) -> ExtractResult:
    assert job.writer is not None and job.stream is not None
    max_abs = job.stream.max_abs
    unchanged = job.dropped if drop_unchanged else [
        k for k, m in max_abs.items() if m < UNCHANGED_TOL
    ]  # fmt: skip
    if unchanged and not drop_unchanged:
        log.warning(
            "%s: %d key(s) equal the base (max |control - base| < 1e-6), kept as zeros so "
            "loaders rebuild them correctly: %s",
            job.ctl.path.name,
            len(unchanged),
            ", ".join(unchanged),
        )
    elif job.dropped:
        log.warning("%s: dropped %d unchanged key(s): %s", job.ctl.path.name,
                    len(job.dropped), ", ".join(job.dropped))  # fmt: skip
    n_sub = sum(1 for i in job.plan if i.base_key is not None)
    match = None
    if job.stream.base_match is not None:
        match = classify_base(job.stream.base_match)
        (log.info if match.kind == "identical" else log.warning)(
            "%s: %s", job.ctl.path.name, match.message
        )
    return ExtractResult(
        output=job.target,
        keys_written=len(job.plan) + (job.kind == "difference"),
        subtracted=n_sub,
        copied=len(job.plan) - n_sub,
        dtype=dt.name,
        device=dev,
        bytes=job.writer.size,
        seconds=seconds,
        unchanged=unchanged,
        dropped=job.dropped,
        sha256=job.writer.sha256,
        base_match=match,
        kind=job.kind,
    )


def _difference_marker(dt: DType):
    import numpy as np

    from .engine import cast_from_float32

    one = np.ones(1, dtype=np.float32)
    out = np.empty(1, dtype=dt.numpy)
    cast_from_float32(one, dt, out, np.empty(1, dtype=np.uint32))
    return out
