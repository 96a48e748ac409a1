"""The README's command blocks, run in order, exactly as written, in an empty folder with
synthetic files named as in the README. ``bash`` blocks are commands a user types
(``cndiff`` runs this checkout's cndiff); ``python`` blocks are notebook cells, run in one
interpreter in order; ``sh`` blocks are set-up (``scripts/run.sh``, ``pip install``) and are
not run here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cndiff import synthetic

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NAMES = ["canny", "depth", "hed", "mlsd", "normal", "openpose", "scribble", "seg"]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def commands(body: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def make_files(folder: Path) -> None:
    """What the README's examples name, as tiny synthetic models."""
    arch = synthetic.tiny()
    synthetic.make_base(folder / "v1-5-pruned.ckpt", arch, seed=0)
    synthetic.make_control(folder / "control_v11p_sd15_canny.pth", arch, seed=11, base_seed=0,
                           layout="control-only")  # fmt: skip
    xl = synthetic.tiny(synthetic.SDXL)
    synthetic.make_diffusers_controlnet(folder / "controlnet-canny-sdxl-1.0", xl, seed=1,
                                        base_seed=0)  # fmt: skip
    synthetic.make_base(folder / "sd_xl_base_1.0.safetensors", xl, seed=0)
    synthetic.make_base(folder / "dreamshaper_8.safetensors", arch, seed=8, fmt="safetensors")
    (folder / "models").mkdir()
    for i, name in enumerate(NAMES):
        p = synthetic.make_control(folder / "models" / f"control_sd15_{name}.pth", arch,
                                   seed=i + 1, base_seed=0, embedded_unet="same")  # fmt: skip
        if name in ("canny", "depth"):
            (folder / p.name).write_bytes(p.read_bytes())


def run_bash(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    if argv[0] == "cndiff":
        argv = [sys.executable, "-m", "cndiff", *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
        if argv[1].startswith("scripts/"):
            argv[1] = str(REPO / argv[1])
    else:
        pytest.fail(f"README command not understood: {cmd}")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_readme_blocks_run_in_order(tmp_path):
    make_files(tmp_path)
    ran = {"bash": 0, "python": 0}
    cells: list[str] = []
    for lang, body in blocks(README.read_text()):
        if lang == "bash":
            for cmd in commands(body):
                proc = run_bash(cmd, tmp_path)
                assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
                assert "Traceback" not in proc.stderr, cmd
                ran["bash"] += 1
        elif lang == "python":
            cells.append(body)
            ran["python"] += 1
    # the notebook cells: one interpreter, in order, after the commands they build on
    script = "\n".join(cells)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ran["bash"] >= 12 and ran["python"] >= 3
    # what the README says the commands wrote
    assert (tmp_path / "diff_control_sd15_canny_fp16.safetensors").exists()
    assert (tmp_path / "control_sd15_canny_dreamshaper_8_fp16.safetensors").exists()
    assert len(list((tmp_path / "diffs").glob("diff_control_sd15_*_fp16.safetensors"))) == 8
    assert (tmp_path / "drop-in_canny_fp16.safetensors").exists()
    assert (tmp_path / "control_v11p_sd15_canny_fp16.safetensors").exists()
    assert (tmp_path / "control_sd15_canny_diffusers" / "config.json").exists()
    assert (tmp_path / "controlnet-canny-sdxl-1.0_fp16.safetensors").exists()
    assert (tmp_path / "diff_controlnet-canny-sdxl-1.0_fp16.safetensors").exists()


def test_readme_setup_blocks_name_real_scripts():
    for lang, body in blocks(README.read_text()):
        if lang == "sh":
            for cmd in commands(body):
                first = shlex.split(cmd)[0]
                assert first == "pip" or (REPO / first).exists(), cmd
