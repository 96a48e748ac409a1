"""What every output says about itself: safetensors ``__metadata__``.

Keys follow the SAI ModelSpec conventions (``modelspec.*``) where one fits, plus
``cndiff.*`` keys for what ModelSpec has no name for. Loaders ignore ``__metadata__``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from . import _version
from .identify import detect_arch
from .inputs import Checkpoint
from .progress import progress_bar

__all__ = ["build_metadata", "sha256_file", "MODELSPEC_ARCH"]

#: ModelSpec architecture names of the SD families (ControlNet adapters get a suffix)
MODELSPEC_ARCH = {"SD1.x": "stable-diffusion-v1", "SD2.x": "stable-diffusion-v2",
                  "SDXL": "stable-diffusion-xl-v1-base"}  # fmt: skip


def sha256_file(path: str | os.PathLike[str], progress: bool = False) -> str:
    """sha256 of a whole file, read in 8 MiB blocks (with a progress bar if asked)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f, progress_bar(size, f"sha256 {Path(path).name}",
                                                        progress) as bar:  # fmt: skip
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            bar.update(n)
    return h.hexdigest()


def build_metadata(
    *,
    kind: str,
    control: Checkpoint,
    base: Checkpoint | None,
    base_is_self: bool,
    dtype: str,
    adapter: str = "controlnet",
    dropped: Sequence[str] = (),
    hashes: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``__metadata__`` of an output.

    ``kind``: ``difference``, ``standalone`` or ``control-lora``. ``control`` is the
    input ControlNet file (original or difference), ``base`` the SD checkpoint used.
    """
    arch = detect_arch(control.tensors)
    family = MODELSPEC_ARCH.get(arch.split("-like")[0], "")
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family}/{adapter}" if family else adapter,
        "modelspec.implementation": "https://github.com/lllyasviel/ControlNet",
        "modelspec.title": Path(control.path).stem,
        "modelspec.date": _dt.date.today().isoformat(),
        "modelspec.description": {
            "difference": "ControlNet difference model: add the SD UNet to every "
            "control_model.* key that has one (marker key 'difference')",
            "standalone": "standalone ControlNet (difference + base UNet baked in)",
            "control-lora": "Control-LoRA: UNet weights + up @ down for factorized layers",
        }.get(kind, kind),
        "cndiff.version": _version.__version__,
        "cndiff.kind": kind,
        "cndiff.arch": arch,
        "cndiff.dtype": dtype,
        "cndiff.source": Path(control.path).name,
        "cndiff.source_size": str(control.size),
        "cndiff.base": "self" if base_is_self else (Path(base.path).name if base else ""),
        "cndiff.base_size": "" if base_is_self or base is None else str(base.size),
        "cndiff.dropped_keys": ",".join(dropped),
    }
    if arch.startswith("SD1.x"):
        meta["modelspec.resolution"] = "512x512"
    for name, digest in (hashes or {}).items():
        meta[f"cndiff.{name}_sha256"] = digest
    meta.update(extra or {})
    return meta
