"""cndiff's public functions: what a notebook or the command line calls."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import _version
from .checkpoint import Checkpoint, open_checkpoint
from .dtypes import OUTPUT_DTYPES, DType, by_name
from .engine import DEFAULT_CHUNK_MB, UNCHANGED_TOL, Stream, resolve_device, run_streams
from .errors import CndiffError, OutputError, OutputExistsError
from .keys import (
    DIFFERENCE_KEY,
    UNET_PREFIX,
    PlanItem,
    plan_diff,
    require_control_keys,
    unet_prefix,
)
from .writer import OutputEntry, SafetensorsWriter, remove_stale_temp_files

__all__ = ["ExtractResult", "extract", "default_output_name"]

log = logging.getLogger("cndiff")


@dataclass
class ExtractResult:
    """What :func:`extract` wrote.

    ``subtracted`` and ``copied`` count the ``control_model.*`` tensors stored as
    ``control - base`` and as they are; ``unchanged`` lists subtracted keys whose difference
    is below 1e-6 everywhere (kept as zeros, or dropped with ``drop_unchanged=True``, in
    which case they are also in ``dropped``).
    """

    output: Path
    keys_written: int
    subtracted: int
    copied: int
    dtype: str
    device: str
    bytes: int
    seconds: float
    unchanged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    sha256: str | None = None

    def __str__(self) -> str:
        return (
            f"{self.output}: {self.keys_written} tensors ({self.subtracted} subtracted, "
            f"{self.copied} copied), {self.dtype}, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.2f} s"
        )


def _out_dtype(dtype: str | DType) -> DType:
    if isinstance(dtype, DType):
        dt = dtype
    else:
        dt = OUTPUT_DTYPES.get(str(dtype).lower()) or by_name(dtype)
    if dt.name not in ("float16", "bfloat16", "float32"):
        raise CndiffError(f"output dtype must be fp16, bf16 or fp32, not {dtype!r}")
    return dt


_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def default_output_name(control: str | os.PathLike[str], dtype: str | DType = "fp16") -> str:
    """``diff_<control stem>_<dtype>.safetensors``, the name sd-webui-controlnet users know."""
    return f"diff_{Path(control).stem}_{_SHORT[_out_dtype(dtype).name]}.safetensors"


def resolve_output(
    control: str | os.PathLike[str], out: str | os.PathLike[str] | None, dtype: DType
) -> Path:
    """Where the output goes: beside the control file, in folder ``out``, or at ``out``."""
    name = default_output_name(control, dtype)
    if out is None:
        return Path(control).parent / name
    o = Path(out)
    if o.is_dir() or str(out).endswith(("/", os.sep)):
        if not o.exists():
            raise OutputError(f"output folder {o} does not exist; create it first")
        return o / name
    if not o.parent.exists():
        raise OutputError(f"folder {o.parent} does not exist; create it or choose another -o")
    return o


def open_base(base: str | os.PathLike[str], control: Checkpoint) -> tuple[Checkpoint, str]:
    """Open the base checkpoint, or use the control file's own UNet copy for ``"self"``.

    Returns the checkpoint and the prefix of its UNet keys.
    """
    if str(base) == "self":
        if not any(k.startswith(UNET_PREFIX) for k in control.tensors):
            raise CndiffError(
                f"--base self: {control.path.name} has no embedded SD UNet "
                "(model.diffusion_model.*); pass the SD base checkpoint instead"
            )
        return control, UNET_PREFIX
    ckpt = open_checkpoint(base)
    return ckpt, unet_prefix(ckpt.tensors)


def _metadata(
    control: Checkpoint, base: Checkpoint, base_is_self: bool, dt: DType, dropped: list[str]
) -> dict[str, str]:
    return {
        "format": "pt",
        "cndiff.version": _version.__version__,
        "cndiff.kind": "difference",
        "cndiff.control": control.path.name,
        "cndiff.control_size": str(control.size),
        "cndiff.base": "self" if base_is_self else base.path.name,
        "cndiff.base_size": "" if base_is_self else str(base.size),
        "cndiff.dtype": dt.name,
        "cndiff.dropped_keys": ",".join(dropped),
    }


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30.0,
        leave=False,
    )


def extract(
    control: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
    drop_unchanged: bool = False,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    hash: bool = False,
    progress: bool = False,
) -> ExtractResult:
    """Turn an original ControlNet checkpoint into a difference model.

    For every ``control_model.X`` tensor of ``control`` whose UNet counterpart
    ``model.diffusion_model.X`` exists in ``base``, the file stores ``control - base``
    (computed in float32, then rounded to ``dtype``); the ControlNet's own tensors
    (``input_hint_block``, ``zero_convs``, ``middle_block_out``) are stored as they are.
    A scalar ``difference`` = 1 marks the file, so sd-webui-controlnet and ComfyUI add
    the user's own UNet back when they load it. Everything else in ``control`` (the
    locked UNet copy, VAE, text encoder) is left out and never read.

    Args:
        control: an original ``control_sd15_*.pth`` (or ``.ckpt``/``.safetensors``).
        base: the SD checkpoint the ControlNet was built on (e.g. ``v1-5-pruned.ckpt``),
            ``.ckpt``/``.pth``/``.safetensors``; or ``"self"`` to use the SD UNet copy
            embedded in ``control`` itself (no base file needed).
        out: output file or existing folder; default: ``diff_<name>_<dtype>.safetensors``
            beside ``control``.
        dtype: ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        overwrite: replace an existing output (otherwise that is an error).
        drop_unchanged: leave out keys whose difference is below 1e-6 everywhere, as the
            original script does. Loaders then load those keys without the UNet added,
            which is wrong; by default they are kept (as zeros) and a warning names them.
        chunk_mb: float32 megabytes processed per chunk (bounds memory).
        workers: compute threads (default ``min(4, cpus)``).
        hash: compute the output's sha256 while writing (``result.sha256``).
        progress: show a tqdm progress bar on stderr.

    Returns:
        An :class:`ExtractResult` (output path, counts, bytes, seconds).

    Raises:
        CndiffError: missing or corrupt input, a control file without ``control_model.*``
            keys, a base that does not match, an existing output, a full disk... The
            message says what to do. No output file is left behind.
    """
    t0 = time.perf_counter()
    dt = _out_dtype(dtype)
    dev = resolve_device(device)
    ctl = open_checkpoint(control)
    try:
        require_control_keys(ctl.tensors, ctl.path.name)
        bse, prefix = open_base(base, ctl)
        try:
            return _extract(ctl, bse, prefix, out, dt, dev, overwrite, drop_unchanged,
                            chunk_mb, workers, hash, progress, t0)  # fmt: skip
        finally:
            if bse is not ctl:
                bse.close()
    finally:
        ctl.close()


def _extract(
    ctl: Checkpoint,
    bse: Checkpoint,
    prefix: str,
    out: str | os.PathLike[str] | None,
    dt: DType,
    dev: str,
    overwrite: bool,
    drop_unchanged: bool,
    chunk_mb: float,
    workers: int | None,
    hash: bool,
    progress: bool,
    t0: float,
) -> ExtractResult:
    base_is_self = bse is ctl
    plan = plan_diff(
        ctl.tensors,
        bse.tensors,
        control_name=ctl.path.name,
        base_name="the embedded UNet" if base_is_self else bse.path.name,
        base_prefix=prefix,
    )
    target = resolve_output(ctl.path, out, dt)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} exists; pass --overwrite to replace it")
    remove_stale_temp_files(target)
    total = sum(ctl.info(i.control_key).nbytes for i in plan)

    dropped: list[str] = []
    max_abs: dict[str, float] = {}
    if drop_unchanged:
        # The header comes first, so find the keys to drop before writing anything.
        subtracted = [i for i in plan if i.base_key is not None]
        probe = Stream(subtracted, ctl, bse, dt)
        bar = _progress(sum(ctl.info(i.control_key).nbytes for i in subtracted), "scan", progress)
        run_streams([probe], chunk_mb=chunk_mb, workers=workers, device=dev,
                    on_chunk=bar.update if bar else None)  # fmt: skip
        if bar:
            bar.close()
        max_abs = probe.max_abs
        dropped = [k for k, m in max_abs.items() if m < UNCHANGED_TOL]
        drop = set(dropped)
        plan = [i for i in plan if i.key not in drop]
        total = sum(ctl.info(i.control_key).nbytes for i in plan)

    entries = [OutputEntry(i.key, dt, i.shape) for i in plan]
    entries.append(OutputEntry(DIFFERENCE_KEY, dt, ()))
    meta = _metadata(ctl, bse, base_is_self, dt, dropped)
    bar = _progress(total, ctl.path.name, progress)
    with SafetensorsWriter(target, entries, meta, overwrite=overwrite, hash=hash) as w:

        def sink(item: PlanItem, data) -> None:
            w.write(data)

        stream = Stream(plan, ctl, bse, dt, sink)
        try:
            run_streams([stream], chunk_mb=chunk_mb, workers=workers, device=dev,
                        on_chunk=bar.update if bar else None)  # fmt: skip
        finally:
            if bar:
                bar.close()
        w.write(_difference_marker(dt))
        w.commit()
    if not drop_unchanged:
        max_abs = stream.max_abs
    unchanged = [k for k, m in max_abs.items() if m < UNCHANGED_TOL]
    if unchanged and not drop_unchanged:
        log.warning(
            "%d key(s) equal the base (max |control - base| < 1e-6), kept as zeros so loaders "
            "rebuild them correctly: %s",
            len(unchanged),
            ", ".join(unchanged),
        )
    elif dropped:
        log.warning("dropped %d unchanged key(s): %s", len(dropped), ", ".join(dropped))
    n_sub = sum(1 for i in plan if i.base_key is not None)
    return ExtractResult(
        output=target,
        keys_written=len(entries),
        subtracted=n_sub,
        copied=len(plan) - n_sub,
        dtype=dt.name,
        device=dev,
        bytes=w.size,
        seconds=time.perf_counter() - t0,
        unchanged=unchanged,
        dropped=dropped,
        sha256=w.sha256,
    )


def _difference_marker(dt: DType):
    import numpy as np

    from .engine import cast_from_float32

    one = np.ones(1, dtype=np.float32)
    out = np.empty(1, dtype=dt.numpy)
    cast_from_float32(one, dt, out, np.empty(1, dtype=np.uint32))
    return out
