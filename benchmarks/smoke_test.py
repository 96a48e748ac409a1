#!/usr/bin/env python3
"""Smoke test of the harness itself, on tiny synthetic files (about two minutes on 2 cores):

    python benchmarks/smoke_test.py [--data /tmp/cndiff-bench-smoke]

1. ``bench.py --tiny --all`` (SD1.5) plus a runner that always fails: every section of the
   report prints, the failure is reported (in the run list, the table and the "FAILED
   runs" section) and the exit status is 1;
2. ``bench.py --tiny --all --arch sdxl``: the SDXL rows (extract, prune, convert) run,
   with their floors and RSS targets; exit status 0.

Numbers from tiny files mean nothing; this only checks that the harness works.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def run(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(argv)
    text = buf.getvalue()
    print(text)
    return rc, text


def expect(text: str, *needles: str) -> list[str]:
    return [f"missing from the report: {n!r}" for n in needles if n not in text]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("/tmp/cndiff-bench-smoke"))
    a = p.parse_args()
    problems: list[str] = []

    # 1. SD1.5, every runner of --all, and one that fails on purpose
    bench.RUNNERS["always-fails"] = bench.Runner(
        "always-fails",
        "exits 3 (checks that failures are reported)",
        lambda job: [job.python, "-c", "import sys; print('failing on purpose'); sys.exit(3)"],
        outputs=lambda job: [],
        rss_target=bench.RSS_TARGET,
    )
    runners = bench.ALL_RUNNERS["sd15"] + ",always-fails"
    rc, text = run(["--tiny", "--data", str(a.data / "sd15"), "--runners", runners,
                    "--repeat", "1", "--latency-runs", "1",
                    "--json", str(a.data / "sd15.json")])  # fmt: skip
    if rc != 1:
        problems.append(f"sd15: exit status {rc}, expected 1 (a runner failed)")
    problems += expect(
        text,
        "start-up (median of 3",
        "I/O floor",
        "setup: -m cndiff extract",
        "job floors:",
        "Control-LoRA: the per-layer decompositions alone",
        "time to first tensor byte written",
        "targets (n/a: not measured in this run)",
        "always-fails    warm   0 all 1 run(s) failed",
        "FAILED rc=3",
        "FAILED runs: 2 of 18",
        "failing on purpose",
        "cndiff-verify   warm wall <= 1.5x cndiff's",
        "cndiff-lora     warm wall <= 1.5x (floor + decomp.)",
        "cndiff-batch    warm first tensor byte < 0.5 s",
        "cndiff-apply    cold wall <= 1.5x its floor",
        "always-fails    peak RSS <= 512 MB",
    )
    for name in bench.ALL_RUNNERS["sd15"].split(","):
        if f"\n{name:<16}warm   1 " not in text:
            problems.append(f"sd15: no successful warm row for {name}")

    # 2. SDXL
    del bench.RUNNERS["always-fails"]
    rc, text = run(["--tiny", "--arch", "sdxl", "--all", "--data", str(a.data / "sdxl"),
                    "--repeat", "1", "--latency-runs", "1"])  # fmt: skip
    if rc != 0:
        problems.append(f"sdxl: exit status {rc}, expected 0")
    problems += expect(text, "sdxl-prune      peak RSS <= 512 MB", "sdxl-extract    warm first")
    for name in bench.ALL_RUNNERS["sdxl"].split(","):
        if f"\n{name:<16}warm   1 " not in text or f"  {name:<20}cold" not in text:
            problems.append(f"sdxl: no warm row or no cold floor for {name}")

    print("\n".join(["", "smoke test:", *(f"  {x}" for x in problems)]) if problems
          else "\nsmoke test: ok")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
