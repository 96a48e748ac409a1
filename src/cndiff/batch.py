"""Batch conversion: many ControlNets against one base, the base read once.

All outputs are produced together: the engine walks the tensor positions once, reads
each base chunk once, then the matching chunk of every control file, and appends each
difference to its own output stream. Memory stays bounded by the chunks in flight.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from .api import (
    DEFAULT_CHUNK_MB,
    ExtractResult,
    _execute,
    _Job,
    _prepare,
    _Skip,
)
from .dtypes import output_dtype
from .engine import resolve_device
from .errors import CndiffError
from .inputs import open_checkpoint
from .keys import CONTROL_PREFIX
from .progress import progress_bar

__all__ = ["ModelStatus", "find_controls", "extract_many", "format_summary", "summary_json"]

log = logging.getLogger("cndiff")

CHECKPOINT_SUFFIXES = (".pth", ".ckpt", ".pt", ".safetensors")


@dataclass
class ModelStatus:
    """The outcome for one file of a batch.

    ``status`` is ``"written"``, ``"skipped"`` (complete output already there, or not a
    ControlNet checkpoint: see ``reason``) or ``"failed"`` (``reason`` says why).
    ``sha256`` is the output's, computed while it was written (None when not written).
    """

    control: Path
    status: str
    output: Path | None = None
    reason: str = ""
    bytes: int = 0
    seconds: float = 0.0
    sha256: str | None = None
    result: ExtractResult | None = None

    @property
    def short_hash(self) -> str:
        """The first 10 hex digits of sha256, as model sites show it."""
        return self.sha256[:10] if self.sha256 else ""


def find_controls(folder: str | os.PathLike[str]) -> tuple[list[Path], list[ModelStatus]]:
    """The ControlNet checkpoints in ``folder`` (files holding ``control_model.*``), and
    the other checkpoint-like files as skipped entries with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CndiffError(f"{folder} is not a folder; name the folder holding the models")
    controls: list[Path] = []
    skipped: list[ModelStatus] = []
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.suffix not in CHECKPOINT_SUFFIXES or p.name.startswith("."):
            continue
        try:
            with open_checkpoint(p) as ck:
                keys = ck.tensors
                if any(k.startswith(CONTROL_PREFIX) for k in keys):
                    controls.append(p)
                    continue
                kind = "difference model" if "difference" in keys else "no control_model.* keys"
        except CndiffError as exc:
            kind = f"unreadable: {exc}"
        skipped.append(ModelStatus(p, "skipped", reason=f"not a ControlNet checkpoint ({kind})"))
    return controls, skipped


def extract_many(
    controls: list[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
    drop_unchanged: bool = False,
    chunk_mb: float = DEFAULT_CHUNK_MB,
    workers: int | None = None,
    hash: bool = True,
    hash_inputs: bool = False,
    check_base: bool = True,
    format: str = "difference",
    rank: int | None = None,
    max_error: float | None = None,
    stability_compatible: bool = False,
    svd: str = "auto",
    progress: bool = False,
) -> list[ModelStatus]:
    """Convert several ControlNet checkpoints against one base, reading the base once.

    Each output is named as :func:`cndiff.extract` names it, in ``out_dir`` (default:
    beside each control file). A complete existing output is skipped unless
    ``overwrite``; leftover temporary files of interrupted runs are removed. One bad
    model does not stop the others: it is reported as ``"failed"`` and leaves no file.
    ``base`` may be ``"self"`` (each control's embedded UNet). Returns one
    :class:`ModelStatus` per control, in the order given.
    """
    t0 = time.perf_counter()
    dt = output_dtype(dtype)
    dev = resolve_device(device)
    if out_dir is not None and not Path(out_dir).is_dir():
        raise CndiffError(f"output folder {out_dir} does not exist; create it first")
    if format == "control-lora":
        lora = {"rank": rank, "max_error": max_error, "svd": svd,
                "stability_compatible": stability_compatible}  # fmt: skip
        return [_lora_one(Path(c), base, out_dir, dtype, device, overwrite, lora, progress)
                for c in controls]  # fmt: skip
    statuses = {Path(c): ModelStatus(Path(c), "failed") for c in controls}
    with ExitStack() as stack:
        shared = None
        if str(base) != "self":
            shared = open_checkpoint(base)
            stack.callback(shared.close)
        jobs: list[_Job] = []
        for c in controls:
            st = statuses[Path(c)]
            try:
                job = _prepare(Path(c), shared if shared is not None else "self", out_dir,
                               dt, overwrite, stack, skip_complete=True)  # fmt: skip
            except _Skip as skip:
                st.status, st.output = "skipped", skip.target
                st.reason = "complete output exists (--overwrite to redo)"
                st.bytes = skip.target.stat().st_size
                log.info("%s: skipped, %s exists", Path(c).name, skip.target.name)
                continue
            except CndiffError as exc:
                st.reason = str(exc)
                log.warning("%s: failed: %s", Path(c).name, exc)
                continue
            jobs.append(job)
        if jobs:
            with progress_bar(len(jobs), "models", progress and len(jobs) > 1, unit="model") as bar:

                def on_result(job: _Job) -> None:
                    bar.update(1)

                _execute(jobs, dt, dev, drop_unchanged, chunk_mb, workers, hash, progress, t0,
                         isolate=True, on_result=on_result, check_base=check_base,
                         hash_inputs=hash_inputs)  # fmt: skip
        for job in jobs:
            st = statuses[job.control_path]
            if job.result is not None and job.error is None:
                r = job.result
                st.status, st.output, st.result = "written", r.output, r
                st.bytes, st.seconds, st.sha256 = r.bytes, r.seconds, r.sha256
            else:
                st.reason = str(job.error) if job.error else "unknown error"
                log.warning("%s: failed: %s", job.control_path.name, st.reason)
    return [statuses[Path(c)] for c in controls]


def _lora_one(control: Path, base, out_dir, dtype, device, overwrite, lora, progress):
    """One model of a Control-LoRA batch (each reads the base: SVDs dominate the time)."""
    from .api import extract

    st = ModelStatus(control, "failed")
    try:
        r = extract(control, base, out_dir, dtype=dtype, device=device, overwrite=overwrite,
                    format="control-lora", progress=progress, **lora)  # fmt: skip
    except CndiffError as exc:
        st.reason = str(exc)
        log.warning("%s: failed: %s", control.name, exc)
        return st
    st.status, st.output, st.bytes, st.seconds = "written", r.output, r.bytes, r.seconds
    st.reason = f"relative error {r.overall_rel_error:.4f}"
    return st


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n else "-"


def format_summary(results: list[ModelStatus]) -> str:
    """A plain-text table: model, status, output size, seconds, sha256 (short and full)."""
    rows = [("model", "status", "size", "seconds", "sha256")]
    for r in results:
        status = r.status if not r.reason or r.status == "written" else f"{r.status}: {r.reason}"
        secs = f"{r.seconds:.1f}" if r.status == "written" else "-"
        sha = f"{r.short_hash}  {r.sha256}" if r.sha256 else "-"
        rows.append((r.control.name, status, _size(r.bytes), secs, sha))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) if i != 2 else row[i].rjust(widths[i]) for i in range(4)]
        lines.append("  ".join(cells + [row[4]]).rstrip())
    n_ok = sum(r.status == "written" for r in results)
    n_skip = sum(r.status == "skipped" for r in results)
    n_fail = sum(r.status == "failed" for r in results)
    lines.append(f"{n_ok} written, {n_skip} skipped, {n_fail} failed")
    return "\n".join(lines)


def summary_json(results: list[ModelStatus]) -> list[dict]:
    """The summary as JSON-ready dicts (for ``--json``)."""
    return [
        {
            "model": str(r.control),
            "status": r.status,
            "reason": r.reason,
            "output": str(r.output) if r.output else None,
            "bytes": r.bytes,
            "seconds": round(r.seconds, 3),
            "sha256": r.sha256,
            "sha256_short": r.short_hash or None,
        }
        for r in results
    ]
