"""``cndiff apply``: bake a difference model into a standalone ControlNet.

Tools that cannot load difference models (Forge, diffusers, InvokeAI) need a plain
ControlNet. Adding a fine-tune's UNet back to a diff, once, gives exactly what
sd-webui-controlnet and ComfyUI build at load time: ``control_model.X = diff.X + UNet.X``
(computed in float32, rounded once), the ControlNet's own tensors as they are, and no
``difference`` marker. It streams like ``extract``: the memory stays bounded.
"""

from __future__ import annotations

import os

from ..backends import select_backend
from ..errors import OptionError
from ..inputs.sources import open_inputs
from ..options import Options, build_options
from ..pipeline import make_job, run_jobs
from ..plan import plan_apply
from ..results import ExtractResult
from ..targets import Skip

__all__ = ["apply_diff"]


def apply_diff(
    diff: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    options: Options | None = None,
    **kwargs,
) -> ExtractResult:
    """Add ``base``'s UNet to the difference model ``diff``; write a standalone ControlNet.

    Args:
        diff: a difference model (``diff_control_sd15_*.safetensors``, with the
            ``difference`` marker key).
        base: the SD checkpoint (fine-tune) to bake in.
        out: output file or folder (default: beside ``diff``,
            ``<control>_<base>_<dtype>.safetensors``).
        options: as for :func:`cndiff.extract` (``dtype``, ``device``, ``backend``,
            ``overwrite``, ``chunk_mb``, ``workers``, ``hash_inputs``, ``progress``);
            the extraction-only ones (``format``, ``drop_unchanged``, the Control-LoRA
            ones) are refused.

    Returns an :class:`~cndiff.results.ExtractResult` of kind ``standalone`` (``paired``
    counts the tensors added to the base).

    Raises:
        CndiffError: ``diff`` is not a difference model, ``base`` is not the UNet the
            ControlNet was built on (same checks as :func:`cndiff.extract`), an existing
            output of another job...
    """
    opts = build_options(options, **kwargs)
    if opts.format != "difference" or opts.drop_unchanged:
        raise OptionError("apply takes no --format or --drop-unchanged: it bakes a difference "
                          "model into a standalone ControlNet")  # fmt: skip
    backend = select_backend(opts.device, opts.backend)
    with open_inputs(diff, base, role="difference") as inputs:
        try:
            job = make_job(inputs, plan_apply(inputs), out, opts)
        except Skip as skip:
            return ExtractResult(source=inputs.control.path, output=skip.target,
                                 kind="standalone", dtype=opts.out_dtype.name,
                                 status="skipped", bytes=skip.target.stat().st_size,
                                 reason="complete output of the same job exists; "
                                 "--overwrite redoes it")  # fmt: skip
        run_jobs([job], opts, backend, isolate=False)
        assert job.result is not None
        return job.result
