"""``cndiff inspect``: say what a checkpoint file is, from its index alone.

Only the header (safetensors) or the pickle (torch files, through the restricted
unpickler) is read; no tensor data, unless the hashes are asked for (one streaming pass).
The kind is decided from key names (:mod:`cndiff.inputs.classify`), the architecture from
shapes (the cross-attention width: 768 for SD1.x, 1024 for SD2.x, 2048 for SDXL).
Everything taken from the file (names, metadata) is escaped before it is shown.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..hashes import FileHashes, file_hashes
from ..inputs import open_checkpoint
from ..inputs.classify import CONTROL_PREFIX, classify
from ..inputs.sources import model_file
from ..text import escape, escape_path

__all__ = ["FileReport", "inspect_file", "LOADERS"]

#: how each loader treats each kind of file
LOADERS = {
    "original-controlnet": {
        "ComfyUI (ControlNetLoader)": "loads the control_model.* weights; ignores the rest",
        "ComfyUI (DiffControlNetLoader)": "same as ControlNetLoader (no difference marker)",
        "sd-webui-controlnet": "loads it as a standalone ControlNet",
        "Forge": "loads it as a standalone ControlNet",
        "diffusers": "needs the diffusers layout: 'cndiff convert --to diffusers'",
    },
    "pruned-controlnet": {
        "ComfyUI (ControlNetLoader)": "loads it",
        "ComfyUI (DiffControlNetLoader)": "loads it as is (no difference marker)",
        "sd-webui-controlnet": "loads it as a standalone ControlNet",
        "Forge": "loads it as a standalone ControlNet",
        "diffusers": "needs the diffusers layout: 'cndiff convert --to diffusers'",
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
        "diffusers": "ControlNetModel.from_pretrained(folder) with its config.json; "
        "'cndiff convert --to ldm' makes one control_model.* file of it",
    },
    "sd-checkpoint": {
        "cndiff": "a base: extract, verify and apply take its model.diffusion_model.* UNet",
    },
    "unet": {
        "cndiff": "a base: extract, verify and apply take its UNet keys (no prefix)",
    },
    "diffusers-unet": {
        "cndiff": "a base: extract, verify and apply map its diffusers keys onto the ldm "
        "names (the file, its folder, or a pipeline folder with unet/)",
    },
}


@dataclass(repr=False)
class FileReport:
    """What :func:`inspect_file` found. ``kind`` is a key of
    :data:`cndiff.inputs.classify.KINDS`; ``hashes`` is set when asked for."""

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
    hashes: FileHashes | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["hashes"] = self.hashes.to_dict() if self.hashes else None
        return d

    def __repr__(self) -> str:
        return (f"<FileReport {escape(os.path.basename(self.path), 60)!r} {self.kind}, "
                f"{self.arch}, {self.keys} tensors>")  # fmt: skip

    def __str__(self) -> str:
        lines = [
            escape_path(self.path),
            f"  kind:         {self.description}",
            f"  architecture: {self.arch}",
            f"  container:    {self.container}"
            f"{' (wrapped in state_dict)' if self.wrapped else ''}, {self.size:,} bytes",
            f"  tensors:      {self.keys:,} ({self.control_keys:,} {CONTROL_PREFIX}*), "
            f"{self.params:,} parameters",
            "  dtypes:       " + ", ".join(f"{k} x{v}" for k, v in self.dtypes.items()),
        ]
        if self.extras:
            lines.append("  also holds:   " + ", ".join(escape(e, 60) for e in self.extras[:20]))
        if self.hashes is not None:
            lines.append("  hashes:")
            lines += [f"    {k}: {v}" for k, v in self.hashes.to_dict().items() if v is not None]
        if self.metadata:
            lines.append("  metadata:")
            lines += [f"    {escape(k, 80)}: {escape(v, 300)}"
                      for k, v in sorted(self.metadata.items())]  # fmt: skip
        if self.loaders:
            lines.append("  how loaders treat it:")
            lines += [f"    {k}: {v}" for k, v in self.loaders.items()]
        return "\n".join(lines)


def inspect_file(path: str | os.PathLike[str], *, hashes: bool = False,
                 progress: bool = False) -> FileReport:  # fmt: skip
    """Describe a checkpoint file (or a diffusers model folder) without loading its
    tensors; with ``hashes``, also the hashes model sites show
    (:func:`cndiff.hashes.file_hashes`: one read of the file)."""
    path = model_file(path)  # (a diffusers model folder: its weights file)
    with open_checkpoint(path) as ck:
        tensors = ck.tensors
        kind = classify(tensors)
        dtypes = Counter(t.dtype.name for t in tensors.values())
        report = FileReport(
            path=str(Path(path)),
            size=ck.size,
            container=ck.format,
            kind=kind.kind,
            description=kind.description,
            arch=kind.arch,
            keys=len(tensors),
            params=sum(t.numel for t in tensors.values()),
            dtypes=dict(sorted(dtypes.items())),
            control_keys=sum(k.startswith(CONTROL_PREFIX) for k in tensors),
            wrapped=ck.wrapped,
            metadata=dict(ck.metadata),
            extras=list(ck.extras),
            loaders=dict(LOADERS.get(kind.kind, {})),
        )
    if hashes:
        report.hashes = file_hashes(path, progress)
    return report
