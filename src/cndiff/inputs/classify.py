"""What a checkpoint file is, from its key names and shapes alone (no tensor data).

One place decides it for every command: ``extract`` refuses a file that is not a
ControlNet (a difference model, a Control-LoRA, a base) with a message that says what it
is and what to use instead; ``batch`` skips such files with that reason; ``inspect``
shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .checkpoint import TensorInfo
from .views import DIFFUSERS_CONTROL_MARK, DIFFUSERS_UNET_MARK, architecture

__all__ = [
    "CONTROL_PREFIX",
    "UNET_PREFIX",
    "DIFFERENCE_KEY",
    "LORA_MARKER",
    "KINDS",
    "FileKind",
    "classify",
    "detect_arch",
]

CONTROL_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
#: the marker key of a difference model
DIFFERENCE_KEY = "difference"
#: the marker key of a Control-LoRA
LORA_MARKER = "lora_controlnet"

#: file kinds and how users call them
KINDS = {
    "original-controlnet": "original ControlNet checkpoint (ControlNet + full SD model)",
    "pruned-controlnet": "pruned ControlNet (ControlNet weights only)",
    "difference": "ControlNet difference model (needs the SD UNet added at load time)",
    "control-lora": "Control-LoRA",
    "diffusers-controlnet": "diffusers ControlNet",
    "sd-checkpoint": "Stable Diffusion checkpoint (no ControlNet)",
    "unet": "Stable Diffusion UNet alone (ldm layout)",
    "diffusers-unet": "diffusers UNet (Stable Diffusion)",
    "unknown": "unknown (no ControlNet or UNet keys)",
}

#: kinds that hold a ControlNet ``extract`` can take
CONTROL_KINDS = ("original-controlnet", "pruned-controlnet", "diffusers-controlnet")
#: kinds that hold an SD UNet a ControlNet can be taken against
BASE_KINDS = ("sd-checkpoint", "original-controlnet", "unet", "diffusers-unet")
_LDM_UNET_MARKS = ("input_blocks.0.0.weight", "time_embed.0.weight")

_WIDTHS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class FileKind:
    """``kind`` is a key of :data:`KINDS`; ``arch`` is ``SD1.x``, ``SD2.x``, ``SDXL``,
    ``...-like (...)`` for scaled-down models, or ``unknown``."""

    kind: str
    arch: str

    @property
    def description(self) -> str:
        return KINDS[self.kind]

    @property
    def is_control(self) -> bool:
        """A ControlNet whose weights ``extract`` turns into a difference model."""
        return self.kind in CONTROL_KINDS


def classify(tensors: Mapping[str, TensorInfo]) -> FileKind:
    """Say what a state dict is, from its keys (markers first: a file carrying the
    ``difference`` or ``lora_controlnet`` marker is never an original ControlNet)."""
    return FileKind(_kind(tensors), detect_arch(tensors))


class _Prefixes:
    """Which key prefixes a file has, fast on a million keys: one C-level search of the
    joined names says "none" exactly (every key starts after a NUL); a hit is confirmed
    key by key (a key may itself hold a NUL), which stops at the first real match."""

    def __init__(self, keys: Mapping[str, object]) -> None:
        self.keys = keys
        self.joined = "\0" + "\0".join(keys)

    def any(self, *prefixes: str) -> bool:
        if not any("\0" + p in self.joined for p in prefixes):
            return False
        return any(k.startswith(prefixes) for k in self.keys)


def _kind(keys: Mapping[str, object]) -> str:
    has = _Prefixes(keys).any
    if LORA_MARKER in keys:
        return "control-lora"
    control = has(CONTROL_PREFIX)
    bare_control = has("zero_convs.", "input_hint_block.")
    if DIFFERENCE_KEY in keys and (control or bare_control):
        return "difference"
    if control:
        if has(UNET_PREFIX):
            return "original-controlnet"
        return "pruned-controlnet"
    if DIFFUSERS_CONTROL_MARK in keys:
        return "diffusers-controlnet"
    if bare_control:
        return "pruned-controlnet"
    if has(UNET_PREFIX):
        return "sd-checkpoint"
    if DIFFUSERS_UNET_MARK in keys and "conv_in.weight" in keys:
        return "diffusers-unet"
    if all(k in keys for k in _LDM_UNET_MARKS):
        return "unet"
    return "unknown"


def detect_arch(tensors: Mapping[str, TensorInfo]) -> str:
    """``SD1.x``, ``SD2.x``, ``SDXL`` or ``unknown``: from the architecture
    :mod:`cndiff.layouts` reads off the keys and shapes when they match a layout it
    derives, else from the cross-attention width (768, 1024, 2048).

    Scaled-down models (tests) have another width; then SDXL is told by ``label_emb``
    and SD2.x by its Linear ``proj_in`` (2-D), and the width is named.
    """
    config = architecture(tensors)
    if config is not None and config.family in ("sd1", "sd2", "sdxl"):
        if config.context_dim in _WIDTHS:
            return config.label
        return (f"{config.label}-like (cross-attention width {config.context_dim}, not a "
                "standard size)")  # fmt: skip
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
