"""Odd and hostile inputs, round two, on the pipeline's side: values (NaN/Inf, float8,
float64 against bfloat16), keys and names that are not valid Unicode, output targets
that are not files, names at the file system's limit, escapes on the terminal, and one
model's failure of any kind in a batch."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import naive_diff
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cndiff
from cndiff import synthetic
from cndiff.cli import main
from cndiff.errors import CheckpointError, OutputError

REPO = Path(__file__).resolve().parents[1]
CP, UP = "control_model.", "model.diffusion_model."


def _flat_pair(tmp_path: Path, control_dtype=torch.float32, base_dtype=torch.float32):
    """A tiny control (control_model.* only) and base as safetensors."""
    arch = synthetic.tiny()
    c = {k: v.to(control_dtype) if v.is_floating_point() else v
         for k, v in synthetic.control_state_dict(arch).items() if k.startswith(CP)}  # fmt: skip
    b = {k: v.to(base_dtype) if v.is_floating_point() else v
         for k, v in synthetic.base_state_dict(arch).items() if k.startswith(UP)}  # fmt: skip
    return c, b


def _save(tensors: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# -- values ------------------------------------------------------------------------------------


def test_apply_float64_diff_onto_bfloat16_base(tmp_path):
    c, b = _flat_pair(tmp_path, base_dtype=torch.bfloat16)
    diff = {k: (v.double() - b[UP + k[len(CP):]].double()) if UP + k[len(CP):] in b
            else v.double() for k, v in c.items()}  # fmt: skip
    diff["difference"] = torch.tensor(1.0, dtype=torch.float64)
    dpath, bpath = _save(diff, tmp_path / "d64.safetensors"), _save(b, tmp_path / "bbf.safetensors")
    for backend in ("numpy", "torch"):
        r = cndiff.apply_diff(dpath, bpath, tmp_path / f"{backend}.safetensors", dtype="fp16",
                              backend=backend)  # fmt: skip
        got = load_file(str(r.output))
        for k, v in diff.items():
            if k == "difference":
                continue
            bk = UP + k[len(CP) :]
            want = (v + b[bk].double()).float().half() if bk in b else v.float().half()
            assert torch.equal(got[k].view(torch.int16), want.view(torch.int16)), (backend, k)


def test_nan_and_inf_in_a_control_are_reported(tmp_path, caplog, capsys):
    c, b = _flat_pair(tmp_path)
    c[CP + "input_blocks.1.0.in_layers.2.weight"][0, 0, 0, 0] = float("nan")
    c[CP + "zero_convs.0.0.weight"][0, 0, 0, 0] = float("inf")
    big = CP + "middle_block.0.in_layers.2.bias"
    c[big][0] = 1e6  # finite, but no float16 holds it
    cp, bp = _save(c, tmp_path / "c.safetensors"), _save(b, tmp_path / "b.safetensors")
    with caplog.at_level(logging.WARNING, logger="cndiff"):
        r = cndiff.extract(cp, bp, tmp_path / "o.safetensors")
    assert sorted(r.nonfinite) == sorted([CP + "input_blocks.1.0.in_layers.2.weight",
                                          CP + "zero_convs.0.0.weight", big])  # fmt: skip
    assert any("NaN or infinite" in rec.getMessage() for rec in caplog.records)
    # verify says so plainly, with no numpy warnings on stderr
    rc = subprocess.run([sys.executable, "-m", "cndiff", "verify", str(r.output), "--control",
                         str(cp), "--base", str(bp)], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(REPO / "src")))  # fmt: skip
    assert rc.returncode == 1
    assert "NaN or infinite values in: 3 key(s)" in rc.stdout
    assert "RuntimeWarning" not in rc.stderr and "Traceback" not in rc.stderr
    # the Control-LoRA export refuses a NaN layer with a one-line error naming it
    with pytest.raises(CheckpointError, match="in_layers.2.weight holds NaN or infinite"):
        cndiff.extract(cp, bp, tmp_path, format="control-lora", rank=2)
    assert not list(tmp_path.glob("control_lora_*"))


def test_float8_control_tensors_are_read(tmp_path):
    c, b = _flat_pair(tmp_path)
    c8 = {k: (v.to(torch.float8_e4m3fn) if k.startswith(CP + "zero_convs") else v)
          for k, v in c.items()}  # fmt: skip
    c8 = {k: v for k, v in c8.items()}
    cp = _save(c8, tmp_path / "c8.safetensors")
    bp = _save(b, tmp_path / "b.safetensors")
    r = cndiff.extract(cp, bp, tmp_path / "o.safetensors", dtype="bf16")
    got = load_file(str(r.output))
    assert_equal = torch.equal(got[CP + "zero_convs.0.0.weight"],
                               c8[CP + "zero_convs.0.0.weight"].float().bfloat16())  # fmt: skip
    assert assert_equal
    assert torch.equal(got[CP + "time_embed.0.weight"].view(torch.int16),
                       naive_diff(cp, bp, "bf16")[CP + "time_embed.0.weight"].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.uint16])
def test_a_torch_file_with_new_dtypes_is_refused_for_what_it_is(tmp_path, capsys, dtype):
    """torch.save writes float8 and uint16-64 tensors with ``_rebuild_tensor_v3``: not
    code, and torch.load(weights_only=True) reads it; cndiff refuses it as a format it
    does not read (not as unsafe), saying what to do, in one line."""
    c, b = _flat_pair(tmp_path)
    c[CP + "zero_convs.0.0.bias"] = torch.zeros(4).to(dtype)
    cp = tmp_path / "c.pth"
    torch.save(c, str(cp))
    assert torch.load(str(cp), weights_only=True)[CP + "zero_convs.0.0.bias"].dtype == dtype
    bp = _save(b, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError) as info:
        cndiff.extract(cp, bp, tmp_path / "o.safetensors")
    assert type(info.value) is CheckpointError  # not UnsafeCheckpointError
    assert "_rebuild_tensor_v3" in str(info.value) and ".safetensors" in str(info.value)
    assert "could run code" not in str(info.value)
    rc = main(["extract", str(cp), str(bp), "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("cndiff: error: c.pth") and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


# -- keys and names that are not valid Unicode ---------------------------------------------------


def test_a_key_that_is_not_valid_unicode_is_refused_clearly(tmp_path, capsys):
    c, b = _flat_pair(tmp_path)
    odd = CP + "zero_convs.0.0.\udcff"
    c[odd] = torch.zeros(2)
    cp = tmp_path / "c.pth"
    torch.save(c, str(cp))  # torch writes and reads such a key
    assert odd in torch.load(str(cp), weights_only=True)
    bp = _save(b, tmp_path / "b.safetensors")
    rc = main(["extract", str(cp), str(bp), "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "not valid Unicode" in err and err.count("\n") == 1
    assert "\\udcff" in err  # escaped, never raw
    assert not (tmp_path / "o.safetensors").exists()


def test_a_file_name_that_is_not_valid_unicode_is_escaped_in_metadata(tmp_path):
    c, b = _flat_pair(tmp_path)
    name = os.fsdecode(b"control_caf\xe9.safetensors")  # Latin-1 bytes: a lone surrogate
    cp = _save(c, tmp_path / name)
    bp = _save(b, tmp_path / "b.safetensors")
    r = cndiff.extract(cp, bp, tmp_path / "o.safetensors")
    with safe_open(str(r.output), "np") as f:  # the safetensors library opens it
        meta = f.metadata()
    assert meta["cndiff.source"] == "control_caf\\udce9.safetensors"
    assert cndiff.inspect_file(r.output).metadata["cndiff.source"].startswith("control_caf")


def test_a_header_over_the_safetensors_limit_is_never_written(tmp_path):
    from cndiff.dtypes import F16
    from cndiff.writer import MAX_HEADER_BYTES, OutputEntry, build_header

    entries = [OutputEntry(f"k{i:07d}" + "x" * 200, F16, (1,)) for i in range(450_000)]
    with pytest.raises(OutputError, match="safetensors readers refuse headers over"):
        build_header(entries, {})
    assert MAX_HEADER_BYTES == 100_000_000


# -- output targets ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_overwrite_never_replaces_a_device_or_a_pipe(sd15_pair, tmp_path, capsys, kind):
    control, base = sd15_pair
    if kind == "fifo":
        target = tmp_path / "pipe.safetensors"
        os.mkfifo(target)
    else:
        target = Path("/dev/null")
    rc = main(["extract", str(control), str(base), "-o", str(target), "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "not a regular file" in err
    assert stat.S_ISFIFO(os.stat(target).st_mode) if kind == "fifo" else \
        stat.S_ISCHR(os.stat(target).st_mode)  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == (["pipe.safetensors"] if kind == "fifo"
                                                    else [])  # fmt: skip


def test_names_at_the_file_system_limit(sd15_pair, tmp_path, capsys):
    control, base = sd15_pair
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "n" * (limit - len(".safetensors") - 3) + ".safetensors"  # legal: 252 bytes
    r = cndiff.extract(control, base, tmp_path / name)
    assert r.output.name == name and r.output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    too_long = "n" * (limit + 1) + ".safetensors"
    rc = main(["extract", str(control), str(base), "-o", str(tmp_path / too_long), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "this file system allows" in err and err.count("\n") == 1


# -- the terminal -----------------------------------------------------------------------------


def test_control_characters_from_files_never_reach_the_terminal(sd15_pair, tmp_path, capsys):
    control, base = sd15_pair
    evil = "\x1b[2J\x1b[1;1HPASS\x07\r\n"
    c, b = _flat_pair(tmp_path)
    save_file({k: v.contiguous() for k, v in c.items()}, str(tmp_path / "c.safetensors"),
              metadata={"note" + evil: "x" + evil})  # fmt: skip
    assert main(["inspect", str(tmp_path / "c.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\x1b[2J" in out
    # a file name with a newline and an escape: every message stays one line
    weird = tmp_path / "a\nb\x1b.pth"
    weird.write_bytes(b"not a model")
    rc = main(["extract", str(weird), str(base), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "\x1b" not in err and "a\\nb\\x1b" in err
    # keys with control characters in warnings and verify lists
    bad = CP + "zero_convs.0.0.\x1b[31mred"
    c[bad] = torch.full((2,), float("nan"))
    cp = _save(c, tmp_path / "k.safetensors")
    bp = _save(b, tmp_path / "b.safetensors")
    rc = main(["extract", str(cp), str(bp), "-o", str(tmp_path / "o.safetensors")])
    captured = capsys.readouterr()
    assert rc == 0 and "\x1b" not in captured.err + captured.out
    assert "\\x1b[31mred" in captured.err


# -- a batch survives any failure of one model ------------------------------------------------


def test_any_exception_of_one_model_leaves_the_others(tmp_path, monkeypatch, capsys):
    arch = synthetic.tiny()
    base = synthetic.make_base(tmp_path / "base.ckpt", arch)
    models = tmp_path / "models"
    for n in ("a", "b", "c"):
        synthetic.make_control(models / f"control_{n}.pth", arch, seed=1, base_seed=0)
    from cndiff.inputs import opening

    real = opening.open_checkpoint

    def flaky(path, *a, **k):
        if Path(path).name == "control_b.pth":
            raise AttributeError("'OrderedDict' object attribute 'items' is read-only")
        return real(path, *a, **k)

    for mod in ("cndiff.inputs.opening", "cndiff.inputs.sources", "cndiff.inputs",
                "cndiff.commands.extract"):  # fmt: skip
        if hasattr(sys.modules[mod], "open_checkpoint"):
            monkeypatch.setattr(sys.modules[mod], "open_checkpoint", flaky)
    rc = main(["batch", str(models), str(base), "-o", str(tmp_path / "out"), "-q", "--json"])
    rows = {Path(r["source"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rc == 1
    assert rows["control_a.pth"]["status"] == rows["control_c.pth"]["status"] == "written"
    assert rows["control_b.pth"]["status"] == "failed"
    assert "AttributeError" in rows["control_b.pth"]["reason"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "diff_control_a_fp16.safetensors", "diff_control_c_fp16.safetensors"]


def test_lora_factors_of_the_wrong_rank_fail_verify_structurally(sd15_pair, tmp_path):
    control, base = sd15_pair
    res = cndiff.extract(control, base, tmp_path, format="control-lora", rank=2)
    t = load_file(str(res.output))
    module = "input_blocks.1.0.in_layers.2"  # factorized at rank 2 (4 x 36)
    assert module + ".up" in t
    t[module + ".up"] = torch.tensor(1.0, dtype=torch.float16)  # 0-d
    t[module + ".down"] = torch.ones(3, dtype=torch.float16)  # 1-d
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad))
    rep = cndiff.verify(bad, control, base)
    assert not rep.passed
    assert any(m.startswith(module + ".weight") and "2 or more dimensions" in m
               for m in rep.misshaped)  # fmt: skip
    assert np.isfinite(rep.weight_error)


def test_the_escape_fast_path_and_the_rule_agree_on_every_code_point():
    import re

    from cndiff.text import _UNSAFE, _is_unsafe

    rule = "".join(chr(c) for c in range(sys.maxunicode + 1) if _is_unsafe(chr(c)))
    assert "".join(_UNSAFE.findall("".join(chr(c) for c in range(sys.maxunicode + 1)))) == rule
    assert re.search(_UNSAFE, "plain ascii key.weight") is None
