"""``cndiff verify``: rebuild a converted model the way the loaders do and compare.

For a difference model with tensors of dtype D, every ``control_model.X`` is rebuilt
from the diff ``s`` and the base ``b`` three ways:

* ``comfyui``: ComfyUI's ``cd += base.to(cd.dtype)``: the base rounded to D, the sum
  computed in float32 and rounded to D;
* ``webui``: sd-webui-controlnet's ``p + unet`` with torch type promotion to
  P = promote(D, base dtype): the sum in float32, rounded to P;
* ``exact``: ``float32(s) + float32(b)`` in float32;

and compared with the original control tensor ``c`` (errors in float64). Keys the
ControlNet keeps as they are (no base counterpart) are compared directly.

The pass bound is derived per element, not a guessed constant. With ``h_T(x)`` half the
spacing of dtype T at ``|x|`` (the largest error of one rounding to T) and
``d = fl32(c - b)`` the difference extract computed:

* stored diff: ``|s - d| <= h_D(d)``; the subtraction itself: ``|d - (c-b)| <= h_32(d)``;
* ``exact``: ``|r - c| <= h_D(d) + h_32(d) + h_32(r)``;
* ``webui``: ``+ h_32(s+b) + h_P(r)``; ``comfyui``: ``+ h_D(b) + h_32(s+b) + h_D(r)``;
* copied keys: ``|s - c| <= h_D(c)``.

A model passes when every key is present with the right shape and every element of
every rebuild is within its bound. Control-LoRA files (lossy) are rebuilt as the loaders
do (``W_unet + up @ down``) and reported without a pass bound; they fail only on
structural errors (missing, extra or misshaped keys, non-finite values).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .api import open_base
from .dtypes import BF16, F16, F32, DType
from .engine import BaseMatchStats, compare_chunk, to_float32
from .errors import CheckpointError
from .fingerprint import BaseMatch, classify_base
from .inputs import Checkpoint, open_checkpoint
from .keys import CONTROL_PREFIX, DIFFERENCE_KEY, UNET_PREFIX, plan_diff, require_control_keys
from .progress import progress_bar

__all__ = ["KeyCheck", "VerifyReport", "verify", "format_verify", "half_spacing"]

METHODS = ("comfyui", "webui", "exact")

# (precision bits, smallest frexp exponent of a normal number) per dtype
_FORMAT = {"float16": (11, -13), "bfloat16": (8, -125), "float32": (24, -125)}


def half_spacing(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Half the spacing of ``dtype`` at ``|x|`` (float64): the largest error of rounding
    ``x`` to ``dtype`` (subnormals included; inf where ``x`` overflows)."""
    p, emin = _FORMAT[dtype.name]
    _, e = np.frexp(np.asarray(x, dtype=np.float64))
    e = np.maximum(e, emin)
    e = np.where(np.asarray(x) == 0, emin, e)
    return np.ldexp(0.5, (e - p).astype(np.int32))


def _round_to(x32: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float32 values to ``dtype`` (returned as float32 values), as torch does."""
    if dtype is F32:
        return x32
    if dtype is F16:
        return x32.astype(np.float16).astype(np.float32)
    if dtype is BF16:
        u = x32.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
        out = r.view(np.float32)
        return np.where(np.isnan(x32), np.float32("nan"), out)
    raise CheckpointError(f"cannot rebuild in {dtype.name}")


def _promote(a: DType, b: DType) -> DType:
    if a is b:
        return a
    return F32  # fp16+bf16, or anything with fp32, promotes to float32 (or wider)


@dataclass
class KeyCheck:
    """One key's errors per method: max absolute, and max in units of D's spacing at the
    stored value (the difference, or the copied weight)."""

    key: str
    kind: str
    max_abs: dict[str, float]
    max_ulp: dict[str, float]
    ok: bool
    rel_error: float | None = None


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``passed`` is the verdict."""

    diff: str
    control: str
    base: str
    file_kind: str
    dtype: str
    passed: bool
    keys: list[KeyCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    misshaped: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    max_abs: dict[str, float] = field(default_factory=dict)
    max_ulp: dict[str, float] = field(default_factory=dict)
    failing: list[str] = field(default_factory=list)
    base_match: BaseMatch | None = None
    overall_rel_error: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["base_match"] = self.base_match.to_dict() if self.base_match else None
        return d


def _f32(ck: Checkpoint, key: str, start: int, count: int) -> np.ndarray:
    info = ck.info(key)
    raw = ck.read(key, start, count)
    if info.dtype is F32:
        return raw
    if info.dtype.raw or info.dtype.is_float:
        return to_float32(raw, info.dtype, np.empty(count, np.float32))
    raise CheckpointError(f"{ck.path.name}: {key} has dtype {info.dtype.name}, not a float")


def verify(
    diff: str | os.PathLike[str],
    control: str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    chunk_mb: float = 4.0,
    check_base: bool = True,
    progress: bool = False,
) -> VerifyReport:
    """Rebuild every weight of ``diff`` as the loaders do and compare with ``control``.

    Args:
        diff: a difference model or a Control-LoRA written from ``control``.
        control: the original ControlNet checkpoint.
        base: the SD checkpoint the diff was taken against (or ``"self"``).
        check_base: also compare ``base`` with the UNet embedded in ``control``.

    Returns a :class:`VerifyReport`; ``report.passed`` is the verdict. Reads in chunks:
    memory stays bounded.
    """
    chunk = max(1, int(chunk_mb * 1024 * 1024) // 4)
    with ExitStack() as stack:
        dk = open_checkpoint(diff)
        stack.callback(dk.close)
        ck = open_checkpoint(control)
        stack.callback(ck.close)
        require_control_keys(ck.tensors, ck.path.name)
        bk, prefix = open_base(base, ck)
        if bk is not ck:
            stack.callback(bk.close)
        plan = plan_diff(ck.tensors, bk.tensors, control_name=ck.path.name,
                         base_name=bk.path.name, base_prefix=prefix)  # fmt: skip
        if "lora_controlnet" in dk.tensors:
            return _verify_lora(dk, ck, bk, plan, prefix, progress)
        if DIFFERENCE_KEY not in dk.tensors:
            raise CheckpointError(
                f"{dk.path.name} is neither a difference model (no 'difference' key) nor a "
                "Control-LoRA; run 'cndiff inspect' on it"
            )
        floats = {t.dtype for k, t in dk.tensors.items() if k.startswith(CONTROL_PREFIX)}
        if len(floats) != 1 or next(iter(floats)).name not in _FORMAT:
            raise CheckpointError(f"{dk.path.name}: expected one float dtype, found {floats}")
        D = next(iter(floats))
        report = VerifyReport(str(dk.path), str(ck.path), str(bk.path), "difference",
                              D.name, False)  # fmt: skip
        expected = {i.key for i in plan}
        report.extra = sorted(
            k for k in dk.tensors if k != DIFFERENCE_KEY and k not in expected
        )  # fmt: skip
        embedded = (
            check_base and bk is not ck and any(k.startswith(UNET_PREFIX) for k in ck.tensors)
        )
        stats = BaseMatchStats() if embedded else None
        total = sum(ck.info(i.control_key).nbytes for i in plan)
        with progress_bar(total, f"verify {dk.path.name}", progress) as bar:
            for item in plan:
                if item.key not in dk.tensors:
                    report.missing.append(item.key)
                    bar.update(ck.info(item.control_key).nbytes)
                    continue
                if dk.info(item.key).shape != item.shape:
                    report.misshaped.append(item.key)
                    continue
                kc = _check_key(dk, ck, bk, item, D, chunk, stats, bar)
                report.keys.append(kc)
        for m in METHODS:
            report.max_abs[m] = max((k.max_abs[m] for k in report.keys), default=0.0)
            report.max_ulp[m] = max((k.max_ulp[m] for k in report.keys), default=0.0)
        report.failing = [k.key for k in report.keys if not k.ok]
        report.passed = not (report.missing or report.extra or report.misshaped
                             or report.failing)  # fmt: skip
        if stats is not None and stats.keys:
            report.base_match = classify_base(stats)
        return report


def _check_key(dk, ck, bk, item, D: DType, chunk: int, stats, bar) -> KeyCheck:
    n = 1
    for dim in item.shape:
        n *= dim
    max_abs = dict.fromkeys(METHODS, 0.0)
    max_ulp = dict.fromkeys(METHODS, 0.0)
    ok = True
    P = _promote(D, bk.info(item.base_key).dtype) if item.base_key else D
    for start in range(0, max(n, 1), chunk):
        count = min(chunk, n - start)
        if count <= 0:
            break
        c = _f32(ck, item.control_key, start, count)
        s = _f32(dk, item.key, start, count)
        # error unit: D's spacing at the value that was rounded when the file was written
        # (the difference for subtracted keys, the weight itself for copied ones)
        ulp = 2 * half_spacing(c, D)
        if item.base_key is None:
            err = np.abs(s.astype(np.float64) - c)
            bound = half_spacing(c, D)
            errs = dict.fromkeys(METHODS, err)
            bounds = dict.fromkeys(METHODS, bound)
        else:
            b = _f32(bk, item.base_key, start, count)
            if stats is not None:
                ekey = UNET_PREFIX + item.control_key[len(CONTROL_PREFIX) :]
                if ekey in ck.tensors and ck.info(ekey).shape == item.shape:
                    e = _f32(ck, ekey, start, count)
                    stats.add(compare_chunk(e, b, bool(np.array_equal(e, b))), start == 0)
            d = c - b  # float32, as extract computed it
            ulp = 2 * half_spacing(d, D)
            base_err = half_spacing(d, D) + half_spacing(d, F32)
            sb = s + b
            exact = sb
            webui = _round_to(sb, P)
            comfy = _round_to(s + _round_to(b, D), D)
            c64 = c.astype(np.float64)
            errs = {
                "exact": np.abs(exact.astype(np.float64) - c64),
                "webui": np.abs(webui.astype(np.float64) - c64),
                "comfyui": np.abs(comfy.astype(np.float64) - c64),
            }
            h32_sum = half_spacing(sb, F32)
            bounds = {
                "exact": base_err + half_spacing(exact, F32),
                "webui": base_err + h32_sum + half_spacing(webui, P),
                "comfyui": base_err + half_spacing(b, D) + h32_sum + half_spacing(comfy, D),
            }
        for m in METHODS:
            e = errs[m]
            if not np.all(np.isfinite(e)) or np.any(e > bounds[m]):
                ok = False
            if e.size:
                max_abs[m] = max(max_abs[m], float(np.max(e)))
                max_ulp[m] = max(max_ulp[m], float(np.max(e / ulp)))
        bar.update(count * ck.info(item.control_key).itemsize)
    kind = "subtracted" if item.base_key else "copied"
    return KeyCheck(item.key, kind, max_abs, max_ulp, ok)


def format_verify(r: VerifyReport, per_key: bool = False) -> str:
    """The report as text."""
    lines = [f"verify {Path(r.diff).name} ({r.file_kind}, {r.dtype}) against "
             f"{Path(r.control).name} + {Path(r.base).name}"]  # fmt: skip
    if r.file_kind == "control-lora":
        lines.append(f"  overall relative error ||W - W_orig|| / ||W_orig||: "
                     f"{r.overall_rel_error:.4g} (lossy format: no pass bound)")  # fmt: skip
        worst = sorted((k for k in r.keys if k.rel_error is not None),
                       key=lambda k: -(k.rel_error or 0))[:5]  # fmt: skip
        for k in worst:
            lines.append(f"  {k.key}: relative error {k.rel_error:.4g}")
    else:
        for m in METHODS:
            lines.append(f"  {m:8s} max |error| {r.max_abs[m]:.3g} "
                         f"({r.max_ulp[m]:.3g} x {r.dtype} spacing)")  # fmt: skip
    for name in ("missing", "extra", "misshaped", "nonfinite", "failing"):
        items = getattr(r, name)
        if items:
            lines.append(f"  {name}: {len(items)} ({', '.join(items[:5])}"
                         f"{', ...' if len(items) > 5 else ''})")  # fmt: skip
    if per_key:
        for k in r.keys:
            errs = ", ".join(f"{m} {k.max_abs[m]:.3g}" for m in k.max_abs)
            lines.append(f"    {k.key} [{k.kind}] {'ok' if k.ok else 'FAIL'}: {errs}")
    if r.base_match is not None:
        lines.append("  " + r.base_match.message)
    what = "structure" if r.file_kind == "control-lora" else "all errors within bound"
    lines.append(f"  {'PASS' if r.passed else 'FAIL'}: {len(r.keys)} keys checked ({what})")
    return "\n".join(lines)


def _verify_lora(dk, ck, bk, plan, prefix: str, progress: bool) -> VerifyReport:
    """Rebuild every ControlNet weight from a Control-LoRA as the loaders do; report
    relative errors (a lossy format: no pass bound, only structural failures)."""
    import torch

    from .lora import MARKER_KEY, lora_weight

    report = VerifyReport(str(dk.path), str(ck.path), str(bk.path), "control-lora",
                          "", False)  # fmt: skip
    dtypes = {t.dtype.name for k, t in dk.tensors.items() if k != MARKER_KEY}
    report.dtype = ",".join(sorted(dtypes))
    expected: set[str] = {MARKER_KEY}
    for item in plan:
        name = item.key[len(CONTROL_PREFIX) :]
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module + ".up" in dk.tensors:
            expected |= {module + ".up", module + ".down"}
            if name in dk.tensors:
                report.extra.append(name)  # both forms: loaders disagree on which wins
        elif name in dk.tensors:
            expected.add(name)
        else:
            # every key must be in the file: sd-webui-controlnet does not take UNet biases,
            # norms or weights, and ControlNet-only modules exist nowhere else
            report.missing.append(name)
    report.extra += sorted(k for k in dk.tensors if k not in expected)
    num = den = 0.0
    with progress_bar(len(plan), f"verify {dk.path.name}", progress, unit="key") as bar:
        for item in plan:
            name = item.key[len(CONTROL_PREFIX) :]
            bar.update(1)
            if name in report.missing:
                continue
            try:
                w = lora_weight(dk, bk, item.key, base_prefix=prefix)
            except (CheckpointError, RuntimeError, ValueError) as exc:
                report.misshaped.append(f"{name} ({exc})")
                continue
            if tuple(w.shape) != item.shape:
                report.misshaped.append(name)
                continue
            if not bool(torch.isfinite(w).all()):
                report.nonfinite.append(name)
                continue
            c = ck.read_torch(item.control_key).to(torch.float32)
            e = float(torch.linalg.vector_norm((w - c).double()) ** 2)
            n = float(torch.linalg.vector_norm(c.double()) ** 2)
            num, den = num + e, den + n
            rel = (e / n) ** 0.5 if n else (0.0 if e == 0 else float("inf"))
            mx = float((w - c).abs().max()) if w.numel() else 0.0
            report.keys.append(KeyCheck(item.key, "lora" if item.base_key else "copied",
                                        {"loaders": mx}, {}, True, rel))  # fmt: skip
    report.overall_rel_error = (num / den) ** 0.5 if den else 0.0
    report.max_abs = {"loaders": max((k.max_abs["loaders"] for k in report.keys), default=0.0)}
    report.passed = not (report.missing or report.extra or report.misshaped
                         or report.nonfinite)  # fmt: skip
    return report
