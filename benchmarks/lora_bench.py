#!/usr/bin/env python3
"""Control-LoRA export: the per-layer decompositions alone, timed per backend, method and
number of worker threads.

    python benchmarks/lora_bench.py [--control C --base B] [--rank 128] \\
        [--methods gram,exact,lowrank] [--backends numpy,torch] [--workers 1,2] [--json F]

What it does, in this order:

1. finds the layers the export factorizes, with the library's own layout:
   ``lora_layout(plan_pairs(control_view(control), unet_view(base)), rank=R)``, entries of
   kind ``"lora"`` (a weight whose factors would not be smaller is stored in full,
   kind ``"weight"``, and is not decomposed; ``"copy"`` entries are not weights);
2. reads every such layer's difference ``D = float32(control) - float32(base)`` (the
   ``(out, in*kh*kw)`` matrix) into memory: **not timed** (about 1.4 GB of float32 for
   SD1.5: 121 layers);
3. for every backend x method x workers: decomposes all layers exactly as the export does,
   ``backend.decompose(D, method, r).factors(r, "balanced")`` with ``r`` the entry's rank,
   on ``workers`` threads inside ``threadpoolctl.threadpool_limits(1, "blas")`` (what the
   export does with more than one worker: one single-threaded BLAS per worker). Timed:
   from the first submission to the last result. Only the decompositions: no reading,
   no rounding to fp16, no error figures, no writing;
4. per backend x method (outside the timing): the overall relative error
   ``sqrt(sum ||D - up @ down||^2) / sqrt(sum ||D||^2)`` of the factors at that rank.

Backends: ``numpy`` = ``cndiff.backends.numpy_backend.NumpyBackend()`` (the CPU default);
``torch`` = ``cndiff.backends.torch_backend.TorchBackend(DEVICE)`` (``--device cuda`` on a
GPU machine). Note that ``threadpool_limits(1, "blas")`` does not reach torch's own
thread pool (its MKL is linked statically, its intra-op threads are OpenMP): the torch
rows run with torch's default threads unless ``--torch-threads N``, as the export does.

The synthetic pair's differences are i.i.d. Gaussian noise (full rank, flat spectrum): a
rank-128 approximation keeps little of their energy (relative error about 0.88 for SD1.5),
and the error figures compare the methods, not what real ControlNets lose. ``--one-layer``
also times one 1280 x 11520 layer whose difference is low rank plus noise against a
float64 SVD (how close each method gets to the best rank-r error).

``benchmarks/bench.py`` runs this (``--methods gram --backends numpy --workers W`` by
default) and uses the gram/numpy/W total in the Control-LoRA target; ``--json`` writes
everything for it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
try:
    import cndiff  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(HERE.parent / "src"))

DEFAULT_CONTROL = Path("/tmp/fullsize/control_sd15_synthetic.pth")
DEFAULT_BASE = Path("/tmp/fullsize/sd15_base_synthetic.ckpt")
METHODS = ("gram", "exact", "lowrank")
BACKENDS = ("numpy", "torch")


def default_workers() -> int:
    """What the export uses without ``--workers``: min(4, CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------


def load_layers(
    control: Path, base: Path, rank: int, limit: Optional[int] = None
) -> tuple[list[Any], list[np.ndarray], dict[str, Any]]:
    """The entries the export factorizes at ``rank`` and their differences (float32)."""
    from cndiff.backends import Raw
    from cndiff.backends.numpy_backend import to_float32
    from cndiff.inputs import open_checkpoint
    from cndiff.inputs.sources import model_file
    from cndiff.inputs.views import control_view, unet_view
    from cndiff.lora import lora_layout, matrix_dims
    from cndiff.plan import plan_pairs

    def f32(ck: Any, key: str) -> np.ndarray:
        info = ck.info(key)
        out = np.empty(info.numel, np.float32)
        return to_float32(Raw(ck.read(key).reshape(-1), info.dtype), out)

    t0 = time.perf_counter()
    with (
        open_checkpoint(model_file(control, "control")) as ck,
        open_checkpoint(model_file(base, "base")) as bk,
    ):
        cview, bview = control_view(ck.tensors), unet_view(bk.tensors)
        if cview is None or bview is None:
            raise SystemExit(f"{control} / {base}: not a ControlNet and an SD base")
        layout = lora_layout(plan_pairs(cview, bview), rank=rank)
        kinds = {k: sum(1 for e in layout if e.kind == k) for k in ("lora", "weight", "copy")}
        entries = [e for e in layout if e.kind == "lora"]
        if limit is not None:
            entries = entries[:limit]
        ds = []
        for e in entries:
            d = f32(ck, e.control_key)
            d -= f32(bk, e.base_key)  # one IEEE subtraction in float32, as the export
            ds.append(d.reshape(matrix_dims(e.shape)))
    info = {
        "layout": kinds,
        "layers": len(entries),
        "d_bytes": sum(d.nbytes for d in ds),
        "read_s": time.perf_counter() - t0,
        "largest": max((list(d.shape) for d in ds), key=lambda s: s[0] * s[1], default=None),
    }
    return entries, ds, info


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def make_backend(name: str, device: str) -> Any:
    if name == "numpy":
        from cndiff.backends.numpy_backend import NumpyBackend

        return NumpyBackend()
    from cndiff.backends.torch_backend import TorchBackend

    return TorchBackend(device)


def decompose_all(
    backend: Any, method: str, entries: Sequence[Any], ds: Sequence[np.ndarray], workers: int
) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
    """Seconds to decompose every layer (``workers`` threads, single-threaded BLAS), and
    the factors (in layer order)."""
    from threadpoolctl import threadpool_limits

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        r = entries[i].rank
        up, down, _kept = backend.decompose(ds[i], method, r).factors(r, "balanced")
        return up, down

    sync: Callable[[], None] = lambda: None  # noqa: E731
    if getattr(backend, "cuda", False):
        sync = backend.torch.cuda.synchronize
    with threadpool_limits(limits=1, user_api="blas"):
        sync()
        t0 = time.perf_counter()
        if workers == 1:
            out = [one(i) for i in range(len(ds))]
        else:
            with ThreadPoolExecutor(workers) as pool:
                out = list(pool.map(one, range(len(ds))))
        sync()
        seconds = time.perf_counter() - t0
    return seconds, out


def relative_error(ds: Sequence[np.ndarray], factors: Sequence[tuple[np.ndarray, np.ndarray]]
                   ) -> float:  # fmt: skip
    """sqrt(sum ||D - up @ down||^2) / sqrt(sum ||D||^2) over all layers."""
    num = den = 0.0
    for d, (up, down) in zip(ds, factors):
        r = (d - up @ down).reshape(-1).astype(np.float64)
        v = d.reshape(-1).astype(np.float64)
        num += float(np.dot(r, r))
        den += float(np.dot(v, v))
    return math.sqrt(num / den) if den else 0.0


def run_matrix(
    entries: Sequence[Any],
    ds: Sequence[np.ndarray],
    combos: Sequence[tuple[str, str, int]],
    device: str,
    torch_threads: Optional[int],
    repeat: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Time every (backend, method, workers) of ``combos``, in that order."""
    rows: list[dict[str, Any]] = []
    widths = (7, 8, 7, 9, 11, 8)
    log(_row(("backend", "method", "workers", "seconds", "rel error", "layers"), widths))
    backends: dict[str, Any] = {}
    errors: dict[tuple[str, str], float] = {}
    for bname, method, w in combos:
        if bname not in backends:
            backends[bname] = make_backend(bname, device)
            if bname == "torch" and torch_threads:
                backends[bname].torch.set_num_threads(torch_threads)
        backend = backends[bname]
        threads = backend.torch.get_num_threads() if bname == "torch" else None
        times = []
        factors: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(repeat):
            s, factors = decompose_all(backend, method, entries, ds, w)
            times.append(s)
        if (bname, method) not in errors:  # the same factors whatever the threads
            errors[bname, method] = relative_error(ds, factors)
        err = errors[bname, method]
        del factors
        row = {
            "backend": bname,
            "device": getattr(backend, "device", "cpu"),
            "method": method,
            "workers": w,
            "seconds": min(times),
            "seconds_all": times,
            "rel_error": err,
            "layers": len(ds),
            "torch_threads": threads,
        }
        rows.append(row)
        log(_row((bname, method, w, f"{row['seconds']:.2f}", f"{err:.6f}", len(ds)), widths))
    return rows


def _row(cells: Sequence[object], widths: Sequence[int]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def pick(rows: Sequence[dict[str, Any]], backend: str, method: str, workers: int
         ) -> Optional[dict[str, Any]]:  # fmt: skip
    return next((r for r in rows if (r["backend"], r["method"], r["workers"]) ==
                 (backend, method, workers)), None)  # fmt: skip


# --------------------------------------------------------------------------------------
# One layer with a decaying spectrum (how exact each method is)
# --------------------------------------------------------------------------------------


def one_layer(rank: int, backends: Sequence[str], methods: Sequence[str], device: str,
              m: int = 1280, n: int = 11520) -> list[dict[str, Any]]:  # fmt: skip
    rng = np.random.default_rng(0)
    k = 64
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = np.logspace(0, -2, k)  # singular values decaying 1 -> 0.01
    d64 = (u * s) @ v.T + 0.02 / math.sqrt(n) * rng.standard_normal((m, n))
    d = (d64 * 0.01).astype(np.float32)
    d64 = d.astype(np.float64)
    sv = np.linalg.svd(d64, compute_uv=False)
    ref = math.sqrt(float((sv[rank:] ** 2).sum()) / float((sv**2).sum()))
    print(f"\n== one {m}x{n} layer, rank-{k} spectrum (1 -> 0.01) plus noise, rank {rank} ==")
    print(f"   float64 SVD: best relative error {ref:.8f}")
    widths = (7, 8, 8, 12, 10)
    print(_row(("backend", "method", "seconds", "rel error", "excess"), widths))
    rows = []
    for bname in backends:
        backend = make_backend(bname, device)
        for method in methods:
            t0 = time.perf_counter()
            up, down, _ = backend.decompose(d, method, rank).factors(rank, "balanced")
            dt = time.perf_counter() - t0
            r = d64 - up.astype(np.float64) @ down.astype(np.float64)
            err = float(np.linalg.norm(r) / np.linalg.norm(d64))
            rows.append({"backend": bname, "method": method, "seconds": dt, "rel_error": err,
                         "best": ref})  # fmt: skip
            print(_row((bname, method, f"{dt:.2f}", f"{err:.8f}", f"{err - ref:+.1e}"), widths),
                  flush=True)  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _list(text: str, allowed: Optional[Sequence[str]] = None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed or [])}")
    return items


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--control", type=Path, default=DEFAULT_CONTROL)
    p.add_argument("--base", type=Path, default=DEFAULT_BASE)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--methods", type=lambda t: _list(t, METHODS), default=list(METHODS))
    p.add_argument("--backends", type=lambda t: _list(t, BACKENDS), default=["numpy", "torch"])
    p.add_argument(
        "--workers",
        type=lambda t: [int(x) for x in _list(t)],
        default=sorted({1, default_workers()}),
        help="worker thread counts to time (comma-separated; default 1 and the export's "
        "default, min(4, CPUs))",
    )
    p.add_argument(
        "--combos",
        type=_combos,
        default=None,
        help="time exactly these BACKEND:METHOD:WORKERS (comma-separated, e.g. "
        "numpy:gram:2,torch:exact:1) instead of every backend x method x workers",
    )
    p.add_argument("--device", default="cpu", help="device of the torch backend (cpu, cuda)")
    p.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads for torch rows"
    )
    p.add_argument("--repeat", type=int, default=1, help="timed passes per row (best kept)")
    p.add_argument("--max-layers", type=int, default=None, help="only the first N layers")
    p.add_argument("--one-layer", action="store_true", help="also the one-layer accuracy test")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    if a.combos is None:
        a.combos = [(b, m, w) for b in a.backends for m in a.methods for w in a.workers]
    if a.rank < 1 or a.repeat < 1 or any(w < 1 for _, _, w in a.combos):
        p.error("--rank, --repeat and --workers must be at least 1")
    return a


def _combos(text: str) -> list[tuple[str, str, int]]:
    out = []
    for item in _list(text):
        parts = item.split(":")
        if len(parts) != 3 or parts[0] not in BACKENDS or parts[1] not in METHODS:
            raise argparse.ArgumentTypeError(f"{item!r}: BACKEND:METHOD:WORKERS, with BACKEND "
                                             f"in {BACKENDS}, METHOD in {METHODS}")  # fmt: skip
        try:
            out.append((parts[0], parts[1], int(parts[2])))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: WORKERS is a number") from None
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    for f in (a.control, a.base):
        if not f.exists():
            raise SystemExit(
                f"{f} missing: generate a pair with cndiff.synthetic.make_pair(folder) (full "
                "size: ~10 GB), or run benchmarks/bench.py once"
            )
    from threadpoolctl import threadpool_info

    blas = [f"{i['internal_api']} ({i['num_threads']} threads)" for i in threadpool_info()
            if i.get("user_api") == "blas"]  # fmt: skip
    print(f"python {platform.python_version()}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, BLAS: {', '.join(blas) or '?'}")  # fmt: skip
    print(f"{a.control} vs {a.base}, rank {a.rank}")
    entries, ds, info = load_layers(a.control, a.base, a.rank, a.max_layers)
    print(
        f"layout: {info['layout']['lora']} factorized, {info['layout']['weight']} stored in full, "
        f"{info['layout']['copy']} copied; {info['layers']} differences read "
        f"({info['d_bytes'] / 1e9:.2f} GB float32, largest {info['largest']}) in "
        f"{info['read_s']:.1f} s (not timed)",
        flush=True,
    )
    print("\n== all factorized layers: decompose + factors, BLAS 1 thread per worker ==")
    rows = run_matrix(entries, ds, a.combos, a.device, a.torch_threads, a.repeat,
                      log=lambda s: print(s, flush=True))  # fmt: skip
    del ds
    layer_rows = []
    if a.one_layer:
        backends = list(dict.fromkeys(b for b, _, _ in a.combos))
        methods = list(dict.fromkeys(m for _, m, _ in a.combos))
        layer_rows = one_layer(a.rank, backends, methods, a.device)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({
            "control": str(a.control), "base": str(a.base), "rank": a.rank,
            "cpus": os.cpu_count(), "default_workers": default_workers(), **info,
            "rows": rows, "one_layer": layer_rows,
        }, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
