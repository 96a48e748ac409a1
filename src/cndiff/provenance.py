"""What every output says about itself: safetensors ``__metadata__``.

Keys follow the SAI ModelSpec conventions (``modelspec.*``) where one fits, plus
``cndiff.*`` keys for what ModelSpec has no name for, among them ``cndiff.job``: the
record of the job that made the file (inputs' names and sizes, base file or ``self``,
format, dtype, rank or max-error, drop-unchanged), which decides whether a rerun skips
it. Loaders ignore ``__metadata__``. Names from the file system are escaped where they
are not valid Unicode.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from typing import Any

from . import _version
from .hashes import FileHashes
from .inputs.sources import Inputs
from .options import Options
from .targets import JOB_KEY

__all__ = ["build_metadata", "job_record", "MODELSPEC_ARCH"]

#: ModelSpec architecture names of the SD families (ControlNet adapters get a suffix)
MODELSPEC_ARCH = {"SD1.x": "stable-diffusion-v1", "SD2.x": "stable-diffusion-v2",
                  "SDXL": "stable-diffusion-xl-v1-base"}  # fmt: skip

_DESCRIPTIONS = {
    "difference": "ControlNet difference model: add the SD UNet to every control_model.* key "
    "that has one (marker key 'difference')",
    "standalone": "standalone ControlNet (difference + base UNet baked in)",
    "control-lora": "Control-LoRA: UNet weights + up @ down for factorized layers",
    "pruned": "ControlNet weights alone (the rest of the original file dropped)",
    "ldm": "ControlNet in the ldm layout (control_model.*), converted from diffusers",
    "diffusers": "ControlNet in the diffusers layout, converted from ldm",
}


def _file_name(path) -> str:
    return path.name


def job_record(kind: str, inputs: Inputs, options: Options) -> dict[str, Any]:
    """What identifies the job that makes an output (``kind``: what the output is,
    ``difference``, ``standalone``, ``control-lora``, ``pruned``, ``ldm``, ``diffusers``):
    an existing output whose record is equal was made by the same job and is skipped on a
    rerun."""
    base = inputs.base
    record: dict[str, Any] = {
        "kind": kind,
        "dtype": options.dtype,
        "source": _file_name(inputs.control.path),
        "source_size": inputs.control.size,
        "base": "self" if inputs.base_is_self else (_file_name(base.path) if base else None),
        "base_size": None if inputs.base_is_self or base is None else base.size,
    }
    if kind == "difference":
        record["drop_unchanged"] = options.drop_unchanged
    if kind == "control-lora":
        record.update(
            rank=None if options.max_error is not None else options.lora_rank,
            max_error=options.max_error,
            stability_compatible=options.stability_compatible,
            svd=options.svd,
        )
    # what json would give back, so that a record read from a file compares equal
    return json.loads(json.dumps(record))


def build_metadata(
    kind: str,
    inputs: Inputs,
    options: Options,
    *,
    dropped: Sequence[str] = (),
    hashes: dict[str, FileHashes] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``__metadata__`` of an output of ``kind`` (``difference``, ``standalone``,
    ``control-lora``) made from ``inputs`` with ``options``."""
    arch = inputs.kind.arch  # (read off the shapes once, when the file was opened)
    family = MODELSPEC_ARCH.get(arch.split("-like")[0], "")
    adapter = "control-lora" if kind == "control-lora" else "controlnet"
    record = job_record(kind, inputs, options)
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family}/{adapter}" if family else adapter,
        "modelspec.implementation": "https://github.com/lllyasviel/ControlNet",
        "modelspec.title": inputs.control.path.stem,
        "modelspec.date": _dt.date.today().isoformat(),
        "modelspec.description": _DESCRIPTIONS.get(kind, kind),
        "cndiff.version": _version.__version__,
        "cndiff.kind": kind,
        "cndiff.arch": arch,
        "cndiff.dtype": options.out_dtype.name,
        "cndiff.source": record["source"],
        "cndiff.source_size": str(record["source_size"]),
        "cndiff.base": record["base"] or "",
        "cndiff.base_size": "" if record["base_size"] is None else str(record["base_size"]),
        "cndiff.dropped_keys": ",".join(dropped),
        JOB_KEY: json.dumps(record, sort_keys=True, ensure_ascii=False),
    }
    if arch.startswith("SD1.x"):
        meta["modelspec.resolution"] = "512x512"
    elif arch.startswith("SDXL"):
        meta["modelspec.resolution"] = "1024x1024"
    for role, h in (hashes or {}).items():
        for name, value in h.to_dict().items():
            if value is not None:
                meta[f"cndiff.{role}_{name}"] = value
    meta.update(extra or {})
    return meta
