#!/usr/bin/env python3
"""Benchmark cndiff against the original extraction script on a full-size SD1.5 pair.

One command (see benchmarks/README.md)::

    python benchmarks/bench.py                 # generates /tmp/cndiff-bench once, then runs

Every run is a fresh process, timed from spawn to exit; runners alternate round-robin in
each cache state (warm: inputs in the page cache; cold: inputs and outputs evicted before
each run). Per run: wall seconds, peak RSS (``wait4`` rusage), bytes read from and
written to disk by the child (rusage blocks), the time of an ``os.sync()`` right after it
exits, and the output size. Also measured in the same invocation: interpreter/import
start-up times and the machine's I/O floor (page-cache and disk read throughput, write
throughput with ``fdatasync``), from which a floor for the job itself is derived.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MB = 1e6
GB = 1e9
MiB = 1 << 20

try:
    import cndiff  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(REPO / "src"))

# File names as cndiff.synthetic.make_pair writes them for SD15 (and the EMA base).
CONTROL_NAME = "control_sd15_synthetic.pth"
BASE_NAME = "sd15_base_synthetic.ckpt"
EMA_BASE_NAME = "sd15_base_ema_synthetic.ckpt"

# --------------------------------------------------------------------------------------
# Runners: one row of the table each. A runner turns a Job into a command line.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What one run works on."""

    python: str
    control: Path
    base: Path
    #: the output file of this run (runners with several outputs put them in out_dir)
    out: Path
    out_dir: Path


@dataclass(frozen=True)
class Runner:
    name: str
    help: str
    #: the command line of one run
    command: Callable[[Job], list[str]]
    #: files the run writes (evicted before cold runs, sized after each run)
    outputs: Callable[[Job], list[Path]] = lambda job: [job.out]
    #: files the run reads (warmed / evicted per cache state)
    inputs: Callable[[Job], list[Path]] = lambda job: [job.control, job.base]
    #: compared against the baselines (ratios and targets)
    subject: bool = False
    #: needs a CUDA GPU (also times `import torch; torch.cuda.init()`)
    cuda: bool = False
    #: also reads the control's embedded UNet (cndiff's default base check): job floor
    check_base: bool = False


def _cndiff(*options: str) -> Callable[[Job], list[str]]:
    def command(job: Job) -> list[str]:
        cmd = ["-m", "cndiff", "extract", str(job.control), str(job.base), "-o", str(job.out)]
        return [job.python, *cmd, "--overwrite", "-q", *options]

    return command


def _naive(*options: str) -> Callable[[Job], list[str]]:
    def command(job: Job) -> list[str]:
        files = ["--control", str(job.control), "--base", str(job.base), "--dst", str(job.out)]
        return [job.python, str(HERE / "naive.py"), *files, *options]

    return command


BATCH_NAMES = ["canny", "depth", "hed", "mlsd", "normal", "openpose", "scribble", "seg"]
BATCH_RSS_TARGET = 1024 * MB


def _batch_dirs(job: Job) -> tuple[Path, Path]:
    src, dst = job.out_dir / "batch-in", job.out_dir / "batch-out"
    src.mkdir(parents=True, exist_ok=True)
    dst.mkdir(parents=True, exist_ok=True)
    for name in BATCH_NAMES:
        link = src / f"control_sd15_{name}.pth"
        if not link.exists():
            os.link(job.control, link)
    return src, dst


def _batch_command(job: Job) -> list[str]:
    src, dst = _batch_dirs(job)
    return [
        job.python,
        "-m",
        "cndiff",
        "batch",
        str(src),
        str(job.base),
        "-o",
        str(dst),
        "--overwrite",
        "-q",
        "--device",
        "cpu",
    ]


def _batch_outputs(job: Job) -> list[Path]:
    return [
        job.out_dir / "batch-out" / f"diff_control_sd15_{n}_fp16.safetensors" for n in BATCH_NAMES
    ]


# fmt: off
RUNNERS: dict[str, Runner] = {
    r.name: r
    for r in [
        Runner("cndiff", "cndiff extract --device cpu (fp16)", _cndiff("--device", "cpu"),
               subject=True, check_base=True),
        Runner("cndiff-nocheck", "cndiff extract --device cpu --no-check-base (skips the "
               "base vs embedded-UNet comparison: 1.4 GB less to read)",
               _cndiff("--device", "cpu", "--no-check-base"), subject=True),
        Runner("cndiff-cuda", "cndiff extract --device cuda (fp16)",
               _cndiff("--device", "cuda"), subject=True, cuda=True, check_base=True),
        Runner("naive", "benchmarks/naive.py: the original script (torch.load whole)",
               _naive()),
        Runner("naive-mmap", "benchmarks/naive.py --mmap: torch.load(..., mmap=True)",
               _naive("--mmap")),
        # ---- add rows here ------------------------------------------------------------
        Runner("cndiff-lora", "cndiff extract --format control-lora (rank 128, fp16, exact "
               "Gram SVD)", lambda job: [job.python, "-m", "cndiff", "extract", str(job.control),
               str(job.base), "-o", str(job.out_dir / "lora.safetensors"), "--overwrite", "-q",
               "--device", "cpu", "--format", "control-lora"],
               outputs=lambda job: [job.out_dir / "lora.safetensors"]),
        Runner("cndiff-lora-lowrank", "the same with --svd lowrank (randomized)",
               lambda job: [job.python, "-m", "cndiff", "extract", str(job.control),
               str(job.base), "-o", str(job.out_dir / "lora-lowrank.safetensors"),
               "--overwrite", "-q", "--device", "cpu", "--format", "control-lora",
               "--svd", "lowrank"],
               outputs=lambda job: [job.out_dir / "lora-lowrank.safetensors"]),
        Runner("cndiff-batch", "cndiff batch: 8 controls against one base read once "
               "(the 8 are hard links of the one generated control: they share page "
               "cache, so this row measures memory and CPU, not 8x the disk reads)",
               _batch_command, outputs=_batch_outputs,
               inputs=lambda job: [job.control, job.base]),
    ]
}
# fmt: on
DEFAULT_RUNNERS = "cndiff,naive,naive-mmap"
BASELINES = ("naive", "naive-mmap")

# Targets: (cache state, baseline, max ratio of cndiff's median wall to the baseline's).
WALL_TARGETS = [
    ("warm", "naive", 1 / 6, "<= 1/6 of naive"),
    ("warm", "naive-mmap", 1.15, "<= 1.15x naive-mmap"),
    ("cold", "naive", 1 / 3, "<= 1/3 of naive"),
    ("cold", "naive-mmap", 1.0, "<= naive-mmap"),
]
RSS_TARGET = 512 * MB

# --------------------------------------------------------------------------------------
# Page cache: residency (mincore), eviction (fadvise), reading
# --------------------------------------------------------------------------------------

_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int64,
            ]
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def resident_fraction(path: Path) -> Optional[float]:
    """Fraction of ``path``'s pages in the page cache (mincore), or None if unknown."""
    lib = _libc()
    try:
        size = path.stat().st_size
    except OSError:
        return None
    if lib is None or size == 0:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if lib.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            import numpy as np

            resident = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
            return resident / pages
        finally:
            lib.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(paths: Sequence[Path]) -> None:
    """Write back dirty pages, then drop ``paths`` from the page cache."""
    os.sync()
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through(path: Path, limit: Optional[int] = None, bufsize: int = 16 * MiB) -> float:
    """Read ``path`` (its first ``limit`` bytes) with large reads; returns seconds."""
    buf = bytearray(bufsize)
    view = memoryview(buf)
    limit = path.stat().st_size if limit is None else limit
    done = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < limit:
            n = f.readinto(view[: min(bufsize, limit - done)])
            if not n:
                break
            done += n
    return time.perf_counter() - t0


def make_warm(paths: Sequence[Path]) -> None:
    """Bring ``paths`` wholly into the page cache (reads only files not fully resident)."""
    for p in paths:
        frac = resident_fraction(p)
        if frac is None or frac < 0.999:
            read_through(p)


# --------------------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    runner: str
    label: str
    cache: str
    rep: int
    index: int
    rc: int = 0
    wall_s: float = 0.0
    sync_s: float = 0.0
    user_s: float = 0.0
    sys_s: float = 0.0
    maxrss_bytes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    out_bytes: int = 0
    out_files: int = 0
    out_keys: Optional[int] = None
    resident_before: dict[str, Optional[float]] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    log_tail: str = ""


#: the cndiff source the runs import (main() points it at a snapshot by default)
SRC = REPO / "src"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + old if old else "")
    return env


def snapshot_src(dest: Path, python: str) -> Path:
    """Copy the package source to ``dest``, so edits made during the run do not change it,
    and byte-compile it (runs do not pay for compiling, even with PYTHONDONTWRITEBYTECODE)."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        REPO / "src" / "cndiff", dest / "cndiff", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run([python, "-m", "compileall", "-q", str(dest)], check=False)
    return dest


def git_info() -> dict[str, Optional[str]]:
    """Commit of the checkout and the uncommitted changes under src/ (read-only git)."""

    def git(*a: str) -> Optional[str]:
        try:
            r = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(REPO), *a],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_changes": git("status", "--porcelain", "--", "src"),
    }


def spawn(argv: list[str], log_path: Path) -> tuple[int, float, Any]:
    """Run ``argv`` to completion; (exit code, wall seconds, rusage of that child)."""
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=child_env(),
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 above
    return proc.returncode, wall, usage


def time_command(argv: list[str], n: int = 3) -> list[float]:
    """Wall seconds of ``n`` runs of ``argv`` (after one untimed run)."""
    times = []
    for i in range(n + 1):
        t0 = time.perf_counter()
        subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            env=child_env(),
            check=True,
        )
        if i:
            times.append(time.perf_counter() - t0)
    return times


def safetensors_keys(path: Path) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return sum(1 for k in header if k != "__metadata__")
    except (OSError, ValueError):
        return None


def tail(path: Path, n: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

_GEN = """
import sys
from pathlib import Path
from cndiff import synthetic as s
what, folder, tiny = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
arch = s.tiny(s.SD15) if tiny else s.SD15
if what == "pair":
    s.make_pair(folder, arch)
elif what == "control":
    s.make_control(folder / "control_sd15_synthetic.pth", arch, seed=0, base_seed=0)
elif what == "base":
    s.make_base(folder / "sd15_base_synthetic.ckpt", arch)
elif what == "ema":
    s.make_base(folder / "sd15_base_ema_synthetic.ckpt", arch, ema=True)
"""


def generate(what: str, data: Path, python: str, tiny: bool) -> None:
    """Generate into a temporary folder, then move into ``data`` (no half-written inputs)."""
    tmp = data / ".generating"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"generating {what} in {data} (full-size: a few minutes) ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(
        [python, "-c", _GEN, what, str(tmp), "1" if tiny else "0"],
        check=True,
        cwd=REPO,
        env=child_env(),
    )
    for f in tmp.iterdir():
        os.replace(f, data / f.name)
    tmp.rmdir()
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def prepare_data(args: argparse.Namespace) -> tuple[Path, Path, Optional[Path]]:
    data: Path = args.data
    data.mkdir(parents=True, exist_ok=True)
    control = args.control or data / CONTROL_NAME
    base = args.base or data / BASE_NAME
    need = [
        w
        for w, p, given in (("control", control, args.control), ("base", base, args.base))
        if not p.exists() and not given
    ]
    for p, given in ((control, args.control), (base, args.base)):
        if given and not p.exists():
            sys.exit(f"bench: {p} does not exist")
    if len(need) == 2:
        generate("pair", data, args.python, args.tiny)
    elif need:
        generate(need[0], data, args.python, args.tiny)
    ema = None
    if args.ema:
        ema = data / EMA_BASE_NAME
        if not ema.exists():
            generate("ema", data, args.python, args.tiny)
    return control, base, ema


def needed_bytes(control: Path, base: Path) -> dict[str, int]:
    """Bytes of the tensors the job must read, from cndiff's own plan."""
    from cndiff import open_checkpoint
    from cndiff.inputs.views import control_view, unet_view
    from cndiff.plan import plan_pairs

    ctl, bse = open_checkpoint(control), open_checkpoint(base)
    try:
        plan = plan_pairs(control_view(ctl.tensors), unet_view(bse.tensors))
        c = sum(ctl.tensors[i.control_key].nbytes for i in plan)
        sub = [i for i in plan if i.base_key is not None]
        b = sum(bse.tensors[i.base_key].nbytes for i in sub)
        numel = sum(ctl.tensors[i.control_key].numel for i in plan)
        # cndiff's default base check also reads the control file's embedded UNet copy
        emb = [i.base_key for i in sub if i.base_key in ctl.tensors]
        e = sum(ctl.tensors[k].nbytes for k in emb)
        return {
            "embedded_tensors": len(emb),
            "embedded_bytes": e,
            "read_with_check_bytes": c + b + e,
            "control_tensors": len(plan),
            "base_tensors": len(sub),
            "control_bytes": c,
            "base_bytes": b,
            "read_bytes": c + b,
            "out_fp16_data_bytes": 2 * (numel + 1),
        }
    finally:
        ctl.close()
        bse.close()


# --------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------


def machine_info(python: str, cuda: bool) -> dict[str, Any]:
    from importlib import metadata

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "bench_python": python,
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            None,
        )
    except OSError:
        info["cpu"] = platform.processor() or None
    try:
        for ln in Path("/proc/meminfo").read_text().splitlines():
            if ln.startswith("MemTotal:"):
                info["mem_bytes"] = int(ln.split()[1]) * 1024
    except OSError:
        pass
    for pkg in ("torch", "numpy", "safetensors", "cndiff"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if cuda and shutil.which("nvidia-smi"):
        q = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        info["gpu"] = subprocess.run(q, capture_output=True, text=True).stdout.strip()
    return info


def measure_io_floor(control: Path, data: Path, read_n: int, write_n: int) -> dict[str, Any]:
    """Read throughput (disk, page cache) on ``control``'s head; write+fdatasync on ``data``."""
    n = min(read_n, control.stat().st_size)
    cold, warm, resid = [], [], []
    for _ in range(2):
        evict([control])
        resid.append(resident_fraction(control))
        cold.append(n / read_through(control, n))
    for _ in range(3):  # the head is now cached
        warm.append(n / read_through(control, n))
    os.sync()
    chunk = os.urandom(8 * MiB)
    path = data / ".cndiff-bench-write-test"
    writes = []
    for _ in range(2):
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            while done < write_n:
                done += os.write(fd, chunk[: min(len(chunk), write_n - done)])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        writes.append(write_n / (time.perf_counter() - t0))
        path.unlink()
    return {
        "read_test_bytes": n,
        "write_test_bytes": write_n,
        "cold_read_Bps": cold,
        "warm_read_Bps": warm,
        "write_fdatasync_Bps": writes,
        "resident_after_evict": resid,
        "cold_read": max(cold),
        "warm_read": max(warm),
        "write": max(writes),
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.0f} MB"


def ratio_str(r: Optional[float]) -> str:
    if r is None:
        return "n/a"
    return f"{r:.3f} (1/{1 / r:.1f})" if 0 < r < 1 else f"{r:.3f}"


def summarize(runs: list[Run]) -> dict[tuple[str, str], dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in runs:
        rows.setdefault((r.label, r.cache), {"runs": []})["runs"].append(r)
    for row in rows.values():
        ok = [r for r in row["runs"] if r.rc == 0]
        row["n"], row["failed"] = len(ok), len(row["runs"]) - len(ok)
        if not ok:
            continue
        walls = [r.wall_s for r in ok]
        res = [
            min((v for v in r.resident_before.values() if v is not None), default=None) for r in ok
        ]
        row.update(
            wall=statistics.median(walls),
            wall_min=min(walls),
            wall_max=max(walls),
            sync=statistics.median(r.sync_s for r in ok),
            cpu=statistics.median(r.user_s + r.sys_s for r in ok),
            rss=max(r.maxrss_bytes for r in ok),
            read=statistics.median(r.read_bytes for r in ok),
            written=statistics.median(r.write_bytes for r in ok),
            out=statistics.median(r.out_bytes for r in ok),
            files=ok[-1].out_files,
            keys=ok[-1].out_keys,
            resident=None if None in res else statistics.median(res),  # type: ignore[type-var]
        )
    return rows


def print_table(
    rows: dict[tuple[str, str], dict[str, Any]], order: list[str], caches: list[str]
) -> list[str]:
    w = max([16, *(len(label) + 1 for label in order)])
    head = (
        f"{'runner':<{w}}{'cache':<6}{'n':>2} {'wall med':>9} {'min-max':>13} {'+sync':>6} "
        f"{'cpu s':>6} {'peak RSS':>9} {'disk read':>9} {'written':>9} {'output':>8} "
        f"{'keys':>5} {'cached':>6}"
    )
    lines = [head, "-" * len(head)]
    for label in order:
        for cache in caches:
            row = rows.get((label, cache))
            if row is None:
                continue
            if not row["n"]:
                lines.append(f"{label:<{w}}{cache:<6}{0:>2} all {row['failed']} run(s) failed")
                continue
            mm = f"{row['wall_min']:.2f}-{row['wall_max']:.2f}"
            cached = "-" if row["resident"] is None else f"{100 * row['resident']:.0f}%"
            keys = "-" if row["keys"] is None else str(row["keys"])
            out = fmt_bytes(row["out"]) + (f" x{row['files']}" if row["files"] > 1 else "")
            lines.append(
                f"{label:<{w}}{cache:<6}{row['n']:>2} {row['wall']:>7.2f} s {mm:>13} "
                f"{row['sync']:>6.2f} {row['cpu']:>6.1f} {fmt_bytes(row['rss']):>9} "
                f"{fmt_bytes(row['read']):>9} {fmt_bytes(row['written']):>9} {out:>8} "
                f"{keys:>5} {cached:>6}" + (f"  ({row['failed']} failed)" if row["failed"] else "")
            )
    return lines


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder for the generated pair and outputs (outside the repo; "
        "default /tmp/cndiff-bench, /tmp/cndiff-bench-tiny with --tiny)",
    )
    p.add_argument("--control", type=Path, help="use this control file instead of generating")
    p.add_argument("--base", type=Path, help="use this base file instead of generating")
    p.add_argument(
        "--ema",
        action="store_true",
        help="also generate a v1-5-pruned-style base with model_ema.* (7.7 GB) and "
        "run every runner against it too (rows RUNNER@ema)",
    )
    p.add_argument("--out-dir", type=Path, help="where outputs go (default DATA/out)")
    p.add_argument(
        "--runners", default=DEFAULT_RUNNERS, help=f"comma-separated, from: {', '.join(RUNNERS)}"
    )
    p.add_argument("--cache", default="warm,cold", help="cache states: warm, cold or both")
    p.add_argument("--repeat", type=int, default=3, help="runs per runner and cache state")
    p.add_argument("--json", type=Path, help="write all raw measurements to this file")
    p.add_argument("--python", default=sys.executable, help="interpreter for the runs")
    p.add_argument(
        "--live-src",
        action="store_true",
        help="run the checkout's src/ as it is at each moment (default: a copy "
        "taken at start, DATA/.src-snapshot, so concurrent edits do not leak in)",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the I/O floor measurement")
    p.add_argument("--no-startup", action="store_true", help="skip the import timings")
    p.add_argument(
        "--floor-read-gb",
        type=float,
        default=2.0,
        help="bytes of the control file read for the read throughput",
    )
    p.add_argument(
        "--floor-write-gb",
        type=float,
        default=0.72,
        help="bytes written (then fdatasync) for the write throughput",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke-test the harness on a tiny synthetic pair (numbers meaningless)",
    )
    args = p.parse_args(argv)
    if args.data is None:
        args.data = Path("/tmp/cndiff-bench-tiny" if args.tiny else "/tmp/cndiff-bench")
    args.runner_list = [r.strip() for r in args.runners.split(",") if r.strip()]
    bad = [r for r in args.runner_list if r not in RUNNERS]
    if bad:
        p.error(f"unknown runner(s) {', '.join(bad)}; known: {', '.join(RUNNERS)}")
    args.cache_list = [c.strip() for c in args.cache.split(",") if c.strip()]
    if not args.cache_list or any(c not in ("warm", "cold") for c in args.cache_list):
        p.error("--cache takes warm, cold or warm,cold")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now().astimezone()
    runners = [RUNNERS[n] for n in args.runner_list]
    any_cuda = any(r.cuda for r in runners)
    control, base, ema = prepare_data(args)
    out_dir: Path = args.out_dir or args.data / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    bases = [("", base)] + ([("ema", ema)] if ema else [])

    global SRC
    git = git_info()
    SRC = REPO / "src" if args.live_src else snapshot_src(args.data / ".src-snapshot", args.python)
    machine = machine_info(args.python, any_cuda)
    machine["git"] = git
    machine["cndiff_src"] = str(SRC)
    print(f"cndiff benchmark, {started:%Y-%m-%d %H:%M %Z}")
    mem = machine.get("mem_bytes")
    print(
        f"machine: {machine.get('cpu')}, {machine['cpus']} CPUs, "
        f"{(mem or 0) / 2**30:.0f} GiB RAM, {machine['platform']}"
    )
    print(
        f"python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}, "
        f"safetensors {machine['safetensors']}, cndiff {machine['cndiff']}"
    )
    if machine.get("gpu"):
        print(f"gpu: {machine['gpu']}")
    dirty = " + uncommitted changes" if git["src_changes"] else ""
    print(f"cndiff source: {SRC} (commit {git['commit']}{dirty})")
    files = {"control": control, "base": base, **({"ema_base": ema} if ema else {})}
    for k, p in files.items():
        print(f"{k}: {p} ({p.stat().st_size / GB:.2f} GB)")
    need = needed_bytes(control, base)
    print(
        f"job must read {need['control_tensors']} control + {need['base_tensors']} base "
        f"tensors = {fmt_bytes(need['read_bytes'])} "
        f"({fmt_bytes(need['control_bytes'])} + {fmt_bytes(need['base_bytes'])})"
    )
    if need["embedded_tensors"]:
        print(
            f"  + {need['embedded_tensors']} embedded UNet tensors "
            f"({fmt_bytes(need['embedded_bytes'])}) for cndiff's base check = "
            f"{fmt_bytes(need['read_with_check_bytes'])}"
        )
    if resident_fraction(control) is None:
        print("note: mincore is unavailable; page-cache residency is not checked")

    startup: dict[str, list[float]] = {}
    if not args.no_startup:
        cmds = {
            "python -c pass": "pass",
            "import numpy": "import numpy",
            "import torch": "import torch",
            "import cndiff": "import cndiff",
        }
        if any_cuda:
            cmds["import torch; torch.cuda.init()"] = "import torch; torch.cuda.init()"
        print("\nstart-up (median of 3 fresh interpreters, warm):")
        for name, code in cmds.items():
            startup[name] = time_command([args.python, "-c", code])
            print(f"  {name:<34} {statistics.median(startup[name]):6.3f} s")

    floor: dict[str, Any] = {}
    if not args.no_floor:
        print("\nI/O floor ...", flush=True)
        floor = measure_io_floor(
            control, args.data, int(args.floor_read_gb * GB), int(args.floor_write_gb * GB)
        )
        ev = floor["resident_after_evict"]
        print(
            f"  read {fmt_bytes(floor['read_test_bytes'])} of the control file: "
            f"cold {floor['cold_read'] / GB:.2f} GB/s (resident after eviction: "
            f"{', '.join('?' if v is None else f'{100 * v:.1f}%' for v in ev)}), "
            f"page cache {floor['warm_read'] / GB:.2f} GB/s"
        )
        print(
            f"  write {fmt_bytes(floor['write_test_bytes'])} + fdatasync: "
            f"{floor['write'] / GB:.2f} GB/s"
        )
        if floor["cold_read"] > 0.5 * floor["warm_read"]:
            print(
                "  WARNING: cold reads are not much slower than page-cache reads: eviction "
                "may not work here (or the disk is cached below this machine)"
            )

    # ---- the runs: per cache state, round-robin over runners, repeat times ----
    all_outputs: set[Path] = set()
    runs: list[Run] = []
    blob: dict[str, Any] = {
        "started": started.isoformat(),
        "finished": None,
        "argv": sys.argv,
        "machine": machine,
        "files": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in files.items()},
        "needed": need,
        "startup_s": startup,
        "io_floor": floor,
        "runs": runs,
    }
    total = len(args.cache_list) * args.repeat * len(runners) * len(bases)
    print(
        f"\n{total} runs ({', '.join(args.runner_list)}; {', '.join(args.cache_list)}; "
        f"repeat {args.repeat}) ...",
        flush=True,
    )
    for cache in args.cache_list:
        for rep in range(args.repeat):
            for runner in runners:
                for tag, b in bases:
                    label = runner.name + (f"@{tag}" if tag else "")
                    job = Job(args.python, control, b, out_dir / f"{label}.safetensors", out_dir)
                    inputs = runner.inputs(job)
                    if cache == "warm":
                        make_warm(inputs)
                    else:
                        existing = [p for p in all_outputs | set(runner.outputs(job)) if p.exists()]
                        evict([*inputs, *existing])
                    run = Run(
                        runner.name, label, cache, rep, len(runs) + 1, command=runner.command(job)
                    )
                    run.resident_before = {str(p): resident_fraction(p) for p in inputs}
                    log = out_dir / "logs" / f"{label}-{cache}-{rep}.log"
                    run.rc, run.wall_s, ru = spawn(run.command, log)
                    t0 = time.perf_counter()
                    os.sync()
                    run.sync_s = time.perf_counter() - t0
                    run.user_s, run.sys_s = ru.ru_utime, ru.ru_stime
                    run.maxrss_bytes = ru.ru_maxrss * 1024
                    run.read_bytes, run.write_bytes = ru.ru_inblock * 512, ru.ru_oublock * 512
                    outs = [p for p in runner.outputs(job) if p.exists()]
                    all_outputs.update(outs)
                    run.out_files = len(outs)
                    run.out_bytes = sum(p.stat().st_size for p in outs)
                    run.out_keys = safetensors_keys(outs[0]) if outs else None
                    run.log_tail = tail(log)
                    runs.append(run)
                    status = "ok" if run.rc == 0 else f"FAILED rc={run.rc} (log: {log})"
                    print(
                        f"  [{run.index:>2}/{total}] {cache} {label:<16} {run.wall_s:7.2f} s  "
                        f"RSS {fmt_bytes(run.maxrss_bytes):>8}  read "
                        f"{fmt_bytes(run.read_bytes):>8}  out {fmt_bytes(run.out_bytes):>7}  "
                        f"{status}",
                        flush=True,
                    )
                    if run.rc != 0:
                        print("    " + run.log_tail[-800:].replace("\n", "\n    "))
                    save_json(args.json, blob)  # partial results survive an interruption

    # ---- report ----
    rows = summarize(runs)
    order = [r.name + (f"@{t}" if t else "") for r in runners for t, _ in bases]
    report = [
        "",
        "wall = spawn to exit (median, min-max); +sync = os.sync() right after exit; "
        "cpu = user+sys;",
        "peak RSS = max over runs (wait4 ru_maxrss); disk read/written "
        "= rusage blocks x 512; cached = input pages in",
        "the page cache before the run (mincore); sizes in decimal MB/GB",
        "",
    ]
    report += print_table(rows, order, args.cache_list)

    def med(label: str, cache: str, key: str) -> Optional[float]:
        row = rows.get((label, cache))
        return row.get(key) if row and row.get("n") else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    subjects = [r.name for r in runners if r.subject]
    baselines = [n for n in BASELINES if n in args.runner_list]
    targets: list[dict[str, Any]] = []
    for s in subjects:
        if baselines:
            report += ["", f"{s} / baseline (wall: medians; RSS: peaks)"]
            for bl in baselines:
                for cache in args.cache_list:
                    w = ratio(med(s, cache, "wall"), med(bl, cache, "wall"))
                    ws = ratio(
                        _plus(med(s, cache, "wall"), med(s, cache, "sync")),
                        _plus(med(bl, cache, "wall"), med(bl, cache, "sync")),
                    )
                    m = ratio(med(s, cache, "rss"), med(bl, cache, "rss"))
                    report.append(
                        f"  {s} / {bl:<11} {cache}: wall {ratio_str(w):<15} "
                        f"wall+sync {ratio_str(ws):<15} RSS {ratio_str(m)}"
                    )
        rss = [med(s, c, "rss") for c in args.cache_list]
        rss_v = max((v for v in rss if v is not None), default=None)
        targets.append(
            {
                "runner": s,
                "target": f"peak RSS <= {RSS_TARGET / MB:.0f} MB",
                "value": rss_v,
                "shown": fmt_bytes(rss_v),
                "holds": None if rss_v is None else rss_v <= RSS_TARGET,
            }
        )
        for cache, bl, limit, text in WALL_TARGETS:
            if cache not in args.cache_list or bl not in baselines:
                continue
            r = ratio(med(s, cache, "wall"), med(bl, cache, "wall"))
            targets.append(
                {
                    "runner": s,
                    "target": f"{cache} wall {text}",
                    "value": r,
                    "limit": limit,
                    "shown": ratio_str(r),
                    "holds": None if r is None else r <= limit,
                }
            )
    if "cndiff-batch" in args.runner_list:
        rss = [med("cndiff-batch", c, "rss") for c in args.cache_list]
        rss_v = max((v for v in rss if v is not None), default=None)
        targets.append(
            {
                "runner": "cndiff-batch",
                "target": f"peak RSS <= {BATCH_RSS_TARGET / MB:.0f} MB (8 models)",
                "value": rss_v,
                "shown": fmt_bytes(rss_v),
                "holds": None if rss_v is None else rss_v <= BATCH_RSS_TARGET,
            }
        )
    if targets:
        report += ["", "targets"]
        for t in targets:
            holds = {True: "yes", False: "NO", None: "n/a"}[t["holds"]]
            report.append(f"  {t['runner']:<15} {t['target']:<30} {t['shown']:<16} {holds}")

    if any_cuda and "import torch; torch.cuda.init()" in startup:
        init = statistics.median(startup["import torch; torch.cuda.init()"])
        report += [
            "",
            "CUDA runners without start-up (median wall - median time of "
            "python -c 'import torch; torch.cuda.init()')",
        ]
        for r in runners:
            for cache in args.cache_list:
                w = med(r.name, cache, "wall") if r.cuda else None
                if w is not None:
                    report.append(
                        f"  {r.name} {cache}: {w:.2f} s - {init:.2f} s = {w - init:.2f} s"
                    )

    floors: dict[str, Any] = {}
    if floor:
        out_bytes = med("cndiff", args.cache_list[0], "out") or need["out_fp16_data_bytes"]
        kinds = {"extract": need["read_bytes"], "with base check": need["read_with_check_bytes"]}
        report += [
            "",
            f"job floor: bytes to read / read throughput + output ({fmt_bytes(out_bytes)}) / "
            "write throughput (serial; overlapped = max of the two)",
        ]
        for cache in args.cache_list:
            tput = floor["warm_read"] if cache == "warm" else floor["cold_read"]
            wr = out_bytes / floor["write"]
            floors[cache] = {}
            for kind, nbytes in kinds.items():
                rd = nbytes / tput
                floors[cache][kind] = {"read_s": rd, "write_s": wr, "serial_s": rd + wr,
                                       "overlapped_s": max(rd, wr)}  # fmt: skip
                report.append(
                    f"  {cache} {kind + ':':<17} read {fmt_bytes(nbytes)} {rd:5.2f} s + write "
                    f"{wr:.2f} s = {rd + wr:5.2f} s (overlapped {max(rd, wr):.2f} s)"
                )
            for r in runners:
                w = med(r.name, cache, "wall")
                if r.subject and w is not None:
                    f = floors[cache]["with base check" if r.check_base else "extract"]
                    report.append(
                        f"    {r.name} {w:.2f} s = {w / f['serial_s']:.1f}x its floor "
                        f"(+{w - f['serial_s']:.2f} s)"
                    )
        if startup:
            report.append(
                f"  (start-up alone: python + import cndiff "
                f"{statistics.median(startup['import cndiff']):.2f} s)"
            )

    print("\n".join(report))
    if args.json:
        blob.update(
            finished=datetime.datetime.now().astimezone().isoformat(),
            job_floor_s=floors,
            targets=targets,
            report=report,
            summary=[
                {"label": k[0], "cache": k[1], **{kk: vv for kk, vv in v.items() if kk != "runs"}}
                for k, v in rows.items()
            ],
        )
        save_json(args.json, blob)
        print(f"\nraw measurements: {args.json}")
    return 0 if all(r.rc == 0 for r in runs) else 1


def save_json(path: Optional[Path], blob: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: ([asdict(r) for r in v] if k == "runs" else v) for k, v in blob.items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _plus(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a + b if a is not None and b is not None else None


if __name__ == "__main__":
    sys.exit(main())
