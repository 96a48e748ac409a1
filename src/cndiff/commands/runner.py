"""Run one command over one or several models: the loop every batch command shares.

Each model's files are opened (:func:`cndiff.inputs.sources.open_inputs`, the shared base
once), ``prepare`` turns them into a :class:`~cndiff.pipeline.Job` (streamed together
with the others, a shared base read once) or a finished result (the Control-LoRA export),
and every model ends as a result: ``written``, ``skipped`` (the same job's complete
output is there) or, in a batch, ``failed`` with the reason, whatever went wrong; alone,
the error is raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from ..backends import Backend, select_backend
from ..errors import CndiffError, WrongKindError
from ..inputs import Checkpoint, open_checkpoint
from ..inputs.sources import SELF, Inputs, check_base_kind, model_file, open_inputs
from ..options import Options
from ..pipeline import Job, run_jobs
from ..progress import progress_bar
from ..results import ExtractResult
from ..targets import Skip
from ..text import escape, escape_path

__all__ = ["Prepare", "run_models", "refuse_repeats", "failed_result", "skipped_result"]

log = logging.getLogger("cndiff")

PathLike = str | os.PathLike[str]
#: turns one model's open inputs into a job (or a finished result); may raise Skip
Prepare = Callable[[Inputs, Backend], "Job | ExtractResult"]


def refuse_repeats(paths: list[Path]) -> None:
    """Refuse a file named twice (also through another path or a link)."""
    seen: dict[tuple, Path] = {}
    for p in paths:
        try:
            st = p.stat()
            key: tuple = (st.st_dev, st.st_ino)
        except OSError:
            key = (str(p.resolve()),)
        if key in seen:
            raise CndiffError(f"{escape_path(p)} is named twice (as {escape_path(seen[key])}); "
                              "name each model once")  # fmt: skip
        seen[key] = p


def failed_result(path: Path, kind: str, exc: BaseException) -> ExtractResult:
    """A ``failed`` result saying why (an unexpected exception as an internal error)."""
    reason = str(exc) if isinstance(exc, CndiffError) else (
        f"internal error ({type(exc).__name__}: {escape(str(exc))})"
    )  # fmt: skip
    log.warning("%s: failed: %s", escape_path(path.name), reason)
    return ExtractResult(source=path, output=None, kind=kind, dtype="", status="failed",
                         reason=reason)  # fmt: skip


def skipped_result(path: Path, target: Path, kind: str, options: Options) -> ExtractResult:
    """A ``skipped`` result: ``target`` holds the complete output of the same job."""
    log.info("%s: skipped, %s is the complete output of the same job",
             escape_path(path.name), escape_path(target.name))  # fmt: skip
    size = sum(p.stat().st_size for p in target.iterdir()) if target.is_dir() else \
        target.stat().st_size  # fmt: skip
    return ExtractResult(source=path, output=target, kind=kind, dtype=options.out_dtype.name,
                         status="skipped", bytes=size,
                         reason="complete output of the same job exists; --overwrite redoes it")


def _open_base(base: PathLike | None, stack: ExitStack) -> Checkpoint | str | None:
    if base is None or os.fspath(base) == SELF:
        return None if base is None else SELF
    b = open_checkpoint(model_file(base, "base"))
    stack.callback(b.close)
    check_base_kind(b)
    return b


def _open_model(
    path: Path,
    shared: Checkpoint | str | None,
    role: str,
    kind: str,
    *,
    isolate: bool,
    scan: bool,
    refuse_bases: bool,
) -> Inputs | ExtractResult:
    """One model's open inputs, or (in a batch) its ``skipped`` or ``failed`` result."""
    try:
        return open_inputs(path, shared, role=role)
    except WrongKindError as exc:
        if scan:
            return ExtractResult(source=path, output=None, kind="", dtype="", status="skipped",
                                 reason=str(exc))  # fmt: skip
        if exc.kind == "sd-checkpoint" and refuse_bases:
            # a base among the named ControlNets is a mistake in the command
            # ("extract control.pth base.ckpt --base self"): refuse the whole run
            raise CndiffError(
                f"{escape_path(path)} is a Stable Diffusion checkpoint, not a ControlNet: "
                "give the base once, either as the last file or with --base"
            ) from None
        if not isolate:
            raise
        return failed_result(path, kind, exc)
    except Exception as exc:  # noqa: BLE001 - in a batch, one model's failure, any kind
        if not isolate:
            raise
        return failed_result(path, kind, exc)


def run_models(
    paths: list[Path],
    base: PathLike | None,
    prepare: Prepare,
    options: Options,
    *,
    isolate: bool,
    kind: str = "",
    role: str = "control",
    scan: bool = False,
) -> list[ExtractResult]:
    """Run ``prepare`` on every model (see the module documentation); one result per
    path, in order. ``base`` is opened once (``"self"``: each control's embedded UNet;
    None: no base). ``kind`` names what failed models would have been. ``scan``: the paths
    are a folder's files, and those that are readable but not what the command takes (a
    base, a VAE, a difference model) are ``skipped`` with what they are."""
    kind = kind or options.format
    backend = select_backend(options.device, options.backend)
    results: dict[int, ExtractResult] = {}
    jobs: dict[int, Job] = {}
    targets: dict[Path, Path] = {}
    many = len(paths) > 1
    with ExitStack() as stack:
        shared = _open_base(base, stack)
        opened: list[tuple[int, Inputs]] = []
        # (a batch shows its models being opened: 12-15 ms each from the page cache, more
        # from a cold disk, and a batch may name many)
        with progress_bar(len(paths), "opening", options.progress and many,
                          unit="model") as bar:  # fmt: skip
            for i, path in enumerate(paths):
                try:
                    got = _open_model(path, shared, role, kind, isolate=isolate, scan=scan,
                                      refuse_bases=many and base is not None)  # fmt: skip
                finally:
                    bar.update(1)
                if isinstance(got, ExtractResult):
                    results[i] = got
                    continue
                stack.callback(got.close)
                opened.append((i, got))
        for i, inputs in opened:
            path = paths[i]
            try:
                job = prepare(inputs, backend)
                if isinstance(job, ExtractResult):
                    results[i] = job
                    continue
                if job.target in targets:
                    raise CndiffError(
                        f"{escape_path(path)} and {escape_path(targets[job.target])} would both "
                        f"be written to {escape_path(job.target)}; convert them into different "
                        "folders"
                    )
                targets[job.target] = path
                jobs[i] = job
            except Skip as skip:
                results[i] = skipped_result(path, skip.target, kind, options)
            except Exception as exc:  # noqa: BLE001 - one model's failure stops no other
                if not isolate:
                    raise
                results[i] = failed_result(path, kind, exc)
        if jobs:
            _run_jobs(list(jobs.values()), options, backend, isolate)
        for i, job in jobs.items():
            if job.result is not None and job.error is None:
                results[i] = job.result
            else:
                results[i] = failed_result(paths[i], kind,
                                           job.error or CndiffError("unknown error"))  # fmt: skip
    return [results[i] for i in range(len(paths))]


def _run_jobs(jobs: list[Job], options: Options, backend: Backend, isolate: bool) -> None:
    def on_result(job: Job) -> None:  # a batch says each model's result when it is done
        if job.result is not None:
            log.info("%s: written to %s (%.1f MB)", job.inputs.name,
                     escape_path(job.target.name), job.result.bytes / 1e6)  # fmt: skip

    run_jobs(jobs, options, backend, isolate=isolate,
             on_result=on_result if len(jobs) > 1 else None)  # fmt: skip
