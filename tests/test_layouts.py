"""Tests of cndiff.layouts: the derived key tables against the manifests, the counts,
the diffusers configs, and infer() on every layout (full size and tiny)."""

from __future__ import annotations

import ast
import dataclasses
import doctest
import json
import math
import os
import types
from pathlib import Path

import pytest
from manifests import config, pairs, rows

from cndiff import layouts as L
from cndiff.layouts import CONTROL_PREFIX, SD1, SD2, SDXL, UNET_PREFIX

FULL = [SD1, SD2, SDXL]
TINY = [L.tiny(c) for c in FULL]
ALL = FULL + TINY
IDS = ["sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sd2", "tiny-sdxl"]


def _table(rows_: list, prefix: str = "", dtype: str | None = None) -> list:
    return [(prefix + k, *((dtype,) if dtype else ()), s) for k, s in rows_]


# ------------------------------------------------------------------- tables vs manifests


@pytest.mark.parametrize(
    ("manifest", "table", "prefix", "dtype"),
    [
        ("controlnet_sd15_diffusers.tsv", lambda: L.diffusers_controlnet(SD1), "", "float32"),
        ("controlnet_sdxl_diffusers.tsv", lambda: L.diffusers_controlnet(SDXL), "", "float32"),
        ("controlnet_sdxl_ldm.tsv", lambda: L.ldm_controlnet(SDXL), CONTROL_PREFIX, "float32"),
        ("sdxl_base_unet.tsv", lambda: L.ldm_unet(SDXL), UNET_PREFIX, "float16"),
        ("sd15_unet_diffusers.tsv", lambda: L.diffusers_unet(SD1), "", "float32"),
        ("sdxl_unet_diffusers.tsv", lambda: L.diffusers_unet(SDXL), "", "float32"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_tables_equal_manifests(manifest, table, prefix, dtype):
    got = _table(table(), prefix, dtype)
    assert got == rows(manifest)  # key for key, in order, dtype and shape


@pytest.mark.parametrize(
    ("manifest", "prefix", "table"),
    [
        ("control_sd15.tsv", CONTROL_PREFIX, lambda: L.ldm_controlnet(SD1)),
        ("control_sd15.tsv", UNET_PREFIX, lambda: L.ldm_unet(SD1)),
        ("sd15_base.tsv", UNET_PREFIX, lambda: L.ldm_unet(SD1)),
    ],
)
def test_tables_equal_sd15_checkpoints(manifest, prefix, table):
    want = [(k, s) for k, d, s in rows(manifest) if k.startswith(prefix)]
    assert _table(table(), prefix) == want
    assert {d for k, d, _ in rows(manifest) if k.startswith(prefix)} == {"float32"}


@pytest.mark.parametrize(
    ("manifest", "table", "prefix", "diffusers_side", "ldm_side"),
    [
        ("controlnet_sd15_diffusers_to_ldm.tsv", lambda: L.controlnet_pairs(SD1), CONTROL_PREFIX,
         "controlnet_sd15_diffusers.tsv", "control_sd15.tsv"),
        ("controlnet_sdxl_diffusers_to_ldm.tsv", lambda: L.controlnet_pairs(SDXL),
         CONTROL_PREFIX, "controlnet_sdxl_diffusers.tsv", "controlnet_sdxl_ldm.tsv"),
        ("sd15_unet_diffusers_to_ldm.tsv", lambda: L.unet_pairs(SD1), UNET_PREFIX,
         "sd15_unet_diffusers.tsv", "sd15_base.tsv"),
        ("sdxl_unet_diffusers_to_ldm.tsv", lambda: L.unet_pairs(SDXL), UNET_PREFIX,
         "sdxl_unet_diffusers.tsv", "sdxl_base_unet.tsv"),
    ],
)  # fmt: skip
def test_bijections_equal_manifests(manifest, table, prefix, diffusers_side, ldm_side):
    got = table()
    want = pairs(manifest)
    assert [(p.diffusers, prefix + p.ldm) for p in got] == want
    # a bijection both ways, with equal shapes on both sides (checked on the manifests)
    dif_shapes = {k: s for k, _, s in rows(diffusers_side)}
    ldm_shapes = {k: s for k, _, s in rows(ldm_side) if k.startswith(prefix)}
    forward = dict(want)
    backward = {v: k for k, v in want}
    assert len(forward) == len(backward) == len(want) == len(dif_shapes) == len(ldm_shapes)
    assert set(forward) == set(dif_shapes) and set(backward) == set(ldm_shapes)
    for d, lk in want:
        assert dif_shapes[d] == ldm_shapes[lk]
    assert {p.diffusers: p.shape for p in got} == dif_shapes
    assert {prefix + p.ldm: p.shape for p in got} == ldm_shapes


@pytest.mark.parametrize("cfg", ALL, ids=IDS)
def test_pairs_are_bijections_between_the_tables(cfg):
    for pairs_, ldm, dif in (
        (L.unet_pairs(cfg), L.ldm_unet(cfg), L.diffusers_unet(cfg)),
        (L.controlnet_pairs(cfg), L.ldm_controlnet(cfg), L.diffusers_controlnet(cfg)),
    ):
        assert [(p.diffusers, p.shape) for p in pairs_] == list(dif)  # diffusers order
        assert sorted((p.ldm, p.shape) for p in pairs_) == sorted(ldm)
        assert len({p.ldm for p in pairs_}) == len({p.diffusers for p in pairs_}) == len(ldm)


def test_control_lora_manifest_covers_the_sdxl_controlnet():
    """Stability's Control-LoRA producer, run on the SDXL ControlNet: its keys are the
    ControlNet's (weights of shared >=2-D layers as up/down), with consistent shapes."""
    control = dict(L.ldm_controlnet(SDXL))
    shared = set(L.shared_keys(SDXL))
    seen: dict[str, tuple] = {}
    ups = 0
    for key, _, shape in rows("control_lora_sdxl_rank128.tsv"):
        if key == "lora_controlnet":
            continue
        if key.endswith((".up", ".down")):
            base = key.rsplit(".", 1)[0] + ".weight"
            assert base in shared and len(control[base]) >= 2, key
            w = control[base]
            if key.endswith(".up"):
                ups += 1
                assert shape[0] == w[0] and shape[1] == min(128, w[0], w[1])
            else:
                assert shape[1:] == w[1:] and shape[0] <= 128
            seen[base] = w
        else:
            assert control[key] == shape, key
            seen[key] = shape
    assert ups == 383
    assert set(seen) == set(control)  # every ControlNet tensor, nothing else


# ----------------------------------------------------------------------------- counts


def test_sd15_counts():
    control, unet = L.ldm_controlnet(SD1), L.ldm_unet(SD1)
    assert (len(control), len(unet)) == (340, 686)
    assert sum(math.prod(s) for _, s in control) == 361_279_120
    assert sum(math.prod(s) for _, s in unet) == 859_520_964
    shared, only = L.shared_keys(SD1), L.control_only_keys(SD1)
    assert (len(shared), len(only)) == (298, 42)
    shapes = dict(control)
    assert sum(math.prod(shapes[k]) for k in shared) == 348_712_960
    assert sum(math.prod(shapes[k]) for k in only) == 12_566_160
    groups = [k.split(".")[0] for k in only]
    assert (groups.count("zero_convs"), groups.count("input_hint_block")) == (24, 16)
    assert groups.count("middle_block_out") == 2


def test_sdxl_counts():
    control, unet = L.ldm_controlnet(SDXL), L.ldm_unet(SDXL)
    assert (len(control), len(unet)) == (844, 1680)
    assert sum(math.prod(s) for _, s in control) == 1_251_014_160
    assert sum(math.prod(s) for _, s in unet) == 2_567_463_684
    shared, only = L.shared_keys(SDXL), L.control_only_keys(SDXL)
    assert (len(shared), len(only)) == (808, 36)
    shapes = dict(control)
    assert sum(math.prod(shapes[k]) for k in shared) == 1_243_367_040
    assert sum(math.prod(shapes[k]) for k in only) == 7_647_120
    groups = [k.split(".")[0] for k in only]
    assert groups.count("zero_convs") == 18
    assert groups.count("input_hint_block") == 16
    assert groups.count("middle_block_out") == 2
    assert {int(k.split(".")[1]) for k in only if k.startswith("zero_convs")} == set(range(9))
    assert not any(k.startswith(("input_blocks.9.", "zero_convs.9.")) for k, _ in control)
    assert shapes["label_emb.0.0.weight"] == (1280, 2816)


@pytest.mark.parametrize("cfg", ALL, ids=IDS)
def test_diffusers_controlnet_is_unet_plus_controlnet_blocks(cfg):
    """Every diffusers ControlNet key but controlnet_* is a UNet key of the same shape."""
    unet = dict(L.diffusers_unet(cfg))
    own = [k for k, _ in L.diffusers_controlnet(cfg) if k.startswith("controlnet_")]
    rest = [(k, s) for k, s in L.diffusers_controlnet(cfg) if not k.startswith("controlnet_")]
    assert all(unet.get(k) == s for k, s in rest)
    assert (len(rest), len(own)) == (len(L.shared_keys(cfg)), len(L.control_only_keys(cfg)))


@pytest.mark.parametrize("cfg", FULL, ids=IDS[:3])
def test_tiny_keeps_keys_and_order(cfg):
    small = L.tiny(cfg)
    for fn in (L.ldm_unet, L.ldm_controlnet, L.diffusers_unet, L.diffusers_controlnet):
        full, tiny = fn(cfg), fn(small)
        assert [k for k, _ in tiny] == [k for k, _ in full]
        assert [len(s) for _, s in tiny] == [len(s) for _, s in full]
        assert sum(math.prod(s) for _, s in tiny) < 500_000
    assert L.shared_keys(small) == L.shared_keys(cfg)
    assert small.family == cfg.family and L.family_of(small) == cfg.family


def test_sd2_differs_from_sd1_in_shapes_only():
    sd1, sd2 = dict(L.ldm_unet(SD1)), dict(L.ldm_unet(SD2))
    assert list(sd1) == list(sd2)
    assert sd2["middle_block.1.proj_in.weight"] == (1280, 1280)
    assert sd1["middle_block.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert sd2["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert SD1.label == "SD1.x" and SD2.label == "SD2.x" and SDXL.label == "SDXL"


# ---------------------------------------------------------------------- diffusers config


@pytest.mark.parametrize(
    ("manifest", "cfg", "fn"),
    [
        ("controlnet_sd15_diffusers.tsv", SD1, L.diffusers_controlnet_config),
        ("controlnet_sdxl_diffusers.tsv", SDXL, L.diffusers_controlnet_config),
        ("sd15_unet_diffusers.tsv", SD1, L.diffusers_unet_config),
        ("sdxl_unet_diffusers.tsv", SDXL, L.diffusers_unet_config),
    ],
)
def test_diffusers_configs_match_published(manifest, cfg, fn):
    published = config(manifest)
    mine = fn(cfg)
    common = set(mine) & set(published)
    assert {k: mine[k] for k in common} == {k: published[k] for k in common}
    # what the published files have and ours leaves out is diffusers' default
    assert set(published) - set(mine) <= {
        "sample_size", "upcast_attention", "num_attention_heads", "conv_in_kernel",
        "conv_out_kernel", "class_embeddings_concat", "cross_attention_norm",
        "dual_cross_attention", "encoder_hid_dim", "encoder_hid_dim_type",
        "mid_block_only_cross_attention", "mid_block_type", "resnet_out_scale_factor",
        "resnet_skip_time_act", "time_cond_proj_dim", "time_embedding_act_fn",
        "time_embedding_dim", "time_embedding_type", "timestep_post_act", "conditioning_channels",
        "global_pool_conditions",
    }  # fmt: skip
    assert L.config_from_diffusers(published) == cfg
    assert mine["_class_name"] in ("ControlNetModel", "UNet2DConditionModel")
    json.dumps(mine)  # serialisable


@pytest.mark.parametrize("cfg", ALL, ids=IDS)
def test_config_round_trip(cfg):
    assert L.config_from_diffusers(L.diffusers_controlnet_config(cfg)) == cfg
    assert L.config_from_diffusers(L.diffusers_unet_config(cfg)) == cfg


def test_config_from_diffusers_refuses_what_ldm_cannot_hold():
    for bad in (
        {"mid_block_type": "UNetMidBlock2D"},
        {"class_embed_type": "projection"},
        {"addition_embed_type": "text"},
        {"block_out_channels": [320, 500]},
    ):
        with pytest.raises(L.LayoutError):
            L.config_from_diffusers({**L.diffusers_controlnet_config(SD1), **bad})


def test_configs_validate():
    with pytest.raises(ValueError):
        dataclasses.replace(SD1, transformer_depth=(1, 1))
    with pytest.raises(ValueError):
        dataclasses.replace(SD1, num_head_channels=64)  # and num_heads=8
    with pytest.raises(ValueError):
        L.diffusers_controlnet_config(dataclasses.replace(SDXL, transformer_depth_middle=3))


# ------------------------------------------------------------------------------- infer

_EXTRA = {
    "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
    "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "betas": (1000,),
}


def _file(cfg, layout, kind, prefix):
    fn = {
        ("ldm", "unet"): L.ldm_unet,
        ("ldm", "controlnet"): L.ldm_controlnet,
        ("diffusers", "unet"): L.diffusers_unet,
        ("diffusers", "controlnet"): L.diffusers_controlnet,
    }[(layout, kind)]
    return {prefix + k: list(s) for k, s in fn(cfg)}


@pytest.mark.parametrize("cfg", ALL, ids=IDS)
@pytest.mark.parametrize(
    ("layout", "kind", "prefix"),
    [
        ("ldm", "controlnet", CONTROL_PREFIX),
        ("ldm", "controlnet", ""),
        ("ldm", "unet", UNET_PREFIX),
        ("ldm", "unet", ""),
        ("diffusers", "controlnet", ""),
        ("diffusers", "controlnet", "controlnet."),
        ("diffusers", "unet", ""),
        ("diffusers", "unet", "unet."),
    ],
)
def test_infer_every_layout(cfg, layout, kind, prefix):
    shapes = {**_EXTRA, **_file(cfg, layout, kind, prefix)}
    found = L.infer(shapes)
    assert found is not None
    assert (found.layout, found.kind, found.prefix) == (layout, kind, prefix)
    assert found.config == cfg and found.family == cfg.family
    assert L.infer(shapes, kind) == found
    assert L.infer(shapes, "unet" if kind == "controlnet" else "controlnet") is None
    assert L.detect(shapes) == [found]
    table = found.table()
    assert [m.key for m in table] == list(_file(cfg, layout, kind, prefix))
    canon = found.ldm_prefix
    assert canon == (CONTROL_PREFIX if kind == "controlnet" else UNET_PREFIX)
    pairs_ = L.controlnet_pairs(cfg) if kind == "controlnet" else L.unet_pairs(cfg)
    if layout == "diffusers":
        assert found.to_ldm() == {prefix + p.diffusers: canon + p.ldm for p in pairs_}
    else:
        assert found.to_ldm() == {prefix + p.ldm: canon + p.ldm for p in pairs_}
    assert all(tuple(shapes[m.key]) == m.shape for m in table)


def test_infer_original_controlnet_checkpoint_has_both():
    """control_sd15.tsv: the ControlNet and the SD UNet it carries."""
    shapes = {k: s for k, _, s in rows("control_sd15.tsv")}
    control = L.infer(shapes)
    unet = L.infer(shapes, "unet")
    assert (control.kind, control.prefix, control.config) == ("controlnet", CONTROL_PREFIX, SD1)
    assert (unet.kind, unet.prefix, unet.config) == ("unet", UNET_PREFIX, SD1)
    assert sorted(L.detect(shapes), key=lambda f: f.kind) == [control, unet]


@pytest.mark.parametrize(
    ("manifest", "layout", "kind", "cfg"),
    [
        ("sd15_base.tsv", "ldm", "unet", SD1),
        ("controlnet_sd15_diffusers.tsv", "diffusers", "controlnet", SD1),
        ("controlnet_sdxl_diffusers.tsv", "diffusers", "controlnet", SDXL),
        ("controlnet_sdxl_ldm.tsv", "ldm", "controlnet", SDXL),
        ("sdxl_base_unet.tsv", "ldm", "unet", SDXL),
        ("sd15_unet_diffusers.tsv", "diffusers", "unet", SD1),
        ("sdxl_unet_diffusers.tsv", "diffusers", "unet", SDXL),
    ],
)
def test_infer_manifests(manifest, layout, kind, cfg):
    shapes = {k: s for k, _, s in rows(manifest)}
    found = L.infer(shapes)
    assert (found.layout, found.kind, found.config) == (layout, kind, cfg)
    model = [k for k in shapes if k.startswith(found.prefix)]
    assert [m.key for m in found.table()] == model  # every key of the model, in file order


def test_infer_sdxl_single_file_base():
    """sd_xl_base_1.0.safetensors: UNet + two text encoders + VAE."""
    from cndiff import synthetic

    shapes = {s.key: s.shape for s in synthetic.base_spec(synthetic.SDXL)}
    found = L.infer(shapes)
    assert (found.layout, found.kind, found.prefix, found.config) == ("ldm", "unet", UNET_PREFIX,
                                                                     SDXL)  # fmt: skip
    assert L.infer(shapes, "controlnet") is None


def test_infer_refuses_what_is_not_a_model():
    assert L.infer({}) is None
    assert L.infer(_EXTRA) is None
    assert L.infer({"difference": ()}) is None
    assert L.detect(_EXTRA) == []
    # a Control-LoRA: LoRA'd layers have up/down, no weight
    lora = {k: s for k, _, s in rows("control_lora_sdxl_rank128.tsv")}
    assert L.infer(lora) is None


@pytest.mark.parametrize("cfg", [SD1, L.tiny(SDXL)], ids=["sd1", "tiny-sdxl"])
def test_infer_explains_near_misses(cfg):
    good = _file(cfg, "ldm", "controlnet", CONTROL_PREFIX)
    missing = dict(good)
    del missing["control_model.middle_block.1.proj_out.bias"]
    with pytest.raises(L.LayoutError, match=r"1 missing \(control_model\.middle_block\.1\.proj"):
        L.infer(missing)
    assert L.detect(missing) == []
    extra = {**good, "control_model.input_blocks.1.0.bogus.weight": [1]}
    with pytest.raises(L.LayoutError, match="1 unexpected"):
        L.infer(extra)
    reshaped = {**good, "control_model.time_embed.2.bias": [7]}
    with pytest.raises(L.LayoutError, match="other shape"):
        L.infer(reshaped)
    two = {**good, **{"x." + k: s for k, s in good.items()}}
    with pytest.raises(L.LayoutError, match="2 controlnets"):
        L.infer(two)
    # extra keys outside the model's own modules are fine
    assert L.infer({**good, "control_model.lora_marker": [1], "difference": []}).config == cfg
    garbled = dict(good)
    garbled["control_model.input_blocks.1.0.in_layers.2.weight"] = [3]
    with pytest.raises(L.LayoutError):
        L.infer(garbled)


def test_infer_variants():
    """Configs read off the keys, not matched against a list: inpainting UNets (9 input
    channels), other hint widths, an SDXL-refiner-like UNet (custom family)."""
    inpaint = dataclasses.replace(SD1, in_channels=9)
    assert L.infer(_file(inpaint, "ldm", "unet", UNET_PREFIX)).config == inpaint
    odd = dataclasses.replace(SD1, context_dim=1024)  # SD1.x structure, SD2.x context
    assert L.infer(_file(odd, "ldm", "unet", UNET_PREFIX)).config.family == "custom"
    hint = dataclasses.replace(SD1, hint_channels=1, hint_widths=(16, 32, 96, 128, 256))
    got = L.infer(_file(hint, "diffusers", "controlnet", "")).config
    assert got == hint and len(L.ldm_controlnet(hint)) == 344
    refiner = dataclasses.replace(
        SDXL,
        family="custom",
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        transformer_depth=(0, 4, 4, 0),
        transformer_depth_middle=4,
        context_dim=1280,
        adm_in_channels=2560,
    )
    for layout in ("ldm", "diffusers"):
        found = L.infer(_file(refiner, layout, "unet", ""))
        assert found.family == "custom" and found.config.label == "custom"
        c = found.config
        assert (c.model_channels, c.channel_mult) == (384, (1, 2, 4, 4))
        assert (c.transformer_depth, c.transformer_depth_middle) == ((0, 4, 4, 0), 4)
        assert (c.context_dim, c.adm_in_channels, c.linear_proj) == (1280, 2560, True)
        assert L.ldm_unet(c) == L.ldm_unet(refiner)


def test_infer_accepts_shape_objects():
    class Info:
        def __init__(self, shape):
            self.shape = shape

    shapes = {k: Info(tuple(s)) for k, s in _file(L.tiny(SD2), "ldm", "unet", UNET_PREFIX).items()}
    assert L.infer(shapes).config == L.tiny(SD2)
    with pytest.raises(ValueError):
        L.infer(shapes, "vae")  # type: ignore[arg-type]


def test_docstring_examples():
    assert doctest.testmod(L).failed == 0


def test_layouts_needs_only_the_standard_library():
    tree = ast.parse(Path(L.__file__).read_text())
    imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names}  # fmt: skip
    imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imports <= {"__future__", "dataclasses", "functools", "math", "re", "collections",
                       "typing"}  # fmt: skip


# ---------------------------------------------------------------------------- diffusers


@pytest.fixture(scope="module")
def diffusers_mod():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("cfg", TINY, ids=IDS[3:])
@pytest.mark.parametrize("model", ["ControlNetModel", "UNet2DConditionModel"])
def test_diffusers_loads_our_folders(diffusers_mod, tmp_path, cfg, model):
    """config.json from the cndiff config + a synthetic diffusers-layout file: diffusers
    builds the model offline with no missing/unexpected key and every weight equal."""
    import torch
    from safetensors.torch import load_file

    from cndiff import synthetic

    arch = synthetic.tiny({"sd1": synthetic.SD15, "sd2": synthetic.SD21,
                           "sdxl": synthetic.SDXL}[cfg.family])  # fmt: skip
    assert arch.unet == cfg
    if model == "ControlNetModel":
        weights = synthetic.make_diffusers_controlnet(tmp_path, arch, seed=3)
    else:
        weights = synthetic.make_diffusers_unet(tmp_path, arch, seed=3)
    cls = getattr(diffusers_mod, model)
    loaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    want = load_file(str(weights))
    got = loaded.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_ldm_controlnet_converts_to_a_diffusers_folder(diffusers_mod, tmp_path):
    """An ldm ControlNet, renamed with controlnet_pairs and written with the derived
    config.json, loads in diffusers with every weight equal."""
    import torch
    from safetensors.torch import save_file

    from cndiff import synthetic

    arch = synthetic.tiny(synthetic.SDXL)
    ldm = synthetic.control_state_dict(arch, layout="control-only", seed=5)
    found = L.infer({k: tuple(v.shape) for k, v in ldm.items()})
    assert (found.layout, found.kind, found.config) == ("ldm", "controlnet", arch.unet)
    renamed = {p.diffusers: ldm[CONTROL_PREFIX + p.ldm] for p in L.controlnet_pairs(found.config)}
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(L.diffusers_controlnet_config(found.config)))
    model, info = diffusers_mod.ControlNetModel.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    sd = model.state_dict()
    assert set(sd) == set(renamed)
    assert all(torch.equal(sd[k], v) for k, v in renamed.items())


def test_infer_is_bounded_on_hostile_keys():
    """Indices far past the keys a file has, zero widths, bad shapes: a clear refusal."""
    good = _file(SD1, "ldm", "controlnet", CONTROL_PREFIX)
    for bad in (
        {"control_model.input_blocks.1.1.transformer_blocks.999999999.norm1.weight": [320]},
        {"control_model.input_blocks.99999999.0.op.weight": [320, 320, 3, 3]},
        {"control_model.input_blocks.0.0.weight": [0, 4, 3, 3]},
        {"control_model.input_blocks.0.0.weight": []},
        {"control_model.input_hint_block.0.weight": [16]},
    ):
        with pytest.raises(L.LayoutError):
            L.infer({**good, **bad})
    dif = _file(SDXL, "diffusers", "unet", "")
    with pytest.raises(L.LayoutError):
        L.infer({**dif, "down_blocks.7777777.resnets.0.conv1.weight": [1, 1, 3, 3]})


def test_key_search_is_exact_when_keys_hold_nul_and_separators():
    """The marker and prefix searches run over the joined key names: a key holding a NUL
    (legal in JSON and in pickles) neither fakes a model nor hides a real one."""
    from cndiff.inputs.classify import classify

    good = _file(SD1, "ldm", "controlnet", CONTROL_PREFIX)
    fake = {"x\0" + k: s for k, s in good.items()}  # every name preceded by junk and a NUL
    assert L.detect(fake) == [] and L.infer(fake) is None
    infos = {k: types.SimpleNamespace(shape=tuple(s)) for k, s in fake.items()}
    assert classify(infos).kind == "unknown"
    both = {**good, **fake, "a\0": [1], "\0": [1]}
    assert [(f.layout, f.kind, f.prefix) for f in L.detect(both)] == [
        ("ldm", "controlnet", CONTROL_PREFIX)
    ]
    infos = {k: types.SimpleNamespace(shape=tuple(s)) for k, s in {**good, **fake}.items()}
    assert classify(infos).kind == "pruned-controlnet"
