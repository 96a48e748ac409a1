#!/usr/bin/env python3
"""Drop-in replacement for sd-webui-controlnet's extract_controlnet_diff.py, on cndiff.

Same flags as the original: --sd15 BASE --control CONTROL --dst OUT [--fp16 | --bf16]
(float32 when neither). A .safetensors --dst is written as safetensors, any other as
torch.save({"state_dict": ...}), as the original does. Unlike the original, keys equal
to the base are kept (as zeros) so loaders rebuild them; --drop-unchanged restores the
original behaviour. Runs in bounded memory for safetensors output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cndiff.commands.compat import extract_like_original  # noqa: E402
from cndiff.errors import CndiffError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sd15", required=True, help="Path to the original sd15.")
    p.add_argument("--control", required=True, help="Path to the sd15 with control.")
    p.add_argument("--dst", required=True, help="Path to the output difference model.")
    p.add_argument("--fp16", action="store_true", help="Save as fp16.")
    p.add_argument("--bf16", action="store_true", help="Save as bf16.")
    p.add_argument("--drop-unchanged", action="store_true",
                   help="drop keys equal to the base, exactly as the original does")  # fmt: skip
    args = p.parse_args(argv)
    dtype = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    try:
        out = extract_like_original(args.control, args.sd15, args.dst, dtype=dtype,
                                    drop_unchanged=args.drop_unchanged)  # fmt: skip
    except CndiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done! {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
