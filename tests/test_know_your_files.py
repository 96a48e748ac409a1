"""verify, inspect, apply, the base fingerprint and provenance metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_whole
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cndiff
from cndiff import apply_diff, inspect_file, synthetic
from cndiff.cli import main
from cndiff.commands.verify import half_spacing, verify
from cndiff.dtypes import BF16, F16, F32
from cndiff.errors import CndiffError, IncompatibleBaseError

# -- the derived bound ---------------------------------------------------------------------


@pytest.mark.parametrize("dt,np_dt", [(F16, np.float16), (F32, np.float32)])
def test_half_spacing_bounds_one_rounding(dt, np_dt):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1e-3, 10000), rng.normal(0, 10, 10000),
                        [0.0, 1e-9, -6e-8, 65504.0, 2.0**-14, 2.0**-24]])  # fmt: skip
    x = x.astype(np.float32).astype(np.float64) if dt is F16 else x
    rounded = x.astype(np_dt).astype(np.float64)
    err = np.abs(rounded - x)
    h = half_spacing(x, dt)
    assert np.all(err <= h)
    # and it is tight: some elements reach it within a factor of 2
    assert np.any(err > h / 2)


def test_half_spacing_bf16_matches_torch_rounding():
    x = torch.randn(100000) * 1e-2
    r = x.to(torch.bfloat16).float()
    err = (r - x).abs().double().numpy()
    assert np.all(err <= half_spacing(x.numpy(), BF16))


# -- verify ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_verify_passes_on_a_correct_diff(sd15_pair, tmp_path, dtype):
    control, base = sd15_pair
    r = cndiff.extract(control, base, tmp_path, dtype=dtype)
    report = verify(r.output, control, base)
    assert report.passed, report.failing
    assert len(report.keys) == 340 and not report.missing and not report.extra
    assert report.dtype == {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
    # every rebuild is within its bound; the exact one is the tightest
    assert all(0 < report.of_bound[m] <= 1.0 for m in ("exact", "webui", "comfyui"))
    assert report.max_abs["exact"] <= report.max_abs["comfyui"]
    assert report.base_match is not None and report.base_match.kind == "close"


def test_verify_fails_on_wrong_base_and_missing_key(sd15_pair, tmp_path):
    control, base = sd15_pair
    r = cndiff.extract(control, base, tmp_path)
    other = synthetic.make_base(tmp_path / "other.ckpt", synthetic.tiny(), seed=7)
    bad = verify(r.output, control, other, check_base=False)
    assert not bad.passed and len(bad.failing) > 250
    tensors = load_file(str(r.output))
    del tensors["control_model.zero_convs.0.0.weight"]
    tensors["control_model.extra.weight"] = torch.zeros(2, dtype=torch.float16)
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken))
    rep = verify(broken, control, base)
    assert not rep.passed
    assert rep.missing == ["control_model.zero_convs.0.0.weight"]
    assert rep.extra == ["control_model.extra.weight"]


def test_verify_detects_a_single_flipped_value(sd15_pair, tmp_path):
    control, base = sd15_pair
    r = cndiff.extract(control, base, tmp_path)
    t = load_file(str(r.output))
    key = "control_model.input_blocks.4.1.proj_in.weight"
    flat = t[key].reshape(-1)
    flat[3] = flat[3] + flat[3].abs().clamp(min=1e-3)  # far beyond one rounding
    p = tmp_path / "flip.safetensors"
    save_file(t, str(p))
    rep = verify(p, control, base, check_base=False)
    assert rep.failing == [key]


def test_verify_cli_exit_codes_and_json(sd15_pair, tmp_path, capsys):
    control, base = sd15_pair
    r = cndiff.extract(control, base, tmp_path)
    args = ["verify", str(r.output), "--control", str(control), "--base", str(base), "-q"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "PASS: 340 keys, every element within its rounding bound" in text
    assert "of its rounding bound" in text and "spacing" not in text
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and data["file_kind"] == "difference"
    assert set(data["max_abs"]) == {"comfyui", "webui", "exact"}
    other = synthetic.make_base(tmp_path / "o.ckpt", synthetic.tiny(), seed=3)
    bad = ["verify", str(r.output), "--control", str(control), "--base", str(other), "-q"]
    assert main(bad) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("  FAIL: ") and "over the bound" in last and "within" not in last


# -- base fingerprint ------------------------------------------------------------------------


def test_fingerprint_identical_close_and_different(pair_factory, tmp_path, caplog):
    same_c, same_b = pair_factory(embedded_unet="same")
    assert cndiff.extract(same_c, same_b, tmp_path / "a.safetensors").base_match.kind == (
        "identical"
    )
    c, b = pair_factory()  # embedded = base + EMA-like offset
    m = cndiff.extract(c, b, tmp_path / "b.safetensors").base_match
    assert m.kind == "close" and 0 < m.max_abs < 1e-3 and m.keys == 298
    other = synthetic.make_base(tmp_path / "ft.ckpt", synthetic.tiny(), seed=5)
    with pytest.raises(IncompatibleBaseError):
        sd21_base = synthetic.make_base(tmp_path / "sd21.ckpt", synthetic.tiny(synthetic.SD21))
        cndiff.extract(c, sd21_base, tmp_path / "x.safetensors")
    import logging

    with caplog.at_level(logging.WARNING, logger="cndiff"):
        m = cndiff.extract(c, other, tmp_path / "c.safetensors").base_match
    assert m.kind == "different"
    assert any("another model" in rec.getMessage() for rec in caplog.records)
    assert cndiff.extract(c, other, tmp_path / "d.safetensors", check_base=False).base_match is None
    assert cndiff.extract(c, "self", tmp_path / "e.safetensors").base_match is None


# -- apply -----------------------------------------------------------------------------------


@pytest.mark.parametrize("base_fmt", ["ckpt", "safetensors"])
def test_apply_rebuilds_the_original_within_the_verify_bound(pair_factory, tmp_path, base_fmt):
    control, base = pair_factory(base_fmt=base_fmt)
    d = cndiff.extract(control, base, tmp_path, dtype="fp32")
    r = apply_diff(d.output, base, tmp_path, dtype="fp32")
    assert r.output.name == f"{control.stem}_{base.stem}_fp32.safetensors"
    got = load_file(str(r.output))
    orig = {k: v for k, v in load_whole(control).items() if k.startswith("control_model.")}
    assert set(got) == set(orig)  # no difference marker, control_model.* keys
    bb = load_whole(base)
    for k, v in orig.items():
        bk = "model.diffusion_model." + k[len("control_model.") :]
        if bk not in bb:
            assert torch.equal(got[k], v)
            continue
        dd = (v - bb[bk].float()).numpy()
        err = np.abs(got[k].double().numpy() - v.double().numpy())
        bound = half_spacing(dd, F32) + half_spacing(got[k].numpy(), F32)
        assert np.all(err <= bound), k
    with safe_open(str(r.output), "pt") as f:
        meta = f.metadata()
    assert meta["cndiff.kind"] == "standalone"
    assert inspect_file(r.output).kind == "pruned-controlnet"


def test_apply_fp16_matches_verify_bound(sd15_pair, tmp_path):
    control, base = sd15_pair
    d = cndiff.extract(control, base, tmp_path)
    r = apply_diff(d.output, base, tmp_path)
    got = load_file(str(r.output))
    assert all(v.dtype == torch.float16 for v in got.values())
    orig = load_whole(control)
    bb = load_whole(base)
    k = "control_model.middle_block.1.proj_out.weight"
    bk = "model.diffusion_model.middle_block.1.proj_out.weight"
    dd = (orig[k] - bb[bk]).numpy()
    err = np.abs(got[k].double().numpy() - orig[k].double().numpy())
    bound = half_spacing(dd, F16) + half_spacing(dd, F32) + half_spacing(got[k].numpy(), F16)
    assert np.all(err <= bound)


def test_apply_refuses_other_arch_and_non_diffs(pair_factory, sd15_pair, tmp_path):
    control, base = sd15_pair
    d = cndiff.extract(control, base, tmp_path)
    sd21_base = synthetic.make_base(tmp_path / "sd21.ckpt", synthetic.tiny(synthetic.SD21))
    with pytest.raises(IncompatibleBaseError, match="does not match"):
        apply_diff(d.output, sd21_base, tmp_path)
    standalone = apply_diff(d.output, base, tmp_path).output
    with pytest.raises(CndiffError, match="not a difference model"):
        apply_diff(standalone, base, tmp_path / "x.safetensors")
    assert main(["apply", str(d.output), str(sd21_base), "-o", str(tmp_path / "y.safetensors"),
                 "-q"]) == 1  # fmt: skip
    assert not (tmp_path / "y.safetensors").exists()


def test_sd21_extract_verify_apply(pair_factory, tmp_path):
    control, base = pair_factory(arch=synthetic.tiny(synthetic.SD21))
    d = cndiff.extract(control, base, tmp_path)
    assert verify(d.output, control, base).passed
    assert inspect_file(d.output).arch.startswith("SD2.x")
    r = apply_diff(d.output, base, tmp_path)
    assert r.keys_written == 340


# -- inspect ---------------------------------------------------------------------------------


def _fake_shapes(tmp_path, name, shapes: dict[str, tuple], extra=None):
    t = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    t.update(extra or {})
    p = tmp_path / name
    save_file(t, str(p))
    return p


def test_inspect_each_kind(sd15_pair, tmp_path):
    control, base = sd15_pair
    d = cndiff.extract(control, base, tmp_path).output
    pruned = apply_diff(d, base, tmp_path).output
    lora = _fake_shapes(tmp_path, "cl.safetensors",
                        {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.up": (320, 8),
                         "input_blocks.1.1.transformer_blocks.0.attn2.to_k.down": (8, 768)},
                        {"lora_controlnet": torch.zeros(0)})  # fmt: skip
    diffusers = _fake_shapes(tmp_path, "diffusers.safetensors",
                             {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3),
                              "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight":
                              (640, 2048)})  # fmt: skip
    junk = _fake_shapes(tmp_path, "junk.safetensors", {"foo": (3,)})
    kinds = {
        control: ("original-controlnet", "SD1.x-like"),
        base: ("sd-checkpoint", "SD1.x-like"),
        d: ("difference", "SD1.x-like"),
        pruned: ("pruned-controlnet", "SD1.x-like"),
        lora: ("control-lora", "SD1.x"),
        diffusers: ("diffusers-controlnet", "SDXL"),
        junk: ("unknown", "unknown"),
    }
    for path, (kind, arch) in kinds.items():
        rep = inspect_file(path)
        assert rep.kind == kind, path
        assert rep.arch.startswith(arch), (path, rep.arch)
    rep = inspect_file(control)
    assert rep.keys == 1484 and rep.control_keys == 340
    assert rep.dtypes == {"float32": 1483, "int64": 1}
    rb = inspect_file(base)
    assert rb.wrapped and "callbacks" in rb.extras
    rd = inspect_file(d)
    assert rd.metadata["cndiff.kind"] == "difference"
    assert "ignores 'difference'" in rd.loaders["Forge"]


def test_inspect_real_widths(tmp_path):
    for width, arch in [(768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL")]:
        shapes = {
            "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, width),
            "control_model.zero_convs.0.0.weight": (320, 320, 1, 1),
        }
        p = _fake_shapes(tmp_path, f"w{width}.safetensors", shapes)
        assert inspect_file(p).arch == arch


def test_inspect_cli_json(sd15_pair, capsys):
    control, base = sd15_pair
    assert main(["inspect", str(control), str(base), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["kind"] for d in data] == ["original-controlnet", "sd-checkpoint"]
    assert data[0]["params"] == sum(
        v.numel() for v in load_whole(control).values()
    )  # fmt: skip


def test_inspect_does_not_read_tensor_data(sd15_pair, monkeypatch):
    from cndiff.inputs import checkpoint as ck

    control, _ = sd15_pair

    def boom(*a, **k):
        raise AssertionError("read tensor data")

    monkeypatch.setattr(ck.Checkpoint, "read_into", boom)
    assert inspect_file(control).kind == "original-controlnet"


# -- provenance ------------------------------------------------------------------------------


def test_hash_inputs_recorded_in_metadata(sd15_pair, tmp_path):
    import hashlib

    control, base = sd15_pair
    r = cndiff.extract(control, base, tmp_path, hash_inputs=True)
    with safe_open(str(r.output), "pt") as f:
        meta = f.metadata()
    assert meta["cndiff.source_sha256"] == hashlib.sha256(control.read_bytes()).hexdigest()
    assert meta["cndiff.base_sha256"] == hashlib.sha256(base.read_bytes()).hexdigest()
    assert load_file(str(r.output))["difference"].item() == 1.0
    r2 = cndiff.extract(control, "self", tmp_path / "s.safetensors", hash_inputs=True)
    with safe_open(str(r2.output), "pt") as f:
        meta = f.metadata()
    assert meta["cndiff.base"] == "self" and "cndiff.base_sha256" not in meta
