"""Every ControlNet file users hold, through every command: SD1.5, SD2.x and SDXL; the ldm
layout (originals, ControlNet 1.1-style control-only files) and the diffusers layout
(files and folders), against ldm and diffusers bases; prune; convert; inspect's kinds
and hashes.

The oracle for the diffusers names is diffusers itself: its own single-file conversion
functions (``convert_controlnet_checkpoint``, ``convert_ldm_unet_checkpoint``) turn the
synthetic ldm state dicts into diffusers ones, and ``ControlNetModel.from_pretrained``
loads what ``convert`` writes; nothing here maps names with cndiff's own tables."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, naive_diff
from safetensors.torch import load_file, save_file

import cndiff
from cndiff import layouts, synthetic
from cndiff.errors import CndiffError, IncompatibleBaseError, WrongKindError

su = pytest.importorskip("diffusers.loaders.single_file_utils")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CP, UP = "control_model.", "model.diffusion_model."
ARCHS = {"sd15": synthetic.SD15, "sd21": synthetic.SD21, "sdxl": synthetic.SDXL}


def _diffusers_controlnet(arch, ldm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of an ldm ControlNet state dict (``control_model.*``)."""
    cfg = layouts.diffusers_controlnet_config(arch.unet)
    out = dict(su.convert_controlnet_checkpoint(ldm, cfg))
    if arch.unet.adm_in_channels:  # (diffusers' function leaves SDXL's add_embedding out;
        # its UNet conversion names the same label_emb tensors)
        unet_like = {UP + k[len(CP):]: v for k, v in ldm.items() if k.startswith(CP)}
        unet = su.convert_ldm_unet_checkpoint(unet_like, layouts.diffusers_unet_config(arch.unet))
        out.update({k: v for k, v in unet.items() if k.startswith("add_embedding.")})
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request, tmp_path_factory):
    """One architecture's files in every layout (fp32 everywhere: the same numbers)."""
    arch = synthetic.tiny(ARCHS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    f32 = torch.float32
    files = {
        "arch": arch,
        "original": synthetic.make_control(folder / "control_orig.pth", arch, seed=1,
                                           base_seed=0, embedded_unet="same",
                                           layout="original"),  # fmt: skip
        "v11": synthetic.make_control(folder / "control_v11.pth", arch, seed=1, base_seed=0,
                                      layout="control-only", embedded_unet="same"),  # fmt: skip
        "base": synthetic.make_base(folder / "base.safetensors", arch, seed=0, dtype=f32),
    }
    ldm = synthetic.control_state_dict(arch, seed=1, base_seed=0, embedded_unet="same",
                                       layout="original")  # fmt: skip
    ldm = {k: v for k, v in ldm.items() if k.startswith(CP)}
    dif = folder / "controlnet_diffusers"
    dif.mkdir()
    (dif / "config.json").write_text(json.dumps(layouts.diffusers_controlnet_config(arch.unet)))
    save_file(_diffusers_controlnet(arch, ldm), str(dif / "diffusion_pytorch_model.safetensors"))
    files["diffusers"] = dif
    unet = folder / "unet_diffusers" / "unet"
    unet.mkdir(parents=True)
    base = synthetic.base_state_dict(arch, seed=0, dtype=f32)
    ubase = su.convert_ldm_unet_checkpoint(base, layouts.diffusers_unet_config(arch.unet))
    save_file({k: v.contiguous() for k, v in ubase.items()},
              str(unet / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    files["diffusers_base"] = unet.parent  # a pipeline folder: unet/ inside
    files["ldm_state"] = ldm
    return files


@pytest.mark.parametrize("control", ["original", "v11", "diffusers"])
@pytest.mark.parametrize("base", ["base", "diffusers_base"])
def test_extract_every_layout_pair(family, tmp_path, control, base):
    r = cndiff.extract(family[control], family[base], tmp_path / "d.safetensors")
    got = load_file(str(r.output))
    # the reference: the ldm pair, through the naive algorithm
    want = naive_diff(family["original"], family["base"], "fp16")
    assert_bit_equal(got, want)
    assert all(k.startswith(CP) or k == "difference" for k in got)  # always the ldm layout
    counts = {"sd15": (298, 42), "sd21": (298, 42), "sdxl": (808, 36)}
    assert (r.paired, r.copied) == counts[family["arch"].name]
    assert cndiff.verify(r.output, family[control], family[base]).passed


def test_a_mismatched_pair_is_refused_with_the_match_count(family, pair_factory, tmp_path):
    other = synthetic.tiny(synthetic.SD15 if family["arch"].name == "sdxl" else synthetic.SDXL)
    wrong_base = synthetic.make_base(tmp_path / "other.safetensors", other)
    with pytest.raises(IncompatibleBaseError, match=r"only \d+ of \d+ UNet keys match"):
        cndiff.extract(family["diffusers"], wrong_base, tmp_path)
    assert list(tmp_path.iterdir()) == [wrong_base]


def test_apply_onto_a_diffusers_base(family, tmp_path):
    d = cndiff.extract(family["diffusers"], family["base"], tmp_path / "d.safetensors",
                       dtype="fp32")  # fmt: skip
    a = cndiff.apply_diff(d.output, family["diffusers_base"], tmp_path / "a.safetensors",
                          dtype="fp32")  # fmt: skip
    got = load_file(str(a.output))
    assert set(got) == set(family["ldm_state"])
    k = next(k for k in got if k.endswith("in_layers.2.weight"))
    assert torch.allclose(got[k], family["ldm_state"][k], atol=1e-6)


def test_base_self_needs_an_embedded_unet(family, tmp_path):
    with pytest.raises(CndiffError, match="no embedded SD UNet"):
        cndiff.extract(family["v11"], "self", tmp_path)
    r = cndiff.extract(family["original"], "self", tmp_path)
    assert_bit_equal(load_file(str(r.output)), naive_diff(family["original"], "self", "fp16"))


# -- prune -----------------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["original", "v11", "diffusers"])
def test_prune_keeps_the_controlnet_weights(family, tmp_path, control):
    r = cndiff.prune(family[control], tmp_path / "p.safetensors")
    got = load_file(str(r.output))
    if control == "diffusers":
        want = load_file(str(family["diffusers"] / "diffusion_pytorch_model.safetensors"))
    else:
        want = family["ldm_state"]
    assert set(got) == set(want) and r.kind == "pruned"
    for k, v in want.items():
        assert torch.equal(got[k].view(torch.int16), v.half().view(torch.int16)), k


def test_prune_default_names_and_the_diffusers_variant(family, tmp_path):
    import shutil

    shutil.copytree(family["diffusers"], tmp_path / "cn")
    r = cndiff.prune(tmp_path / "cn")
    assert r.output == tmp_path / "cn" / "diffusion_pytorch_model.fp16.safetensors"
    from diffusers import ControlNetModel

    model = ControlNetModel.from_pretrained(tmp_path / "cn", variant="fp16")
    want = load_file(str(family["diffusers"] / "diffusion_pytorch_model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v.half().float()) for k, v in want.items())
    c = tmp_path / "control_v11p_sd15_canny.pth"
    shutil.copy(family["v11"], c)
    assert cndiff.prune(c).output == tmp_path / "control_v11p_sd15_canny_fp16.safetensors"
    with pytest.raises(WrongKindError, match="difference model"):
        d = cndiff.extract(family["original"], family["base"], tmp_path / "d.safetensors")
        cndiff.prune(d.output)


# -- convert ---------------------------------------------------------------------------------


def test_convert_to_diffusers_loads_in_diffusers(family, tmp_path):
    from diffusers import ControlNetModel

    r = cndiff.convert(family["original"], "diffusers", tmp_path / "cn", dtype="fp32")
    assert r.output == tmp_path / "cn" and r.kind == "diffusers"
    assert sorted(p.name for p in r.output.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]  # fmt: skip
    model = ControlNetModel.from_pretrained(r.output)
    want = _diffusers_controlnet(family["arch"], family["ldm_state"])
    state = model.state_dict()
    assert set(state) == set(want)
    assert all(torch.equal(state[k], v) for k, v in want.items())
    # the file itself holds exactly diffusers' names and values
    assert_bit_equal(load_file(str(r.output / "diffusion_pytorch_model.safetensors")), want)


def test_convert_to_ldm_and_back_is_bit_identical(family, tmp_path):
    r = cndiff.convert(family["diffusers"], "ldm", tmp_path / "ldm.safetensors", dtype="fp32")
    assert_bit_equal(load_file(str(r.output)), family["ldm_state"])
    back = cndiff.convert(r.output, "diffusers", tmp_path / "again", dtype="fp32")
    again = cndiff.convert(back.output, "ldm", tmp_path / "ldm2.safetensors", dtype="fp32")
    assert_bit_equal(load_file(str(again.output)), load_file(str(r.output)))
    fp16 = cndiff.convert(family["original"], "diffusers", tmp_path / "h")
    h2 = cndiff.convert(fp16.output, "ldm", tmp_path / "h.safetensors")
    assert_bit_equal(load_file(str(h2.output)),
                     {k: v.half() for k, v in family["ldm_state"].items()})  # fmt: skip


def test_convert_refuses_what_no_loader_rebases(family, tmp_path):
    d = cndiff.extract(family["original"], family["base"], tmp_path / "d.safetensors")
    with pytest.raises(WrongKindError, match="no loader would add a UNet back"):
        cndiff.convert(d.output, "diffusers", tmp_path / "x")
    with pytest.raises(CndiffError, match="already in the ldm layout"):
        cndiff.convert(family["original"], "ldm", tmp_path / "y.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors"]


def test_convert_rerun_is_skipped(family, tmp_path):
    a = cndiff.convert(family["original"], "diffusers", tmp_path / "cn")
    b = cndiff.convert(family["original"], "diffusers", tmp_path / "cn")
    assert (a.status, b.status) == ("written", "skipped")
    (tmp_path / "cn" / "config.json").unlink()
    assert cndiff.convert(family["original"], "diffusers", tmp_path / "cn").status == "skipped"
    assert (tmp_path / "cn" / "config.json").exists()  # the missing part is restored


# -- Control-LoRA ----------------------------------------------------------------------------


def test_control_lora_from_every_layout(family, tmp_path):
    a = cndiff.extract(family["original"], family["base"], tmp_path / "a.safetensors",
                       format="control-lora", rank=2)  # fmt: skip
    b = cndiff.extract(family["diffusers"], family["diffusers_base"], tmp_path / "b.safetensors",
                       format="control-lora", rank=2)  # fmt: skip
    ta, tb = load_file(str(a.output)), load_file(str(b.output))
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert cndiff.verify(b.output, family["diffusers"], family["diffusers_base"]).passed


def test_sdxl_control_lora_layout_at_full_size():
    from cndiff.inputs.views import control_view, unet_view
    from cndiff.lora import layout_counts, lora_layout
    from cndiff.plan import plan_pairs

    arch = synthetic.SDXL
    control = {s.key: s for s in synthetic.control_model_spec(arch)}
    base = {s.key: s for s in synthetic.base_spec(arch)}
    layout = lora_layout(plan_pairs(control_view(control), unet_view(base)), rank=128,
                         stability_compatible=True)  # fmt: skip
    keys, params = layout_counts(layout)
    assert keys == 1228 and sum(e.kind == "lora" for e in layout) == 383
    assert params == 197_779_104 - 0  # the marker is empty
    manifest = Path(__file__).resolve().parents[2] / "shared/fixtures/control_lora_sdxl_rank128.tsv"
    if manifest.exists():
        rows = [ln.split("\t") for ln in manifest.read_text().splitlines()
                if ln and not ln.startswith("#")]  # fmt: skip
        want = {k: tuple(int(x) for x in s.split("x")) if s not in ("", "0") else
                ((0,) if s == "0" else ()) for k, _, s in rows}  # fmt: skip
        got = {k: s for e in layout for k, s in e.outputs}
        got["lora_controlnet"] = (0,)
        assert got == want


# -- inspect: kinds and hashes ---------------------------------------------------------------


def test_inspect_names_every_layout(family):
    want = {"original": "original-controlnet", "v11": "pruned-controlnet",
            "diffusers": "diffusers-controlnet", "base": "sd-checkpoint",
            "diffusers_base": "diffusers-unet"}  # fmt: skip
    label = {"sd15": "SD1.x", "sd21": "SD2.x", "sdxl": "SDXL"}[family["arch"].name]
    for name, kind in want.items():
        path = cndiff.commands.extract.model_file(family[name], "base" if "base" in name
                                                  else "control")  # fmt: skip
        rep = cndiff.inspect_file(path)
        assert rep.kind == kind, name
        assert rep.arch.startswith(label), (name, rep.arch)
        assert rep.loaders or kind in ("sd-checkpoint", "diffusers-unet"), name


def test_hashes_model_sites_show(family, tmp_path):
    path = family["base"]
    data = Path(path).read_bytes()
    h = cndiff.file_hashes(path)
    assert h.sha256 == hashlib.sha256(data).hexdigest() and h.autov2 == h.sha256[:10]
    assert h.autov1 == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert h.crc32 == f"{zlib.crc32(data):08x}"
    n = int.from_bytes(data[:8], "little")
    assert h.tensor_sha256 == hashlib.sha256(data[8 + n :]).hexdigest()
    assert h.autov3 == h.tensor_sha256[:12]
    assert cndiff.file_hashes(family["original"]).tensor_sha256 is None  # not safetensors
    # recorded by extract --hash, shown by inspect --hash
    r = cndiff.extract(family["original"], path, tmp_path / "d.safetensors", hash_inputs=True)
    meta = cndiff.inspect_file(r.output).metadata
    assert meta["cndiff.base_autov3"] == h.autov3 and meta["cndiff.base_autov1"] == h.autov1
    assert cndiff.inspect_file(path, hashes=True).hashes == h
