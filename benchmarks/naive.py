#!/usr/bin/env python3
"""The baseline: what sd-webui-controlnet's ``extract_controlnet_diff.py`` does, re-stated.

Both checkpoints are loaded whole with ``torch.load`` (``weights_only=False``, as the
original's plain ``torch.load`` did before torch 2.6; the Lightning base under
``cndiff.synthetic.lightning_stub()`` because pytorch_lightning is not installed), the
``"state_dict"`` wrapper is popped, first/cond stage keys are dropped, and for every
``control_model.X`` the output holds ``control_model.X - model.diffusion_model.X``
(skipped when ``max |d| < 1e-6``) or the control tensor itself when the base has no such
key. Everything is cast with ``.to(float16)``, a ``difference = 1.0`` marker is added and
the result is written with ``safetensors.torch.save_file`` (which does not fsync).

``--mmap`` passes ``mmap=True`` to ``torch.load`` (torch >= 2.1): tensors are then pages
of the mapped file, read on first touch.

Usage: ``python benchmarks/naive.py --control C.pth --base B.ckpt --dst OUT.safetensors
[--mmap]``. Prints per-phase seconds on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time


def _under(key: str, prefix: str) -> bool:
    """The original's ``get_node_name(key, prefix)[0]``: a strictly longer key with that prefix."""
    return len(key) > len(prefix) and key.startswith(prefix)


def _drop_first_and_cond(sd: dict) -> dict:
    for key in list(sd.keys()):
        if _under(key, "first_stage_model") or _under(key, "cond_stage_model"):
            sd.pop(key, None)
    return sd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--control", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--mmap", action="store_true", help="torch.load(..., mmap=True)")
    args = p.parse_args(argv)

    phases: list[tuple[str, float]] = []
    t = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases.append((name, now - t))
        t = now

    import torch
    from safetensors.torch import save_file

    from cndiff.synthetic import lightning_stub

    mark("import")
    kw = {"weights_only": False, "mmap": True} if args.mmap else {"weights_only": False}

    with lightning_stub():
        base = torch.load(args.base, **kw)
    base = base.pop("state_dict", base)
    base = _drop_first_and_cond(base)
    mark("load_base")

    control = torch.load(args.control, **kw)
    control = _drop_first_and_cond(control)
    mark("load_control")

    out: dict[str, torch.Tensor] = {"difference": torch.tensor(1.0)}
    dropped = 0
    for key in list(control.keys()):
        value = control.pop(key)
        if not _under(key, "control_"):
            continue
        base_key = "model.diffusion_" + key[len("control_") :]
        if base_key in base:
            value = value - base.pop(base_key)
            if torch.max(torch.abs(value)) < 1e-6:
                dropped += 1
                continue
        out[key] = value
    mark("diff")

    for key in out:
        out[key] = out[key].to(torch.float16)
    mark("cast")

    save_file(out, args.dst)
    mark("save")
    total = sum(s for _, s in phases)
    print(
        f"naive{' (mmap)' if args.mmap else ''}: {len(out)} tensors, {dropped} dropped; "
        + ", ".join(f"{n} {s:.2f}" for n, s in phases)
        + f"; total {total:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
