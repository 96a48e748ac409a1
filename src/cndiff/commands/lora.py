"""Export a ControlNet as a Control-LoRA (``extract(..., format="control-lora")``).

The format is described in :mod:`cndiff.lora`. How ``up @ down`` approximates
``D = control - base`` (computed in float32 exactly as a difference model's, through the
backend's ``combine``):

* ``rank=N`` (default 128): the truncated SVD of each layer, the best rank-``N``
  approximation in the Frobenius norm (factors ``U sqrt(S)`` and ``sqrt(S) Vh``);
* ``max_error=E``: per layer the smallest rank whose relative error of the difference
  ``||D - up @ down||_F / ||D||_F`` is at most ``E``;
* ``stability_compatible``: ``up = U*S``, ``down = Vh`` at rank ``min(N, out, in)``, both
  clamped to ``±q`` with ``q`` the 0.99 quantile of their values (Stability's node).

The SVD is exact by default (``svd="gram"``: the eigendecomposition of the float64 Gram
matrix ``D Dᵀ`` or ``Dᵀ D``, through the backend: numpy's LAPACK on the CPU, torch on a
GPU). A control with NaN or infinite values in a factorized layer is refused (no SVD of it
exists). Every layer is factorized first (one layer's ``D`` in memory at a time; the
factors, about the size of the output file, are kept): with ``max_error`` the ranks, and so
the header, are known only then. The file is then written atomically like every output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator

import numpy as np

from ..backends import Backend, Raw
from ..dtypes import F32, DType
from ..engine import parallel_map
from ..errors import CheckpointError
from ..fingerprint import BaseMatchStats, classify_base
from ..inputs import Checkpoint
from ..inputs.classify import CONTROL_PREFIX, UNET_PREFIX
from ..inputs.sources import Inputs
from ..lora import (
    MARKER_KEY,
    STABILITY_CLAMP_QUANTILE,
    LoraEntry,
    choose_kind,
    layout_counts,
    lora_layout,
    matrix_dims,
)
from ..options import Options
from ..pipeline import Job, describe_keys, input_hashes, make_job
from ..plan import Plan, plan_extract
from ..progress import progress_bar
from ..provenance import build_metadata
from ..results import ExtractResult, LoraLayer, LoraSummary
from ..text import escape
from ..writer import OutputEntry, SafetensorsWriter

__all__ = ["plan_lora", "export_lora", "SVD_AUTO"]

log = logging.getLogger("cndiff")

#: what ``svd="auto"`` means (the exact Gram eigendecomposition: fastest on a CPU)
SVD_AUTO = "gram"


def plan_lora(inputs: Inputs, options: Options) -> tuple[Plan, list[LoraEntry]]:
    """The Control-LoRA layout of a job (ranks from ``rank``; ``max_error`` decides them
    later), and a plan of the same tensors for the job machinery."""
    plan = plan_extract(inputs)
    layout = lora_layout(plan.items, rank=options.lora_rank,
                         stability_compatible=options.stability_compatible)  # fmt: skip
    return Plan(plan.items, "sub", "control-lora", MARKER_KEY), layout


def _read(ck: Checkpoint, key: str, backend: Backend) -> np.ndarray:
    """A whole tensor as float32 (through the backend's conversion)."""
    info = ck.info(key)
    raw = ck.read(key).reshape(-1)
    out = np.empty(raw.size, np.float32)
    backend.combine(None, Raw(raw, info.dtype), None, out, F32)
    return out.reshape(info.shape)


def _to_dtype(x: np.ndarray, dt: DType, backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """``x`` (float32) rounded to the output dtype: (stored values, as float32)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    stored = np.empty(flat.size, dt.numpy)
    backend.combine(None, Raw(flat, F32), None, stored, dt)
    back = np.empty(flat.size, np.float32)
    backend.combine(None, Raw(stored, dt), None, back, F32)
    return stored.reshape(x.shape), back.reshape(x.shape)


def _norm(x: np.ndarray) -> float:
    v = x.reshape(-1).astype(np.float64)
    return math.sqrt(float(np.dot(v, v)))


def _clamp(up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clamp both factors to ±(0.99 quantile of all their values), as Stability's node."""
    hi = float(np.quantile(np.concatenate([up.reshape(-1), down.reshape(-1)]),
                           STABILITY_CLAMP_QUANTILE))  # fmt: skip
    return np.clip(up, -hi, hi), np.clip(down, -hi, hi)


def _factorize(
    entry: LoraEntry, inputs: Inputs, options: Options, backend: Backend, method: str,
    compare: bool,
) -> tuple[LoraEntry, tuple[np.ndarray, np.ndarray] | None, LoraLayer, tuple | None]:
    """One mirrored Linear/Conv2d weight: its final entry (kind and rank decided), the
    stored factors (None when stored in full), the layer's figures and its base check."""
    assert entry.base_key is not None and inputs.base is not None
    ctl, dt = inputs.control, options.out_dtype
    c = _read(ctl, entry.control_key, backend)
    b = _read(inputs.base, entry.base_key, backend)
    match = _compare(entry, inputs, backend) if compare else None
    m, n = matrix_dims(entry.shape)
    d = np.empty(c.size, np.float32)
    mx = backend.combine("sub", Raw(c.reshape(-1), F32), Raw(b.reshape(-1), F32), d, F32)
    if not math.isfinite(mx):
        raise CheckpointError(
            f"{inputs.name}: {escape(entry.key)} holds NaN or infinite values "
            "(in the control or the base): no Control-LoRA can be computed from it; extract a "
            "difference model instead, or use another file"
        )
    d = d.reshape(m, n)
    norm = _norm(d)
    w_norm = _norm(c)
    want = options.lora_rank
    dec = None
    if options.max_error is not None:
        dec = backend.decompose(d, method, min(m, n))
        want = dec.rank_for(options.max_error)
    kind, r = choose_kind(entry.shape, want, options.stability_compatible)
    final = entry.with_kind(kind, r)
    if kind == "weight":  # the control's own weight, rounded once to the output dtype
        _, back = _to_dtype(c, dt, backend)
        err = _norm(back - c)
        layer = LoraLayer(entry.key, entry.shape, "weight", r, 0.0,
                          err / w_norm if w_norm else 0.0, 1.0, norm, w_norm)  # fmt: skip
        return final, None, layer, match
    if dec is None:
        dec = backend.decompose(d, method, r)
    up, down, kept = dec.factors(r, "stability" if options.stability_compatible else "balanced")
    tail = dec.tail_sq(r)
    del dec
    if options.stability_compatible:
        up, down = _clamp(up, down)
        trunc = _norm(d - up @ down)
    elif tail is not None:  # (from the small singular values: no cancellation)
        trunc = math.sqrt(max(tail, 0.0))
    else:
        trunc = _norm(d - up @ down)
    (_, up_shape), (_, down_shape) = final.outputs
    up_o, up_back = _to_dtype(up, dt, backend)
    down_o, down_back = _to_dtype(down, dt, backend)
    rebuilt = b.reshape(m, n) + up_back @ down_back
    w_err = _norm(rebuilt - c.reshape(m, n))
    energy = kept / (norm * norm) if norm else 1.0
    layer = LoraLayer(entry.key, entry.shape, "lora", r, trunc / norm if norm else 0.0,
                      w_err / w_norm if w_norm else 0.0, min(energy, 1.0), norm,
                      w_norm)  # fmt: skip
    return final, (up_o.reshape(up_shape), down_o.reshape(down_shape)), layer, match


def _compare(entry: LoraEntry, inputs: Inputs, backend: Backend) -> tuple | None:
    """One tensor's base check (base vs the control file's embedded UNet)."""
    assert inputs.base is not None and entry.base_key is not None
    ekey = UNET_PREFIX + entry.key[len(CONTROL_PREFIX) :]
    info = inputs.control.tensors.get(ekey)
    if info is None or info.shape != entry.shape:
        return None
    e = Raw(inputs.control.read(ekey).reshape(-1), info.dtype)
    b = Raw(inputs.base.read(entry.base_key).reshape(-1), inputs.base.info(entry.base_key).dtype)
    return backend.compare(e, b)


#: layers handed out per worker beyond the oldest one not yet written
_AHEAD = 8


def export_lora(
    inputs: Inputs,
    out: str | os.PathLike[str] | None,
    options: Options,
    backend: Backend,
    *,
    many: bool = False,
) -> ExtractResult:
    """Write the Control-LoRA of ``inputs`` (see the module documentation).

    Raises :class:`~cndiff.targets.Skip` when a complete output of the same job exists,
    and a :class:`~cndiff.errors.CndiffError` for anything a user can fix.
    """
    plan, layout = plan_lora(inputs, options)
    job = make_job(inputs, plan, out, options, many=many)
    if options.hash_inputs:
        input_hashes([job], options.progress)
    method = SVD_AUTO if options.svd == "auto" else options.svd
    compare = options.check_base and not inputs.base_is_self and inputs.has_embedded_unet
    match = BaseMatchStats() if compare else None
    layers: list[LoraLayer] = []
    todo = [e for e in layout if e.kind != "copy"]

    one_thread = options.n_workers > 1
    torch_cpu = getattr(backend, "torch", None) if backend.name == "torch" and not getattr(
        backend, "cuda", False) else None  # fmt: skip

    def work(e: LoraEntry):
        if torch_cpu is not None and one_thread:
            # torch's CPU pool is per thread (OpenMP): threadpoolctl's limit, set on this
            # thread, does not reach it; each worker sets its own
            torch_cpu.set_num_threads(1)
        if e.kind == "copy":  # (only its base check)
            return e, None, None, _compare(e, inputs, backend) if e.base_key else None
        return _factorize(e, inputs, options, backend, method, compare)

    jobs = [e for e in layout if e.kind != "copy" or (compare and e.base_key is not None)]
    t_svd = time.perf_counter()
    # Layers are decomposed on ``workers`` threads (LAPACK releases the GIL), one D each,
    # each with a single-threaded BLAS: a threaded BLAS competing with the other workers
    # (or any other busy core) spins, and one 1280 x 1280 eigh then takes 12 s, not 0.3 s.
    # With a fixed rank every shape is known from the layout: the header is written first
    # and each layer as soon as its factors are ready (memory: the layers in flight). With
    # max_error the ranks, and so the header, are known only after every decomposition.
    bar_ctx = progress_bar(len(todo), inputs.name, options.progress, unit="layer")
    saved_torch_threads = torch_cpu.get_num_threads() if torch_cpu is not None else None
    try:
        with _blas_threads(1 if one_thread else None), bar_ctx as bar:
            # (layers differ 100-fold in cost: a wide window keeps both workers busy
            # behind a large one; a waiting result is only its factors)
            results = iter(zip(jobs, parallel_map(work, jobs, options.n_workers,
                                                  ahead=_AHEAD * options.n_workers)))  # fmt: skip

            def next_result(entry: LoraEntry) -> tuple:
                for e, res in results:
                    if match is not None and res[3] is not None:
                        match.add(res[3], True)
                    if e.kind != "copy":
                        bar.update(1)
                        layers.append(res[2])
                    if e is entry:
                        return res
                raise AssertionError("a layer was not decomposed")

            if options.max_error is None:
                result = _write(job, layout, next_result, options, backend, layers, method,
                                t_svd)  # fmt: skip
            else:
                done = {e.control_key: next_result(e) for e in todo}
                final = [done[e.control_key][0] if e.kind != "copy" else e for e in layout]
                factors = {e.control_key: done[e.control_key][1] for e in todo}
                result = _write(job, final, lambda e: (e, factors.pop(e.control_key)), options,
                                backend, layers, method, t_svd)  # fmt: skip
            for _ in results:  # (only base checks of copied keys may remain)
                pass
    finally:  # (MKL's pool, which torch also sets, is shared by every thread)
        if saved_torch_threads is not None and one_thread:
            torch_cpu.set_num_threads(saved_torch_threads)  # type: ignore[union-attr]
    summary = result.lora
    assert summary is not None
    if match is not None and match.keys:
        result.base_match = classify_base(match)
        kind = result.base_match.kind
        (log.info if kind == "identical" else log.warning)(
            "%s: %s", inputs.name, result.base_match.message
        )
    worst = [x for x in summary.worst(3) if x.kind == "lora"]
    if worst:
        log.info("%s: largest errors of the difference: %s", inputs.name,
                 ", ".join(f"{escape(x.key)} (rank {x.rank}) {x.diff_error:.4f}"
                           for x in worst))  # fmt: skip
    return result


@contextlib.contextmanager
def _blas_threads(limit: int | None) -> Iterator[None]:
    """Limit the BLAS/LAPACK thread pools (numpy's OpenBLAS, MKL...) for the block."""
    if limit is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=limit, user_api="blas"):
        yield


def _copy(w: SafetensorsWriter, ck: Checkpoint, key: str, dt: DType, backend: Backend,
          chunk: int) -> bool:  # fmt: skip
    """Write one tensor as it is (cast to ``dt``), ``chunk`` elements at a time; False when
    it holds NaN or infinite values."""
    info = ck.info(key)
    raw = np.empty(min(chunk, max(info.numel, 1)), info.dtype.numpy)
    out = np.empty(raw.size, dt.numpy)
    finite = True
    for start in range(0, info.numel, chunk):
        n = min(chunk, info.numel - start)
        ck.read_into(key, raw[:n], start)
        finite &= math.isfinite(backend.combine(None, Raw(raw[:n], info.dtype), None, out[:n], dt))
        w.write(out[:n])
    return finite


def _write(job: Job, final: list[LoraEntry], factors_of, options: Options, backend: Backend,
           layers: list[LoraLayer], method: str, t_svd: float) -> ExtractResult:  # fmt: skip
    """Write the file: every entry of ``final`` in order; ``factors_of(entry)`` gives a
    factorized layer's ``(final entry, (up, down) or None)`` (waiting for it)."""
    dt = options.out_dtype
    inputs = job.inputs
    entries = [OutputEntry(k, dt, s) for e in final for k, s in e.outputs]
    entries.append(OutputEntry(MARKER_KEY, F32, (0,)))
    keys, params = layout_counts(final)
    rank = None if options.max_error is not None else options.lora_rank
    extra = {
        "cndiff.rank": "" if rank is None else str(rank),
        "cndiff.max_error": "" if options.max_error is None else f"{options.max_error:g}",
        "cndiff.stability_compatible": str(options.stability_compatible).lower(),
        "cndiff.svd": method,
    }
    meta = build_metadata("control-lora", inputs, options, hashes=job.hashes, extra=extra)
    nonfinite: list[str] = []
    with SafetensorsWriter(job.target, entries, meta, overwrite=options.overwrite) as w:
        for e in final:
            if e.kind == "copy":
                if not _copy(w, inputs.control, e.control_key, dt, backend, options.chunk_elems):
                    nonfinite.append(e.key)
                continue
            fe, fac = factors_of(e)[:2]
            if fac is not None:
                w.write(fac[0])
                w.write(fac[1])
            elif not _copy(w, inputs.control, e.control_key, dt, backend, options.chunk_elems):
                nonfinite.append(e.key)  # (a weight stored in full)
        w.write(b"")
        inputs.check_unchanged()
        w.commit()
    if nonfinite:
        log.warning("%s: %d key(s) hold NaN or infinite values: %s", inputs.name,
                    len(nonfinite), describe_keys(nonfinite))  # fmt: skip
    summary = LoraSummary(layers, rank, options.max_error, method, options.stability_compatible,
                          params, time.perf_counter() - t_svd)  # fmt: skip
    paired = sum(1 for e in final if e.kind != "copy")
    return ExtractResult(
        source=inputs.control.path,
        output=job.target,
        kind="control-lora",
        dtype=dt.name,
        bytes=w.size,
        seconds=time.perf_counter() - job.started,
        sha256=w.sha256,
        keys_written=keys,
        paired=paired,
        copied=len(final) - paired,
        device=backend.device,
        backend=backend.name,
        nonfinite=nonfinite,
        lora=summary,
    )
