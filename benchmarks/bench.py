#!/usr/bin/env python3
"""Benchmark cndiff's commands against their I/O floors and the original extraction script.

One command for everything the targets need (see benchmarks/README.md)::

    python benchmarks/bench.py --all                 # SD1.5: generates /tmp/cndiff-bench once
    python benchmarks/bench.py --all --arch sdxl     # SDXL: extract, prune, convert

Every run is a fresh process, timed from spawn to exit; runners alternate round-robin in
each cache state (warm: inputs in the page cache; cold: inputs and outputs evicted before
each run). Each run writes its outputs afresh: the previous run's are removed first,
untimed (``--keep-outputs`` times re-runs over them instead). Per run: wall seconds, peak
RSS (``wait4`` rusage), bytes read from and written to disk by the child (rusage blocks),
the time of an ``os.sync()`` right after it exits, and the output size. Also measured in
the same invocation: interpreter/import start-up times, the machine's I/O floor
(page-cache and disk read throughput, write throughput with ``fdatasync``) from which
each runner's job floor is derived, the Control-LoRA decompositions alone
(``lora_bench.py``), and the time from spawn to the first tensor byte written and to the
progress bar's first update (under a pty).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import fcntl
import json
import mmap
import os
import platform
import pty
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
import types
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


# --------------------------------------------------------------------------------------
# Data: the synthetic files of each architecture (cndiff.synthetic.make_pair's names)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchData:
    name: str
    #: the control: a file (SD1.5 original layout) or a diffusers folder (SDXL)
    control: str
    base: str
    #: approximate full-size bytes of the pair (for the free-space check)
    pair_bytes: float
    ema_base: Optional[str] = None


ARCHS = {
    "sd15": ArchData("sd15", "control_sd15_synthetic.pth", "sd15_base_synthetic.ckpt", 10.0 * GB,
                     ema_base="sd15_base_ema_synthetic.ckpt"),
    "sdxl": ArchData("sdxl", "controlnet_sdxl_synthetic", "sdxl_base_synthetic.safetensors",
                     12.0 * GB),
}  # fmt: skip

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
    #: the difference model verify and apply take (made once, untimed, by the setup step)
    diff: Path
    #: Control-LoRA rank
    rank: int = 128
    #: how cndiff-batch gets eight controls: "links" (hard links) or "copies"
    batch_inputs: str = "links"


#: bytes a run must read, per file: [(path, bytes)] (see job_floor)
Reads = list[tuple[Path, int]]


@dataclass(frozen=True)
class Runner:
    name: str
    help: str
    #: the command line of one run
    command: Callable[[Job], list[str]]
    #: files the run writes (evicted before cold runs, sized after each run)
    outputs: Callable[[Job], list[Path]] = lambda job: [job.out]
    #: files the run reads (warmed / evicted per cache state)
    inputs: Callable[[Job], list[Path]] = lambda job: [weights(job.control), weights(job.base)]
    #: compared against the baselines (ratios and the baseline targets)
    subject: bool = False
    #: needs a CUDA GPU (also times `import torch; torch.cuda.init()`)
    cuda: bool = False
    #: the architecture of the data it runs on
    arch: str = "sd15"
    #: the bytes it must read (job floor); None: no floor
    reads: Optional[Callable[[dict[str, Any], Job], Reads]] = None
    #: runs on the setup step's difference model
    needs_diff: bool = False
    #: run before the first run (untimed), e.g. making the batch folder
    prepare: Optional[Callable[[Job], None]] = None
    #: peak RSS target (bytes)
    rss_target: Optional[float] = None
    #: wall <= limit x its job floor, per cache state
    floor_targets: tuple[tuple[str, float], ...] = ()
    #: time to first byte / first progress update measured for it (under a pty)
    latency: bool = False
    #: the folder its output (temporary files) appears in, for the latency runs
    out_folder: Callable[[Job], Path] = lambda job: job.out.parent


def weights(path: Path) -> Path:
    """A model file, or a diffusers folder's weights file."""
    if path.is_dir():
        from cndiff.inputs.sources import model_file

        return model_file(path)
    return path


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


def _lora(out: str, *options: str) -> tuple[Callable[[Job], list[str]], Callable]:
    def command(job: Job) -> list[str]:
        return [job.python, "-m", "cndiff", "extract", str(job.control), str(job.base), "-o",
                str(job.out_dir / out), "--overwrite", "-q", "--device", "cpu", "--format",
                "control-lora", "--rank", str(job.rank), *options]  # fmt: skip

    return command, lambda job: [job.out_dir / out]


# ---- cndiff-batch ----------------------------------------------------------------------

BATCH_NAMES = ["canny", "depth", "hed", "mlsd", "normal", "openpose", "scribble", "seg"]


def _batch_in(job: Job) -> Path:
    return job.out_dir / ("batch-in" if job.batch_inputs == "links" else "batch-copies")


def _batch_files(job: Job) -> list[Path]:
    return [_batch_in(job) / f"control_sd15_{name}{job.control.suffix}" for name in BATCH_NAMES]


def _batch_prepare(job: Job) -> None:
    """Eight controls: hard links of the one control (shared page cache), or copies."""
    src = _batch_in(job)
    src.mkdir(parents=True, exist_ok=True)
    (job.out_dir / "batch-out").mkdir(parents=True, exist_ok=True)
    cst = job.control.stat()
    for f in _batch_files(job):
        if f.exists():
            st = f.stat()
            same = (st.st_dev, st.st_ino) == (cst.st_dev, cst.st_ino)
            if (job.batch_inputs == "links") == same and st.st_size == cst.st_size:
                continue
            f.unlink()
        if job.batch_inputs == "links":
            os.link(job.control, f)
            continue
        need = cst.st_size + 2 * GB
        if shutil.disk_usage(src).free < need:
            sys.exit(f"bench: --batch-inputs copies: not enough free disk in {src} for "
                     f"another {fmt_bytes(cst.st_size)} copy")  # fmt: skip
        print(f"  copying {job.control.name} -> {f} ...", flush=True)
        tmp = f.with_name(f.name + ".part")
        shutil.copyfile(job.control, tmp)
        os.replace(tmp, f)


def _batch_command(job: Job) -> list[str]:
    args = ["batch", str(_batch_in(job)), str(job.base), "-o", str(job.out_dir / "batch-out"),
            "--overwrite", "-q", "--device", "cpu"]  # fmt: skip
    if job.batch_inputs == "links":  # cndiff refuses one file named twice: see batch_links.py
        return [job.python, str(HERE / "batch_links.py"), *args]
    return [job.python, "-m", "cndiff", *args]


def _batch_outputs(job: Job) -> list[Path]:
    return [job.out_dir / "batch-out" / f"diff_control_sd15_{n}_fp16.safetensors"
            for n in BATCH_NAMES]  # fmt: skip


def _batch_inputs(job: Job) -> list[Path]:
    return [*(_batch_files(job) if job.batch_inputs == "copies" else [job.control]), job.base]


# ---- what each job must read (from the library's plan; see needed_bytes) ----------------


def _reads_extract(need: dict[str, Any], job: Job) -> Reads:
    return [(weights(job.control), need["control_bytes"]), (weights(job.base), need["base_bytes"])]


def _reads_check(need: dict[str, Any], job: Job) -> Reads:
    return [(weights(job.control), need["control_bytes"] + need["embedded_bytes"]),
            (weights(job.base), need["base_bytes"])]  # fmt: skip


def _reads_batch(need: dict[str, Any], job: Job) -> Reads:
    per = need["control_bytes"] + need["embedded_bytes"]
    return [*((f, per) for f in _batch_files(job)), (job.base, need["base_bytes"])]


def _reads_verify(need: dict[str, Any], job: Job) -> Reads:
    return [*_reads_check(need, job), (job.diff, need["diff_bytes"])]


def _reads_apply(need: dict[str, Any], job: Job) -> Reads:
    return [(job.diff, need["diff_bytes"]), (weights(job.base), need["apply_base_bytes"])]


def _reads_control(need: dict[str, Any], job: Job) -> Reads:
    return [(weights(job.control), need["control_bytes"])]


RSS_TARGET = 512 * MB
BATCH_RSS_TARGET = 1024 * MB
_diff_inputs: Callable[[Job], list[Path]] = lambda job: [job.diff, weights(job.base)]  # noqa: E731
_verify_inputs: Callable[[Job], list[Path]] = lambda job: [  # noqa: E731
    job.diff, weights(job.control), weights(job.base)]  # fmt: skip
_lora_cmd, _lora_out = _lora("lora.safetensors")
_lowrank_cmd, _lowrank_out = _lora("lora-lowrank.safetensors", "--svd", "lowrank")


def _out(name: str) -> Callable[[Job], list[Path]]:
    return lambda job: [job.out_dir / name]


def _sdxl(*args: str, out: str) -> Callable[[Job], list[str]]:
    def command(job: Job) -> list[str]:
        files = [str(job.control), str(job.base)] if args[0] == "extract" else [str(job.control)]
        return [job.python, "-m", "cndiff", args[0], *files, *args[1:], "-o",
                str(job.out_dir / out), "--overwrite", "-q", "--device", "cpu"]  # fmt: skip

    return command


# fmt: off
RUNNERS: dict[str, Runner] = {
    r.name: r
    for r in [
        Runner("cndiff", "cndiff extract --device cpu (fp16, default base check on)",
               _cndiff("--device", "cpu"), subject=True, reads=_reads_check,
               rss_target=RSS_TARGET, floor_targets=(("warm", 1.5), ("cold", 1.3)),
               latency=True),
        Runner("cndiff-nocheck", "cndiff extract --device cpu --no-check-base (skips the "
               "base vs embedded-UNet comparison: 1.4 GB less to read)",
               _cndiff("--device", "cpu", "--no-check-base"), subject=True,
               reads=_reads_extract, rss_target=RSS_TARGET),
        Runner("cndiff-cuda", "cndiff extract --device cuda (fp16)",
               _cndiff("--device", "cuda"), subject=True, cuda=True, reads=_reads_check,
               rss_target=RSS_TARGET),
        Runner("naive", "benchmarks/naive.py: the original script (torch.load whole)",
               _naive()),
        Runner("naive-mmap", "benchmarks/naive.py --mmap: torch.load(..., mmap=True)",
               _naive("--mmap")),
        # ---- add rows here ------------------------------------------------------------
        Runner("cndiff-batch", "cndiff batch: 8 controls against one base read once (by "
               "default the 8 are hard links of the one control, run through "
               "batch_links.py: they share page cache)", _batch_command,
               outputs=_batch_outputs, inputs=_batch_inputs, reads=_reads_batch,
               prepare=_batch_prepare, rss_target=BATCH_RSS_TARGET,
               floor_targets=(("warm", 1.5), ("cold", 1.5)), latency=True,
               out_folder=lambda job: job.out_dir / "batch-out"),
        Runner("cndiff-verify", "cndiff verify of the setup diff against the control and "
               "the base (default base check on)",
               lambda job: [job.python, "-m", "cndiff", "verify", str(job.diff), "--control",
                            str(job.control), "--base", str(job.base), "-q"],
               outputs=lambda job: [], inputs=_verify_inputs, reads=_reads_verify,
               needs_diff=True),
        Runner("cndiff-apply", "cndiff apply: the setup diff + the base -> a standalone "
               "ControlNet (fp16)",
               lambda job: [job.python, "-m", "cndiff", "apply", str(job.diff), str(job.base),
                            "-o", str(job.out), "--overwrite", "-q", "--device", "cpu"],
               inputs=_diff_inputs, reads=_reads_apply, needs_diff=True,
               rss_target=RSS_TARGET, floor_targets=(("warm", 1.5), ("cold", 1.5))),
        Runner("cndiff-lora", "cndiff extract --format control-lora (rank 128, fp16, "
               "--svd auto = gram)", _lora_cmd, outputs=_lora_out, reads=_reads_check),
        Runner("cndiff-lora-lowrank", "the same with --svd lowrank (randomized)",
               _lowrank_cmd, outputs=_lowrank_out, reads=_reads_check),
        Runner("sdxl-extract", "cndiff extract of the SDXL diffusers ControlNet (fp32) "
               "against the SDXL base (fp16)",
               _sdxl("extract", out="sdxl-extract.safetensors"),
               outputs=_out("sdxl-extract.safetensors"), arch="sdxl", reads=_reads_check,
               rss_target=RSS_TARGET, latency=True),
        Runner("sdxl-prune", "cndiff prune of the SDXL diffusers ControlNet (fp16)",
               _sdxl("prune", out="sdxl-prune.safetensors"),
               outputs=_out("sdxl-prune.safetensors"), arch="sdxl",
               inputs=lambda job: [weights(job.control)], reads=_reads_control,
               rss_target=RSS_TARGET),
        Runner("sdxl-convert", "cndiff convert --to ldm of the SDXL diffusers ControlNet "
               "(fp16)", _sdxl("convert", "--to", "ldm", out="sdxl-convert.safetensors"),
               outputs=_out("sdxl-convert.safetensors"), arch="sdxl",
               inputs=lambda job: [weights(job.control)], reads=_reads_control,
               rss_target=RSS_TARGET),
    ]
}
# fmt: on
DEFAULT_RUNNERS = {
    "sd15": "cndiff,naive,naive-mmap",
    "sdxl": "sdxl-extract,sdxl-prune,sdxl-convert",
}
#: --all: every row the targets need
ALL_RUNNERS = {
    "sd15": "cndiff,cndiff-nocheck,cndiff-batch,cndiff-verify,cndiff-apply,cndiff-lora,naive,"
    "naive-mmap",
    "sdxl": "sdxl-extract,sdxl-prune,sdxl-convert",
}
BASELINES = ("naive", "naive-mmap")

# Baseline targets: (cache state, baseline, max ratio of the subject's median wall to it).
WALL_TARGETS = [
    ("warm", "naive", 1 / 6, "<= 1/6 of naive"),
    ("warm", "naive-mmap", 1.15, "<= 1.15x naive-mmap"),
    ("cold", "naive", 1 / 3, "<= 1/3 of naive"),
    ("cold", "naive-mmap", 1.0, "<= naive-mmap"),
]
#: verify's median wall <= this x extract's (cndiff's) median, same cache state
VERIFY_VS_EXTRACT = 1.5
#: Control-LoRA wall <= this x (extract's floor + the decompositions alone)
LORA_LIMIT = 1.5
#: time from spawn to the first tensor byte written / the first progress update
LATENCY_TARGET_S = 0.5

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
    log: str = ""
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


# Linux gives a child, at exec, the peak RSS of the memory it was forked from
# (signal->maxrss): a child of bench.py (numpy and cndiff imported, ~55 MB) never reports
# less. The runs are therefore spawned by a small launcher process (a bare interpreter,
# ~10 MB), started once; spawn() falls back to spawning directly when there is none.
_LAUNCHER_CODE = r"""
import json, os, subprocess, sys, time
for line in sys.stdin:
    req = json.loads(line)
    with open(req["log"], "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(req["argv"], stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, cwd=req["cwd"], env=req["env"])
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    fields = ("ru_utime", "ru_stime", "ru_maxrss", "ru_inblock", "ru_oublock")
    out = {"rc": rc, "wall": wall, "ru": {f: getattr(ru, f) for f in fields}}
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""
_LAUNCHER: Optional[subprocess.Popen] = None


def start_launcher(python: str) -> None:
    global _LAUNCHER
    _LAUNCHER = subprocess.Popen([python, "-c", _LAUNCHER_CODE], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip


def stop_launcher() -> None:
    global _LAUNCHER
    if _LAUNCHER is not None:
        assert _LAUNCHER.stdin is not None
        _LAUNCHER.stdin.close()
        _LAUNCHER.wait(10)
        _LAUNCHER = None


def spawn(argv: list[str], log_path: Path) -> tuple[int, float, Any]:
    """Run ``argv`` to completion; (exit code, wall seconds, rusage of that child)."""
    launcher = _LAUNCHER
    if launcher is not None and launcher.poll() is None:
        assert launcher.stdin is not None and launcher.stdout is not None
        req = {"argv": argv, "log": str(log_path), "cwd": str(REPO), "env": child_env()}
        launcher.stdin.write(json.dumps(req) + "\n")
        launcher.stdin.flush()
        line = launcher.stdout.readline()
        if line:
            res = json.loads(line)
            return res["rc"], res["wall"], types.SimpleNamespace(**res["ru"])
        raise RuntimeError("bench: the launcher process died")
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
what, folder, tiny, arch_name, control, base = sys.argv[1:7]
folder = Path(folder)
arch = {"sd15": s.SD15, "sdxl": s.SDXL}[arch_name]
arch = s.tiny(arch) if tiny == "1" else arch
if what in ("pair", "control"):
    if arch.control_layout == "diffusers":
        s.make_diffusers_controlnet(folder / control, arch, seed=0, base_seed=0)
    else:
        s.make_control(folder / control, arch, seed=0, base_seed=0)
if what in ("pair", "base"):
    s.make_base(folder / base, arch)
if what == "ema":
    s.make_base(folder / base, arch, ema=True)
"""


def generate(what: str, data: Path, python: str, tiny: bool, arch: ArchData) -> None:
    """Generate into a temporary folder, then move into ``data`` (no half-written inputs)."""
    tmp = data / ".generating"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if not tiny:
        need = arch.pair_bytes if what == "pair" else 0.6 * arch.pair_bytes
        free = shutil.disk_usage(data).free
        if free < need + 2 * GB:
            sys.exit(f"bench: generating the {arch.name} {what} needs about {fmt_bytes(need)} "
                     f"in {data}; only {fmt_bytes(free)} free")  # fmt: skip
    print(f"generating the {arch.name} {what} in {data} (full size: a few minutes) ...",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    base = arch.ema_base if what == "ema" else arch.base
    subprocess.run(
        [
            python,
            "-c",
            _GEN,
            what,
            str(tmp),
            "1" if tiny else "0",
            arch.name,
            arch.control,
            str(base),
        ],  # fmt: skip
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
    arch = ARCHS[args.arch]
    data.mkdir(parents=True, exist_ok=True)
    control = args.control or data / arch.control
    base = args.base or data / arch.base
    for p, given in ((control, args.control), (base, args.base)):
        if given and not p.exists():
            sys.exit(f"bench: {p} does not exist")
    need = [w for w, p in (("control", control), ("base", base)) if not p.exists()]
    if len(need) == 2:
        generate("pair", data, args.python, args.tiny, arch)
    elif need:
        generate(need[0], data, args.python, args.tiny, arch)
    ema = None
    if args.ema:
        assert arch.ema_base is not None
        ema = data / arch.ema_base
        if not ema.exists():
            generate("ema", data, args.python, args.tiny, arch)
    return control, base, ema


def needed_bytes(control: Path, base: Path) -> dict[str, Any]:
    """Bytes of the tensors an extraction must read, from cndiff's own plan (key names and
    shapes: no tensor data is read)."""
    from cndiff.inputs import open_checkpoint
    from cndiff.inputs.classify import CONTROL_PREFIX, UNET_PREFIX
    from cndiff.inputs.views import control_view, unet_view
    from cndiff.plan import plan_pairs

    with open_checkpoint(weights(control)) as ctl, open_checkpoint(weights(base)) as bse:
        cview, bview = control_view(ctl.tensors), unet_view(bse.tensors)
        if cview is None or bview is None:
            sys.exit(f"bench: {control} / {base} are not a ControlNet and an SD base")
        plan = plan_pairs(cview, bview)
        c = sum(ctl.tensors[i.control_key].nbytes for i in plan)
        sub = [i for i in plan if i.base_key is not None]
        b = sum(bse.tensors[i.base_key].nbytes for i in sub)
        numel = sum(i.numel for i in plan)
        # cndiff's default base check also reads the control file's embedded UNet copy of
        # every paired tensor (model.diffusion_model.X beside control_model.X)
        emb = []
        for i in sub:
            k = UNET_PREFIX + i.key[len(CONTROL_PREFIX) :]
            t = ctl.tensors.get(k)
            if t is not None and t.shape == i.shape:
                emb.append(t.nbytes)
        e = sum(emb)
        return {
            "control_layout": cview.layout,
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


def diff_bytes(diff: Path, base: Path) -> dict[str, Any]:
    """What verify and apply read of the difference model (all of its tensors), and the
    base tensors apply pairs with it (the library's plan)."""
    from cndiff.inputs import open_checkpoint
    from cndiff.inputs.views import control_view, unet_view
    from cndiff.plan import plan_pairs

    with open_checkpoint(diff) as d, open_checkpoint(weights(base)) as bse:
        items = plan_pairs(control_view(d.tensors), unet_view(bse.tensors))  # type: ignore[arg-type]
        return {
            "diff_tensors": len(d.tensors),
            "diff_bytes": sum(t.nbytes for t in d.tensors.values()),
            "apply_base_tensors": sum(1 for i in items if i.base_key is not None),
            "apply_base_bytes": sum(
                bse.tensors[i.base_key].nbytes for i in items if i.base_key is not None
            ),  # fmt: skip
        }


def make_setup_diff(args: argparse.Namespace, control: Path, base: Path, out_dir: Path) -> Path:
    """The difference model cndiff-verify and cndiff-apply take: made once, untimed."""
    diff = out_dir / "setup-diff.safetensors"
    cmd = [args.python, "-m", "cndiff", "extract", str(control), str(base), "-o", str(diff),
           "--overwrite", "-q", "--device", "cpu"]  # fmt: skip
    print(f"\nsetup: {' '.join(cmd[1:])} ...", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True)
    if r.returncode != 0 or not diff.exists():
        print(f"  FAILED rc={r.returncode}: {(r.stderr or r.stdout)[-800:]}")
    else:
        print(f"  {fmt_bytes(diff.stat().st_size)} in {time.perf_counter() - t0:.1f} s")
    return diff


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
    probe = ("import cndiff.backends.numpy_backend as m, cndiff.inputs.unpickle as u; "
             "print(m.native_kernels is not None, u.native_vm is not None)")  # fmt: skip
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=REPO,
                       env=child_env())  # fmt: skip
    info["native_kernels"], info["native_pickle_vm"] = (
        w == "True" for w in (r.stdout.split() + ["", ""])[:2]
    )
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
# Latency: spawn -> first tensor byte written, spawn -> first progress-bar update
# --------------------------------------------------------------------------------------

#: cndiff's temporary output names: .<name>.<pid>.<8 hex>.cndiff-tmp (cndiff.writer)
TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.cndiff-tmp$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: a tqdm bar: "desc:  51%|#####     | 61.9M/121M [00:00<00:00, 307MB/s]"
_BAR = re.compile(r"(\d+)%\|[^|]*\|\s*([0-9.]+)\s*[kMGTPEZY]?[A-Za-z]*/")


@dataclass
class Latency:
    runner: str
    cache: str
    rep: int
    command: list[str] = field(default_factory=list)
    #: seconds from spawn to the first byte past the safetensors header in the output
    first_byte_s: Optional[float] = None
    #: seconds from spawn to the first bar drawn (0 %) and the first one showing progress
    bar_shown_s: Optional[float] = None
    first_progress_s: Optional[float] = None
    #: seconds until the run ended (or was stopped, once both were seen)
    ended_s: float = 0.0
    stopped: bool = False
    rc: Optional[int] = None
    tmp_file: Optional[str] = None
    header_bytes: Optional[int] = None
    note: str = ""


def _watch_output(folder: Path, pid: int, t0: float, lat: Latency, stop: threading.Event) -> None:
    """Poll ``folder`` for the child's temporary output and the first tensor byte in it."""
    path: Optional[Path] = None
    threshold: Optional[int] = None
    while not stop.is_set():
        try:
            if path is None:
                for entry in os.scandir(folder):
                    m = TMP_RE.match(entry.name)
                    if m and int(m.group("pid")) == pid:
                        path = Path(entry.path)
                        lat.tmp_file = entry.name
                        break
            if path is not None:
                if threshold is None:
                    with open(path, "rb") as f:
                        head = f.read(8)
                    if len(head) == 8:
                        lat.header_bytes = 8 + int.from_bytes(head, "little")
                        threshold = lat.header_bytes
                if threshold is not None and os.stat(path).st_size > threshold:
                    lat.first_byte_s = time.perf_counter() - t0
                    return
        except FileNotFoundError:  # renamed into place (committed) or removed
            if path is not None:
                lat.note = "the temporary file was gone before a tensor byte was seen"
                return
        except OSError:
            pass
        time.sleep(0.001)


def _parse_bar(text: str) -> tuple[bool, bool]:
    """(a bar is shown, it shows progress > 0) in one redraw."""
    m = _BAR.search(text)
    if not m:
        return False, False
    return True, int(m.group(1)) > 0 or float(m.group(2)) > 0


def measure_latency(argv: list[str], folder: Path, lat: Latency, timeout: float) -> Latency:
    """Run ``argv`` under a pty (so cndiff shows its bar) and time the two events; stop
    the run (SIGTERM) once both were seen."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 120, 0, 0))
    env = child_env()
    env.update(COLUMNS="120", LINES="50", TERM=env.get("TERM", "xterm"))
    stop = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                            cwd=REPO, env=env)  # fmt: skip
    os.close(slave)
    watcher = threading.Thread(target=_watch_output, args=(folder, proc.pid, t0, lat, stop),
                               daemon=True)  # fmt: skip
    watcher.start()
    chunks: list[tuple[float, bytes]] = []

    def read_pty() -> None:
        tail = ""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            t = time.perf_counter() - t0
            chunks.append((t, data))
            text = tail + _ANSI.sub("", data.decode("utf-8", "replace"))
            segments = re.split(r"[\r\n]", text)
            tail = segments[-1]
            for seg in segments:
                shown, progress = _parse_bar(seg)
                if shown and lat.bar_shown_s is None:
                    lat.bar_shown_s = t
                if progress and lat.first_progress_s is None:
                    lat.first_progress_s = t

    reader = threading.Thread(target=read_pty, daemon=True)
    reader.start()
    deadline = t0 + timeout
    while proc.poll() is None:
        if lat.first_byte_s is not None and lat.first_progress_s is not None:
            break
        if time.perf_counter() > deadline:
            lat.note = (lat.note + "; " if lat.note else "") + f"stopped after {timeout:.0f} s"
            break
        time.sleep(0.005)
    if proc.poll() is None:
        lat.stopped = True
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lat.ended_s = time.perf_counter() - t0
    lat.rc = proc.returncode
    stop.set()
    watcher.join(5)
    reader.join(5)
    os.close(master)
    for f in folder.glob(".*.cndiff-tmp"):  # a killed run's leftovers (cndiff removes its own)
        m = TMP_RE.match(f.name)
        if m and int(m.group("pid")) == proc.pid:
            f.unlink(missing_ok=True)
    if lat.first_byte_s is None and not lat.note:
        lat.note = "no tensor byte seen before the run ended"
    if lat.first_progress_s is None and lat.bar_shown_s is None:
        lat.note += ("; " if lat.note else "") + "no progress bar seen"
    elif lat.first_progress_s is None:
        why = ("the run ended before the bar showed progress > 0" if not lat.stopped
               else "the bar never showed progress > 0")  # fmt: skip
        lat.note += ("; " if lat.note else "") + why
    if not lat.stopped and lat.rc not in (0, None):
        text = b"".join(c for _, c in chunks).decode("utf-8", "replace")
        lat.note += f"; FAILED rc={lat.rc}: {_ANSI.sub('', text)[-300:]!r}"
    return lat


# --------------------------------------------------------------------------------------
# Control-LoRA decompositions (benchmarks/lora_bench.py)
# --------------------------------------------------------------------------------------


def run_lora_bench(args: argparse.Namespace, control: Path, base: Path, out_dir: Path
                   ) -> dict[str, Any]:  # fmt: skip
    """lora_bench.py in a fresh process (it holds every layer's difference in memory)."""
    out = out_dir / "lora_bench.json"
    out.unlink(missing_ok=True)
    workers = lora_workers()
    cmd = [args.python, str(HERE / "lora_bench.py"), "--control", str(control), "--base",
           str(base), "--rank", str(args.lora_rank), "--json", str(out)]  # fmt: skip
    if not args.lora_matrix:
        cmd += ["--combos", f"numpy:gram:{workers}"]
    print(f"\nControl-LoRA decompositions: {' '.join(cmd[1:])}", flush=True)
    log = out_dir / "logs" / "lora_bench.log"
    rc, wall, _ = spawn(cmd, log)
    print("  " + tail(log, 6000).rstrip().replace("\n", "\n  "), flush=True)
    result: dict[str, Any] = {"command": cmd, "rc": rc, "wall_s": wall, "log": str(log),
                              "workers": workers}  # fmt: skip
    if rc == 0 and out.exists():
        result.update(json.loads(out.read_text()))
    return result


def lora_workers() -> int:
    """The export's default --workers: min(4, CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


def lora_decomposition_s(lb: dict[str, Any]) -> Optional[float]:
    row = next((r for r in lb.get("rows", []) if (r["backend"], r["method"], r["workers"]) ==
                ("numpy", "gram", lb.get("workers"))), None)  # fmt: skip
    return row["seconds"] if row else None


# --------------------------------------------------------------------------------------
# Job floors
# --------------------------------------------------------------------------------------


def _inode(p: Path) -> tuple:
    try:
        st = p.stat()
        return (st.st_dev, st.st_ino)
    except OSError:
        return (str(p),)


def job_floor(reads: Reads, write_bytes: float, cache: str, io: dict[str, Any]) -> dict[str, Any]:
    """Seconds the run's I/O takes at the measured throughputs: bytes to read / read
    throughput + bytes written / write throughput (with fdatasync), serial.

    Warm: every byte from the page cache. Cold: each file's bytes once from the disk
    (the largest read of that file: hard links of one file count once), any further read
    of the same file from the page cache.
    """
    per: dict[tuple, list[int]] = {}
    for p, n in reads:
        per.setdefault(_inode(p), []).append(n)
    total = sum(n for _, n in reads)
    cold = sum(max(v) for v in per.values()) if cache == "cold" else 0
    cached = total - cold
    read_s = cold / io["cold_read"] + cached / io["warm_read"]
    write_s = write_bytes / io["write"]
    return {
        "read_bytes": total,
        "cold_bytes": cold,
        "cache_bytes": cached,
        "files": len(per),
        "read_s": read_s,
        "write_bytes": write_bytes,
        "write_s": write_s,
        "floor_s": read_s + write_s,
        "overlapped_s": max(read_s, write_s),
    }


def predicted_out(runner: Runner, need: dict[str, Any]) -> Optional[float]:
    """Output bytes when no run succeeded (the fp16 tensor data)."""
    if runner.name == "cndiff-verify":
        return 0
    if runner.name.startswith("cndiff-lora"):
        return None
    n = len(BATCH_NAMES) if runner.name == "cndiff-batch" else 1
    return n * need["out_fp16_data_bytes"]


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
        help="folder for the generated files and outputs (outside the repo; "
        "default /tmp/cndiff-bench, /tmp/cndiff-bench-tiny with --tiny)",
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default="sd15",
                   help="which synthetic pair (sdxl: a diffusers ControlNet, fp32, and an "
                   "SDXL base, fp16; runners sdxl-*)")  # fmt: skip
    p.add_argument("--control", type=Path, help="use this control file (or diffusers folder) "
                   "instead of generating")  # fmt: skip
    p.add_argument("--base", type=Path, help="use this base file instead of generating")
    p.add_argument(
        "--ema",
        action="store_true",
        help="also generate a v1-5-pruned-style base with model_ema.* (7.7 GB) and "
        "run every runner against it too (rows RUNNER@ema; sd15 only)",
    )
    p.add_argument("--out-dir", type=Path, help="where outputs go (default DATA/out)")
    p.add_argument(
        "--runners",
        default=None,
        help=f"comma-separated, from: {', '.join(RUNNERS)} (default: "
        f"{DEFAULT_RUNNERS['sd15']}; with --arch sdxl: {DEFAULT_RUNNERS['sdxl']})",
    )
    p.add_argument("--all", action="store_true",
                   help=f"every row the targets need: {ALL_RUNNERS['sd15']} "
                   f"(--arch sdxl: {ALL_RUNNERS['sdxl']})")  # fmt: skip
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
        "--latency-runs",
        type=int,
        default=3,
        help="runs per cache state timing spawn -> first tensor byte and -> first "
        "progress update (cndiff, cndiff-batch, sdxl-extract; 0: skip)",
    )
    p.add_argument(
        "--latency-timeout",
        type=float,
        default=30.0,
        help="stop a latency run after this many seconds",
    )
    p.add_argument(
        "--keep-outputs",
        action="store_true",
        help="time each run over the previous run's outputs (a re-run with --overwrite; "
        "default: they are removed first, untimed, and each run writes its files afresh, "
        "as a first conversion and the write-throughput test do)",
    )
    p.add_argument(
        "--no-lora-bench",
        action="store_true",
        help="do not time the decompositions alone (lora_bench.py) with cndiff-lora",
    )
    p.add_argument(
        "--lora-matrix",
        action="store_true",
        help="lora_bench.py over every backend (numpy, torch), method (gram, exact, "
        "lowrank) and 1 vs the default workers (long: see README)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help="Control-LoRA rank (default 128; 2 with --tiny, where rank 128 factorizes nothing)",
    )
    p.add_argument(
        "--batch-inputs",
        choices=("links", "copies"),
        default="links",
        help="cndiff-batch's eight controls: hard links of the control (through "
        "batch_links.py) or real copies (8x the control's size on disk)",
    )
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
    if args.lora_rank is None:
        args.lora_rank = 2 if args.tiny else 128
    if args.all and args.runners:
        p.error("give --all or --runners, not both")
    names = ALL_RUNNERS[args.arch] if args.all else (args.runners or DEFAULT_RUNNERS[args.arch])
    args.runner_list = [r.strip() for r in names.split(",") if r.strip()]
    bad = [r for r in args.runner_list if r not in RUNNERS]
    if bad:
        p.error(f"unknown runner(s) {', '.join(bad)}; known: {', '.join(RUNNERS)}")
    other = [r for r in args.runner_list if RUNNERS[r].arch != args.arch]
    if other:
        p.error(f"runner(s) {', '.join(other)} run on another --arch than {args.arch}")
    if args.ema and args.arch != "sd15":
        p.error("--ema is for --arch sd15")
    args.cache_list = [c.strip() for c in args.cache.split(",") if c.strip()]
    if not args.cache_list or any(c not in ("warm", "cold") for c in args.cache_list):
        p.error("--cache takes warm, cold or warm,cold")
    if args.repeat < 1 or args.latency_runs < 0 or args.lora_rank < 1:
        p.error("--repeat and --lora-rank must be >= 1, --latency-runs >= 0")
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
    print(f"cndiff benchmark, {started:%Y-%m-%d %H:%M %Z}" + (" (--tiny: numbers meaningless)"
                                                             if args.tiny else ""))  # fmt: skip
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
    print(f"cndiff source: {SRC} (commit {git['commit']}{dirty}); native kernels "
          f"{'built' if machine['native_kernels'] else 'NOT built (numpy fallback)'}, "
          "native pickle machine "
          f"{'built' if machine.get('native_pickle_vm') else 'NOT built'}")  # fmt: skip
    files = {"control": control, "base": base, **({"ema_base": ema} if ema else {})}
    for k, p in files.items():
        print(f"{k}: {p} ({weights(p).stat().st_size / GB:.2f} GB)")
    need = needed_bytes(control, base)
    print(
        f"extract must read {need['control_tensors']} control + {need['base_tensors']} base "
        f"tensors = {fmt_bytes(need['read_bytes'])} "
        f"({fmt_bytes(need['control_bytes'])} + {fmt_bytes(need['base_bytes'])})"
    )
    if need["embedded_tensors"]:
        print(
            f"  + {need['embedded_tensors']} embedded UNet tensors "
            f"({fmt_bytes(need['embedded_bytes'])}) for cndiff's base check = "
            f"{fmt_bytes(need['read_with_check_bytes'])}"
        )
    if resident_fraction(weights(control)) is None:
        print("note: mincore is unavailable; page-cache residency is not checked")

    start_launcher(args.python)
    rc, _, ru = spawn([args.python, "-c", "pass"], out_dir / "logs" / "bare-child.log")
    machine["bare_child_rss_bytes"] = ru.ru_maxrss * 1024 if rc == 0 else None
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
            try:
                startup[name] = time_command([args.python, "-c", code])
            except subprocess.CalledProcessError:
                print(f"  {name:<34} FAILED")
                continue
            print(f"  {name:<34} {statistics.median(startup[name]):6.3f} s")
    print(f"peak RSS of a bare `python -c pass` run by the harness: "
          f"{fmt_bytes(machine['bare_child_rss_bytes'])} (the RSS column's floor)")  # fmt: skip

    floor: dict[str, Any] = {}
    if not args.no_floor:
        print("\nI/O floor ...", flush=True)
        floor = measure_io_floor(
            weights(control), args.data, int(args.floor_read_gb * GB), int(args.floor_write_gb * GB)
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

    # ---- setup: the diff verify and apply take; each runner's own preparation ----
    diff = out_dir / "setup-diff.safetensors"
    if any(r.needs_diff for r in runners):
        make_setup_diff(args, control, base, out_dir)
        if diff.exists():
            need.update(diff_bytes(diff, base))
            print(f"  verify reads the diff's {need['diff_tensors']} tensors "
                  f"({fmt_bytes(need['diff_bytes'])}); apply pairs {need['apply_base_tensors']} "
                  f"with base tensors ({fmt_bytes(need['apply_base_bytes'])})")  # fmt: skip

    def job_for(label: str, b: Path) -> Job:
        return Job(args.python, control, b, out_dir / f"{label}.safetensors", out_dir, diff,
                   args.lora_rank, args.batch_inputs)  # fmt: skip

    for r in runners:
        if r.prepare is not None:
            for tag, b in bases:
                r.prepare(job_for(r.name + (f"@{tag}" if tag else ""), b))

    # ---- the runs: per cache state, round-robin over runners, repeat times ----
    all_outputs: set[Path] = set()
    runs: list[Run] = []
    latencies: list[Latency] = []
    lora: dict[str, Any] = {}
    blob: dict[str, Any] = {
        "started": started.isoformat(),
        "finished": None,
        "argv": sys.argv,
        "machine": machine,
        "files": {
            k: {"path": str(p), "bytes": weights(p).stat().st_size} for k, p in files.items()
        },  # fmt: skip
        "needed": need,
        "startup_s": startup,
        "io_floor": floor,
        "runs": runs,
        "latency": latencies,
        "lora_bench": lora,
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
                    job = job_for(label, b)
                    inputs = runner.inputs(job)
                    if not args.keep_outputs:
                        # (replacing a synced output frees its blocks inside the run: on
                        # this ext4 mount, with discard, 0.16-0.19 s for 723 MB)
                        for p in runner.outputs(job):
                            p.unlink(missing_ok=True)
                        os.sync()
                    set_cache(cache, inputs, all_outputs | set(runner.outputs(job)))
                    run = Run(
                        runner.name, label, cache, rep, len(runs) + 1, command=runner.command(job)
                    )
                    run.resident_before = {str(p): resident_fraction(p) for p in inputs}
                    log = out_dir / "logs" / f"{label}-{cache}-{rep}.log"
                    run.log = str(log)
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

    # ---- the decompositions alone, for the Control-LoRA target ----
    if "cndiff-lora" in args.runner_list and not args.no_lora_bench:
        lora.update(run_lora_bench(args, control, base, out_dir))
        save_json(args.json, blob)

    # ---- time to first byte / first progress update ----
    lat_runners = [r for r in runners if r.latency]
    if lat_runners and args.latency_runs:
        print(f"\nlatency: {args.latency_runs} run(s) per cache state under a pty, stopped once "
              "the first tensor byte and the first progress update were seen ...",
              flush=True)  # fmt: skip
        for cache in args.cache_list:
            for rep in range(args.latency_runs):
                for runner in lat_runners:
                    job = job_for(runner.name, base)
                    set_cache(cache, runner.inputs(job), all_outputs)
                    argv = [a for a in runner.command(job) if a != "-q"]
                    lat = Latency(runner.name, cache, rep, command=argv)
                    measure_latency(argv, runner.out_folder(job), lat, args.latency_timeout)
                    latencies.append(lat)
                    print(f"  {cache} {runner.name:<14} first byte {_s(lat.first_byte_s)}  "
                          f"bar {_s(lat.bar_shown_s)}  first progress "
                          f"{_s(lat.first_progress_s)}  ended {lat.ended_s:.2f} s"
                          + (" (stopped)" if lat.stopped else "")
                          + (f"  [{lat.note}]" if lat.note else ""), flush=True)  # fmt: skip
                    save_json(args.json, blob)

    report, targets, floors = build_report(args, runners, bases, runs, need, startup, floor,
                                           lora, latencies)  # fmt: skip
    print("\n".join(report))
    blob.update(
        finished=datetime.datetime.now().astimezone().isoformat(),
        job_floor_s=floors,
        targets=targets,
        report=report,
    )
    if args.json:
        rows = summarize(runs)
        blob["summary"] = [
            {"label": k[0], "cache": k[1], **{kk: vv for kk, vv in v.items() if kk != "runs"}}
            for k, v in rows.items()
        ]
        save_json(args.json, blob)
        print(f"\nraw measurements: {args.json}")
    stop_launcher()
    failed = [r for r in runs if r.rc != 0]
    return 1 if failed or lora.get("rc", 0) != 0 else 0


def set_cache(cache: str, inputs: Sequence[Path], outputs: set[Path]) -> None:
    if cache == "warm":
        make_warm(inputs)
    else:
        evict([*inputs, *(p for p in outputs if p.exists())])


def _s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f} s"


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def build_report(
    args: argparse.Namespace,
    runners: list[Runner],
    bases: list[tuple[str, Path]],
    runs: list[Run],
    need: dict[str, Any],
    startup: dict[str, list[float]],
    floor: dict[str, Any],
    lora: dict[str, Any],
    latencies: list[Latency],
) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    rows = summarize(runs)
    caches = args.cache_list
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
    report += print_table(rows, order, caches)

    def med(label: str, cache: str, key: str) -> Optional[float]:
        row = rows.get((label, cache))
        return row.get(key) if row and row.get("n") else None

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    targets: list[dict[str, Any]] = []

    def target(runner: str, text: str, value: Optional[float], limit: float, shown: str,
               unit: str = "x", excess: Optional[str] = None) -> None:  # fmt: skip
        holds = None if value is None else value <= limit
        over = ""
        if holds is False:
            over = (f"{(value - limit) / MB:.0f} MB over" if unit == "B"
                    else f"{value / limit:.2f}x the limit ({100 * (value / limit - 1):.0f}% "
                    "over)")  # fmt: skip
            if excess:
                over += f"; {excess}"
        targets.append({"runner": runner, "target": text, "value": value, "limit": limit,
                        "shown": shown, "holds": holds, "over": over})  # fmt: skip

    # ---- baselines ----
    baselines = [n for n in BASELINES if n in args.runner_list]
    for r in runners:
        if not r.subject or not baselines:
            continue
        s = r.name
        report += ["", f"{s} / baseline (wall: medians; RSS: peaks)"]
        for bl in baselines:
            for cache in caches:
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

    # ---- RSS and baseline targets ----
    for r in runners:
        if r.rss_target is not None:
            rss = [med(r.name, c, "rss") for c in caches]
            v = max((x for x in rss if x is not None), default=None)
            target(r.name, f"peak RSS <= {r.rss_target / MB:.0f} MB", v, r.rss_target,
                   fmt_bytes(v), unit="B")  # fmt: skip
        if r.subject:
            for cache, bl, limit, text in WALL_TARGETS:
                if cache in caches and bl in baselines:
                    v = ratio(med(r.name, cache, "wall"), med(bl, cache, "wall"))
                    target(r.name, f"{cache} wall {text}", v, limit, ratio_str(v))

    # ---- job floors ----
    floors: dict[str, Any] = {}
    if floor:
        report += [
            "",
            "job floors: bytes to read / read throughput + bytes written / write+fdatasync "
            f"throughput, serial (page cache {floor['warm_read'] / GB:.2f} GB/s; cold: each "
            f"file's bytes once at {floor['cold_read'] / GB:.2f} GB/s, re-reads of the same "
            f"file from the cache; write {floor['write'] / GB:.2f} GB/s). I/O only: no compute, "
            "no start-up",
            f"  {'runner':<20}{'cache':<6}{'read':>9}{'(cold)':>9}{'read s':>8}{'written':>9}"
            f"{'write s':>8}{'floor s':>8}{'median':>9}  ratio",
        ]
        for r in runners:
            if r.reads is None:
                continue
            try:
                reads = r.reads(need, job_template(args, r, bases))
            except KeyError:  # e.g. no setup diff
                report.append(f"  {r.name:<20}(no floor: what it reads is unknown)")
                continue
            for cache in caches:
                wb = med(r.name, cache, "out")
                if wb is None:
                    wb = next((med(r.name, c, "out") for c in caches if med(r.name, c, "out")),
                              predicted_out(r, need))  # fmt: skip
                if wb is None:
                    continue
                f = job_floor(reads, wb, cache, floor)
                floors.setdefault(r.name, {})[cache] = f
                w = med(r.name, cache, "wall")
                rt = ratio(w, f["floor_s"])
                shown = "-" if w is None or rt is None else (
                    f"{rt:.2f}x (+{w - f['floor_s']:.2f} s)")  # fmt: skip
                report.append(
                    f"  {r.name:<20}{cache:<6}{fmt_bytes(f['read_bytes']):>9}"
                    f"{fmt_bytes(f['cold_bytes']) if cache == 'cold' else '':>9}"
                    f"{f['read_s']:>8.2f}{fmt_bytes(f['write_bytes']):>9}{f['write_s']:>8.2f}"
                    f"{f['floor_s']:>8.2f}{'-' if w is None else f'{w:.2f}':>9}  {shown}"
                )
                for c, limit in r.floor_targets:
                    if c == cache:
                        target(r.name, f"{cache} wall <= {limit:g}x its floor", rt, limit,
                               "n/a" if rt is None else f"{rt:.2f}x ({w:.2f} s)",
                               excess=None if w is None else
                               f"{w - limit * f['floor_s']:.2f} s too slow")  # fmt: skip
        if "cndiff-batch" in args.runner_list and args.batch_inputs == "links":
            report.append(
                "  (cndiff-batch: the 8 controls are hard links of one file: cold, "
                "it is read once from the disk, 7 times from the page cache)"
            )
        if startup.get("import cndiff"):
            report.append(
                f"  (start-up alone: python + import cndiff "
                f"{statistics.median(startup['import cndiff']):.2f} s)"
            )

    # ---- verify vs extract ----
    if "cndiff-verify" in args.runner_list:
        for cache in caches:
            v, e = med("cndiff-verify", cache, "wall"), med("cndiff", cache, "wall")
            rt = ratio(v, e)
            target("cndiff-verify", f"{cache} wall <= {VERIFY_VS_EXTRACT:g}x cndiff's", rt,
                   VERIFY_VS_EXTRACT,
                   "n/a (needs the cndiff row)" if e is None else
                   ("n/a" if rt is None else f"{rt:.2f}x ({v:.2f} s vs {e:.2f} s)"),
                   excess=None if v is None or e is None else
                   f"{v - VERIFY_VS_EXTRACT * e:.2f} s too slow")  # fmt: skip

    # ---- Control-LoRA ----
    if lora:
        report += ["", "Control-LoRA: the per-layer decompositions alone (benchmarks/"
                   "lora_bench.py; D = control - base of every factorized layer read into "
                   "memory first, untimed; BLAS 1 thread per worker)"]  # fmt: skip
        if lora.get("rc") != 0 or "rows" not in lora:
            report.append(f"  FAILED rc={lora.get('rc')} (log: {lora.get('log')})")
        else:
            report.append(f"  rank {lora['rank']}: {lora['layers']} layers, "
                          f"{fmt_bytes(lora['d_bytes'])} of float32 differences (read in "
                          f"{lora['read_s']:.1f} s); layout {lora['layout']}")  # fmt: skip
            report.append(f"  {'backend':<8}{'method':<9}{'workers':>7}{'seconds':>10}"
                          f"{'rel error':>12}")  # fmt: skip
            for row in lora["rows"]:
                report.append(f"  {row['backend']:<8}{row['method']:<9}{row['workers']:>7}"
                              f"{row['seconds']:>10.2f}{row['rel_error']:>12.6f}")  # fmt: skip
    dec = lora_decomposition_s(lora) if lora else None
    if "cndiff-lora" in args.runner_list:
        ext = floors.get("cndiff", {}) or {}
        for cache in caches:
            w = med("cndiff-lora", cache, "wall")
            f = ext.get(cache)
            if f is None and floor:  # cndiff not run: extract's floor from the plan
                f = job_floor(_reads_check(need, job_template(args, RUNNERS["cndiff"], bases)),
                              need["out_fp16_data_bytes"], cache, floor)  # fmt: skip
            bound = f["floor_s"] + dec if f is not None and dec is not None else None
            rt = ratio(w, bound)
            if bound is not None:
                report.append(f"  cndiff-lora {cache}: {_s(w)} vs extract's floor "
                              f"{f['floor_s']:.2f} s + decompositions {dec:.2f} s (numpy gram, "
                              f"{lora.get('workers')} workers) = {bound:.2f} s: "
                              + ("-" if rt is None else f"{rt:.2f}x"))  # fmt: skip
            target("cndiff-lora", f"{cache} wall <= {LORA_LIMIT:g}x (floor + decomp.)", rt,
                   LORA_LIMIT, "n/a" if rt is None else f"{rt:.2f}x ({w:.2f} s)",
                   excess=None if w is None or bound is None else
                   f"{w - LORA_LIMIT * bound:.2f} s too slow")  # fmt: skip

    # ---- latency ----
    if latencies:
        report += ["", "time to first tensor byte written / to the progress bar's first "
                   "update (spawn ->; under a pty; median, min-max)"]  # fmt: skip
        report.append(f"  {'runner':<16}{'cache':<6}{'n':>2}  {'first byte':<24}"
                      f"{'bar shown':<12}{'first progress':<24}")  # fmt: skip
        for r in runners:
            for cache in caches:
                ls = [x for x in latencies if x.runner == r.name and x.cache == cache]
                if not ls:
                    continue
                fb = [x.first_byte_s for x in ls if x.first_byte_s is not None]
                bs = [x.bar_shown_s for x in ls if x.bar_shown_s is not None]
                fp = [x.first_progress_s for x in ls if x.first_progress_s is not None]
                report.append(
                    f"  {r.name:<16}{cache:<6}{len(ls):>2}  {_mm(fb):<24}"
                    f"{_s(statistics.median(bs)) if bs else '-':<12}{_mm(fp):<24}"
                )
                notes = sorted({x.note for x in ls if x.note})
                report += [f"      note: {n}" for n in notes]
                for what, vals in (("first tensor byte", fb), ("first progress update", fp)):
                    v = statistics.median(vals) if vals else None
                    target(r.name, f"{cache} {what} < {LATENCY_TARGET_S:g} s", v,
                           LATENCY_TARGET_S, _s(v) if v is not None else
                           f"not seen in {len(ls)} run(s)",
                           excess=None if v is None else
                           f"{v - LATENCY_TARGET_S:.2f} s late")  # fmt: skip

    # ---- CUDA ----
    if any(r.cuda for r in runners) and "import torch; torch.cuda.init()" in startup:
        init = statistics.median(startup["import torch; torch.cuda.init()"])
        report += [
            "",
            "CUDA runners without start-up (median wall - median time of "
            "python -c 'import torch; torch.cuda.init()')",
        ]
        for r in runners:
            for cache in caches:
                w = med(r.name, cache, "wall") if r.cuda else None
                if w is not None:
                    report.append(
                        f"  {r.name} {cache}: {w:.2f} s - {init:.2f} s = {w - init:.2f} s"
                    )

    # ---- targets (grouped by runner, in the runners' order) ----
    rank = {r.name: i for i, r in enumerate(runners)}
    targets.sort(key=lambda t: rank.get(t["runner"], len(rank)))
    if targets:
        report += ["", "targets (n/a: not measured in this run)"]
        for t in targets:
            holds = {True: "yes", False: "NO", None: "n/a"}[t["holds"]]
            report.append(f"  {t['runner']:<15} {t['target']:<38} {t['shown']:<26} {holds}"
                          + (f"  {t['over']}" if t["over"] else ""))  # fmt: skip
        missed = [t for t in targets if t["holds"] is False]
        report.append(f"  {len(missed)} of {len(targets)} targets missed" if missed else
                      "  every measured target holds")  # fmt: skip

    failed = [r for r in runs if r.rc != 0]
    if failed:
        report += ["", f"FAILED runs: {len(failed)} of {len(runs)}"]
        for r in failed:
            last = (r.log_tail.strip().splitlines() or ["(no output)"])[-1]
            report.append(f"  {r.label} {r.cache} #{r.rep + 1}: rc={r.rc}, log {r.log}: "
                          f"{last[:200]}")  # fmt: skip
    return report, targets, floors


def job_template(args: argparse.Namespace, r: Runner, bases: list[tuple[str, Path]]) -> Job:
    """A Job with the paths of ``r``'s runs against the first base (for its reads)."""
    out_dir = args.out_dir or args.data / "out"
    control = args.control or args.data / ARCHS[args.arch].control
    return Job(args.python, control, bases[0][1], out_dir / f"{r.name}.safetensors", out_dir,
               out_dir / "setup-diff.safetensors", args.lora_rank, args.batch_inputs)  # fmt: skip


def _mm(vals: list[float]) -> str:
    if not vals:
        return "-"
    return f"{statistics.median(vals):.3f} s ({min(vals):.2f}-{max(vals):.2f})"


def save_json(path: Optional[Path], blob: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: ([asdict(r) for r in v] if k in ("runs", "latency") else v)
            for k, v in blob.items()}  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _plus(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a + b if a is not None and b is not None else None


if __name__ == "__main__":
    sys.exit(main())
