"""The Control-LoRA format: which tensors a file holds, and how loaders rebuild weights.

A Control-LoRA (the format of Stability AI's ``control-lora-*-rank128.safetensors``) is a
flat safetensors file that ComfyUI, sd-webui-controlnet and Forge load on top of the
user's own UNet. Every Linear/Conv2d weight ``W`` of the ControlNet that the UNet also
has is stored as two factors, and the loaders rebuild it as::

    W = W_unet + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)      # no alpha, no scale

with ``up`` of shape ``(out, r)`` and ``down`` of shape ``(r, in)`` for a Linear layer,
``(out, r, 1, 1)`` and ``(r, in, kh, kw)`` for a convolution. Everything else is stored
as the ControlNet's own (absolute) values, cast to the output dtype: every bias, every
norm weight and bias, and the ControlNet-only modules (``input_hint_block``,
``zero_convs``, ``middle_block_out``); the loaders load those as they are. Keys have no
``control_model.`` prefix, and an empty float32 tensor ``lora_controlnet`` marks the file.

Layout rules (:func:`lora_layout`, from key names and shapes only):

* ``rank=N``: every factorizable weight at rank ``min(N, out, in*kh*kw)``; where the
  factors would not be smaller than the weight (``r * (out + in*kh*kw) >= out *
  in*kh*kw``) the full weight is stored instead;
* ``max_error=E``: the rank per layer is chosen from its singular values (see
  :mod:`cndiff.commands.lora`), same fallback;
* ``stability_compatible``: what Stability's export node wrote for the public files:
  rank ``min(N, out, in_channels)`` always as factors (for SD1.5 at rank 128: 463 keys,
  67,835,680 parameters; for SDXL: 1228 keys).

The export itself (the SVDs and the writing) is :mod:`cndiff.commands.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import CheckpointError, OptionError
from .inputs import Checkpoint
from .inputs.classify import CONTROL_PREFIX, LORA_MARKER
from .plan import PlanItem
from .text import escape

__all__ = [
    "MARKER_KEY",
    "STABILITY_CLAMP_QUANTILE",
    "LoraEntry",
    "lora_layout",
    "layout_counts",
    "choose_kind",
    "factorizable",
    "matrix_dims",
    "lora_weight",
]

#: the key that marks a Control-LoRA file (an empty float32 tensor)
MARKER_KEY = LORA_MARKER
#: Stability's export node clamps the factors at this quantile of their values
STABILITY_CLAMP_QUANTILE = 0.99


@dataclass(frozen=True)
class LoraEntry:
    """One ControlNet tensor in a Control-LoRA file.

    ``kind``: ``"lora"`` (a Linear/Conv2d weight stored as ``<module>.up`` and
    ``<module>.down`` of rank ``rank``), ``"weight"`` (such a weight stored in full because
    its factors would not be smaller) or ``"copy"`` (any other tensor, stored as it is).
    ``name`` is the output key (for ``"lora"``: the module, without ``.weight``).
    """

    name: str
    control_key: str
    base_key: str | None
    shape: tuple[int, ...]
    kind: Literal["lora", "weight", "copy"]
    rank: int | None = None
    #: the canonical ``control_model.X`` key (``control_key`` is the file's own)
    key: str = ""

    @property
    def outputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """The ``(key, shape)`` pairs this entry writes."""
        if self.kind != "lora":
            return [(self.name, self.shape)]
        assert self.rank is not None
        out, fan_in = self.shape[0], self.shape[1:]
        if len(self.shape) == 4:
            return [
                (self.name + ".up", (out, self.rank, 1, 1)),
                (self.name + ".down", (self.rank, *fan_in)),
            ]
        return [(self.name + ".up", (out, self.rank)), (self.name + ".down", (self.rank, *fan_in))]

    @property
    def params(self) -> int:
        """Number of elements written for this entry."""
        return sum(math.prod(s) for _, s in self.outputs)

    def with_kind(self, kind: Literal["lora", "weight"], rank: int) -> LoraEntry:
        """The entry stored as ``kind`` at ``rank`` (its output name follows the kind)."""
        name = (self.key or self.control_key)[len(CONTROL_PREFIX) :]
        if kind == "lora":
            name = name.removesuffix(".weight")
        return LoraEntry(name, self.control_key, self.base_key, self.shape, kind, rank,
                         self.key)  # fmt: skip


def factorizable(key: str, shape: tuple[int, ...], base_key: str | None) -> bool:
    """A Linear (2-D) or Conv2d (4-D) weight that the UNet also has."""
    return base_key is not None and key.endswith(".weight") and len(shape) in (2, 4)


def matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in * kh * kw): the matrix the factors approximate."""
    return shape[0], math.prod(shape[1:])


def choose_kind(
    shape: tuple[int, ...], rank: int, stability_compatible: bool
) -> tuple[Literal["lora", "weight"], int]:
    """How a factorizable weight of ``shape`` is stored at (at most) ``rank``."""
    m, n = matrix_dims(shape)
    if stability_compatible:
        # Stability's node: rank min(N, out, in_channels), always as factors.
        return "lora", max(1, min(rank, shape[0], shape[1]))
    r = max(1, min(rank, m, n))
    if r * (m + n) >= m * n:
        return "weight", min(m, n)
    return "lora", r


def lora_layout(
    items: Sequence[PlanItem],
    *,
    rank: int = 128,
    ranks: Mapping[str, int] | None = None,
    stability_compatible: bool = False,
) -> list[LoraEntry]:
    """The Control-LoRA layout of a ControlNet, from its plan (key names and shapes only:
    the layout of a full-size model is known without reading any data; see
    :func:`cndiff.plan.plan_pairs`). ``ranks`` gives a rank per control key (overriding
    ``rank``), e.g. as chosen by ``max_error``.
    """
    if rank < 1:
        raise OptionError(f"rank must be at least 1, not {rank}")
    entries: list[LoraEntry] = []
    for item in items:
        name = item.key[len(CONTROL_PREFIX) :]
        entry = LoraEntry(name, item.control_key, item.base_key, item.shape, "copy", key=item.key)
        if factorizable(item.key, item.shape, item.base_key):
            r = ranks.get(item.key, rank) if ranks is not None else rank
            entry = entry.with_kind(*choose_kind(item.shape, r, stability_compatible))
        entries.append(entry)
    return entries


def layout_counts(layout: Sequence[LoraEntry]) -> tuple[int, int]:
    """``(keys, parameters)`` of the file a layout describes, the marker key included."""
    keys = sum(len(e.outputs) for e in layout) + 1
    return keys, sum(e.params for e in layout)


def _f32(ck: Checkpoint, key: str) -> np.ndarray:
    from .backends import Raw
    from .backends.numpy_backend import to_float32

    info = ck.info(key)
    raw = ck.read(key).reshape(-1)
    out = np.empty(raw.size, np.float32)
    return to_float32(Raw(raw, info.dtype), out).reshape(info.shape)


def lora_weight(lora: Checkpoint, base: Checkpoint, item: PlanItem) -> np.ndarray:
    """Rebuild one ControlNet weight (plan ``item``) from a Control-LoRA as the loaders do,
    in float32: ``W_base + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`` when the
    file has factors for the module, the file's tensor when it has the key itself, and the
    base's tensor otherwise (what ComfyUI and sd-webui-controlnet then use). Raises
    :class:`CheckpointError` when the factors do not fit the weight.
    """
    name = item.key.removeprefix(CONTROL_PREFIX)
    if name in lora.tensors:
        return _f32(lora, name)
    if item.base_key is None:
        raise CheckpointError(f"neither the Control-LoRA nor the base has {escape(name)!r}")
    w = _f32(base, item.base_key)
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module + ".up" in lora.tensors:
        if module + ".down" not in lora.tensors:
            raise CheckpointError(f"{escape(module)}.up has no .down factor")
        up_info, down_info = lora.info(module + ".up"), lora.info(module + ".down")
        if len(up_info.shape) < 2 or len(down_info.shape) < 2:
            raise CheckpointError(
                f"{escape(module)}: factors must have 2 or more dimensions, not "
                f"{list(up_info.shape)} and {list(down_info.shape)}"
            )
        up = _f32(lora, module + ".up").reshape(up_info.shape[0], -1)
        down = _f32(lora, module + ".down").reshape(down_info.shape[0], -1)
        if up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != w.size:
            raise CheckpointError(
                f"{escape(module)}: factors {list(up_info.shape)} x {list(down_info.shape)} do "
                f"not make a {list(w.shape)} weight"
            )
        w = w + (up @ down).reshape(w.shape)
    return w
