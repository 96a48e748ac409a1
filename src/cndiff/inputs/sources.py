"""Open the inputs of a job: the ControlNet (or a difference model), and its base.

This is the one place that opens a command's files, checks that each is what the command
needs (say what it is otherwise), and resolves ``base="self"`` to the SD UNet copy an
original ControlNet embeds.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CndiffError, WrongKindError
from ..text import escape
from .checkpoint import Checkpoint, open_checkpoint
from .classify import (
    CONTROL_PREFIX,
    DIFFERENCE_KEY,
    UNET_PREFIX,
    FileKind,
    classify,
)

__all__ = [
    "Inputs",
    "Role",
    "open_inputs",
    "open_input",
    "check_role",
    "check_base_kind",
    "unet_prefix",
    "SELF",
]

#: the base name that means "the UNet copy embedded in the control file"
SELF = "self"

#: what a command needs its first file to be
Role = str  # "control" (an original/pruned ControlNet), "difference" (a difference model)

MIRRORED = ("time_embed.", "input_blocks.", "middle_block.", "label_emb.")


@dataclass
class Inputs:
    """The open files of one job. ``control`` is the ControlNet (for ``apply``: the
    difference model); ``base`` the SD checkpoint, or ``control`` itself when
    ``base_is_self``; ``base_prefix`` where the base keeps its UNet keys."""

    control: Checkpoint
    kind: FileKind
    base: Checkpoint | None = None
    base_is_self: bool = False
    base_prefix: str = UNET_PREFIX
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def base_name(self) -> str:
        """How messages name the base: its file name, or ``the embedded UNet``."""
        if self.base is None:
            return "no base"
        return "the embedded UNet" if self.base_is_self else escape(self.base.path.name)

    @property
    def files(self) -> list[Path]:
        """The input files (for checks that an output is none of them)."""
        out = [self.control.path]
        if self.base is not None and not self.base_is_self:
            out.append(self.base.path)
        return out

    @property
    def has_embedded_unet(self) -> bool:
        """The control file carries an SD UNet copy (original ControlNet 1.0 files do)."""
        return any(k.startswith(UNET_PREFIX) for k in self.control.tensors)

    def check_unchanged(self) -> None:
        """Raise when an input changed on disk while it was read."""
        self.control.check_unchanged()
        if self.base is not None and not self.base_is_self:
            self.base.check_unchanged()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Inputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        base = "self" if self.base_is_self else self.base_name
        return f"<Inputs {escape(self.control.path.name)!r} + {base!r}>"


def unet_prefix(keys) -> str:
    """Where a checkpoint keeps its UNet: ``model.diffusion_model.`` in full SD checkpoints,
    ``""`` in UNet-only files (keys such as ``input_blocks.0.0.weight``)."""
    if any(k.startswith(UNET_PREFIX) for k in keys):
        return UNET_PREFIX
    if any(k.startswith(MIRRORED) for k in keys):
        return ""
    return UNET_PREFIX


def _what_instead(name: str, kind: FileKind, role: Role) -> str:
    if kind.kind == "difference" and role == "control":
        return (
            f"{name} is a difference model (it has the '{DIFFERENCE_KEY}' marker), not a "
            f"ControlNet to extract from: use 'cndiff apply {name} BASE' to bake it into "
            f"a standalone ControlNet, or 'cndiff verify {name} --control ORIGINAL "
            "--base BASE' to check it"
        )
    if kind.kind == "control-lora":
        return (
            f"{name} is a Control-LoRA, not a ControlNet to extract from: loaders take it "
            f"as it is; 'cndiff verify {name} --control ORIGINAL --base BASE' checks it"
        )
    if kind.kind == "sd-checkpoint":
        return (
            f"{name} is a Stable Diffusion checkpoint without ControlNet weights: name it "
            "as the base, once"
        )
    if kind.kind == "diffusers-controlnet":
        return f"{name} is a ControlNet in the diffusers layout, which is not supported yet"
    if role == "difference":
        return (
            f"{name} is a {kind.description}, not a difference model (no "
            f"'{DIFFERENCE_KEY}' marker): its weights are already standalone; nothing to "
            "apply"
        )
    return f"{name} has no {CONTROL_PREFIX}* keys: it is not a ControlNet checkpoint"


def check_role(ckpt: Checkpoint, role: Role) -> FileKind:
    """The file's kind, or a :class:`CheckpointError` when it is not what ``role`` needs."""
    kind = classify(ckpt.tensors)
    name = escape(ckpt.path.name)
    ok = kind.is_control if role == "control" else kind.kind == "difference"
    if role == "difference" and kind.kind == "difference":
        ok = any(k.startswith(CONTROL_PREFIX) for k in ckpt.tensors)
    if not ok:
        raise WrongKindError(_what_instead(name, kind, role), kind.kind)
    return kind


_NOT_A_BASE = ("difference", "control-lora", "pruned-controlnet")


def check_base_kind(base: Checkpoint) -> None:
    """Refuse a base that is a ControlNet or an adapter rather than an SD model."""
    kind = classify(base.tensors)
    if kind.kind in _NOT_A_BASE:
        raise WrongKindError(
            f"the base {escape(base.path.name)} is a {kind.description}, not a Stable "
            "Diffusion checkpoint: name the SD model the ControlNet was built on",
            kind.kind,
        )


def open_input(path: str | os.PathLike[str], role: Role = "control") -> tuple[Checkpoint, FileKind]:
    """Open one file and check it is what ``role`` needs; close it on refusal."""
    ckpt = open_checkpoint(path)
    try:
        return ckpt, check_role(ckpt, role)
    except BaseException:
        ckpt.close()
        raise


def open_inputs(
    control: str | os.PathLike[str] | tuple[Checkpoint, FileKind],
    base: str | os.PathLike[str] | Checkpoint | None,
    *,
    role: Role = "control",
) -> Inputs:
    """Open a job's files: ``control`` checked for ``role``, and ``base`` (a path, an
    already open checkpoint shared by a batch, ``"self"``, or None for no base).

    Raises :class:`CheckpointError` (a file is missing, corrupt, or not what the command
    needs: the message says what it is and what to use instead).
    """
    stack = ExitStack()
    try:
        if isinstance(control, tuple):
            ckpt, kind = control
        else:
            ckpt, kind = open_input(control, role)
            stack.callback(ckpt.close)
        inputs = Inputs(ckpt, kind, _stack=stack)
        if base is None:
            return inputs
        if isinstance(base, Checkpoint):
            inputs.base, inputs.base_prefix = base, unet_prefix(base.tensors)
        elif os.fspath(base) == SELF:
            if not inputs.has_embedded_unet:
                raise CndiffError(
                    f"--base self: {escape(ckpt.path.name)} has no embedded SD UNet "
                    f"({UNET_PREFIX}*); pass the SD base checkpoint instead"
                )
            inputs.base, inputs.base_is_self, inputs.base_prefix = ckpt, True, UNET_PREFIX
        else:
            b = open_checkpoint(base)
            stack.callback(b.close)
            check_base_kind(b)
            inputs.base, inputs.base_prefix = b, unet_prefix(b.tensors)
        return inputs
    except BaseException:
        stack.close()
        raise
