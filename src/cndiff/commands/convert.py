"""``cndiff convert``: a ControlNet between the ldm and the diffusers layout.

* ``to="diffusers"``: an ldm ControlNet (an original ``control_sd15_*.pth``, a pruned or
  standalone one) becomes a diffusers folder: ``config.json``, derived from the shapes
  (:func:`cndiff.layouts.diffusers_controlnet_config`), and
  ``diffusion_pytorch_model.safetensors`` in diffusers' key order; what
  ``diffusers.ControlNetModel.from_pretrained(folder)`` loads offline.
* ``to="ldm"``: a diffusers ControlNet (its weights file or its folder) becomes one
  ``control_model.*`` safetensors file, which ComfyUI, sd-webui-controlnet and Forge load.

Tensors are renamed, never reshaped: ldm -> diffusers -> ldm gives back the same bytes
(in the same dtype). Difference models and Control-LoRAs are refused: no loader adds a
UNet back to a diffusers-layout file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .. import layouts
from ..backends import Backend
from ..errors import OptionError
from ..inputs.sources import Inputs
from ..options import Options, build_options
from ..pipeline import Job, make_job
from ..plan import plan_convert
from ..results import BatchResult, ExtractResult
from ..targets import Skip, default_dir, default_name
from ..writer import AtomicFile
from .runner import refuse_repeats, run_models

__all__ = ["convert", "convert_many", "LAYOUTS"]

PathLike = str | os.PathLike[str]
#: what ``to`` may be
LAYOUTS = ("diffusers", "ldm")
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _check(to: str, options: Options) -> None:
    if to not in LAYOUTS:
        raise OptionError(f"--to must be diffusers or ldm, not {to!r}")
    if options.format != "difference" or options.drop_unchanged:
        raise OptionError("convert takes no --format or --drop-unchanged: it renames the "
                          "ControlNet's weights")  # fmt: skip


def _write_config(folder: Path, config: layouts.UNetConfig, overwrite: bool) -> None:
    text = json.dumps(layouts.diffusers_controlnet_config(config), indent=2, sort_keys=True)
    path = folder / "config.json"
    if path.is_file() and path.read_text(errors="replace") == text + "\n":
        return
    with AtomicFile(path, overwrite=True) as f:
        f.write((text + "\n").encode())
        f.commit()


def _prepare(to: str, out: PathLike | None, options: Options, many: bool):
    def prepare(inputs: Inputs, backend: Backend) -> Job:
        plan, config = plan_convert(inputs, to)
        if to == "ldm":
            return make_job(inputs, plan, out, options, many=many)
        folder = Path(out) if out is not None and not many else (
            Path(out or default_dir(inputs.control.path))
            / default_name("diffusers", inputs.control.path, options)
        )  # fmt: skip
        try:
            job = make_job(inputs, plan, f"{folder}/", options, name=WEIGHTS)
        except Skip:
            _write_config(folder, config, options.overwrite)
            raise Skip(folder) from None
        job.after = lambda j: _write_config(folder, config, options.overwrite)
        return job

    return prepare


def _results(results: list[ExtractResult], to: str) -> list[ExtractResult]:
    for r in results:  # a diffusers model is its folder
        if to == "diffusers" and r.status == "written" and r.output is not None:
            r.output = r.output.parent
    return results


def convert(
    path: PathLike,
    to: str,
    out: PathLike | None = None,
    *,
    options: Options | None = None,
    **kwargs,
) -> ExtractResult:
    """Convert one ControlNet to the ``to`` layout (see the module documentation).

    Args:
        path: an ldm ControlNet file (``to="diffusers"``), or a diffusers ControlNet's
            weights file or folder (``to="ldm"``).
        to: ``"diffusers"`` or ``"ldm"``.
        out: the output folder (diffusers; default ``<name>_diffusers`` beside the input)
            or file (ldm; default ``<name>_<dtype>.safetensors`` beside the input, or
            beside a diffusers folder).
        options: as for :func:`cndiff.extract` (``dtype`` defaults to fp16: give
            ``dtype="fp32"`` to keep fp32 weights).

    >>> cndiff.convert("control_sd15_canny.pth", "diffusers").output   # doctest: +SKIP
    PosixPath('control_sd15_canny_diffusers')
    """
    opts = build_options(options, **kwargs)
    _check(to, opts)
    results = run_models([Path(path)], None, _prepare(to, out, opts, False), opts,
                         isolate=False, kind=to, role="convert")  # fmt: skip
    return _results(results, to)[0]


def convert_many(
    paths: PathLike | Iterable[PathLike],
    to: str,
    out_dir: PathLike | None = None,
    *,
    options: Options | None = None,
    **kwargs,
) -> BatchResult:
    """:func:`convert` for several models (``out_dir``: where the outputs go)."""
    opts = build_options(options, **kwargs)
    _check(to, opts)
    ps = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    refuse_repeats(ps)
    results = run_models(ps, None, _prepare(to, out_dir, opts, True), opts, isolate=True,
                         kind=to, role="convert")  # fmt: skip
    return BatchResult(_results(results, to))
