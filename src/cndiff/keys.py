"""The key mapping between a ControlNet and the UNet it was built on.

ControlNet's trainable copy of the UNet encoder is stored as ``control_model.X``; the
same module of the Stable Diffusion UNet is ``model.diffusion_model.X`` in an SD
checkpoint. The rule is a prefix swap, not an SD1.5 table, so SD2.x pairs work too.
Keys under ``control_model.`` with no UNet counterpart (``input_hint_block``,
``zero_convs``, ``middle_block_out``) are ControlNet's own and are stored as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .errors import CheckpointError, IncompatibleBaseError
from .inputs import TensorInfo

__all__ = [
    "CONTROL_PREFIX",
    "UNET_PREFIX",
    "PlanItem",
    "control_keys",
    "require_control_keys",
    "unet_prefix",
    "plan_diff",
]

CONTROL_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
#: ControlNet modules that mirror the UNet: every key under them must find a base tensor.
MIRRORED = ("time_embed.", "input_blocks.", "middle_block.")
#: the marker key of a difference model
DIFFERENCE_KEY = "difference"


@dataclass(frozen=True)
class PlanItem:
    """One output tensor: ``control - base`` when ``base_key`` is set, else the control copy."""

    key: str
    control_key: str
    base_key: str | None
    shape: tuple[int, ...]


def control_keys(keys: Iterable[str]) -> list[str]:
    """The ``control_model.*`` keys among ``keys``, in order."""
    return [k for k in keys if k.startswith(CONTROL_PREFIX)]


def require_control_keys(keys: Iterable[str], name: str = "control") -> list[str]:
    """The ``control_model.*`` keys, or a :class:`CheckpointError` saying there are none."""
    ckeys = control_keys(keys)
    if not ckeys:
        raise CheckpointError(
            f"{name} has no control_model.* keys: it is not an original ControlNet "
            "checkpoint (is it already a difference model, or a base model?)"
        )
    return ckeys


def unet_prefix(keys: Iterable[str]) -> str:
    """Where a checkpoint keeps its UNet: ``model.diffusion_model.`` in full SD checkpoints,
    ``""`` in UNet-only files (keys such as ``input_blocks.0.0.weight``)."""
    keys = list(keys)
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return UNET_PREFIX
    if any(k.startswith(MIRRORED) for k in keys):
        return ""
    return UNET_PREFIX


def plan_diff(
    control: Mapping[str, TensorInfo],
    base: Mapping[str, TensorInfo],
    *,
    control_name: str = "control",
    base_name: str = "base",
    base_prefix: str | None = None,
) -> list[PlanItem]:
    """Decide, for every ``control_model.*`` tensor, whether it is subtracted or copied.

    Raises :class:`CheckpointError` when ``control`` has no ``control_model.*`` keys and
    :class:`IncompatibleBaseError` when the base does not look like the UNet the control
    model was built on (a mirrored key without base tensor, or a shape mismatch).
    """
    ckeys = require_control_keys(control, control_name)
    prefix = unet_prefix(base) if base_prefix is None else base_prefix
    items: list[PlanItem] = []
    missing: list[str] = []
    mismatched: list[str] = []
    mirrored = 0
    for ck in ckeys:
        name = ck[len(CONTROL_PREFIX) :]
        info = control[ck]
        bk = prefix + name
        is_mirrored = name.startswith(MIRRORED)
        mirrored += is_mirrored
        if bk in base:
            if base[bk].shape != info.shape:
                mismatched.append(f"{name} {list(info.shape)} vs {list(base[bk].shape)}")
            items.append(PlanItem(ck, ck, bk, info.shape))
        else:
            if is_mirrored:
                missing.append(name)
            items.append(PlanItem(ck, ck, None, info.shape))
    if missing or mismatched:
        matched = mirrored - len(missing) - len(mismatched)
        detail = (
            f"{len(missing)} have no {prefix}* tensor (e.g. {missing[0]})"
            if missing
            else f"{len(mismatched)} differ in shape (e.g. {mismatched[0]})"
        )
        raise IncompatibleBaseError(
            f"{base_name} does not match the UNet {control_name} was built on: only {matched} of "
            f"{mirrored} UNet keys match; {detail}. Use the SD base the ControlNet was trained "
            "from (SD1.5 for control_sd15_*), or --base self"
        )
    return items
