"""What the original sd-webui-controlnet script writes, for its drop-in replacement."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..optional import require_torch
from ..writer import AtomicFile, output_error, temp_path
from .extract import extract

__all__ = ["extract_like_original"]


def extract_like_original(
    control: str | os.PathLike[str],
    base: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    drop_unchanged: bool = False,
) -> Path:
    """Extract as ``extract_controlnet_diff.py --dst DST`` does: safetensors for a
    ``.safetensors`` destination, ``torch.save({"state_dict": ...})`` for any other
    (which needs torch).

    The torch format needs the whole output in memory (as the original does); it is
    built from a streamed safetensors file written under a temporary name, and written
    itself under a temporary name, flushed to disk and moved into place; a killed run's
    leftovers are removed by the next run on the same destination.
    """
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        return extract(control, base, dst, dtype=dtype, overwrite=True,
                       drop_unchanged=drop_unchanged).output  # type: ignore[return-value]
    torch = require_torch(f"a torch-format --dst ({dst.suffix or 'no .safetensors suffix'})")
    from safetensors.torch import load_file

    inter = temp_path(dst)
    try:
        extract(control, base, inter, dtype=dtype, overwrite=True, drop_unchanged=drop_unchanged)
        state = load_file(str(inter))
        with AtomicFile(dst, overwrite=True) as out:
            assert out.path is not None
            try:
                torch.save({"state_dict": state}, str(out.path))
            except OSError as exc:
                raise output_error(exc, dst) from None
            out.commit()
    finally:
        with contextlib.suppress(OSError):
            inter.unlink()
    return dst
