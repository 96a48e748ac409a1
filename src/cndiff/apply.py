"""``cndiff apply``: bake a difference model into a standalone ControlNet.

Tools that cannot load difference models (Forge, diffusers, InvokeAI) need a plain
ControlNet. Adding a fine-tune's UNet back to a diff, once, gives exactly what
sd-webui-controlnet and ComfyUI build at load time: ``control_model.X = diff.X + UNet.X``
(computed in float32, rounded once), the ControlNet's own tensors as they are, and no
``difference`` marker. It streams like ``extract``: the memory stays bounded.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

from .api import (
    DEFAULT_CHUNK_MB,
    ExtractResult,
    _execute,
    _Job,
    open_base,
    prepare_target,
    resolve_device,
)
from .dtypes import output_dtype, short_name
from .errors import CheckpointError
from .inputs import open_checkpoint
from .keys import DIFFERENCE_KEY, plan_diff, require_control_keys

__all__ = ["apply_diff", "default_apply_name"]


def default_apply_name(diff: str | os.PathLike[str], base: str | os.PathLike[str],
                       dtype: str = "fp16") -> str:  # fmt: skip
    """``<control name>_<base name>_<dtype>.safetensors``, e.g.
    ``control_sd15_canny_dreamshaper_8_fp16.safetensors``."""
    stem = Path(diff).stem
    stem = stem.removeprefix("diff_")
    for suffix in ("_fp16", "_bf16", "_fp32"):
        stem = stem.removesuffix(suffix)
    return f"{stem}_{Path(base).stem}_{short_name(output_dtype(dtype))}.safetensors"


def apply_diff(
    diff: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    progress: bool = False,
) -> ExtractResult:
    """Add ``base``'s UNet to the difference model ``diff``; write a standalone ControlNet.

    Args:
        diff: a difference model (``diff_control_sd15_*.safetensors``, with the
            ``difference`` marker key).
        base: the SD checkpoint (fine-tune) to bake in, ``.ckpt``/``.safetensors``.
        out: output file or existing folder (default: beside ``diff``, named by
            :func:`default_apply_name`).
        dtype: ``fp16`` (default), ``bf16`` or ``fp32``.

    Raises:
        CndiffError: ``diff`` is not a difference model, ``base`` is not the UNet the
            ControlNet was built on (same checks as :func:`cndiff.extract`), or the
            output exists without ``overwrite``...
    """
    t0 = time.perf_counter()
    dt = output_dtype(dtype)
    dev = resolve_device(device)
    with ExitStack() as stack:
        d = open_checkpoint(diff)
        stack.callback(d.close)
        require_control_keys(d.tensors, d.path.name)
        if DIFFERENCE_KEY not in d.tensors:
            raise CheckpointError(
                f"{d.path.name} is not a difference model (no 'difference' key): its weights "
                "are already standalone; nothing to apply"
            )
        b, prefix = open_base(base, d)
        stack.callback(b.close)
        plan = plan_diff(d.tensors, b.tensors, control_name=d.path.name,
                         base_name=b.path.name, base_prefix=prefix)  # fmt: skip
        name = default_apply_name(d.path, b.path, dt.name)
        target = prepare_target(d.path, out, name, [d.path, b.path], overwrite=overwrite)
        job = _Job(Path(diff), d, b, False, plan, target, op="add", kind="standalone")
        _execute([job], dt, dev, False, chunk_mb, workers, False, progress, t0,
                 isolate=False, check_base=False)  # fmt: skip
        assert job.result is not None
        return job.result
