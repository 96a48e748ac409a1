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
from .checkpoint import Checkpoint
from .classify import (
    CONTROL_PREFIX,
    DIFFERENCE_KEY,
    UNET_PREFIX,
    FileKind,
    classify,
)
from .opening import open_checkpoint
from .views import View, control_view, unet_view

__all__ = [
    "Inputs",
    "Role",
    "open_inputs",
    "open_input",
    "check_role",
    "check_base_kind",
    "SELF",
    "model_file",
    "model_folder",
    "model_stem",
]

#: the base name that means "the UNet copy embedded in the control file"
SELF = "self"

#: what a command needs its first file to be: "control" (a ControlNet, any layout),
#: "convert" (the same, for convert), "difference" (a difference model)
Role = str

#: ControlNet modules that mirror the UNet: every key under them must find a base tensor
MIRRORED = ("time_embed.", "input_blocks.", "middle_block.", "label_emb.")


@dataclass
class Inputs:
    """The open files of one job. ``control`` is the ControlNet (for ``apply``: the
    difference model); ``base`` the SD checkpoint, or ``control`` itself when
    ``base_is_self``. ``control_view`` and ``base_view`` map their keys onto the
    canonical ldm names, whatever the files' layouts."""

    control: Checkpoint
    kind: FileKind
    base: Checkpoint | None = None
    base_is_self: bool = False
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _views: dict[str, View | None] = field(default_factory=dict, repr=False)

    @property
    def control_view(self) -> View:
        """The control file's ControlNet, keys mapped to ``control_model.X``."""
        if "control" not in self._views:
            self._views["control"] = control_view(self.control.tensors,
                                                  escape(self.control.path.name))  # fmt: skip
        view = self._views["control"]
        if view is None:
            raise WrongKindError(
                f"{escape(self.control.path.name)} has no {CONTROL_PREFIX}* keys: it is not a "
                "ControlNet checkpoint"
            )
        return view

    @property
    def base_view(self) -> View | None:
        """The base's UNet, keys mapped to ``model.diffusion_model.X`` (None: none found)."""
        if "base" not in self._views:
            b = self.base
            self._views["base"] = None if b is None else unet_view(b.tensors,
                                                                   escape(b.path.name))  # fmt: skip
        return self._views["base"]

    @property
    def base_name(self) -> str:
        """How messages name the base: its file name, or ``the embedded UNet``."""
        if self.base is None:
            return "no base"
        return "the embedded UNet" if self.base_is_self else escape(self.base.path.name)

    @property
    def name(self) -> str:
        """How messages name the model (a diffusers model: its folder), escaped."""
        folder = model_folder(self.control.path)
        return escape(folder.name if folder is not None else self.control.path.name)

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


def _what_instead(name: str, kind: FileKind, role: Role) -> str:
    if kind.kind in ("difference", "control-lora") and role == "convert":
        return (
            f"{name} is a {kind.description}: in the diffusers layout no loader would add a "
            "UNet back to it; bake it into a standalone ControlNet first ('cndiff apply "
            f"{name} BASE'), then convert that"
        )
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
    ok = kind.is_control if role in ("control", "convert") else kind.kind == "difference"
    if role == "difference" and kind.kind == "difference":
        ok = any(k.startswith(CONTROL_PREFIX) for k in ckpt.tensors)
    if not ok:
        raise WrongKindError(_what_instead(name, kind, role), kind.kind)
    return kind


_NOT_A_BASE = ("difference", "control-lora", "pruned-controlnet", "diffusers-controlnet")


def check_base_kind(base: Checkpoint) -> None:
    """Refuse a base that is a ControlNet or an adapter rather than an SD model."""
    kind = classify(base.tensors)
    if kind.kind in _NOT_A_BASE:
        raise WrongKindError(
            f"the base {escape(base.path.name)} is a {kind.description}, not a Stable "
            "Diffusion checkpoint: name the SD model the ControlNet was built on",
            kind.kind,
        )


#: the weights file of a diffusers model folder, in the order diffusers looks for them
DIFFUSERS_WEIGHTS = tuple(
    f"diffusion_pytorch_model{variant}.{ext}"
    for ext in ("safetensors", "bin")
    for variant in ("", ".fp16")
)


def model_file(path: str | os.PathLike[str], role: Role = "control") -> Path:
    """``path``, or for a diffusers model folder its weights file: a ControlNet folder
    (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``), or for a base a
    pipeline folder's ``unet/``. Other paths are returned as they are (opening them says
    what is wrong)."""
    p = Path(path)
    try:
        is_dir = p.is_dir()
    except (OSError, ValueError):
        return p
    if not is_dir:
        return p
    folders = [p, p / "unet"] if role == "base" else [p, p / "controlnet"]
    for folder in folders:
        for name in DIFFUSERS_WEIGHTS:
            if (folder / name).is_file():
                return folder / name
    return p


def model_folder(path: Path) -> Path | None:
    """The diffusers model folder a weights file (``diffusion_pytorch_model*``) belongs to:
    its folder, or the pipeline folder above ``controlnet/`` or ``unet/``; None for other
    files."""
    if not path.name.startswith("diffusion_pytorch_model"):
        return None
    folder = path.absolute().parent
    if folder.name in ("controlnet", "unet") and folder.parent.name:
        folder = folder.parent
    return folder


def model_stem(path: Path) -> str:
    """How outputs and messages name a model: the file's stem, or a diffusers model's
    folder name."""
    folder = model_folder(path)
    return folder.name if folder is not None and folder.name else path.stem


def open_input(path: str | os.PathLike[str], role: Role = "control") -> tuple[Checkpoint, FileKind]:
    """Open one file (or diffusers model folder) and check it is what ``role`` needs; close
    it on refusal."""
    ckpt = open_checkpoint(model_file(path, role))
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
            inputs.base = base
        elif os.fspath(base) == SELF:
            if not inputs.has_embedded_unet:
                raise CndiffError(
                    f"--base self: {escape(ckpt.path.name)} has no embedded SD UNet "
                    f"({UNET_PREFIX}*); pass the SD base checkpoint instead"
                )
            inputs.base, inputs.base_is_self = ckpt, True
        else:
            b = open_checkpoint(model_file(base, "base"))
            stack.callback(b.close)
            check_base_kind(b)
            inputs.base = b
        return inputs
    except BaseException:
        stack.close()
        raise
