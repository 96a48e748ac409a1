"""Where outputs go: default names, ``-o``, and what to do with an existing file.

One place decides every output path, for every command:

* the default name of each kind of output (:func:`default_name`);
* ``-o``: a file, or a folder (an existing one, a path ending in a separator, or any
  ``-o`` of a run with several models: created when missing);
* checks before any work: not a folder or a device, not one of the inputs, a name the
  file system can hold; leftover temporary files of killed runs removed;
* an existing output: replaced with ``overwrite``; otherwise skipped when it is a
  complete output of the same job (the job record in its metadata matches), refused
  when it is anything else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .dtypes import short_name
from .errors import CndiffError, OutputError, OutputExistsError
from .inputs import open_checkpoint
from .inputs.sources import model_folder, model_stem
from .options import Options
from .text import escape_path
from .writer import check_writable_name, refuse_special, remove_stale_temp_files

__all__ = [
    "default_name",
    "default_dir",
    "output_path", "prepare_target", "Skip", "existing_job", "JOB_KEY"]

#: the metadata key holding the job record (see :func:`cndiff.provenance.job_record`)
JOB_KEY = "cndiff.job"

_DTYPE_TAGS = ("_fp16", "_bf16", "_fp32")


class Skip(Exception):
    """The target is a complete output of the same job: nothing to do."""

    def __init__(self, target: Path) -> None:
        super().__init__(str(target))
        self.target = target


def default_dir(source: Path) -> Path:
    """Where outputs go by default: beside the model (a diffusers folder's parent)."""
    folder = model_folder(source)
    return folder.parent if folder is not None else source.parent


def default_name(kind: str, source: Path, options: Options, base: Path | None = None) -> str:
    """The file name of an output of ``kind``:

    * ``difference``: ``diff_<control>_<dtype>.safetensors`` (the name sd-webui-controlnet
      users know);
    * ``control-lora``: ``control_lora_rank<N>_<control>_<dtype>.safetensors``
      (``maxerr<E>`` instead of ``rank<N>`` with ``max_error``);
    * ``standalone``: ``<control>_<base>_<dtype>.safetensors`` (``apply``; the diff's
      ``diff_`` prefix and dtype tag dropped);
    * ``pruned``: ``<control>_<dtype>.safetensors``; for a diffusers weights file the
      diffusers variant beside it, ``diffusion_pytorch_model.<dtype>.safetensors``;
    * ``ldm``: ``<control>_<dtype>.safetensors`` (a diffusers ControlNet converted);
    * ``diffusers``: the folder ``<control>_diffusers``.

    ``<control>`` is the file's stem, or a diffusers model's folder name.
    """
    dt = short_name(options.out_dtype)
    stem = model_stem(source)
    if kind == "difference":
        return f"diff_{stem}_{dt}.safetensors"
    if kind == "control-lora":
        tag = (f"maxerr{options.max_error:g}" if options.max_error is not None
               else f"rank{options.lora_rank}")  # fmt: skip
        return f"control_lora_{tag}_{stem}_{dt}.safetensors"
    if kind == "standalone":
        stem = stem.removeprefix("diff_")
        for tag in _DTYPE_TAGS:
            stem = stem.removesuffix(tag)
        assert base is not None
        return f"{stem}_{model_stem(base)}_{dt}.safetensors"
    if kind == "pruned" and model_folder(source) is not None:
        return f"diffusion_pytorch_model.{dt}.safetensors"
    if kind in ("pruned", "ldm"):
        return f"{stem}_{dt}.safetensors"
    if kind == "diffusers":
        return f"{stem}_diffusers"
    raise ValueError(kind)


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, a NUL...
        return False


def _is_folder_spec(out: str | os.PathLike[str]) -> bool:
    text = os.fspath(out)
    return text.endswith(("/", os.sep)) or _is_dir(Path(text))


def output_path(
    source: Path, out: str | os.PathLike[str] | None, name: str, *, many: bool = False
) -> Path:
    """Where an output named ``name`` goes: beside ``source`` (no ``out``), in folder
    ``out`` (an existing folder, a path ending in a separator, or any ``out`` when the run
    has several models: ``many``; created when missing), or at ``out`` itself."""
    if out is None:
        return default_dir(source) / name
    o = Path(out)
    if many or _is_folder_spec(out):
        if os.path.lexists(o) and not _is_dir(o):
            raise OutputError(
                f"-o {escape_path(o)} is a file; with several models -o must be a folder"
                if many
                else f"-o {escape_path(o)} is not a folder"
            )
        try:
            o.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {escape_path(o)} "
                              f"({exc.strerror}): choose another -o") from None  # fmt: skip
        return o / name
    check_writable_name(o)
    if not _is_dir(o.parent):
        raise OutputError(
            f"folder {escape_path(o.parent)} does not exist; create it, end -o with a / to "
            "name a folder to create, or choose another -o"
        )
    return o


def existing_job(path: Path) -> dict | None:
    """The job record of a complete cndiff output at ``path`` (its safetensors header
    parses, the file is exactly as long as the header says), or None."""
    try:
        with open_checkpoint(path) as ck:
            if ck.format != "safetensors":
                return None
            end = max((t.offset + t.nbytes for t in ck.tensors.values()), default=0)
            if end != ck.size:
                return None
            record = ck.metadata.get(JOB_KEY)
    except CndiffError:
        return None
    if record is None:
        return None
    try:
        job = json.loads(record)
    except ValueError:
        return None
    return job if isinstance(job, dict) else None


def prepare_target(
    target: Path, inputs: list[Path], record: dict, *, overwrite: bool
) -> Path:
    """Check an output path before any work (see the module documentation). Raises
    :class:`Skip` when it holds a complete output of the same job (``record``) and
    ``overwrite`` is off, :class:`OutputExistsError` when it holds anything else."""
    check_writable_name(target)
    refuse_special(target)
    if target.exists():
        for src in inputs:
            try:
                same = os.path.samefile(target, src)
            except OSError:
                same = False
            if same:
                raise OutputError(
                    f"output {escape_path(target)} is the input {escape_path(src.name)}; "
                    "choose another -o"
                )
    remove_stale_temp_files(target)
    if target.exists() and not overwrite:
        job = existing_job(target)
        if job == record:
            raise Skip(target)
        what = (
            "from a different job" if job is not None else "and is not a complete cndiff output"
        )
        raise OutputExistsError(f"{escape_path(target)} exists {what}; --overwrite replaces it")
    return target
