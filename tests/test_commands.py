"""The edges where commands used to disagree: output folders, files that are not
ControlNets, reruns of the same and of other jobs, options with one meaning everywhere,
repeated files, JSON, notebook reprs, wording. Each test names what a user hit."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
from conftest import assert_bit_equal, naive_diff
from safetensors.torch import load_file, save_file

import cndiff
from cndiff import synthetic
from cndiff.cli import main
from cndiff.errors import CndiffError, OptionError, OutputExistsError, WrongKindError
from cndiff.options import Options


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny controls and their base, in one folder."""
    folder = tmp_path_factory.mktemp("models")
    arch = synthetic.tiny()
    base = synthetic.make_base(folder / "v1-5-pruned.ckpt", arch, seed=0)
    controls = [synthetic.make_control(folder / f"control_sd15_{n}.pth", arch, seed=i + 1,
                                       base_seed=0, embedded_unet="same")
                for i, n in enumerate(["canny", "depth", "hed"])]  # fmt: skip
    return folder, controls, base


def copy_models(models, dest: Path) -> tuple[list[Path], Path]:
    folder, controls, base = models
    dest.mkdir(parents=True, exist_ok=True)
    for p in [*controls, base]:
        shutil.copy(p, dest / p.name)
    return [dest / c.name for c in controls], dest / base.name


# -- 1. output folders are created the way users expect ---------------------------------------


def test_batch_creates_the_output_folder(models, tmp_path, capsys):
    folder, controls, base = models
    out = tmp_path / "diffs"
    assert main(["batch", str(folder), str(base), "-o", str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"diff_{c.stem}_fp16.safetensors" for c in controls
    )
    # several models with -o and no trailing separator: a folder too
    out2 = tmp_path / "a" / "b"
    assert main(["extract", *map(str, controls[:2]), str(base), "-o", str(out2), "-q"]) == 0
    assert len(list(out2.iterdir())) == 2


def test_trailing_separator_makes_a_folder_for_one_model(models, tmp_path):
    _, controls, base = models
    r = cndiff.extract(controls[0], base, f"{tmp_path}/new/")
    assert r.output == tmp_path / "new" / f"diff_{controls[0].stem}_fp16.safetensors"
    # without a separator, a missing parent is an error that says how to make a folder
    with pytest.raises(CndiffError, match="end -o with a /"):
        cndiff.extract(controls[0], base, tmp_path / "missing" / "x.safetensors")


# -- 2. a difference model (or a Control-LoRA) is never taken for a control -------------------


def test_extract_refuses_a_difference_model(models, tmp_path, capsys):
    _, controls, base = models
    d = cndiff.extract(controls[0], base, tmp_path).output
    with pytest.raises(WrongKindError, match="cndiff apply") as exc:
        cndiff.extract(d, base, tmp_path / "x.safetensors")
    assert exc.value.kind == "difference" and "cndiff verify" in str(exc.value)
    rc = main(["extract", str(d), str(base), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0 and "difference model" in err
    lora = cndiff.extract(controls[0], base, tmp_path, format="control-lora", rank=2).output
    with pytest.raises(WrongKindError, match="Control-LoRA"):
        cndiff.extract(lora, base, tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([d.name, lora.name])


def test_batch_rerun_beside_the_models_skips_its_own_outputs(models, tmp_path, capsys):
    controls, base = copy_models(models, tmp_path / "m")
    folder = controls[0].parent
    assert main(["batch", str(folder), str(base), "-q"]) == 0
    capsys.readouterr()
    assert main(["batch", str(folder), str(base), "-q", "--json"]) == 0
    rows = {Path(r["source"]).name: r for r in json.loads(capsys.readouterr().out)}
    for c in controls:  # the models: the same job's outputs exist
        assert rows[c.name]["status"] == "skipped"
        assert "same job" in rows[c.name]["reason"]
    for c in controls:  # the outputs: listed as difference models, not converted
        row = rows[f"diff_{c.stem}_fp16.safetensors"]
        assert row["status"] == "skipped" and "difference model" in row["reason"]
    assert not list(folder.glob("diff_diff_*"))


# -- 3. an unreadable file in a batch folder is a failure --------------------------------------


def test_truncated_file_in_a_batch_folder_fails_the_batch(models, tmp_path, capsys):
    controls, base = copy_models(models, tmp_path / "m")
    folder = controls[0].parent
    data = controls[0].read_bytes()
    (folder / "control_sd15_broken.pth").write_bytes(data[: len(data) // 2])
    (folder / "notes.safetensors").write_bytes(b"\x00" * 3)
    rc = main(["batch", str(folder), str(base), "-o", str(tmp_path / "o"), "-q"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "3 written, 1 skipped, 2 failed" in out  # the base is skipped; two unreadable
    broken = next(line for line in out.splitlines() if line.startswith("control_sd15_broken"))
    assert "failed" in broken and "truncated" in broken


# -- 4. "complete output" means "made by the same job", for every format ----------------------


def test_control_lora_batch_rerun_skips(models, tmp_path):
    _, controls, base = models
    first = cndiff.extract_many(controls[:2], base, tmp_path, format="control-lora", rank=2)
    again = cndiff.extract_many(controls[:2], base, tmp_path, format="control-lora", rank=2)
    assert [r.status for r in first] == ["written"] * 2
    assert [r.status for r in again] == ["skipped"] * 2
    other = cndiff.extract_many(controls[:2], base, tmp_path, format="control-lora", rank=2,
                                stability_compatible=True)  # fmt: skip
    assert [r.status for r in other] == ["failed"] * 2
    assert all("different job" in r.reason and "--overwrite" in r.reason for r in other)


def test_base_self_after_base_file_is_a_different_job(models, tmp_path):
    _, controls, base = models
    assert all(r.status == "written" for r in cndiff.extract_many(controls, base, tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    again = cndiff.extract_many(controls, "self", tmp_path)
    assert [r.status for r in again] == ["failed"] * 3
    assert all("exists from a different job; --overwrite replaces it" in r.reason for r in again)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    forced = cndiff.extract_many(controls, "self", tmp_path, overwrite=True)
    assert [r.status for r in forced] == ["written"] * 3
    # and the same for one model alone, and for other dtypes / options
    with pytest.raises(OutputExistsError, match="different job"):
        cndiff.extract(controls[0], base, tmp_path)
    assert cndiff.extract(controls[0], "self", tmp_path).status == "skipped"
    with pytest.raises(OutputExistsError, match="different job"):
        cndiff.extract(controls[0], "self", tmp_path, drop_unchanged=True)


def test_a_file_cndiff_did_not_write_is_never_skipped(models, tmp_path):
    _, controls, base = models
    target = tmp_path / f"diff_{controls[0].stem}_fp16.safetensors"
    save_file(load_file(str(cndiff.extract(controls[0], base, tmp_path / "x/").output)),
              str(target))  # the same tensors, no job record  # fmt: skip
    with pytest.raises(OutputExistsError, match="not a complete cndiff output"):
        cndiff.extract(controls[0], base, tmp_path)


# -- 5. one options object, one meaning --------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(format="control-lora", drop_unchanged=True), "difference models only"),
        (dict(rank=4), "need --format control-lora"),
        (dict(svd="exact"), "need --format control-lora"),
        (dict(format="control-lora", rank=4, max_error=0.1), "not both"),
        (dict(workers=0), r"workers \(--workers\) must be a whole number from 1 to 64"),
        (dict(chunk_mb=float("nan")), r"chunk_mb \(--chunk-mb\) must be a number from 0.001"),
        (dict(dtype="fp8"), "fp16, bf16 or fp32"),
        (dict(device="gpu"), "auto, cpu, cuda"),
        (dict(hash=True), "unknown option 'hash'"),
    ],
)  # fmt: skip
def test_the_same_options_fail_the_same_way_alone_and_in_a_batch(models, tmp_path, kw, match):
    _, controls, base = models
    with pytest.raises(OptionError, match=match):
        cndiff.extract(controls[0], base, tmp_path, **kw)
    with pytest.raises(OptionError, match=match):
        cndiff.extract_many(controls, base, tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []


def test_options_that_used_to_be_dropped_for_control_lora(models, tmp_path):
    folder, controls, base = models
    r = cndiff.extract(controls[0], base, tmp_path, format="control-lora", rank=2,
                       hash_inputs=True, workers=1, chunk_mb=0.001)  # fmt: skip
    assert r.base_match is not None and r.base_match.kind == "identical"
    from safetensors import safe_open

    with safe_open(str(r.output), "np") as f:
        meta = f.metadata()
    assert meta["cndiff.source_sha256"] == cndiff.file_hashes(controls[0]).sha256
    assert meta["cndiff.base_autov2"] == cndiff.file_hashes(base).sha256[:10]
    # the same job with other chunks and threads gives the same bytes
    r2 = cndiff.extract(controls[0], base, tmp_path / "b/", format="control-lora", rank=2,
                        hash_inputs=True, workers=3, chunk_mb=4)  # fmt: skip
    assert r2.output.read_bytes() == r.output.read_bytes()
    no = cndiff.extract(controls[0], base, tmp_path / "c/", format="control-lora", rank=2,
                        check_base=False)  # fmt: skip
    assert no.base_match is None


def test_output_sha256_always_and_input_hashes_opt_in(models, tmp_path):
    import hashlib

    _, controls, base = models
    r = cndiff.extract(controls[0], base, tmp_path)
    assert r.sha256 == hashlib.sha256(r.output.read_bytes()).hexdigest()
    batch = cndiff.extract_many(controls, base, tmp_path / "b")
    assert all(x.sha256 == hashlib.sha256(x.output.read_bytes()).hexdigest() for x in batch)
    from safetensors import safe_open

    with safe_open(str(r.output), "np") as f:
        assert not any(k.endswith("sha256") for k in f.metadata())


@pytest.mark.parametrize(
    "flags,expect",
    [
        (["--workers", "0"], "workers (--workers) must be a whole number from 1 to 64, not 0"),
        (["--workers", "-1"], "from 1 to 64, not -1"),
        (["--chunk-mb", "nan"], "chunk_mb (--chunk-mb) must be a number from 0.001 to 256"),
        (["--chunk-mb", "inf"], "not inf"),
        (["--chunk-mb", "1e12"], "not 1000000000000.0"),
        (["--chunk-mb", "0"], "not 0.0"),
        (["--chunk-mb", "-5"], "not -5.0"),
        (["--chunk-mb", "x"], "not a number"),
        (["--dtype", "int8"], "fp16, bf16 or fp32"),
    ],
)  # fmt: skip
def test_cli_validates_options_before_any_work(models, tmp_path, capsys, flags, expect):
    _, controls, base = models
    rc = main(["extract", str(controls[0]), str(base), "-o", str(tmp_path), "-q", *flags])
    err = capsys.readouterr().err
    assert rc in (1, 2) and err.count("\n") == 1 and "Traceback" not in err
    assert expect in err
    assert list(tmp_path.iterdir()) == []


# -- 7. files named twice, a base in the wrong place, --json, one path as a string ------------


def test_a_file_named_twice_is_refused(models, tmp_path, capsys):
    _, controls, base = models
    rc = main(["extract", str(controls[0]), str(controls[0]), str(base), "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "named twice" in err and list(tmp_path.iterdir()) == []
    link = tmp_path / "link.pth"
    link.symlink_to(controls[0])
    with pytest.raises(CndiffError, match="named twice"):
        cndiff.extract_many([controls[0], link], base, tmp_path / "o")


def test_two_models_with_the_same_output_name_are_refused(models, tmp_path):
    _, controls, base = models
    other = tmp_path / "x" / controls[0].name
    other.parent.mkdir()
    shutil.copy(controls[0], other)
    res = cndiff.extract_many([controls[0], other], base, tmp_path / "out")
    assert [r.status for r in res] == ["written", "failed"]
    assert "would both be written" in res[1].reason


def test_a_base_among_the_controls_is_refused(models, tmp_path, capsys):
    _, controls, base = models
    rc = main(["extract", str(controls[0]), str(base), "--base", "self", "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "is a Stable Diffusion checkpoint, not a ControlNet" in err
    assert list(tmp_path.iterdir()) == []


def test_json_with_one_control(models, tmp_path, capsys):
    _, controls, base = models
    assert main(["extract", str(controls[0]), str(base), "-o", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "written" and row["paired"] == 298 and row["copied"] == 42
    assert row["sha256"][:10] == row["short_hash"]


def test_extract_many_takes_one_path_as_a_string(models, tmp_path):
    _, controls, base = models
    res = cndiff.extract_many(str(controls[0]), base, tmp_path)
    assert len(res) == 1 and res[0].status == "written"
    res = cndiff.extract_many(controls[0], base, tmp_path)
    assert res[0].status == "skipped"


# -- 10. short reprs, readable str ---------------------------------------------------------------


def test_every_public_object_has_a_short_repr(models, tmp_path):
    _, controls, base = models
    diff = cndiff.extract(controls[0], base, tmp_path)
    lora = cndiff.extract(controls[0], base, tmp_path, format="control-lora", rank=2)
    batch = cndiff.extract_many(controls, base, tmp_path / "b")
    report = cndiff.verify(diff.output, controls[0], base)
    lreport = cndiff.verify(lora.output, controls[0], base)
    objects = [diff, lora, lora.lora, lora.lora.layers[0], batch, report, lreport,
               report.keys[0], cndiff.inspect_file(controls[0]), Options(dtype="bf16"),
               cndiff.file_hashes(base)]  # fmt: skip
    with cndiff.open_checkpoint(controls[0]) as ck:
        objects += [ck, ck.info("control_model.time_embed.0.weight")]
    for obj in objects:
        text = repr(obj)
        assert len(text) < 200 and "\n" not in text, text
    assert "PASS" in str(report) and str(report).splitlines()[-1].strip().startswith("PASS")
    assert "3 written, 0 skipped, 0 failed" in str(batch)
    assert str(diff).count("\n") == 0 and "341 tensors (298 subtracted, 42 copied)" in str(diff)


# -- 11. wording --------------------------------------------------------------------------------


def test_verify_fail_line_says_what_failed(models, tmp_path):
    _, controls, base = models
    d = cndiff.extract(controls[0], base, tmp_path)
    other = synthetic.make_base(tmp_path / "other.ckpt", synthetic.tiny(), seed=9)
    rep = cndiff.verify(d.output, controls[0], other, check_base=False)
    last = str(rep).splitlines()[-1].strip()
    assert last.startswith("FAIL: ") and "over the bound" in last and "within" not in last
    assert not rep.passed and rep.of_bound["comfyui"] > 1


def test_max_error_changes_the_printed_figure(models, tmp_path, capsys):
    _, controls, base = models
    figures = []
    for e in ("0.9", "0.3"):
        rc = main(["extract", str(controls[0]), str(base), "-o", str(tmp_path / e) + "/",
                   "--format", "control-lora", "--max-error", e, "-q"])  # fmt: skip
        assert rc == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "relative error of the differences" in x)
        figures.append(float(line.split("relative error of the differences ")[1].split()[0]))
    assert figures[0] > figures[1] and figures[0] <= 0.9 and figures[1] <= 0.3


# -- the design: two extractions at once, verify against fp16 and self ------------------------


def test_two_extractions_at_once_in_one_process(models, tmp_path):
    _, controls, base = models
    want = [cndiff.extract(c, base, f"{tmp_path}/seq/").output.read_bytes()
            for c in controls[:2]]  # fmt: skip
    errors: list[BaseException] = []

    def run(c: Path) -> None:
        try:
            for i in range(3):
                cndiff.extract(c, base, f"{tmp_path}/par{i}/", chunk_mb=0.001)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in controls[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(3):
        got = [(tmp_path / f"par{i}" / f"diff_{c.stem}_fp16.safetensors").read_bytes()
               for c in controls[:2]]  # fmt: skip
        assert got == want
    import gc

    assert gc.isenabled()


def test_verify_against_an_fp16_base_and_self(pair_factory, tmp_path):
    import torch

    control, base = pair_factory(base_dtype=torch.float16, base_fmt="safetensors")
    for dtype in ("fp16", "bf16", "fp32"):
        d = cndiff.extract(control, base, tmp_path, dtype=dtype, overwrite=True)
        rep = cndiff.verify(d.output, control, base)
        assert rep.passed, (dtype, rep.failing)
        assert_bit_equal(load_file(str(d.output)), naive_diff(control, base, dtype))
    s = cndiff.extract(control, "self", tmp_path / "self/")
    rep = cndiff.verify(s.output, control, "self")
    assert rep.passed and rep.base == "self" and rep.base_match is None
    # the self-diff verified against the file base fails: another base
    assert not cndiff.verify(s.output, control, base, check_base=False).passed


def test_result_to_dict_is_json(models, tmp_path):
    _, controls, base = models
    r = cndiff.extract(controls[0], base, tmp_path, format="control-lora", rank=2)
    data = json.loads(json.dumps(r.to_dict()))
    assert data["kind"] == "control-lora" and data["lora"]["factored"] > 0
    assert math.isfinite(data["lora"]["diff_error"])
