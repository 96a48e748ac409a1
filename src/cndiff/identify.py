"""``cndiff inspect``: say what a checkpoint file is, from its index alone.

Only the header (safetensors) or the pickle (torch files, through the restricted
unpickler) is read; no tensor data. The kind is decided from key names, the architecture
from shapes (the cross-attention width: 768 for SD1.x, 1024 for SD2.x, 2048 for SDXL).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .inputs import TensorInfo, open_checkpoint
from .keys import CONTROL_PREFIX, DIFFERENCE_KEY, UNET_PREFIX

__all__ = ["FileReport", "inspect_file", "detect_arch", "format_report", "KINDS"]

#: file kinds and how users call them
KINDS = {
    "original-controlnet": "original ControlNet checkpoint (ControlNet + full SD model)",
    "pruned-controlnet": "pruned ControlNet (ControlNet weights only)",
    "difference": "ControlNet difference model (needs the SD UNet added at load time)",
    "control-lora": "Control-LoRA",
    "diffusers-controlnet": "diffusers ControlNet",
    "sd-checkpoint": "Stable Diffusion checkpoint (no ControlNet)",
    "unknown": "unknown",
}

_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}

_LOADERS = {
    "original-controlnet": {
        "ComfyUI (ControlNetLoader)": "loads the control_model.* weights; ignores the rest",
        "ComfyUI (DiffControlNetLoader)": "same as ControlNetLoader (no difference marker)",
        "sd-webui-controlnet": "loads it as a standalone ControlNet",
        "Forge": "loads it as a standalone ControlNet",
    },
    "pruned-controlnet": {
        "ComfyUI (ControlNetLoader)": "loads it",
        "ComfyUI (DiffControlNetLoader)": "loads it as is (no difference marker)",
        "sd-webui-controlnet": "loads it as a standalone ControlNet",
        "Forge": "loads it as a standalone ControlNet",
    },
    "difference": {
        "ComfyUI (ControlNetLoader)": "WRONG: without a model it warns and uses the raw "
        "differences as weights; use DiffControlNetLoader",
        "ComfyUI (DiffControlNetLoader)": "adds the chosen model's UNet to every key present "
        "in the file: correct",
        "sd-webui-controlnet": "sees the 'difference' key and adds the loaded SD model's UNet: "
        "correct",
        "Forge": "WRONG in current Forge: it ignores 'difference' and loads the raw "
        "differences as weights (older ldm_patched builds add the UNet like ComfyUI); bake it "
        "with 'cndiff apply' or export a Control-LoRA",
    },
    "control-lora": {
        "ComfyUI (ControlNetLoader)": "loads it as a Control-LoRA on the model it is applied to",
        "ComfyUI (DiffControlNetLoader)": "loads it as a Control-LoRA",
        "sd-webui-controlnet": "loads it as a Control-LoRA (UNet weights + up @ down)",
        "Forge": "loads it as a Control-LoRA",
    },
    "diffusers-controlnet": {
        "ComfyUI (ControlNetLoader)": "converts the diffusers layout and loads it",
        "ComfyUI (DiffControlNetLoader)": "converts the diffusers layout and loads it",
        "sd-webui-controlnet": "converts the diffusers layout and loads it",
        "Forge": "converts the diffusers layout and loads it",
    },
}


@dataclass
class FileReport:
    """What :func:`inspect_file` found. ``kind`` is a key of :data:`KINDS`."""

    path: str
    size: int
    container: str
    kind: str
    description: str
    arch: str
    keys: int
    params: int
    dtypes: dict[str, int]
    control_keys: int = 0
    wrapped: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    extras: list[str] = field(default_factory=list)
    loaders: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _kind(keys: Mapping[str, TensorInfo]) -> str:
    has = keys.__contains__
    if has("lora_controlnet"):
        return "control-lora"
    if any(k.startswith("controlnet_cond_embedding.") for k in keys):
        return "diffusers-controlnet"
    control = any(k.startswith(CONTROL_PREFIX) for k in keys)
    bare_control = any(k.startswith(("zero_convs.", "input_hint_block.")) for k in keys)
    if control or bare_control:
        if has(DIFFERENCE_KEY):
            return "difference"
        if any(k.startswith(UNET_PREFIX) for k in keys):
            return "original-controlnet"
        return "pruned-controlnet"
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return "sd-checkpoint"
    return "unknown"


def detect_arch(tensors: Mapping[str, TensorInfo]) -> str:
    """``SD1.x``, ``SD2.x``, ``SDXL`` or ``unknown``, from the cross-attention width.

    Scaled-down models (tests) have another width; then SDXL is told by ``label_emb``
    and SD2.x by its Linear ``proj_in`` (2-D), and the width is named.
    """
    width = None
    linear_proj = None
    sdxl = False
    for k, t in tensors.items():
        if width is None and (k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_k.down")):
            width = t.shape[-1] if len(t.shape) == 2 else None
        if linear_proj is None and k.endswith("proj_in.weight"):
            linear_proj = len(t.shape) == 2
        sdxl |= ".label_emb." in f".{k}" or k.startswith("add_embedding.")
    if width is None:
        return "unknown"
    if width in _WIDTHS:
        return _WIDTHS[width]
    guess = "SDXL" if sdxl else "SD2.x" if linear_proj else "SD1.x"
    return f"{guess}-like (cross-attention width {width}, not a standard size)"


def inspect_file(path: str | os.PathLike[str]) -> FileReport:
    """Describe a checkpoint file without loading its tensors."""
    with open_checkpoint(path) as ck:
        tensors = ck.tensors
        kind = _kind(tensors)
        dtypes = Counter(t.dtype.name for t in tensors.values())
        return FileReport(
            path=str(Path(path)),
            size=ck.size,
            container=ck.format,
            kind=kind,
            description=KINDS[kind],
            arch=detect_arch(tensors),
            keys=len(tensors),
            params=sum(t.numel for t in tensors.values()),
            dtypes=dict(sorted(dtypes.items())),
            control_keys=sum(k.startswith(CONTROL_PREFIX) for k in tensors),
            wrapped=ck.wrapped,
            metadata=dict(ck.metadata),
            extras=list(ck.extras),
            loaders=dict(_LOADERS.get(kind, {})),
        )


def format_report(r: FileReport) -> str:
    """The report as text for the terminal."""
    lines = [
        f"{r.path}",
        f"  kind:         {r.description}",
        f"  architecture: {r.arch}",
        f"  container:    {r.container}{' (wrapped in state_dict)' if r.wrapped else ''}, "
        f"{r.size:,} bytes",
        f"  tensors:      {r.keys:,} ({r.control_keys:,} control_model.*), {r.params:,} parameters",
        "  dtypes:       " + ", ".join(f"{k} x{v}" for k, v in r.dtypes.items()),
    ]
    if r.extras:
        lines.append("  also holds:   " + ", ".join(r.extras))
    if r.metadata:
        lines.append("  metadata:")
        lines += [f"    {k}: {v}" for k, v in sorted(r.metadata.items())]
    if r.loaders:
        lines.append("  how loaders treat it:")
        lines += [f"    {k}: {v}" for k, v in r.loaders.items()]
    return "\n".join(lines)
