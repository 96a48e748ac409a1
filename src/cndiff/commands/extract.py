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
from pathlib import Path

from ..backends import Backend
from ..errors import CndiffError
from ..inputs.sources import Inputs, model_file
from ..options import Options, build_options
from ..pipeline import Job, make_job
from ..plan import plan_extract
from ..results import BatchResult, ExtractResult
from ..text import escape_path
from .lora import export_lora
from .runner import Prepare, refuse_repeats, run_models

__all__ = ["extract", "extract_many", "candidates", "CHECKPOINT_SUFFIXES"]

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
    prepare = _prepare(out, opts, many=False)
    (result,) = run_models([Path(control)], base, prepare, opts, isolate=False)
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

    ``controls`` may also be one folder: every checkpoint file and diffusers model folder
    in it (``cndiff batch``); files that are something else (a base, a VAE, a difference
    model: cndiff's own outputs) are listed as ``skipped`` with what they are, unreadable
    ones as ``failed``.

    Returns a :class:`~cndiff.results.BatchResult`: one result per file, in order.
    """
    opts = build_options(options, **kwargs)
    scan = isinstance(controls, (str, os.PathLike)) and Path(controls).is_dir() and \
        model_file(controls) == Path(controls)  # fmt: skip
    if scan:
        paths = candidates(controls)  # type: ignore[arg-type]
        if not paths:
            raise CndiffError(f"no checkpoint files in {escape_path(controls)}")
    else:
        paths = [Path(controls)] if isinstance(controls, (str, os.PathLike)) else \
            [Path(c) for c in controls]  # fmt: skip
        if not paths:
            raise CndiffError("no ControlNet files given")
        refuse_repeats(paths)
    prepare = _prepare(out_dir, opts, many=True)
    results = BatchResult(run_models(paths, base, prepare, opts, isolate=True, scan=scan))
    if scan and not any(r.status != "skipped" or r.output for r in results):
        raise CndiffError(f"no ControlNet checkpoints in {escape_path(controls)} "
                          f"({len(results)} other file(s))")  # fmt: skip
    return results


def _prepare(out: PathLike | None, options: Options, *, many: bool) -> Prepare:
    """How one model becomes a job: a difference model through the pipeline, or a
    Control-LoRA through its own export."""

    def prepare(inputs: Inputs, backend: Backend) -> Job | ExtractResult:
        if options.format == "control-lora":
            return export_lora(inputs, out, options, backend, many=many)
        return make_job(inputs, plan_extract(inputs), out, options, many=many)

    return prepare


def candidates(folder: PathLike) -> list[Path]:
    """The files of ``folder`` a batch looks at: checkpoint files (by their ending) and
    diffusers model folders, in name order (hidden files left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CndiffError(f"{escape_path(folder)} is not a folder; name the folder holding the "
                          "models")  # fmt: skip
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            if model_file(p) != p:  # a diffusers model folder counts as one model
                out.append(p)
        elif p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file():
            out.append(p)
    return out
