"""The ``cndiff`` command line. It parses arguments and calls the library, nothing more."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__
from .errors import CndiffError

log = logging.getLogger("cndiff")

_EPILOG = """\
examples:
  cndiff extract control_sd15_canny.pth v1-5-pruned.ckpt
  cndiff extract control_sd15_canny.pth --base self -o diffs/
  cndiff batch models/ v1-5-pruned.ckpt -o diffs/
  cndiff demo
"""

_BASE_HELP = (
    "the SD checkpoint the ControlNet was built on (.ckpt/.pth/.safetensors), or 'self' to "
    "use the SD1.5 UNet copy every original control_sd15_*.pth embeds "
    "(model.diffusion_model.*: the non-EMA weights of v1-5-pruned.ckpt, which the "
    "ControlNets were trained from; a diff taken against v1-5-pruned-emaonly differs from "
    "it by the EMA offset)"
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                   help="output dtype (default: fp16)")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available), cpu or cuda (default: auto)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--chunk-mb", type=float, default=4.0, metavar="MB",
                   help="float32 megabytes per chunk; bounds memory (default: 4)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="compute threads (default: min(4, CPUs))")  # fmt: skip


def _add_provenance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hash", action="store_true",
                   help="record the inputs' sha256 in the output metadata (reads both files "
                   "whole once more)")  # fmt: skip
    p.add_argument("--no-check-base", action="store_true",
                   help="skip comparing the base with the SD UNet embedded in an original "
                   "control file (reads another 1.4 GB for SD1.5)")  # fmt: skip


def _add_lora(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Control-LoRA (--format control-lora)")
    g.add_argument("--format", choices=["difference", "control-lora"], default="difference",
                   help="difference model (default, exact) or Control-LoRA (about 5x smaller, "
                   "lossy, loaded by every loader including Forge)")  # fmt: skip
    ranks = g.add_mutually_exclusive_group()
    ranks.add_argument("--rank", type=int, default=None, metavar="N",
                       help="rank of every factorized layer (default: 128)")  # fmt: skip
    ranks.add_argument(
        "--max-error",
        type=float,
        default=None,
        metavar="E",
        help="per layer, the smallest rank with ||D - up@down||/||D|| <= E",
    )
    g.add_argument("--stability-compatible", action="store_true",
                   help="the layout of Stability's SD1.5 rank-128 files (463 keys)")  # fmt: skip
    g.add_argument("--svd", choices=["auto", "gram", "exact", "lowrank"], default="auto",
                   help="SVD method (default auto = gram: exact and fastest on a CPU)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cndiff",
        description="Turn original ControlNet checkpoints into small difference models.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cndiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "extract",
        help="write the difference model of a ControlNet checkpoint",
        description="Write control - base for every control_model.* tensor as a difference "
        "model (diff_<name>_<dtype>.safetensors beside the control file unless -o).",
    )
    ex.add_argument(
        "paths",
        nargs="+",
        metavar="CONTROL... BASE",
        help="original ControlNet checkpoint(s) (control_sd15_*.pth), then the base; "
        "several controls are converted as a batch, reading the base once",
    )
    ex.add_argument("--base", dest="base_opt", metavar="BASE", help=_BASE_HELP)
    ex.add_argument("-o", "--out", help="output file, or an existing folder")
    ex.add_argument("--json", action="store_true", help="print the batch summary as JSON")
    _add_provenance(ex)
    _add_lora(ex)
    ex.add_argument("--drop-unchanged", action="store_true",
                    help="leave out keys equal to the base (as the original script does; "
                    "loaders then rebuild them wrongly)")  # fmt: skip
    _add_common(ex)

    ba = sub.add_parser(
        "batch",
        help="convert every ControlNet checkpoint in a folder, reading the base once",
        description="Convert every ControlNet checkpoint (.pth/.ckpt/.safetensors holding "
        "control_model.*) in MODELS_DIR; other files are listed as skipped. Complete "
        "outputs from an earlier run are skipped unless --overwrite.",
    )
    ba.add_argument("models_dir", help="folder holding control_sd15_*.pth files")
    ba.add_argument("base", nargs="?", help=_BASE_HELP)
    ba.add_argument("--base", dest="base_opt", metavar="BASE", help="same as the positional")
    ba.add_argument("-o", "--out", help="output folder (default: MODELS_DIR)")
    ba.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_provenance(ba)
    _add_lora(ba)
    ba.add_argument(
        "--drop-unchanged",
        action="store_true",
        help="leave out keys equal to the base (as the original script does)",
    )
    _add_common(ba)

    ins = sub.add_parser(
        "inspect",
        help="say what a checkpoint file is (without loading it)",
        description="Say what a file is: original/pruned ControlNet, difference model, "
        "Control-LoRA, diffusers ControlNet, SD checkpoint; architecture, keys, dtypes, "
        "metadata, and how ComfyUI, sd-webui-controlnet and Forge treat it.",
    )
    ins.add_argument("files", nargs="+", help="checkpoint files")
    ins.add_argument("--json", action="store_true", help="print JSON")

    ve = sub.add_parser(
        "verify",
        help="rebuild a diff the way the loaders do and compare with the original",
        description="Rebuild every weight of DIFF as ComfyUI, sd-webui-controlnet and an "
        "exact float32 sum do, and compare with the original ControlNet. Exit 0 when every "
        "key is present and every error is within the derived rounding bound.",
    )
    ve.add_argument("diff", help="difference model (or Control-LoRA) to check")
    ve.add_argument("--control", required=True, help="the original ControlNet checkpoint")
    ve.add_argument("--base", required=True, help="the SD base it was taken against or 'self'")
    ve.add_argument("--json", action="store_true", help="print the report as JSON")
    ve.add_argument("--per-key", action="store_true", help="list every key's errors")
    ve.add_argument(
        "--no-check-base",
        action="store_true",
        help="skip comparing the base with the control file's embedded UNet",
    )
    ve.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    ap = sub.add_parser(
        "apply",
        help="bake a difference model into a standalone ControlNet for a given base",
        description="Add BASE's UNet to DIFF and write a standalone ControlNet "
        "(control_model.* keys, no 'difference' marker) that any loader takes.",
    )
    ap.add_argument("diff", help="difference model (diff_*.safetensors)")
    ap.add_argument("base", help="SD checkpoint (fine-tune) to bake in")
    ap.add_argument("-o", "--out", help="output file, or an existing folder")
    _add_common(ap)

    demo = sub.add_parser("demo", help="extract a built-in synthetic pair (no models needed)")
    demo.add_argument("folder", nargs="?", default="cndiff-demo",
                      help="where to write the demo files (default: ./cndiff-demo)")  # fmt: skip
    _add_common(demo)
    return parser


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("cndiff")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _base_arg(positional: str | None, option: str | None) -> str:
    if positional and option:
        raise CndiffError("give the base once: positional or --base, not both")
    base = option or positional
    if base is None:
        raise CndiffError("name the SD base checkpoint (or --base self)")
    return base


def _show_progress(args: argparse.Namespace) -> bool:
    # Bars only on a terminal: in a log file they would be escape codes and redraws.
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _options(args: argparse.Namespace) -> dict:
    """The keyword arguments extract and extract_many share, from the command line."""
    return {
        "dtype": args.dtype,
        "device": args.device,
        "overwrite": args.overwrite,
        "drop_unchanged": args.drop_unchanged,
        "chunk_mb": args.chunk_mb,
        "workers": args.workers,
        "hash_inputs": args.hash,
        "check_base": not args.no_check_base,
        "format": args.format,
        "rank": args.rank,
        "max_error": args.max_error,
        "stability_compatible": args.stability_compatible,
        "svd": args.svd,
        "progress": _show_progress(args),
    }


def _cmd_extract(args: argparse.Namespace) -> int:
    from .api import extract

    paths = list(args.paths)
    if args.base_opt is None and len(paths) < 2:
        raise CndiffError("name the SD base checkpoint after the control file (or --base self)")
    base = _base_arg(None if args.base_opt else paths.pop(), args.base_opt)
    if len(paths) > 1:
        return _run_batch(paths, base, args, skipped=[])
    result = extract(paths[0], base, args.out, **_options(args))
    print(result)
    worst = getattr(result, "worst", None)
    if worst is not None:
        for layer in worst(3):
            print(f"  worst layer: {layer.key} rank {layer.rank}, "
                  f"relative error {layer.rel_error:.4f}")  # fmt: skip
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import find_controls

    base = _base_arg(args.base, args.base_opt)
    controls, skipped = find_controls(args.models_dir)
    if args.out is None:
        args.out = args.models_dir
    if not controls:
        raise CndiffError(f"no ControlNet checkpoints (control_model.* keys) in {args.models_dir}")
    return _run_batch([str(c) for c in controls], base, args, skipped)


def _run_batch(controls: list[str], base: str, args: argparse.Namespace, skipped: list) -> int:
    import json

    from .batch import extract_many, format_summary, summary_json

    if args.out is not None and not os.path.isdir(args.out):
        raise CndiffError(f"with several models, -o must be an existing folder ({args.out})")
    results = extract_many(controls, base, args.out, **_options(args))
    results = results + skipped
    if args.json:
        print(json.dumps(summary_json(results), indent=2))
    else:
        print(format_summary(results))
    return 1 if any(r.status == "failed" for r in results) else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .identify import format_report, inspect_file

    reports = [inspect_file(f) for f in args.files]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(format_report(r) for r in reports))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from .verify import format_verify, verify

    report = verify(args.diff, args.control, args.base, check_base=not args.no_check_base,
                    progress=_show_progress(args))  # fmt: skip
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_verify(report, per_key=args.per_key))
    return 0 if report.passed else 1


def _cmd_apply(args: argparse.Namespace) -> int:
    from .apply import apply_diff

    result = apply_diff(args.diff, args.base, args.out, dtype=args.dtype, device=args.device,
                        overwrite=args.overwrite, chunk_mb=args.chunk_mb, workers=args.workers,
                        progress=_show_progress(args))  # fmt: skip
    print(result)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .api import extract
    from .synthetic import make_pair, tiny

    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    control, base = make_pair(folder, tiny(), embedded_unet="same")
    print(f"synthetic pair: {control} ({control.stat().st_size:,} B), "
          f"{base} ({base.stat().st_size:,} B)")  # fmt: skip
    result = extract(control, base, folder, dtype=args.dtype, device=args.device,
                     overwrite=True, progress=_show_progress(args))  # fmt: skip
    print(result)
    return 0


def _on_sigterm(signum: int, frame: object) -> None:
    print("cndiff: terminated; no output written", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(getattr(args, "quiet", False))
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        command = {
            "extract": _cmd_extract,
            "batch": _cmd_batch,
            "inspect": _cmd_inspect,
            "verify": _cmd_verify,
            "apply": _cmd_apply,
            "demo": _cmd_demo,
        }[args.command]
        if not _show_progress(args):
            return command(args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=[log]):
            return command(args)
    except CndiffError as exc:
        print(f"cndiff: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cndiff: interrupted; no output written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
