"""How a file's keys map onto the canonical ldm names, whatever its layout.

Every command works on canonical names: ``control_model.X`` for a ControlNet,
``model.diffusion_model.X`` for a UNet. A file in the ldm layout already uses them (or
the same names without a prefix); a file in the diffusers layout (``down_blocks.*``,
``controlnet_down_blocks.*``...) is mapped through the table :mod:`cndiff.layouts`
derives from the configuration it reads off the file's shapes.

A :class:`View` lists the file's tensors of one model as ``(file key, canonical key,
shape)``, in file order; plans are made from views, so a diffusers ControlNet against an
ldm base, or an ldm ControlNet against a diffusers UNet, pair up exactly like two ldm
files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .. import layouts
from ..errors import CheckpointError
from ..text import escape
from .checkpoint import TensorInfo

__all__ = [
    "View",
    "control_view",
    "unet_view",
    "architecture",
    "DIFFUSERS_CONTROL_MARK",
    "DIFFUSERS_UNET_MARK",
]

CONTROL_PREFIX = layouts.CONTROL_PREFIX
UNET_PREFIX = layouts.UNET_PREFIX
#: a key only a diffusers ControlNet has / only a diffusers UNet (or ControlNet) has
DIFFUSERS_CONTROL_MARK = "controlnet_cond_embedding.conv_in.weight"
DIFFUSERS_UNET_MARK = "time_embedding.linear_1.weight"
# top-level ldm UNet modules (a UNet-only file without a prefix)
_LDM_UNET_TOP = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.",
                 "label_emb.")  # fmt: skip
_LDM_CONTROL_ONLY = ("zero_convs.", "input_hint_block.", "middle_block_out.")


@dataclass(frozen=True)
class View:
    """One model's tensors in a file: ``entries`` are ``(file key, canonical key,
    shape)`` in file order; ``layout`` is ``ldm`` or ``diffusers``; ``config`` the
    architecture when :mod:`cndiff.layouts` recognized it (always for diffusers)."""

    layout: str
    entries: tuple[tuple[str, str, tuple[int, ...]], ...]
    config: layouts.UNetConfig | None = None
    _by_canonical: dict[str, tuple[str, tuple[int, ...]]] = field(
        default=None, repr=False, compare=False  # type: ignore[assignment]
    )

    def by_canonical(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Canonical key -> (file key, shape)."""
        cached = self._by_canonical
        if cached is None:
            cached = {c: (k, s) for k, c, s in self.entries}
            object.__setattr__(self, "_by_canonical", cached)
        return cached

    @property
    def family(self) -> str | None:
        return self.config.label if self.config is not None else None

    def __repr__(self) -> str:
        return f"<View {self.layout} {len(self.entries)} tensors {self.family or ''}>"


def _infer(tensors: Mapping[str, TensorInfo], kind: str, name: str) -> layouts.Found | None:
    try:
        return layouts.infer(tensors, kind)  # type: ignore[arg-type]
    except layouts.LayoutError as exc:
        raise CheckpointError(
            f"{name}: its keys look like a diffusers {kind} but do not fit a layout cndiff "
            f"knows ({escape(str(exc), 300)})"
        ) from None


def architecture(tensors: Mapping[str, TensorInfo]) -> layouts.UNetConfig | None:
    """The architecture of the ControlNet (else the UNet) in a file, when its keys match a
    layout :mod:`cndiff.layouts` derives (None for odd or partial files)."""
    try:
        found = layouts.infer(tensors)  # type: ignore[arg-type]
    except layouts.LayoutError:
        return None
    return found.config if found is not None else None


def control_view(tensors: Mapping[str, TensorInfo], name: str = "control") -> View | None:
    """The ControlNet in a file (None when there is none): ``control_model.*`` keys, the
    same without a prefix (a pruned ControlNet), or the diffusers layout."""
    ldm = [(k, k, t.shape) for k, t in tensors.items() if k.startswith(CONTROL_PREFIX)]
    if ldm:
        return View("ldm", tuple(ldm))
    if DIFFUSERS_CONTROL_MARK in tensors:
        found = _infer(tensors, "controlnet", name)
        if found is not None:
            return View("diffusers", tuple(found.table()), found.config)
    if any(k.startswith(_LDM_CONTROL_ONLY) for k in tensors):
        bare = [(k, CONTROL_PREFIX + k, t.shape) for k, t in tensors.items()
                if k.startswith(_LDM_UNET_TOP + _LDM_CONTROL_ONLY)]  # fmt: skip
        return View("ldm", tuple(bare))
    return None


def unet_view(tensors: Mapping[str, TensorInfo], name: str = "base") -> View | None:
    """The SD UNet in a file (None when there is none): ``model.diffusion_model.*`` keys,
    the same without a prefix (a UNet-only file), or the diffusers layout."""
    ldm = [(k, k, t.shape) for k, t in tensors.items() if k.startswith(UNET_PREFIX)]
    if ldm:
        return View("ldm", tuple(ldm))
    if DIFFUSERS_UNET_MARK in tensors and DIFFUSERS_CONTROL_MARK not in tensors:
        found = _infer(tensors, "unet", name)
        if found is not None:
            return View("diffusers", tuple(found.table()), found.config)
    if any(k.startswith(_LDM_UNET_TOP) for k in tensors) and not any(
        k.startswith(_LDM_CONTROL_ONLY) for k in tensors
    ):
        bare = [(k, UNET_PREFIX + k, t.shape) for k, t in tensors.items()
                if k.startswith(_LDM_UNET_TOP)]  # fmt: skip
        return View("ldm", tuple(bare))
    return None
