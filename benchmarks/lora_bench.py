"""Control-LoRA export: SVD methods compared on time and error (CPU, one thread by default).

    python benchmarks/lora_bench.py [--control C.pth --base B.ckpt] [--threads 1]

Part 1 exports the full-size synthetic SD1.5 pair (``cndiff.synthetic.make_pair(folder)``)
at rank 128 with each SVD method and prints wall time, SVD time, output size and the
overall relative error. NOTE: the synthetic differences are i.i.d. Gaussian noise, so they
are full rank and a rank-128 approximation keeps only a small part of their energy; real
ControlNet differences have decaying spectra. Part 2 therefore also times one
1280 x 11520 layer (the largest 3x3 convolution) whose difference is low rank plus noise,
against a float64 SVD reference, including the Gram matrix in float32 (not offered: shown
to justify float64).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from cndiff.lora import _Decomposition, extract_control_lora

DEFAULT_CONTROL = Path("/tmp/fullsize/control_sd15_synthetic.pth")
DEFAULT_BASE = Path("/tmp/fullsize/sd15_base_synthetic.ckpt")


def _row(cells, widths) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))


def full_model(
    control: Path, base: Path, methods: list[str], rank: int, device: str = "cpu"
) -> None:
    print(f"\n== whole model: {control.name} vs {base.name}, rank {rank}, fp16, {device} ==")
    print("   (synthetic differences are Gaussian noise: full rank, flat spectrum)")
    head = ["method", "wall s", "factor s", "MB", "params", "rel error", "trunc err", "energy"]
    widths = [22, 8, 8, 7, 11, 10, 10, 8]
    print(_row(head, widths))
    with tempfile.TemporaryDirectory(dir=control.parent) as tmp:
        runs = [(m, False) for m in methods] + [("gram", True)]
        for method, stab in runs:
            out = Path(tmp) / f"{method}{'_stab' if stab else ''}.safetensors"
            r = extract_control_lora(
                control,
                base,
                out,
                rank=rank,
                svd=method,
                device=device,
                stability_compatible=stab,
            )
            label = method + (" (stability)" if stab else "")
            print(
                _row(
                    [
                        label,
                        f"{r.seconds:.1f}",
                        f"{r.svd_seconds:.1f}",
                        f"{r.bytes / 1e6:.1f}",
                        f"{r.params:,}",
                        f"{r.overall_rel_error:.5f}",
                        f"{r.overall_trunc_error:.5f}",
                        f"{r.energy:.4f}",
                    ],
                    widths,
                ),
                flush=True,
            )
            out.unlink()


def _lowrank_plus_noise(m: int, n: int, k: int = 64, noise: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    s = torch.logspace(0, -2, k)  # singular values decaying 1 -> 0.01
    d = (u * s) @ v.T
    d += noise * float(s[0]) / math.sqrt(n) * torch.randn(m, n, generator=g)
    return (d * 0.01).float()


def one_layer(rank: int) -> None:
    m, n = 1280, 11520
    d = _lowrank_plus_noise(m, n)
    d64 = d.double()
    u, s, vh = torch.linalg.svd(d64, full_matrices=False)
    ref = float((s[rank:] ** 2).sum().sqrt() / (s**2).sum().sqrt())
    print(f"\n== one {m}x{n} layer, rank-64 spectrum (1 -> 0.01) plus noise, rank {rank} ==")
    print(f"   float64 SVD reference: relative error {ref:.7f}")
    widths = [22, 8, 12, 12]
    print(_row(["method", "s", "rel error", "excess"], widths))

    def gram32(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = d @ d.T
        w, v = torch.linalg.eigh(g)
        ur = v.flip(1)[:, :rank]
        return ur, ur.T @ d

    cases = [
        ("exact (svd f32)", lambda: _Decomposition(d, "exact", rank).factors(rank, "balanced")),
        ("gram (f64, default)", lambda: _Decomposition(d, "gram", rank).factors(rank, "balanced")),
        ("gram in f32", lambda: gram32(d)),
        ("lowrank niter=4", lambda: _Decomposition(d, "lowrank", rank).factors(rank, "balanced")),
    ]
    for label, fn in cases:
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        up, down = out[0], out[1]
        err = float((d64 - up.double() @ down.double()).norm() / d64.norm())
        print(_row([label, f"{dt:.2f}", f"{err:.7f}", f"{err - ref:+.1e}"], widths), flush=True)
    for niter in (2, 6):
        t = time.perf_counter()
        uu, ss, vv = torch.svd_lowrank(d, q=rank + 10, niter=niter)
        dt = time.perf_counter() - t
        a = (uu[:, :rank].double() * ss[:rank].double()) @ vv[:, :rank].double().T
        err = float((d64 - a).norm() / d64.norm())
        label = f"lowrank niter={niter}"
        print(_row([label, f"{dt:.2f}", f"{err:.7f}", f"{err - ref:+.1e}"], widths), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--control", type=Path, default=DEFAULT_CONTROL)
    p.add_argument("--base", type=Path, default=DEFAULT_BASE)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="gram,exact,lowrank")
    p.add_argument("--skip-full", action="store_true", help="only the one-layer comparison")
    p.add_argument("--device", default="cpu", help="where the whole-model SVDs run (cpu/cuda)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU")
    one_layer(a.rank)
    if not a.skip_full:
        if not a.control.exists() or not a.base.exists():
            raise SystemExit(
                f"{a.control} / {a.base} missing: generate them with "
                "cndiff.synthetic.make_pair(folder) (full size, ~10 GB)"
            )
        full_model(a.control, a.base, a.methods.split(","), a.rank, a.device)


if __name__ == "__main__":
    main()
