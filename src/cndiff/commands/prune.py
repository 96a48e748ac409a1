"""``cndiff prune``: keep a ControlNet's own weights, drop the rest.

What sd-webui-controlnet's ``extract_controlnet.py`` does, streamed: an original
``control_sd15_*.pth`` (5.7 GB: ControlNet + the whole SD model) becomes its 361 M
ControlNet parameters, a ControlNet 1.1 file (1.45 GB, fp32) the same weights in fp16
(723 MB for SD1.5). Keys keep their names (``control_model.*``, or the diffusers names for
a diffusers ControlNet, written beside it as the ``fp16`` variant diffusers knows); every
tensor is cast to the output dtype (fp16 by default), bit for bit as torch's ``.to()``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..backends import Backend
from ..errors import OptionError
from ..inputs.sources import Inputs, model_folder
from ..options import Options, build_options
from ..pipeline import Job, make_job
from ..plan import plan_prune
from ..results import BatchResult, ExtractResult
from .runner import refuse_repeats, run_models

__all__ = ["prune", "prune_many"]

PathLike = str | os.PathLike[str]


def _check(options: Options) -> None:
    if options.format != "difference" or options.drop_unchanged:
        raise OptionError("prune takes no --format or --drop-unchanged: it keeps the ControlNet "
                          "weights as they are")  # fmt: skip


def _prepare(out: PathLike | None, options: Options, many: bool):
    def prepare(inputs: Inputs, backend: Backend) -> Job:
        where = out
        folder = model_folder(inputs.control.path)
        if where is None and folder is not None:
            where = f"{inputs.control.path.parent}/"  # the diffusers variant, beside it
        return make_job(inputs, plan_prune(inputs), where, options, many=many)

    return prepare


def prune(
    control: PathLike, out: PathLike | None = None, *, options: Options | None = None, **kwargs
) -> ExtractResult:
    """Write ``control``'s ControlNet weights alone (see the module documentation).

    Args:
        control: a ControlNet in any layout: an original ``control_sd15_*.pth``, a
            ControlNet 1.1 ``control_v11p_sd15_*.pth``, a diffusers
            ``diffusion_pytorch_model.safetensors`` (or its folder).
        out: output file or folder; default ``<name>_<dtype>.safetensors`` beside it
            (``diffusion_pytorch_model.<dtype>.safetensors`` for a diffusers file).
        options: as for :func:`cndiff.extract` (``dtype``, ``overwrite``, ``chunk_mb``,
            ``workers``, ``hash_inputs``, ``progress``...).

    >>> cndiff.prune("control_sd15_canny.pth").output   # doctest: +SKIP
    PosixPath('control_sd15_canny_fp16.safetensors')
    """
    opts = build_options(options, **kwargs)
    _check(opts)
    (result,) = run_models([Path(control)], None, _prepare(out, opts, False), opts,
                           isolate=False, kind="pruned")  # fmt: skip
    return result


def prune_many(
    controls: PathLike | Iterable[PathLike],
    out_dir: PathLike | None = None,
    *,
    options: Options | None = None,
    **kwargs,
) -> BatchResult:
    """:func:`prune` for several files; one bad file does not stop the others."""
    opts = build_options(options, **kwargs)
    _check(opts)
    paths = [Path(controls)] if isinstance(controls, (str, os.PathLike)) else \
        [Path(c) for c in controls]  # fmt: skip
    refuse_repeats(paths)
    return BatchResult(run_models(paths, None, _prepare(out_dir, opts, True), opts,
                                  isolate=True, kind="pruned"))  # fmt: skip
