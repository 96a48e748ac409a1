"""``extract`` and ``batch``: ControlNets to difference models (or Control-LoRAs).

Both are one function underneath: a batch of one is an ``extract``. Every model goes
through the job pipeline (inputs -> plan -> chunks -> writer -> result); in a batch the
base is opened and read once for all difference models, one bad model does not stop the
others (it is reported as failed and leaves no file), and a complete output of the same
job is skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from ..backends import Backend, select_backend
from ..errors import CndiffError, WrongKindError
from ..inputs import Checkpoint, open_checkpoint
from ..inputs.sources import SELF, Inputs, check_base_kind, check_role, open_inputs
from ..options import Options, build_options
from ..pipeline import Job, make_job, run_jobs
from ..plan import plan_extract
from ..results import BatchResult, ExtractResult
from ..targets import Skip
from ..text import escape, escape_path
from .lora import export_lora

__all__ = ["extract", "extract_many", "find_controls", "CHECKPOINT_SUFFIXES"]

log = logging.getLogger("cndiff")

#: file name endings of checkpoints (what ``batch`` looks at in a folder)
CHECKPOINT_SUFFIXES = (".pth", ".ckpt", ".pt", ".safetensors", ".bin")

PathLike = str | os.PathLike[str]


def extract(
    control: PathLike,
    base: PathLike,
    out: PathLike | None = None,
    *,
    options: Options | None = None,
    **kwargs,
) -> ExtractResult:
    """Turn an original ControlNet checkpoint into a difference model (or a Control-LoRA).

    For every ``control_model.X`` tensor of ``control`` whose UNet counterpart
    ``model.diffusion_model.X`` exists in ``base``, the file stores ``control - base``
    (computed in float32, then rounded to ``dtype``); the ControlNet's own tensors
    (``input_hint_block``, ``zero_convs``, ``middle_block_out``) are stored as they are.
    A scalar ``difference`` = 1 marks the file, so sd-webui-controlnet and ComfyUI add
    the user's own UNet back when they load it. Everything else in ``control`` (the
    locked UNet copy, VAE, text encoder) is left out and never read.

    Args:
        control: an original ``control_sd15_*.pth`` (or any ``.ckpt``/``.safetensors``
            ControlNet in the ``control_model.*`` layout).
        base: the SD checkpoint the ControlNet was built on (e.g. ``v1-5-pruned.ckpt``),
            or ``"self"`` for the SD UNet copy an original ControlNet embeds.
        out: output file or folder (created when it ends with ``/``); default:
            ``diff_<name>_<dtype>.safetensors`` beside ``control``.
        options: an :class:`~cndiff.options.Options`; or give its fields as keyword
            arguments: ``dtype``, ``device``, ``backend``, ``overwrite``,
            ``drop_unchanged``, ``check_base``, ``hash_inputs``, ``chunk_mb``,
            ``workers``, ``progress``, ``format`` (``"control-lora"``), ``rank``,
            ``max_error``, ``stability_compatible``, ``svd`` (see ``Options``).

    Returns:
        An :class:`~cndiff.results.ExtractResult` (``status`` ``written``, or ``skipped``
        when ``out`` already holds the complete output of the same job); for a
        Control-LoRA its figures are in ``result.lora``.

    Raises:
        CndiffError: an option out of range, a missing or corrupt input, a file that is
            not a ControlNet (a difference model, a base), a base that does not match, an
            existing output of another job, a full disk... The message says what to do.
            No output file is left behind.

    >>> r = cndiff.extract("control_sd15_canny.pth", "v1-5-pruned.ckpt")   # doctest: +SKIP
    >>> r.output, r.subtracted, r.copied                                     # doctest: +SKIP
    (PosixPath('diff_control_sd15_canny_fp16.safetensors'), 298, 42)
    """
    opts = build_options(options, **kwargs)
    (result,) = _run([Path(control)], base, out, opts, isolate=False, many=False)
    return result


def extract_many(
    controls: PathLike | Iterable[PathLike],
    base: PathLike,
    out_dir: PathLike | None = None,
    *,
    options: Options | None = None,
    **kwargs,
) -> BatchResult:
    """Convert several ControlNets against one base, reading the base once.

    Takes the same options as :func:`extract`, with the same meaning. Each output is
    named as :func:`extract` names it, in ``out_dir`` (created when missing; default:
    beside each control file). A complete output of the same job is skipped unless
    ``overwrite``; one of another job is refused for that model. One bad model does not
    stop the others: it is reported as ``failed`` and leaves no file. ``base`` may be
    ``"self"``. A file named twice, or two models whose outputs would have the same
    name, are refused before any work.

    Returns a :class:`~cndiff.results.BatchResult`: one result per control, in order.
    """
    opts = build_options(options, **kwargs)
    if isinstance(controls, (str, os.PathLike)):
        controls = [controls]
    paths = [Path(c) for c in controls]
    if not paths:
        raise CndiffError("no ControlNet files given")
    _refuse_repeats(paths)
    return BatchResult(_run(paths, base, out_dir, opts, isolate=True, many=True))


def _refuse_repeats(paths: list[Path]) -> None:
    seen: dict[tuple, Path] = {}
    for p in paths:
        try:
            st = p.stat()
            key: tuple = (st.st_dev, st.st_ino)
        except OSError:
            key = (str(p.resolve()),)
        if key in seen:
            raise CndiffError(f"{escape_path(p)} is named twice (as {escape_path(seen[key])}); "
                              "name each ControlNet once")  # fmt: skip
        seen[key] = p


def _failed(path: Path, options: Options, exc: BaseException) -> ExtractResult:
    reason = str(exc) if isinstance(exc, CndiffError) else (
        f"internal error ({type(exc).__name__}: {escape(str(exc))})"
    )  # fmt: skip
    log.warning("%s: failed: %s", escape_path(path.name), reason)
    return ExtractResult(source=path, output=None, kind=options.format, dtype="",
                         status="failed", reason=reason)  # fmt: skip


def _skipped(path: Path, target: Path, options: Options) -> ExtractResult:
    log.info("%s: skipped, %s is the complete output of the same job",
             escape_path(path.name), escape_path(target.name))  # fmt: skip
    return ExtractResult(source=path, output=target, kind=options.format,
                         dtype=options.out_dtype.name, status="skipped",
                         bytes=target.stat().st_size,
                         reason="complete output of the same job exists; --overwrite redoes it")


def _open_base(base: PathLike, stack: ExitStack) -> Checkpoint | str:
    if os.fspath(base) == SELF:
        return SELF
    b = open_checkpoint(base)
    stack.callback(b.close)
    check_base_kind(b)
    return b


def _run(
    paths: list[Path],
    base: PathLike,
    out: PathLike | None,
    options: Options,
    *,
    isolate: bool,
    many: bool,
) -> list[ExtractResult]:
    backend = select_backend(options.device, options.backend)
    results: dict[int, ExtractResult] = {}
    jobs: dict[int, Job] = {}
    targets: dict[Path, Path] = {}
    with ExitStack() as stack:
        shared = _open_base(base, stack)
        opened: list[tuple[int, Inputs]] = []
        for i, path in enumerate(paths):
            try:
                inputs = open_inputs(path, shared if isinstance(shared, Checkpoint) else SELF,
                                     role="control")  # fmt: skip
            except WrongKindError as exc:
                if exc.kind == "sd-checkpoint" and many:
                    # a base among the named ControlNets is a mistake in the command
                    # ("extract control.pth base.ckpt --base self"): refuse the whole run
                    raise CndiffError(
                        f"{escape_path(path)} is a Stable Diffusion checkpoint, not a "
                        "ControlNet: give the base once, either as the last file or with --base"
                    ) from None
                if not isolate:
                    raise
                results[i] = _failed(path, options, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - in a batch, one model's failure, any kind
                if not isolate:
                    raise
                results[i] = _failed(path, options, exc)
                continue
            stack.callback(inputs.close)
            opened.append((i, inputs))
        for i, inputs in opened:
            path = paths[i]
            try:
                if options.format == "control-lora":
                    results[i] = export_lora(inputs, out, options, backend, many=many)
                    continue
                job = make_job(inputs, plan_extract(inputs), out, options, many=many)
                if job.target in targets:
                    raise CndiffError(
                        f"{escape_path(path)} and {escape_path(targets[job.target])} would both "
                        f"be written to {escape_path(job.target)}; convert them into different "
                        "folders"
                    )
                targets[job.target] = path
                jobs[i] = job
            except Skip as skip:
                results[i] = _skipped(path, skip.target, options)
            except Exception as exc:  # noqa: BLE001 - one model's failure stops no other
                if not isolate:
                    raise
                results[i] = _failed(path, options, exc)
        if jobs:
            _run_jobs(list(jobs.values()), options, backend, isolate)
        for i, job in jobs.items():
            if job.result is not None and job.error is None:
                results[i] = job.result
            else:
                results[i] = _failed(paths[i], options, job.error or CndiffError("unknown error"))
    return [results[i] for i in range(len(paths))]


def _run_jobs(jobs: list[Job], options: Options, backend: Backend, isolate: bool) -> None:
    def on_result(job: Job) -> None:  # a batch says each model's result when it is done
        if job.result is not None:
            log.info("%s: written to %s (%.1f MB)", escape_path(job.inputs.control.path.name),
                     escape_path(job.target.name), job.result.bytes / 1e6)  # fmt: skip

    run_jobs(jobs, options, backend, isolate=isolate,
             on_result=on_result if len(jobs) > 1 else None)  # fmt: skip


def find_controls(folder: PathLike) -> tuple[list[Path], list[ExtractResult]]:
    """The ControlNets in ``folder`` (files ``extract`` can take), and the other
    checkpoint files: readable ones that are something else (a base, a VAE, a difference
    model...) as ``skipped`` with the reason, unreadable ones as ``failed``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CndiffError(f"{escape_path(folder)} is not a folder; name the folder holding the "
                          "models")  # fmt: skip
    controls: list[Path] = []
    others: list[ExtractResult] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in CHECKPOINT_SUFFIXES:
            continue
        if not p.is_file():
            continue
        try:
            with open_checkpoint(p) as ck:
                check_role(ck, "control")
        except WrongKindError as exc:  # readable, and something else: skipped
            others.append(ExtractResult(source=p, output=None, kind="", dtype="",
                                        status="skipped", reason=str(exc)))  # fmt: skip
            continue
        except Exception as exc:  # noqa: BLE001 - unreadable (whatever broke): a failure
            reason = str(exc) if isinstance(exc, CndiffError) else (
                f"internal error reading it ({type(exc).__name__}: {escape(str(exc))})"
            )  # fmt: skip
            others.append(ExtractResult(source=p, output=None, kind="", dtype="",
                                        status="failed", reason=reason))  # fmt: skip
            continue
        controls.append(p)
    return controls, others
