"""What the original sd-webui-controlnet script writes, for its drop-in replacement."""

from __future__ import annotations

import os
from pathlib import Path

from .api import extract

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
    ``.safetensors`` destination, ``torch.save({"state_dict": ...})`` for any other.

    The torch format needs the whole output in memory (as the original does); it is
    built from a streamed safetensors file and moved into place atomically.
    """
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        return extract(control, base, dst, dtype=dtype, overwrite=True,
                       drop_unchanged=drop_unchanged).output  # fmt: skip
    import torch
    from safetensors.torch import load_file

    tmp_st = dst.with_name(f".{dst.name}.{os.getpid()}.part.safetensors")
    tmp_pt = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    try:
        extract(control, base, tmp_st, dtype=dtype, overwrite=True,
                drop_unchanged=drop_unchanged)  # fmt: skip
        state = load_file(str(tmp_st))
        torch.save({"state_dict": state}, str(tmp_pt))
        os.replace(tmp_pt, dst)
    finally:
        for p in (tmp_st, tmp_pt):
            p.unlink(missing_ok=True)
    return dst
