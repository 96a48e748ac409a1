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

A model passes when every key is present with the right shape, no value is NaN or
infinite, and every element of every rebuild is within its bound. The report gives, per
method, the largest absolute error and the largest error as a fraction of its bound
(at most 1 in a passing file).

A Control-LoRA (lossy) is rebuilt as the loaders do (``W_unet + up @ down``) and reported
without a pass bound: the relative error of the rebuilt weights, ``||W - W_orig|| /
||W_orig||``, and of the differences, ``||W - W_orig|| / ||W_orig - W_base||``; it fails
only on structural errors (missing, extra or misshaped keys, non-finite values).
"""

from __future__ import annotations

import math
import os
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..backends import Raw
from ..backends.numpy_backend import NumpyBackend, to_float32
from ..dtypes import BF16, F16, F32, DType
from ..engine import ChunkIn, Stream, run_streams
from ..errors import CheckpointError, OptionError, WrongKindError
from ..fingerprint import BaseMatch, BaseMatchStats, classify_base
from ..inputs import Checkpoint, open_checkpoint
from ..inputs.classify import CONTROL_PREFIX, DIFFERENCE_KEY, LORA_MARKER, UNET_PREFIX, classify
from ..inputs.sources import Inputs, open_inputs
from ..lora import lora_weight
from ..options import Options, build_options
from ..pipeline import describe_keys
from ..plan import PlanItem, plan_extract
from ..progress import progress_bar
from ..text import escape, escape_path

__all__ = ["KeyCheck", "VerifyReport", "verify", "half_spacing", "METHODS"]

METHODS = ("comfyui", "webui", "exact")

# (precision bits, smallest frexp exponent of a normal number) per dtype
_FORMAT = {"float16": (11, -13), "bfloat16": (8, -125), "float32": (24, -125)}


def half_spacing(x: np.ndarray, dtype: DType) -> np.ndarray:
    """Half the spacing of ``dtype`` at ``|x|`` (float64): the largest error of rounding
    ``x`` to ``dtype`` (subnormals included)."""
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
        return np.where(np.isnan(x32), np.float32("nan"), r.view(np.float32))
    raise CheckpointError(f"cannot rebuild in {dtype.name}")


def _promote(a: DType, b: DType) -> DType:
    return a if a is b else F32  # fp16+bf16, or anything with fp32, promotes to float32


@dataclass(repr=False)
class KeyCheck:
    """One key's errors per method: the largest absolute error (``max_abs``) and the
    largest error as a fraction of its bound (``of_bound``: at most 1 when ``ok``).
    Control-LoRA keys have ``weight_error`` (``||W - W_orig|| / ||W_orig||``) and
    ``diff_error`` (``||W - W_orig|| / ||W_orig - W_base||``) instead of bounds."""

    key: str
    kind: str
    max_abs: dict[str, float]
    of_bound: dict[str, float]
    ok: bool
    weight_error: float | None = None
    diff_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        return f"<KeyCheck {escape(self.key, 60)!r} {'ok' if self.ok else 'FAIL'}>"


@dataclass(repr=False)
class VerifyReport:
    """What :func:`verify` found. ``passed`` is the verdict; ``str()`` is the report."""

    diff: str
    control: str
    base: str
    file_kind: str
    dtype: str
    passed: bool = False
    keys: list[KeyCheck] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    misshaped: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    failing: list[str] = field(default_factory=list)
    max_abs: dict[str, float] = field(default_factory=dict)
    of_bound: dict[str, float] = field(default_factory=dict)
    base_match: BaseMatch | None = None
    #: Control-LoRA: overall relative error of the rebuilt weights and of the differences
    weight_error: float | None = None
    diff_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "keys":
                v = [k.to_dict() for k in v]
            elif isinstance(v, BaseMatch):
                v = v.to_dict()
            d[f.name] = v
        return _finite(d)

    def __repr__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"<VerifyReport {verdict} {escape(os.path.basename(self.diff), 60)!r} "
                f"{self.file_kind}, {len(self.keys)} keys>")  # fmt: skip

    def __str__(self) -> str:
        return format_verify(self)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _f32(raw: Raw, kernels=None) -> np.ndarray:
    if raw.dtype is F32:
        return raw.data
    if raw.dtype.raw or raw.dtype.is_float:
        return to_float32(raw, np.empty(raw.data.size, np.float32), kernels)
    raise CheckpointError(f"expected a float tensor, found {raw.dtype.name}")


@dataclass
class _Acc:
    """One key's figures so far."""

    max_abs: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METHODS, 0.0))
    of_bound: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METHODS, 0.0))
    ok: bool = True
    finite: bool = True


_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}


def _check_chunk(ch: ChunkIn, D: DType, P: DType | None, kernels=None):
    """Errors of every rebuild of one chunk, and their fraction of the bound (with the
    native kernels when given: one pass, no temporaries, the same figures)."""
    c = _f32(ch.c, kernels)
    s = _f32(ch.x, kernels)  # type: ignore[arg-type]
    if kernels is not None:
        b32 = _f32(ch.b, kernels) if ch.b is not None else None
        finite, *figs = kernels.verify(c, s, b32, _KIND[D.name],
                                       _KIND[P.name] if P is not None else 0)  # fmt: skip
        if not finite:
            figs = [(math.nan, math.nan)] * 3
        figures = dict(zip(METHODS, figs))
        return figures, finite and all(r <= 1.0 for _, r in figs), finite
    finite = bool(np.isfinite(c).all() and np.isfinite(s).all())
    if ch.b is None:
        err = np.abs(s.astype(np.float64) - c)
        bound = half_spacing(c, D)
        errs = dict.fromkeys(METHODS, err)
        bounds = dict.fromkeys(METHODS, bound)
    else:
        b = _f32(ch.b)
        finite &= bool(np.isfinite(b).all())
        d = c - b  # float32, as extract computed it
        base_err = half_spacing(d, D) + half_spacing(d, F32)
        sb = s + b
        assert P is not None
        webui = _round_to(sb, P)
        comfy = _round_to(s + _round_to(b, D), D)
        c64 = c.astype(np.float64)
        errs = {
            "exact": np.abs(sb.astype(np.float64) - c64),
            "webui": np.abs(webui.astype(np.float64) - c64),
            "comfyui": np.abs(comfy.astype(np.float64) - c64),
        }
        h32_sum = half_spacing(sb, F32)
        bounds = {
            "exact": base_err + half_spacing(sb, F32),
            "webui": base_err + h32_sum + half_spacing(webui, P),
            "comfyui": base_err + half_spacing(b, D) + h32_sum + half_spacing(comfy, D),
        }
    figures = {}
    ok = finite
    for m in METHODS:
        e = errs[m]
        if e.size == 0:
            figures[m] = (0.0, 0.0)
            continue
        ratio = e / bounds[m]
        worst = float(np.max(ratio)) if finite else math.nan
        ok &= finite and worst <= 1.0
        figures[m] = (float(np.max(e)) if finite else math.nan, worst)
    return figures, ok, finite


def verify(
    diff: str | os.PathLike[str],
    control: str | os.PathLike[str],
    base: str | os.PathLike[str],
    *,
    options: Options | None = None,
    **kwargs,
) -> VerifyReport:
    """Rebuild every weight of ``diff`` as the loaders do and compare with ``control``.

    Args:
        diff: a difference model or a Control-LoRA written from ``control``.
        control: the original ControlNet checkpoint.
        base: the SD checkpoint the diff was taken against (or ``"self"``).
        options: ``chunk_mb``, ``workers``, ``check_base`` (also compare ``base`` with
            the UNet embedded in ``control``) and ``progress`` apply; verify computes on
            the CPU with numpy.

    Returns a :class:`VerifyReport`; ``report.passed`` is the verdict. Reads in chunks:
    memory stays bounded.
    """
    opts = build_options(options, **kwargs)
    if opts.format != "difference" or opts.drop_unchanged or opts.hash_inputs:
        raise OptionError("verify takes no --format, --drop-unchanged or --hash: it checks the "
                          "file it is given")  # fmt: skip
    with ExitStack() as stack:
        dk = open_checkpoint(diff)
        stack.callback(dk.close)
        kind = classify(dk.tensors)
        if kind.kind not in ("difference", "control-lora"):
            raise WrongKindError(
                f"{escape_path(dk.path.name)} is a {kind.description}, neither a difference "
                "model nor a Control-LoRA: nothing to verify (run 'cndiff inspect' on it)",
                kind.kind,
            )
        inputs = stack.enter_context(open_inputs(control, base, role="control"))
        plan = plan_extract(inputs)
        if kind.kind == "control-lora":
            return _verify_lora(dk, inputs, plan.items, opts)
        return _verify_difference(dk, inputs, plan.items, opts)


def _verify_difference(
    dk: Checkpoint, inputs: Inputs, items: list[PlanItem], opts: Options
) -> VerifyReport:
    floats = {t.dtype for k, t in dk.tensors.items() if k.startswith(CONTROL_PREFIX)}
    if len(floats) != 1 or next(iter(floats)).name not in _FORMAT:
        names = ", ".join(sorted(d.name for d in floats))
        raise CheckpointError(f"{escape_path(dk.path.name)}: expected one float dtype for its "
                              f"{CONTROL_PREFIX}* tensors, found {names}")  # fmt: skip
    D = next(iter(floats))
    assert inputs.base is not None
    report = VerifyReport(str(dk.path), str(inputs.control.path), _base_name(inputs),
                          "difference", D.name)  # fmt: skip
    expected = {i.key for i in items}
    report.extra = sorted(k for k in dk.tensors if k != DIFFERENCE_KEY and k not in expected)
    todo: list[PlanItem] = []
    for item in items:
        if item.key not in dk.tensors:
            report.missing.append(item.key)
        elif dk.info(item.key).shape != item.shape:
            report.misshaped.append(item.key)
        else:
            todo.append(item)
    compare = opts.check_base and not inputs.base_is_self and inputs.has_embedded_unet
    stats = BaseMatchStats() if compare else None
    backend = NumpyBackend()
    kernels = backend.kernels
    accs: dict[str, _Acc] = {}

    def kernel(ch: ChunkIn):
        P = _promote(D, ch.b.dtype) if ch.b is not None else None
        with np.errstate(all="ignore"):
            res = _check_chunk(ch, D, P, kernels)
        match = backend.compare(ch.e, ch.b) if ch.e is not None and ch.b is not None else None
        return res, match

    def sink(item: PlanItem, res, ch: ChunkIn) -> None:
        (figures, ok, finite), match = res
        acc = accs.setdefault(item.key, _Acc())
        acc.ok &= ok
        acc.finite &= finite
        for m, (mx, worst) in figures.items():
            acc.max_abs[m] = _nanmax(acc.max_abs[m], mx)
            acc.of_bound[m] = _nanmax(acc.of_bound[m], worst)
        if match is not None and stats is not None:
            stats.add(match, ch.start == 0)

    stream = Stream(todo, inputs.control, kernel, base=inputs.base, sink=sink, extra=dk,
                    embedded_prefix=UNET_PREFIX if compare else None)  # fmt: skip
    total = sum(inputs.control.info(i.control_key).nbytes for i in todo)
    with progress_bar(total, f"verify {dk.path.name}", opts.progress) as bar:
        run_streams([stream], backend, chunk=opts.chunk_elems, workers=opts.n_workers,
                    on_progress=bar.update)  # fmt: skip
    for item in todo:
        acc = accs.get(item.key, _Acc())
        kind = "subtracted" if item.base_key else "copied"
        report.keys.append(KeyCheck(item.key, kind, acc.max_abs, acc.of_bound, acc.ok))
        if not acc.finite:
            report.nonfinite.append(item.key)
    for m in METHODS:
        report.max_abs[m] = max((k.max_abs[m] for k in report.keys), default=0.0, key=_nankey)
        report.of_bound[m] = max((k.of_bound[m] for k in report.keys), default=0.0, key=_nankey)
    report.failing = [k.key for k in report.keys if not k.ok and k.key not in report.nonfinite]
    report.passed = not (report.missing or report.extra or report.misshaped
                         or report.failing or report.nonfinite)  # fmt: skip
    if stats is not None and stats.keys:
        report.base_match = classify_base(stats)
    return report


def _base_name(inputs: Inputs) -> str:
    assert inputs.base is not None
    return "self" if inputs.base_is_self else str(inputs.base.path)


def _nanmax(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _nankey(v: float) -> float:
    return math.inf if math.isnan(v) else v


def _verify_lora(dk: Checkpoint, inputs: Inputs, items: list[PlanItem], opts: Options):
    """Rebuild every ControlNet weight from a Control-LoRA as the loaders do; report
    relative errors (a lossy format: no pass bound, only structural failures)."""
    assert inputs.base is not None
    report = VerifyReport(str(dk.path), str(inputs.control.path), _base_name(inputs),
                          "control-lora", "")  # fmt: skip
    report.dtype = ",".join(sorted({t.dtype.name for k, t in dk.tensors.items()
                                    if k != LORA_MARKER}))  # fmt: skip
    expected: set[str] = {LORA_MARKER}
    present: list[PlanItem] = []
    for item in items:
        name = item.key[len(CONTROL_PREFIX) :]
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module + ".up" in dk.tensors:
            expected |= {module + ".up", module + ".down"}
            if name in dk.tensors:
                report.extra.append(name)  # both forms: loaders disagree on which wins
            present.append(item)
        elif name in dk.tensors:
            expected.add(name)
            present.append(item)
        else:
            # every key must be in the file: sd-webui-controlnet does not take UNet biases,
            # norms or weights, and ControlNet-only modules exist nowhere else
            report.missing.append(name)
    report.extra += sorted(k for k in dk.tensors if k not in expected)
    w_num = w_den = d_den = 0.0
    with progress_bar(len(present), f"verify {dk.path.name}", opts.progress, unit="key") as bar:
        for item in present:
            name = item.key[len(CONTROL_PREFIX) :]
            bar.update(1)
            try:
                w = lora_weight(dk, inputs.base, item)
            except CheckpointError as exc:
                report.misshaped.append(f"{name} ({exc})")
                continue
            if tuple(w.shape) != item.shape:
                report.misshaped.append(f"{name} ({list(w.shape)}, not {list(item.shape)})")
                continue
            with np.errstate(all="ignore"):
                if not np.isfinite(w).all():
                    report.nonfinite.append(name)
                    continue
                c = _whole(inputs.control, item.control_key)
                diff = (w.astype(np.float64) - c).reshape(-1)
                e = float(np.dot(diff, diff))
                cn = float(np.dot(c.reshape(-1).astype(np.float64), c.reshape(-1)))
                dn = e
                if item.base_key is not None:
                    dd = (c - _whole(inputs.base, item.base_key)).reshape(-1).astype(np.float64)
                    dn = float(np.dot(dd, dd))
            w_num, w_den, d_den = w_num + e, w_den + cn, d_den + dn
            werr = math.sqrt(e / cn) if cn else (0.0 if e == 0 else math.inf)
            derr = math.sqrt(e / dn) if dn else (0.0 if e == 0 else math.inf)
            mx = float(np.max(np.abs(diff))) if diff.size else 0.0
            report.keys.append(KeyCheck(item.key, "lora" if item.base_key else "copied",
                                        {"loaders": mx}, {}, True, werr, derr))  # fmt: skip
    report.weight_error = math.sqrt(w_num / w_den) if w_den else 0.0
    report.diff_error = math.sqrt(w_num / d_den) if d_den else 0.0
    report.max_abs = {"loaders": max((k.max_abs["loaders"] for k in report.keys), default=0.0)}
    report.passed = not (report.missing or report.extra or report.misshaped
                         or report.nonfinite)  # fmt: skip
    return report


def _whole(ck: Checkpoint, key: str) -> np.ndarray:
    info = ck.info(key)
    return _f32(Raw(ck.read(key).reshape(-1), info.dtype)).reshape(info.shape)


def format_verify(r: VerifyReport, per_key: bool = False) -> str:
    """The report as text: one line per figure, the verdict last."""
    lines = [f"verify {escape_path(os.path.basename(r.diff))} ({r.file_kind}, {r.dtype}) "
             f"against {escape_path(os.path.basename(r.control))} + "
             f"{escape_path(os.path.basename(r.base))}"]  # fmt: skip
    if r.file_kind == "control-lora":
        lines.append(f"  relative error of the rebuilt weights ||W - W_orig|| / ||W_orig||: "
                     f"{r.weight_error:.4g}")  # fmt: skip
        lines.append(f"  relative error of the differences ||W - W_orig|| / ||W_orig - W_base||: "
                     f"{r.diff_error:.4g} (a lossy format: no pass bound)")  # fmt: skip
        worst = sorted((k for k in r.keys if k.diff_error is not None and k.kind == "lora"),
                       key=lambda k: -(k.diff_error or 0))[:5]  # fmt: skip
        for k in worst:
            lines.append(f"    {escape(k.key)}: difference error {k.diff_error:.4g}, weight "
                         f"error {k.weight_error:.3g}")  # fmt: skip
    else:
        for m in METHODS:
            if m in r.max_abs:
                lines.append(f"  {m:8s} max |error| {r.max_abs[m]:.3g}, "
                             f"{r.of_bound[m]:.2f} of its rounding bound")  # fmt: skip
    for name in ("missing", "extra", "misshaped", "nonfinite", "failing"):
        items = getattr(r, name)
        if items:
            label = {"nonfinite": "NaN or infinite values in", "failing": "over the bound"}.get(
                name, name
            )
            lines.append(f"  {label}: {len(items)} key(s): {describe_keys(items, 5)}")
    if per_key:
        for k in r.keys:
            if r.file_kind == "control-lora":
                errs = f"weight error {k.weight_error:.3g}, difference error {k.diff_error:.3g}"
            else:
                errs = ", ".join(f"{m} {k.max_abs[m]:.3g} ({k.of_bound[m]:.2f} of bound)"
                                 for m in k.max_abs)  # fmt: skip
            lines.append(f"    {escape(k.key)} [{k.kind}] {'ok' if k.ok else 'FAIL'}: {errs}")
    if r.base_match is not None:
        lines.append("  " + r.base_match.message)
    lines.append("  " + _verdict(r))
    return "\n".join(lines)


def _verdict(r: VerifyReport) -> str:
    n = len(r.keys)
    if r.passed:
        if r.file_kind == "control-lora":
            return f"PASS: {n} keys present, shaped and finite (a lossy format: no error bound)"
        return f"PASS: {n} keys, every element within its rounding bound"
    problems = []
    for name, label in (("missing", "missing"), ("extra", "extra"), ("misshaped", "misshaped"),
                        ("nonfinite", "with NaN/Inf"), ("failing", "over the bound")):  # fmt: skip
        count = len(getattr(r, name))
        if count:
            problems.append(f"{count} {label}")
    return f"FAIL: {', '.join(problems)} (of {n + len(r.missing) + len(r.misshaped)} keys)"
