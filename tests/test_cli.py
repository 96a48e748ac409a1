"""The command line: outputs, one-line errors, exit codes, no files left behind; the drop-in."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, naive_diff
from safetensors.torch import load_file

from cndiff import synthetic
from cndiff.cli import main
from cndiff.errors import OutputError

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, "-m", "cndiff", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=120,
    )  # fmt: skip


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_cli_extract_default_name_beside_control(sd15_pair, tmp_path):
    control, base = sd15_pair
    # copy the control so the output lands in tmp_path
    c = tmp_path / "control_sd15_canny.pth"
    c.write_bytes(control.read_bytes())
    proc = run_cli("extract", str(c), str(base), "-q")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "diff_control_sd15_canny_fp16.safetensors"
    assert out.exists()
    assert str(out) in proc.stdout
    # a fresh process (numpy kernels, torch never imported) gives the same bits
    assert_bit_equal(load_file(str(out)), naive_diff(c, base, "fp16"))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_cli_dtype_and_out_folder(sd15_pair, tmp_path, dtype):
    control, base = sd15_pair
    proc = run_cli("extract", str(control), "--base", str(base), "-o", str(tmp_path),
                   "--dtype", dtype, "--device", "cpu", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / f"diff_{control.stem}_{dtype}.safetensors"
    assert_bit_equal(load_file(str(out)), naive_diff(control, base, dtype))


def test_cli_does_not_import_torch_on_cpu(sd15_pair, tmp_path):
    control, base = sd15_pair
    code = (
        "import sys; from cndiff.cli import main; "
        f"rc = main(['extract', {str(control)!r}, {str(base)!r}, '-o', {str(tmp_path)!r}, '-q']);"
        "assert rc == 0; print('torch' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize(
    "argv, preset, want",
    [
        (["extract", "{c}", "{b}", "-o", "{o}", "-q"], None, "1"),
        (["inspect", "{c}"], None, "1"),
        (["extract", "{c}", "{b}", "-o", "{o}", "-q"], {"OMP_NUM_THREADS": "2"}, None),
        (["extract", "{c}", "{b}", "-o", "{o}", "-q"], {"OPENBLAS_NUM_THREADS": "3"}, "3"),
        (["extract", "{c}", "{b}", "-o", "{o}", "-q", "--format", "control-lora", "--rank",
          "4"], None, None),  # fmt: skip
        (["verify", "{d}", "--control", "{c}", "--base", "{b}", "-q"], None, None),
    ],
    ids=["extract", "inspect", "omp-set", "openblas-set", "control-lora", "verify"],
)
def test_one_blas_thread_where_no_blas_call(sd15_pair, tmp_path, argv, preset, want):
    """Commands making no BLAS call start OpenBLAS with one thread (its idle worker
    spins), unless the user said otherwise; the Control-LoRA export and verify keep it."""
    control, base = sd15_pair
    rc0 = main(["extract", str(control), str(base), "-o", str(tmp_path / "d.safetensors"),
                 "-q"])  # fmt: skip
    assert rc0 == 0
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(c=control, b=base, o=out, d=tmp_path / "d.safetensors") for a in argv]
    code = (
        "import os, sys; from cndiff.cli import main; "
        f"rc = main({argv!r}); print(rc, 'numpy' in sys.modules, "
        "os.environ.get('OPENBLAS_NUM_THREADS'))"
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}  # fmt: skip
    env.update(preset or {}, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    rc, numpy_loaded, got = proc.stdout.strip().splitlines()[-1].split()
    assert rc == "0" and numpy_loaded == "True"
    assert got == str(want)


def _error_cases(tmp: Path, control: Path, base: Path) -> dict[str, tuple[list[str], str]]:
    notckpt = tmp / "notes.pth"
    notckpt.write_text("hello, this is not a model\n" * 10)
    trunc = tmp / "trunc.pth"
    data = control.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    trunc_base = tmp / "trunc_base.safetensors"
    st_base = synthetic.make_base(tmp / "b.safetensors", synthetic.tiny(), fmt="safetensors")
    trunc_base.write_bytes(st_base.read_bytes()[:-100])
    sd21_base = synthetic.make_base(tmp / "sd21.ckpt", synthetic.tiny(synthetic.SD21))
    vae_only = tmp / "vae.safetensors"
    from safetensors.torch import save_file

    save_file({"first_stage_model.x": torch.zeros(2)}, str(vae_only))
    existing = tmp / "exists.safetensors"
    existing.write_bytes(b"keep me")
    folder = tmp / "adir"
    folder.mkdir()
    return {
        "missing": (["extract", str(tmp / "nope.pth"), str(base)], "no such file"),
        "directory": (["extract", str(folder), str(base)], "is a folder"),
        "not a checkpoint": (["extract", str(notckpt), str(base)], "not a checkpoint"),
        "truncated control": (["extract", str(trunc), str(base)], "truncated"),
        "truncated base": (["extract", str(control), str(trunc_base)], "truncated"),
        "no control keys": (["extract", str(base), str(base)], "Stable Diffusion checkpoint"),
        "mismatched base": (["extract", str(control), str(sd21_base)], "does not match"),
        "base without unet": (["extract", str(control), str(vae_only)], "only 0 of"),
        "existing output": (["extract", str(control), str(base), "-o", str(existing)], "exists"),
        "missing out folder": (
            ["extract", str(control), str(base), "-o", str(tmp / "no" / "x.safetensors")],
            "does not exist",
        ),
        "self without unet": (["extract", str(vae_only), "--base", "self"], "no control_model"),
    }


CASES = [
    "missing", "directory", "not a checkpoint", "truncated control", "truncated base",
    "no control keys", "mismatched base", "base without unet", "existing output",
    "missing out folder", "self without unet",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_cli_errors_are_one_line(sd15_pair, tmp_path, capsys, case):
    control, base = sd15_pair
    work = tmp_path / "work"
    work.mkdir()
    args, expect = _error_cases(work, control, base)[case]
    before = files_in(work)
    rc = main([*args, "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cndiff: error: ")
    assert expect in lines[0]
    assert "Traceback" not in err
    assert files_in(work) == before  # no output, no temporary file
    if case == "existing output":
        assert (work / "exists.safetensors").read_bytes() == b"keep me"


def test_cli_error_in_a_real_process(tmp_path):
    proc = run_cli("extract", str(tmp_path / "missing.pth"), str(tmp_path / "b.ckpt"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_cli_overwrite(sd15_pair, tmp_path):
    control, base = sd15_pair
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"old")
    assert main(["extract", str(control), str(base), "-o", str(out), "--overwrite", "-q"]) == 0
    assert_bit_equal(load_file(str(out)), naive_diff(control, base, "fp16"))


def test_demo_command(tmp_path):
    proc = run_cli("demo", str(tmp_path / "demo"), "-q")
    assert proc.returncode == 0, proc.stderr
    outs = list((tmp_path / "demo").glob("diff_*_fp16.safetensors"))
    assert len(outs) == 1
    assert "341 tensors (298 subtracted, 42 copied)" in proc.stdout


# -- the drop-in script --------------------------------------------------------------------

SCRIPT = REPO / "scripts" / "extract_controlnet_diff.py"


@pytest.mark.parametrize(
    "flags,dtype,dst",
    [(["--fp16"], "fp16", "d.safetensors"), (["--bf16"], "bf16", "d.safetensors"),
     ([], "fp32", "d.safetensors"), (["--fp16"], "fp16", "d.pth")],
)  # fmt: skip
def test_drop_in_script(sd15_pair, tmp_path, flags, dtype, dst):
    control, base = sd15_pair
    out = tmp_path / dst
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sd15", str(base), "--control", str(control),
         "--dst", str(out), *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    want = naive_diff(control, base, dtype)
    if dst.endswith(".safetensors"):
        got = load_file(str(out))
    else:
        obj = torch.load(str(out), weights_only=True)
        assert set(obj) == {"state_dict"}
        got = obj["state_dict"]
    assert_bit_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst]


def test_drop_in_script_drop_unchanged(sd15_pair, tmp_path):
    control, base = sd15_pair
    out = tmp_path / "d.safetensors"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--sd15", str(base), "--control", str(control),
         "--dst", str(out), "--fp16", "--drop-unchanged"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert_bit_equal(load_file(str(out)), naive_diff(control, base, "fp16", drop_unchanged=True))


@pytest.mark.parametrize("which", ["control", "base"])
def test_output_may_not_be_an_input(sd15_pair, tmp_path, capsys, which):
    control, base = sd15_pair
    c = tmp_path / "c.pth"
    b = tmp_path / "b.ckpt"
    c.write_bytes(control.read_bytes())
    b.write_bytes(base.read_bytes())
    target = c if which == "control" else b
    before = target.read_bytes()
    rc = main(["extract", str(c), str(b), "-o", str(target), "--overwrite", "-q"])
    assert rc == 1
    assert "is the input" in capsys.readouterr().err
    assert target.read_bytes() == before


def test_output_name_that_is_a_folder(sd15_pair, tmp_path, capsys):
    control, base = sd15_pair
    (tmp_path / f"diff_{control.stem}_fp16.safetensors").mkdir()
    rc = main(["extract", str(control), str(base), "-o", str(tmp_path), "--overwrite", "-q"])
    assert rc == 1
    assert "is a folder" in capsys.readouterr().err


# -- the scripts: run.sh in the user's folder; the drop-in's atomic torch output ----------------


def test_run_sh_works_from_another_folder(sd15_pair, tmp_path):
    """run.sh acts on the files where it is called (it used to change to the repo root)."""
    if not (REPO / ".venv" / ".cndiff-run").exists():
        pytest.skip("no set-up .venv in this checkout")
    control, base = sd15_pair
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "c.pth").write_bytes(control.read_bytes())
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run.sh"), "extract", "m/c.pth",
                           str(base), "-q"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "diff_c_fp16.safetensors").exists()


def test_drop_in_torch_output_is_atomic(sd15_pair, tmp_path, monkeypatch):
    import cndiff.writer
    from cndiff.commands.compat import extract_like_original
    from cndiff.writer import temp_files_for, temp_path

    control, base = sd15_pair
    dst = tmp_path / "d.pth"
    # its temporary files are the ones a later run's clean-up recognizes
    inter = temp_path(dst)
    nested = temp_path(inter)
    assert {inter, nested} <= set([*temp_files_for(dst), inter, nested])
    inter.write_bytes(b"x")
    nested.write_bytes(b"y")
    assert set(temp_files_for(dst)) == {inter, nested}
    inter.unlink()
    nested.unlink()
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(cndiff.writer.os, "fsync", lambda fd: (synced.append(fd),
                                                               real_fsync(fd))[1])  # fmt: skip
    extract_like_original(control, base, dst, dtype="fp16")
    assert len(synced) >= 2  # the intermediate safetensors and the torch file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pth"]
    obj = torch.load(str(dst), weights_only=True)
    assert_bit_equal(obj["state_dict"], naive_diff(control, base, "fp16"))

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OutputError, match="no space left"):
        extract_like_original(control, base, tmp_path / "e.pth", dtype="fp16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.pth"]


def test_public_names_import_lazily_and_all_resolve():
    code = (
        "import sys, cndiff; before = set(sys.modules); "
        "assert 'cndiff.commands.extract' not in before and 'numpy' not in before; "
        "assert all(getattr(cndiff, n) is not None for n in cndiff.__all__); "
        "assert sorted(cndiff.__all__) == sorted(['__version__', *cndiff._LAZY])"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
