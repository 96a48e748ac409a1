"""Map keys: which output tensor comes from which input tensors, and how.

ControlNet's trainable copy of the UNet encoder is stored as ``control_model.X``; the
same module of the Stable Diffusion UNet is ``model.diffusion_model.X`` in an SD
checkpoint. The rule is a prefix swap, not an SD1.5 table, so SD2.x and SDXL pairs work
too. Keys under ``control_model.`` with no UNet counterpart (``input_hint_block``,
``zero_convs``, ``middle_block_out``) are ControlNet's own and are stored as they are.

A :class:`Plan` lists every output tensor (:class:`PlanItem`) with the control key it is
read from and, when it is combined with the base, the base key. Plans are made from key
names and shapes only; no tensor data is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from . import layouts
from .errors import CheckpointError, IncompatibleBaseError
from .inputs.classify import CONTROL_PREFIX, DIFFERENCE_KEY, UNET_PREFIX
from .inputs.sources import MIRRORED, Inputs
from .inputs.views import View
from .text import escape

__all__ = [
    "PlanItem",
    "Plan",
    "plan_pairs",
    "plan_extract",
    "plan_apply",
    "plan_prune",
    "plan_convert",
]


class PlanItem:
    """One output tensor: ``control`` combined with ``base`` when ``base_key`` is set,
    else the control tensor as it is (cast to the output dtype). Treat it as read-only.

    (A slotted class, not a frozen dataclass: a file may hold a million tensors, and a
    frozen dataclass costs three times more to build; ``numel`` is computed once.)
    """

    __slots__ = ("key", "control_key", "base_key", "shape", "numel")

    key: str
    control_key: str
    base_key: str | None
    shape: tuple[int, ...]
    numel: int

    def __init__(self, key: str, control_key: str, base_key: str | None,
                 shape: tuple[int, ...]) -> None:  # fmt: skip
        self.key = key
        self.control_key = control_key
        self.base_key = base_key
        self.shape = shape
        self.numel = prod(shape)

    def _fields(self) -> tuple:
        return (self.key, self.control_key, self.base_key, self.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PlanItem) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        base = f" - {escape(self.base_key)!r}" if self.base_key is not None else ""
        return f"<PlanItem {escape(self.key)!r} {list(self.shape)}{base}>"


@dataclass
class Plan:
    """Every output tensor of a job, in output order.

    ``op`` says how a paired tensor is combined with the base: ``sub`` (extract:
    control - base), ``add`` (apply: difference + base) or ``copy`` (no base: prune,
    convert). ``kind`` is what the output is (``difference``, ``standalone``, ``pruned``,
    ``ldm``, ``diffusers``); ``marker`` the key that marks the file (the scalar
    ``difference`` = 1 of a difference model), if any. ``dropped`` lists keys left out.
    """

    items: list[PlanItem]
    op: str
    kind: str
    marker: str | None = None
    dropped: list[str] = field(default_factory=list)

    @property
    def paired(self) -> int:
        """Tensors combined with the base."""
        return sum(1 for i in self.items if i.base_key is not None)

    @property
    def copied(self) -> int:
        """Tensors stored as they are."""
        return len(self.items) - self.paired

    @property
    def keys_written(self) -> int:
        return len(self.items) + (self.marker is not None)

    def without(self, keys: set[str]) -> Plan:
        """The plan with ``keys`` left out (recorded in ``dropped``)."""
        kept = [i for i in self.items if i.key not in keys]
        gone = [i.key for i in self.items if i.key in keys]
        return Plan(kept, self.op, self.kind, self.marker, self.dropped + gone)

    def __repr__(self) -> str:
        return (
            f"<Plan {self.kind}: {len(self.items)} tensors, {self.paired} {self.op} base, "
            f"{self.copied} copied>"
        )


def plan_pairs(
    control: View,
    base: View | None,
    *,
    control_name: str = "control",
    base_name: str = "base",
) -> list[PlanItem]:
    """For every ControlNet tensor, its base counterpart (or None), by canonical name:
    ``control_model.X`` pairs with ``model.diffusion_model.X``, whatever the files'
    layouts.

    Raises :class:`CheckpointError` when ``control`` has no tensors and
    :class:`IncompatibleBaseError` when the base does not look like the UNet the control
    model was built on (a mirrored key without base tensor, or a shape mismatch).
    """
    base_map = base.by_canonical() if base is not None else {}
    items: list[PlanItem] = []
    missing: list[str] = []
    mismatched: list[str] = []
    mirrored = 0
    for file_key, canon, shape in control.entries:
        name = canon[len(CONTROL_PREFIX) :]
        is_mirrored = name.startswith(MIRRORED)
        mirrored += is_mirrored
        hit = base_map.get(UNET_PREFIX + name)
        if hit is not None:
            if hit[1] != shape:
                mismatched.append(f"{name} {list(shape)} vs {list(hit[1])}")
            items.append(PlanItem(canon, file_key, hit[0], shape))
        else:
            if is_mirrored:
                missing.append(name)
            items.append(PlanItem(canon, file_key, None, shape))
    if not items:
        raise CheckpointError(
            f"{control_name} has no {CONTROL_PREFIX}* keys: it is not a ControlNet checkpoint"
        )
    if missing or mismatched:
        matched = mirrored - len(missing) - len(mismatched)
        detail = (
            f"{len(missing)} have no UNet tensor (e.g. {escape(missing[0])})"
            if missing
            else f"{len(mismatched)} differ in shape (e.g. {escape(mismatched[0])})"
        )
        raise IncompatibleBaseError(
            f"{base_name} does not match the UNet {control_name} was built on: only {matched} "
            f"of {mirrored} UNet keys match; {detail}. Use the SD base the ControlNet was "
            "trained from (SD1.5 for control_sd15_*, SDXL for *_sdxl_*), or --base self"
        )
    return items


def _pairs(inputs: Inputs) -> list[PlanItem]:
    return plan_pairs(
        inputs.control_view,
        inputs.base_view,
        control_name=escape(inputs.control.path.name),
        base_name=inputs.base_name,
    )


def plan_extract(inputs: Inputs) -> Plan:
    """A difference model: ``control - base`` for every paired tensor, the ControlNet's
    own tensors as they are, and the ``difference`` marker."""
    return Plan(_pairs(inputs), "sub", "difference", DIFFERENCE_KEY)


def plan_apply(inputs: Inputs) -> Plan:
    """A standalone ControlNet from a difference model: ``diff + base`` for every paired
    tensor, the rest as it is, no marker (the diff's own marker is not a tensor to keep)."""
    items = [i for i in _pairs(inputs) if i.key != DIFFERENCE_KEY]
    return Plan(items, "add", "standalone", None)


def plan_prune(inputs: Inputs) -> Plan:
    """A pruned ControlNet: its own tensors, named as in the file (``control_model.*``, or
    the diffusers names), everything else left out."""
    items = [PlanItem(k, k, None, shape) for k, _, shape in inputs.control_view.entries]
    return Plan(items, "copy", "pruned", None)


def plan_convert(inputs: Inputs, to: str) -> tuple[Plan, layouts.UNetConfig]:
    """A ControlNet in the other layout: ``to="diffusers"`` (from ldm; the keys and order
    of diffusers' ``ControlNetModel``) or ``to="ldm"`` (from diffusers; ``control_model.*``
    in ldm order). Returns the plan and the architecture (for diffusers' ``config.json``).

    Raises :class:`CheckpointError` when the file is already in that layout, or when its
    keys do not fit a layout :mod:`cndiff.layouts` derives.
    """
    view = inputs.control_view
    name = escape(inputs.control.path.name)
    if view.layout == to:
        raise CheckpointError(f"{name} is already in the {to} layout; nothing to convert")
    config = view.config
    if config is None:
        try:
            found = layouts.infer({k: t.shape for k, t in inputs.control.tensors.items()},
                                  "controlnet")  # fmt: skip
        except layouts.LayoutError as exc:
            raise CheckpointError(f"{name}: its ControlNet does not fit a layout cndiff can "
                                  f"convert ({escape(str(exc), 300)})") from None  # fmt: skip
        if found is None:
            raise CheckpointError(f"{name} holds no ControlNet cndiff can convert")
        config = found.config
    by_canonical = view.by_canonical()
    if to == "diffusers":
        items = [PlanItem(p.diffusers, by_canonical[CONTROL_PREFIX + p.ldm][0], None, p.shape)
                 for p in layouts.controlnet_pairs(config)]  # fmt: skip
    else:
        items = [PlanItem(CONTROL_PREFIX + e.key, by_canonical[CONTROL_PREFIX + e.key][0], None,
                          e.shape) for e in layouts.ldm_controlnet(config)]  # fmt: skip
    return Plan(items, "copy", to, None), config
