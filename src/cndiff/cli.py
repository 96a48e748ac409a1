"""The ``cndiff`` command line: it parses arguments, calls the library, renders results.

Every option flag maps onto one field of :class:`cndiff.options.Options` (validated there,
before any file is opened). Every error is one line on stderr with a non-zero exit code:
1 for a cndiff error (or a failed model in a batch), 2 for a command line that does not
parse, 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from ._version import __version__
from .errors import CndiffError
from .text import escape

log = logging.getLogger("cndiff")

_EPILOG = """\
examples:
  cndiff extract control_sd15_canny.pth v1-5-pruned.ckpt
  cndiff extract control_sd15_canny.pth --base self -o diffs/
  cndiff batch models/ v1-5-pruned.ckpt -o diffs/
  cndiff verify diff_control_sd15_canny_fp16.safetensors --control control_sd15_canny.pth \\
      --base v1-5-pruned.ckpt
  cndiff prune control_v11p_sd15_canny.pth
  cndiff convert control_sd15_canny.pth --to diffusers
  cndiff demo
"""

_BASE_HELP = (
    "the SD checkpoint the ControlNet was built on (.ckpt/.pth/.safetensors), or 'self' to "
    "use the SD UNet copy every original control_sd15_*.pth embeds "
    "(model.diffusion_model.*: the non-EMA weights of v1-5-pruned.ckpt, which the "
    "ControlNets were trained from; a diff taken against v1-5-pruned-emaonly differs from "
    "it by the EMA offset)"
)


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cndiff: error: {escape(message, 500)} (see '{self.prog} --help')\n")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _add_run(p: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    """Options of every command that computes."""
    if dtype:
        p.add_argument("--dtype", default="fp16", metavar="{fp16,bf16,fp32}",
                       help="output dtype (default: fp16)")  # fmt: skip
        p.add_argument("--device", default="auto",
                       help="auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N "
                       "(default: auto)")  # fmt: skip
        p.add_argument("--backend", default="auto", choices=["auto", "numpy", "torch"],
                       help="compute backend: numpy (the CPU default) or torch (any device; "
                       "the same bytes)")  # fmt: skip
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output (an output of the same job is "
                       "otherwise skipped, one of another job refused)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--chunk-mb", type=_number, default=4.0, metavar="MB",
                   help="float32 megabytes per chunk, 0.001 to 256; bounds memory "
                   "(default: 4)")  # fmt: skip
    p.add_argument("--workers", type=_whole, default=None, metavar="N",
                   help="compute threads, 1 to 64 (default: min(4, CPUs))")  # fmt: skip


def _add_hash(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hash", "--hash-inputs", dest="hash_inputs", action="store_true",
                   help="record the inputs' hashes (sha256, AutoV1/V2/V3, CRC32) in the "
                   "output's metadata (reads each input whole once more)")  # fmt: skip


def _add_extract(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", dest="base_opt", metavar="BASE", help=_BASE_HELP)
    p.add_argument("-o", "--out", help="output file, or folder (created when it ends with /)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_hash(p)
    p.add_argument("--no-check-base", dest="check_base", action="store_false",
                   help="skip comparing the base with the SD UNet embedded in an original "
                   "control file (reads another 1.4 GB for SD1.5)")  # fmt: skip
    p.add_argument("--drop-unchanged", action="store_true",
                   help="leave out keys equal to the base (as the original script does; "
                   "loaders then rebuild them wrongly)")  # fmt: skip
    g = p.add_argument_group("Control-LoRA (--format control-lora)")
    g.add_argument("--format", default="difference", choices=["difference", "control-lora"],
                   help="difference model (default, exact) or Control-LoRA (about 5x smaller, "
                   "lossy, loaded by every loader including Forge)")  # fmt: skip
    g.add_argument("--rank", type=_whole, default=None, metavar="N",
                   help="rank of every factorized layer (default: 128)")
    g.add_argument("--max-error", type=_number, default=None, metavar="E",
                   help="per layer, the smallest rank whose relative error of the difference "
                   "||D - up@down||/||D|| is at most E")  # fmt: skip
    g.add_argument("--stability-compatible", action="store_true",
                   help="the layout of Stability's published rank-128 files")
    g.add_argument("--svd", default="auto", choices=["auto", "gram", "exact", "lowrank"],
                   help="SVD method (default auto = gram: exact and fastest on a CPU)")
    _add_run(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    ex.add_argument("paths", nargs="+", metavar="CONTROL... BASE",
                    help="ControlNet checkpoint(s) (control_sd15_*.pth), then the base; "
                    "several controls are converted as a batch, reading the base once")  # fmt: skip
    _add_extract(ex)

    ba = sub.add_parser(
        "batch",
        help="convert every ControlNet checkpoint in a folder, reading the base once",
        description="Convert every ControlNet checkpoint in MODELS_DIR; other files are "
        "listed as skipped (unreadable ones as failed). Outputs of the same job from an "
        "earlier run are skipped unless --overwrite.",
    )
    ba.add_argument("models_dir", help="folder holding control_sd15_*.pth files")
    ba.add_argument("base", nargs="?", help=_BASE_HELP)
    _add_extract(ba)

    ins = sub.add_parser(
        "inspect",
        help="say what a checkpoint file is (without loading it)",
        description="Say what a file is: original/pruned ControlNet, difference model, "
        "Control-LoRA, diffusers ControlNet, SD checkpoint; architecture, keys, dtypes, "
        "metadata, and how ComfyUI, sd-webui-controlnet and Forge treat it.",
    )
    ins.add_argument("files", nargs="+", help="checkpoint files")
    ins.add_argument("--json", action="store_true", help="print JSON")
    ins.add_argument("--hash", action="store_true",
                     help="also the hashes model sites show (reads each file whole)")
    ins.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    ve = sub.add_parser(
        "verify",
        help="rebuild a diff the way the loaders do and compare with the original",
        description="Rebuild every weight of DIFF as ComfyUI, sd-webui-controlnet and an "
        "exact float32 sum do, and compare with the original ControlNet. Exit 0 when every "
        "key is present and every error is within the derived rounding bound.",
    )
    ve.add_argument("diff", help="difference model (or Control-LoRA) to check")
    ve.add_argument("--control", required=True, help="the original ControlNet checkpoint")
    ve.add_argument("--base", required=True, help="the SD base it was taken against, or 'self'")
    ve.add_argument("--json", action="store_true", help="print the report as JSON")
    ve.add_argument("--per-key", action="store_true", help="list every key's errors")
    ve.add_argument("--no-check-base", dest="check_base", action="store_false",
                    help="skip comparing the base with the control file's embedded UNet")
    _add_run(ve, dtype=False)

    ap = sub.add_parser(
        "apply",
        help="bake a difference model into a standalone ControlNet for a given base",
        description="Add BASE's UNet to DIFF and write a standalone ControlNet "
        "(control_model.* keys, no 'difference' marker) that any loader takes.",
    )
    ap.add_argument("diff", help="difference model (diff_*.safetensors)")
    ap.add_argument("base", help="SD checkpoint (fine-tune) to bake in")
    ap.add_argument("-o", "--out", help="output file, or folder (created when it ends with /)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_hash(ap)
    _add_run(ap)

    pr = sub.add_parser(
        "prune",
        help="keep a ControlNet's own weights (fp16 by default), drop the rest",
        description="Write the ControlNet weights of each file alone, cast to --dtype: an "
        "original control_sd15_*.pth (5.7 GB) or a ControlNet 1.1 file (1.45 GB) becomes 723 "
        "MB in fp16. Keys keep their names (control_model.*, or diffusers names).",
    )
    pr.add_argument("controls", nargs="+", metavar="CONTROL",
                    help="ControlNet files (any layout; a diffusers folder too)")
    pr.add_argument("-o", "--out", help="output file, or folder (created when it ends with /)")
    pr.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_hash(pr)
    _add_run(pr)

    co = sub.add_parser(
        "convert",
        help="convert a ControlNet between the ldm and the diffusers layout",
        description="--to diffusers: an ldm ControlNet becomes a diffusers folder "
        "(config.json + diffusion_pytorch_model.safetensors) that "
        "diffusers.ControlNetModel.from_pretrained loads offline. --to ldm: a diffusers "
        "ControlNet (file or folder) becomes one control_model.* file for ComfyUI, "
        "sd-webui-controlnet and Forge. Tensors are renamed, never changed (but for --dtype).",
    )
    co.add_argument("models", nargs="+", metavar="MODEL", help="ControlNet files or folders")
    co.add_argument("--to", required=True, choices=["diffusers", "ldm"], help="target layout")
    co.add_argument("-o", "--out", help="output folder (diffusers) or file (ldm)")
    co.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_hash(co)
    _add_run(co)

    demo = sub.add_parser("demo", help="extract a built-in synthetic pair (no models needed)")
    demo.add_argument("folder", nargs="?", default="cndiff-demo",
                      help="where to write the demo files (default: ./cndiff-demo)")
    _add_run(demo)
    return parser


_OPTION_FIELDS = ("dtype", "device", "backend", "overwrite", "drop_unchanged", "check_base",
                  "hash_inputs", "chunk_mb", "workers", "format", "rank", "max_error",
                  "stability_compatible", "svd")  # fmt: skip


def _options(args: argparse.Namespace):
    """The Options the flags given map onto (one field per flag)."""
    from .options import Options

    kw: dict[str, Any] = {f: getattr(args, f) for f in _OPTION_FIELDS if hasattr(args, f)}
    kw["progress"] = not args.quiet and sys.stderr.isatty()
    return Options(**kw)


def _one_blas_thread(args: argparse.Namespace) -> None:
    """Have OpenBLAS start with one thread for the commands that make no BLAS call (all
    but the Control-LoRA export and verify, which multiply matrices). Its idle worker
    thread spins about 0.12 s of CPU once numpy is imported (perf: ``blas_thread_server``,
    6 % of an extract's samples and 9 % of an apply's), CPU that cndiff's own two workers
    need on a 2-core machine. Only before numpy's import, and never over a setting of the
    user's."""
    if "numpy" in sys.modules or args.command == "verify":
        return
    if getattr(args, "format", None) == "control-lora":
        return
    if any(v in os.environ for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
                                     "OMP_NUM_THREADS")):  # fmt: skip
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"


@contextlib.contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    """cndiff's log lines on stderr, whole, for the length of one command (then the
    logger is as it was: main() may be called from a notebook or a test)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = log.handlers[:], log.level, log.propagate
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.handlers[:], log.level, log.propagate = saved


def _print_results(results: Sequence, as_json: bool, table: bool) -> int:
    from .results import BatchResult

    batch = BatchResult(results)
    if as_json:
        print(json.dumps(batch.to_dict(), indent=2))
    elif table:
        print(batch)
    else:
        for r in batch:
            print(r)
            if getattr(r, "lora", None) is not None:
                for layer in r.lora.worst(3):
                    print(f"  largest error: {escape(layer.key)} (rank {layer.rank}): "
                          f"{layer.diff_error:.4f} of the difference")  # fmt: skip
    return 0 if batch.ok else 1


def _cmd_extract(args: argparse.Namespace) -> int:
    from .commands.extract import extract_many

    opts = _options(args)
    paths = list(args.paths)
    if args.base_opt is None:
        if len(paths) < 2:
            raise CndiffError("name the SD base checkpoint after the control file (or --base "
                              "self)")  # fmt: skip
        base = paths.pop()
    else:
        base = args.base_opt
    if len(paths) == 1:
        from .commands.extract import extract

        result = extract(paths[0], base, args.out, options=opts)
        return _print_results([result], args.json, table=False)
    results = extract_many(paths, base, args.out, options=opts)
    return _print_results(results, args.json, table=True)


def _cmd_batch(args: argparse.Namespace) -> int:
    from .commands.extract import extract_many

    opts = _options(args)
    if args.base and args.base_opt:
        raise CndiffError("give the base once: positional or --base, not both")
    base = args.base_opt or args.base
    if base is None:
        raise CndiffError("name the SD base checkpoint after the folder (or --base self)")
    if not os.path.isdir(args.models_dir):
        raise CndiffError(f"{escape(args.models_dir)} is not a folder; name the folder holding "
                          "the models")  # fmt: skip
    out = args.out if args.out is not None else args.models_dir
    results = extract_many(args.models_dir, base, out, options=opts)
    return _print_results(results, args.json, table=True)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .commands.inspect import inspect_file

    progress = not args.quiet and sys.stderr.isatty()
    reports = [inspect_file(f, hashes=args.hash, progress=progress) for f in args.files]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(str(r) for r in reports))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .commands.verify import format_verify, verify

    report = verify(args.diff, args.control, args.base, options=_options(args))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_verify(report, per_key=args.per_key))
    return 0 if report.passed else 1


def _cmd_apply(args: argparse.Namespace) -> int:
    from .commands.apply import apply_diff

    result = apply_diff(args.diff, args.base, args.out, options=_options(args))
    return _print_results([result], args.json, table=False)


def _cmd_prune(args: argparse.Namespace) -> int:
    from .commands.prune import prune, prune_many

    opts = _options(args)
    if len(args.controls) == 1:
        return _print_results([prune(args.controls[0], args.out, options=opts)], args.json,
                              table=False)  # fmt: skip
    return _print_results(prune_many(args.controls, args.out, options=opts), args.json,
                          table=True)  # fmt: skip


def _cmd_convert(args: argparse.Namespace) -> int:
    from .commands.convert import convert, convert_many

    opts = _options(args)
    if len(args.models) == 1:
        return _print_results([convert(args.models[0], args.to, args.out, options=opts)],
                              args.json, table=False)  # fmt: skip
    return _print_results(convert_many(args.models, args.to, args.out, options=opts),
                          args.json, table=True)  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .commands.extract import extract
    from .synthetic import make_pair, tiny

    opts = _options(args).replace(overwrite=True)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    control, base = make_pair(folder, tiny(), embedded_unet="same")
    print(f"synthetic pair: {control} ({control.stat().st_size:,} B), "
          f"{base} ({base.stat().st_size:,} B)")  # fmt: skip
    print(extract(control, base, folder, options=opts))
    return 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


_COMMANDS = {
    "extract": _cmd_extract,
    "batch": _cmd_batch,
    "inspect": _cmd_inspect,
    "verify": _cmd_verify,
    "apply": _cmd_apply,
    "prune": _cmd_prune,
    "convert": _cmd_convert,
    "demo": _cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a command line that does not parse
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    _one_blas_thread(args)
    try:
        with _logging(args.quiet):
            return _COMMANDS[args.command](args)
    except CndiffError as exc:
        print(f"cndiff: error: {escape(str(exc), 4000)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cndiff: interrupted; no output written", file=sys.stderr)
        return 130
    except SystemExit as exc:
        if exc.code == 128 + signal.SIGTERM:
            print("cndiff: terminated; no output written", file=sys.stderr)
        raise
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 141
    except Exception as exc:  # a bug: still one line (CNDIFF_DEBUG=1 shows the traceback)
        if os.environ.get("CNDIFF_DEBUG"):
            raise
        print(f"cndiff: internal error ({type(exc).__name__}: {escape(str(exc), 500)}); "
              "please report it, with CNDIFF_DEBUG=1 for the details", file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
