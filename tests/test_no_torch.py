"""Without torch: every command that can work does, and those that need it say so in one
line. Each case runs in a fresh process where ``import torch`` fails."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cndiff
from cndiff import synthetic

REPO = Path(__file__).resolve().parents[1]
# a process where torch cannot be imported, running the command line
BLOCK = (
    "import sys; sys.modules['torch'] = None; "
    "from cndiff.cli import main; rc = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(rc)"
)


def no_torch(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-c", BLOCK, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("notorch")
    control, base = synthetic.make_pair(folder, synthetic.tiny())
    return folder, control, base


def test_torch_is_an_optional_dependency():
    text = (REPO / "pyproject.toml").read_text()  # (tomllib is not in Python 3.10)
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    assert "numpy" in deps and "torch" not in deps
    assert re.search(r'^torch = \["torch>=', text, re.M)


def test_extract_batch_verify_apply_inspect_without_torch(files, tmp_path):
    folder, control, base = files
    p = no_torch("extract", str(control), str(base), "-o", str(tmp_path), "-q")
    assert p.returncode == 0, p.stderr
    diff = tmp_path / f"diff_{control.stem}_fp16.safetensors"
    want = cndiff.extract(control, base, tmp_path / "ref" / "").output.read_bytes()
    assert diff.read_bytes() == want
    p = no_torch("batch", str(folder), str(base), "-o", str(tmp_path / "b"), "-q")
    assert p.returncode == 0, p.stderr
    p = no_torch("verify", str(diff), "--control", str(control), "--base", str(base), "-q")
    assert p.returncode == 0 and "PASS" in p.stdout, p.stderr
    p = no_torch("apply", str(diff), str(base), "-o", str(tmp_path / "a.safetensors"), "-q")
    assert p.returncode == 0, p.stderr
    p = no_torch("inspect", str(diff), str(control), "--json", "--hash")
    assert p.returncode == 0, p.stderr
    assert [r["kind"] for r in json.loads(p.stdout)] == ["difference", "original-controlnet"]


def test_control_lora_without_torch(files, tmp_path):
    _, control, base = files
    p = no_torch("extract", str(control), str(base), "-o", str(tmp_path), "--format",
                 "control-lora", "--rank", "2", "-q")  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = tmp_path / f"control_lora_rank2_{control.stem}_fp16.safetensors"
    # numpy's LAPACK gives the file the torch-less run must match in structure and error
    ref = cndiff.extract(control, base, tmp_path / "ref" / "", format="control-lora", rank=2)
    assert cndiff.inspect_file(out).keys == ref.keys_written
    p = no_torch("verify", str(out), "--control", str(control), "--base", str(base), "-q")
    assert p.returncode == 0, p.stderr


def test_demo_without_torch(tmp_path):
    p = no_torch("demo", str(tmp_path / "demo"), "-q")
    assert p.returncode == 0, p.stderr
    assert "341 tensors (298 subtracted, 42 copied)" in p.stdout


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--device", "cuda"], "--device cuda needs PyTorch, which is not installed"),
        (["--backend", "torch"], "the torch backend (cpu) needs PyTorch"),
    ],
)
def test_commands_that_need_torch_say_so_in_one_line(files, tmp_path, args, expect):
    _, control, base = files
    p = no_torch("extract", str(control), str(base), "-o", str(tmp_path), "-q", *args)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert expect in p.stderr and "pip install torch" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_drop_in_torch_format_without_torch(files, tmp_path):
    _, control, base = files
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "scripts" / "extract_controlnet_diff.py"),
         "--sd15", str(base), "--control", str(control), "--dst", str(tmp_path / "d.pth")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 1
    assert "needs PyTorch" in p.stderr and p.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
