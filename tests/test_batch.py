"""Batch conversion: equal to single runs, base read once, failures isolated, resumable."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import assert_bit_equal, naive_diff
from safetensors.torch import load_file

import cndiff
from cndiff import extract_many, synthetic
from cndiff.cli import main

NAMES = ["canny", "depth", "hed", "mlsd", "normal", "openpose", "scribble", "seg"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Eight tiny controls (different seeds) and one base, in one folder."""
    folder = tmp_path_factory.mktemp("models")
    arch = synthetic.tiny()
    base = synthetic.make_base(folder / "sd15.ckpt", arch, seed=0)
    for i, name in enumerate(NAMES):
        synthetic.make_control(folder / f"control_sd15_{name}.pth", arch, seed=i + 1,
                               base_seed=0)  # fmt: skip
    return folder, base


def test_batch_equals_single_runs_and_reads_base_once(models, tmp_path, monkeypatch):
    folder, base = models
    controls = sorted(folder.glob("control_*.pth"))
    single = tmp_path / "single"
    single.mkdir()
    for c in controls:
        cndiff.extract(c, base, single)

    from cndiff.inputs import checkpoint as ck

    reads: dict[str, list[tuple[str, int]]] = {}
    orig = ck.Checkpoint.read_into

    def spy(self, key, out, start=0):
        reads.setdefault(self.path.name, []).append((key, start))
        return orig(self, key, out, start)

    monkeypatch.setattr(ck.Checkpoint, "read_into", spy)
    out = tmp_path / "batch"
    out.mkdir()
    results = extract_many(controls, base, out, chunk_mb=0.001)
    assert [r.status for r in results] == ["written"] * 8
    for c, r in zip(controls, results):
        assert r.output == out / f"diff_{c.stem}_fp16.safetensors"
        assert r.output.read_bytes() == (single / r.output.name).read_bytes()
    # every base chunk was read exactly once for all eight models
    base_reads = reads["sd15.ckpt"]
    assert len(base_reads) == len(set(base_reads))
    assert {k for k, _ in base_reads} == {
        "model.diffusion_model." + k[len("control_model.") :]
        for k in synthetic.paired_control_keys(synthetic.tiny())
    }
    assert all(len(reads[c.name]) >= 340 for c in controls)


def test_batch_bit_equal_to_naive(models, tmp_path):
    folder, base = models
    controls = sorted(folder.glob("control_*.pth"))[:3]
    results = extract_many(controls, base, tmp_path, dtype="bf16")
    for c, r in zip(controls, results):
        assert_bit_equal(load_file(str(r.output)), naive_diff(c, base, "bf16"))


def test_short_first_task_changes_no_byte(models, tmp_path, monkeypatch):
    """The first task is cut short (so the first bytes come sooner): the outputs are the
    same bytes, in a batch and alone, wherever the cut falls."""
    from cndiff import engine

    folder, base = models
    controls = sorted(folder.glob("control_*.pth"))[:3]
    ref = tmp_path / "ref"
    ref.mkdir()
    monkeypatch.setattr(engine, "FIRST_TASK", 1 << 40)
    extract_many(controls, base, ref)
    tasks: list[tuple[int, int]] = []
    real = engine._tasks

    def spy(streams, chunk):  # (the tasks in the order they are handed out)
        for task in real(streams, chunk):
            tasks.append((task.start, task.count))
            yield task

    monkeypatch.setattr(engine, "_tasks", spy)
    for cut in (1, 5, 37):
        monkeypatch.setattr(engine, "FIRST_TASK", cut)
        tasks.clear()
        out = tmp_path / f"cut{cut}"
        out.mkdir()
        extract_many(controls, base, out)
        assert tasks[:2] == [(0, cut), (cut, tasks[1][1])] and tasks[1][1] > 0
        cndiff.extract(controls[0], base, out / "alone.safetensors")
        for c in controls:
            name = f"diff_{c.stem}_fp16.safetensors"
            assert (out / name).read_bytes() == (ref / name).read_bytes()
        assert (out / "alone.safetensors").read_bytes() == \
            (ref / f"diff_{controls[0].stem}_fp16.safetensors").read_bytes()  # fmt: skip


def test_corrupt_model_fails_alone(models, tmp_path):
    folder, base = models
    work = tmp_path / "in"
    work.mkdir()
    for c in sorted(folder.glob("control_*.pth"))[:3]:
        shutil.copy(c, work / c.name)
    bad = work / "control_sd15_bad.pth"
    data = (work / "control_sd15_canny.pth").read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    out.mkdir()
    controls = sorted(work.glob("*.pth"))
    results = extract_many(controls, base, out)
    by = {r.source.name: r for r in results}
    assert by["control_sd15_bad.pth"].status == "failed"
    assert "truncated" in by["control_sd15_bad.pth"].reason
    assert sum(r.status == "written" for r in results) == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"diff_{c.stem}_fp16.safetensors" for c in controls if c.name != bad.name
    )


def test_rerun_skips_complete_and_cleans_leftovers(models, tmp_path):
    folder, base = models
    controls = sorted(folder.glob("control_*.pth"))[:2]
    first = extract_many(controls, base, tmp_path)
    assert [r.status for r in first] == ["written", "written"]
    # a leftover temp file of a killed run (dead pid) and a truncated output
    dead = tmp_path / f".{first[0].output.name}.999999999.0123abcd.cndiff-tmp"
    dead.write_bytes(b"partial")
    before = first[1].output.read_bytes()
    again = extract_many(controls, base, tmp_path)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert "complete output of the same job" in again[0].reason
    assert not dead.exists()  # the killed run's temporary file is cleaned up
    dead.write_bytes(b"partial again")
    first[1].output.write_bytes(before[:-10])  # now incomplete
    third = extract_many(controls, base, tmp_path)
    assert third[0].status == "skipped"
    assert third[1].status == "failed" and "exists" in third[1].reason
    forced = extract_many(controls, base, tmp_path, overwrite=True)
    assert [r.status for r in forced] == ["written", "written"]
    assert not dead.exists()
    assert forced[1].output.read_bytes() == before


def test_base_self_batch_equals_base_file(tmp_path):
    arch = synthetic.tiny()
    a = synthetic.make_control(tmp_path / "control_a.pth", arch, seed=1, base_seed=0,
                               embedded_unet="same")  # fmt: skip
    b = synthetic.make_control(tmp_path / "control_b.pth", arch, seed=2, base_seed=0,
                               embedded_unet="same")  # fmt: skip
    base = synthetic.make_base(tmp_path / "base.ckpt", arch, seed=0)
    (tmp_path / "self").mkdir()
    (tmp_path / "file").mkdir()
    r1 = extract_many([a, b], "self", tmp_path / "self")
    r2 = extract_many([a, b], base, tmp_path / "file")
    for x, y in zip(r1, r2):
        assert x.status == y.status == "written"
        assert_bit_equal(load_file(str(x.output)), load_file(str(y.output)))


def test_a_folder_batch_lists_other_files_as_skipped(models, tmp_path):
    folder, base = models
    results = extract_many(folder, base, tmp_path)
    by = {r.source.name: r for r in results}
    assert sorted(by) == sorted([*(f"control_sd15_{n}.pth" for n in NAMES), "sd15.ckpt"])
    assert by["sd15.ckpt"].status == "skipped"
    assert "Stable Diffusion checkpoint" in by["sd15.ckpt"].reason
    assert all(by[f"control_sd15_{n}.pth"].status == "written" for n in NAMES)


def test_cli_batch_summary_and_json(models, tmp_path, capsys):
    folder, base = models
    out = tmp_path / "o"
    out.mkdir()
    rc = main(["batch", str(folder), str(base), "-o", str(out), "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "8 written, 1 skipped, 0 failed" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("control_sd15_canny.pth"))
    written = out / "diff_control_sd15_canny_fp16.safetensors"
    import hashlib

    sha = hashlib.sha256(written.read_bytes()).hexdigest()
    assert f"{sha[:10]}  {sha}" in line
    assert f"{written.stat().st_size / 1e6:,.1f} MB" in line
    rc = main(["batch", str(folder), "--base", str(base), "-o", str(out), "-q", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [d["status"] for d in data].count("skipped") == 9
    canny = next(d for d in data if d["source"].endswith("control_sd15_canny.pth"))
    assert canny["output"] == str(written) and canny["sha256"] is None


def test_cli_extract_several_files_is_a_batch(models, tmp_path, capsys):
    folder, base = models
    a, b = sorted(folder.glob("control_*.pth"))[:2]
    rc = main(["extract", str(a), str(b), str(base), "-o", str(tmp_path), "-q", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [d["status"] for d in data] == ["written", "written"]
    assert all(len(d["sha256"]) == 64 and d["short_hash"] == d["sha256"][:10] for d in data)


def test_cli_batch_exit_code_on_failure(models, tmp_path, capsys):
    folder, base = models
    work = tmp_path / "in"
    work.mkdir()
    shutil.copy(folder / "control_sd15_canny.pth", work)
    (work / "control_sd15_broken.pth").write_bytes(
        (folder / "control_sd15_depth.pth").read_bytes()[:5000]
    )
    args = [str(work / "control_sd15_canny.pth"), str(work / "control_sd15_broken.pth")]
    rc = main(["extract", *args, str(base), "-o", str(work), "-q"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "1 written, 0 skipped, 1 failed" in text
    assert not (work / "diff_control_sd15_broken_fp16.safetensors").exists()


def test_progress_bars_on_a_terminal_only(models, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    from pathlib import Path

    folder, base = models
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    controls = [str(p) for p in sorted(folder.glob("control_*.pth"))[:3]]
    cmd = [sys.executable, "-m", "cndiff", "extract", *controls, str(base), "-o", str(tmp_path),
           "--chunk-mb", "0.01", "--overwrite"]  # fmt: skip

    def run_on_tty(extra: list[str]) -> tuple[int, str, str]:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        proc.wait()
        os.close(master)
        return proc.returncode, out, b"".join(chunks).decode(errors="replace")

    rc, out, err = run_on_tty([])
    assert rc == 0
    assert "3 written, 0 skipped, 0 failed" in out and "%|" not in out
    # one bytes bar for the batch (the outputs complete together: no bar of models), after
    # one that counts the models as they are opened (each a pickle to read)
    assert "3 models" in err and "B/s" in err and not re.search(r"(^|[\r\n])models:", err)
    assert re.search(r"opening:\s+33%[^\r]*1/3", err)  # (its first step drawn at once)
    assert err.index("opening:") < err.index("3 models")
    rc, out, err = run_on_tty(["-q"])
    assert rc == 0 and "%|" not in err
    # not a terminal (a log file): no bars, only the log lines, each whole
    piped = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert piped.returncode == 0
    assert "%|" not in piped.stderr and "\r" not in piped.stderr and "\x1b" not in piped.stderr
    assert all(line.startswith("control_sd15_") for line in piped.stderr.splitlines())


def test_progress_bar_draws_its_first_step_at_once(monkeypatch):
    # tqdm redraws at most every 0.2 s: without a forced redraw a user would first see 0%
    # for that long (the first step of a job usually comes sooner)
    import io
    import sys

    from cndiff.progress import progress_bar

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar(1000, "job", True) as bar:
        bar.update(250)
        shown = err.getvalue()
        bar.update(250)  # (the next ones wait for the interval again)
        assert err.getvalue() == shown
    assert " 25%" in shown


def test_a_base_among_the_controls_refuses_the_run(models, tmp_path, capsys):
    """A base named among several ControlNets while a base is also given is a mistake in
    the command: one line, exit 1, nothing written."""
    folder, base = models
    control = sorted(folder.glob("control_*.pth"))[0]
    out = tmp_path / "out"
    rc = main(["extract", str(control), str(base), "--base", "self", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("cndiff: error: ")
    assert f"{base.name} is a Stable Diffusion checkpoint, not a ControlNet: give the base " \
        "once, either as the last file or with --base" in err  # fmt: skip
    assert not out.exists() or list(out.iterdir()) == []
