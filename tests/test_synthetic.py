"""Tests of cndiff.synthetic: key layout of the synthetic checkpoints and their values."""

from __future__ import annotations

import json
import os
import pickletools
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cndiff import layouts
from cndiff import synthetic as syn
from cndiff.synthetic import CONTROL_PREFIX, SD15, SD21, SDXL, UNET_PREFIX, TensorSpec

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = syn.tiny(SD15)
TINY21 = syn.tiny(SD21)


def _read_tsv(path: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    rows = []
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["key", "dtype", "shape"]
    for line in lines[1:]:
        key, dtype, shape = line.split("\t")
        rows.append((key, dtype, tuple(int(x) for x in shape.strip("[]").split(",") if x)))
    return rows


def _rows(specs: list[TensorSpec]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(s.key, str(s.dtype).replace("torch.", ""), s.shape) for s in specs]


def _counterpart(control_key: str) -> str:
    return UNET_PREFIX + control_key[len(CONTROL_PREFIX) :]


def _load_sd(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with syn.lightning_stub():
        obj = torch.load(path, weights_only=False)
    return obj.get("state_dict", obj)


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
            return z.read(name)
    return path.read_bytes()  # legacy format: a sequence of pickles, the object is the 4th


def _globals(data: bytes) -> set[str]:
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def _assert_matches(sd: dict[str, torch.Tensor], specs: list[TensorSpec], ordered: bool) -> None:
    keys = list(sd)
    if ordered:
        assert keys == [s.key for s in specs]
    else:
        assert sorted(keys) == sorted(s.key for s in specs)
    for s in specs:
        assert sd[s.key].dtype == s.dtype, s.key
        assert tuple(sd[s.key].shape) == s.shape, s.key


# ---------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("fixture", "specs"),
    [("control_sd15.tsv", syn.control_spec(SD15)), ("sd15_base.tsv", syn.base_spec(SD15))],
)
def test_full_size_specs_match_real_files(fixture: str, specs: list[TensorSpec]) -> None:
    path = FIXTURES / fixture
    if not path.is_file():
        pytest.skip(f"fixture {path} not available (shared/ is not part of the repo)")
    assert _rows(specs) == _read_tsv(path)


def test_full_size_facts() -> None:
    control = syn.control_spec(SD15)
    base = syn.base_spec(SD15)
    assert len(control) == 1484
    assert len(base) == 1145
    cm = [s for s in control if s.key.startswith(CONTROL_PREFIX)]
    assert len(cm) == 340
    assert sum(s.numel for s in cm) == 361_279_120
    paired = syn.paired_control_keys(SD15)
    assert len(paired) == 298
    base_by_key = {s.key: s for s in base}
    assert sum(base_by_key[_counterpart(k)].numel for k in paired) == 348_712_960
    only = syn.control_only_keys(SD15)
    assert len(only) == 42
    parts = [k[len(CONTROL_PREFIX) :].split(".")[0] for k in only]
    assert parts.count("zero_convs") == 24
    assert parts.count("input_hint_block") == 16
    assert parts.count("middle_block_out") == 2
    # Sizes quoted for the real files (fp32): ~5.71 GB and ~4.27 GB of tensor data.
    assert sum(s.nbytes for s in control) == pytest.approx(5.71e9, rel=2e-3)
    assert sum(s.nbytes for s in base) == pytest.approx(4.265e9, rel=2e-3)
    # The base has no logvar and only the two scalar EMA entries.
    assert "logvar" not in base_by_key
    assert base_by_key["model_ema.decay"] == TensorSpec("model_ema.decay", torch.float32, ())
    assert base_by_key["model_ema.num_updates"].dtype == torch.int32
    ids = base_by_key["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert (ids.dtype, ids.shape) == (torch.int64, (1, 77))


def test_base_and_control_share_everything_but_control_model() -> None:
    for arch in (SD15, TINY, SD21, TINY21):
        control = [s for s in syn.control_spec(arch) if not s.key.startswith(CONTROL_PREFIX)]
        base = [s for s in syn.base_spec(arch) if not s.key.startswith("model_ema.")]
        assert [s for s in control if s.key != "logvar"] == base


def test_ema_layout() -> None:
    plain = syn.base_spec(SD15)
    ema = syn.base_spec(SD15, ema=True)
    unet = [s for s in plain if s.key.startswith(UNET_PREFIX)]
    keys = [s.key for s in ema]
    i = keys.index("model_ema.num_updates")
    assert keys[i - 1] == "model_ema.decay"
    assert keys[i - 1 - len(unet) : i - 1] == [s.key for s in unet]
    extra = ema[i + 1 : i + 1 + len(unet)]
    assert [s.key for s in extra] == [syn.ema_key(s.key) for s in unet]
    assert [s.shape for s in extra] == [s.shape for s in unet]
    assert extra[0].key == "model_ema.diffusion_modeltime_embed0weight"
    assert len(ema) == len(plain) + len(unet)
    assert [s for s in ema if s.key not in {e.key for e in extra}] == plain


@pytest.mark.parametrize("arch", [SD15, SD21], ids=["sd15", "sd21"])
def test_tiny_keeps_keys_and_order(arch: syn.Arch) -> None:
    small = syn.tiny(arch)
    for ema in (False, True):
        assert [s.key for s in syn.base_spec(small, ema=ema)] == [
            s.key for s in syn.base_spec(arch, ema=ema)
        ]
    full_c, tiny_c = syn.control_spec(arch), syn.control_spec(small)
    assert [s.key for s in tiny_c] == [s.key for s in full_c]
    assert [s.dtype for s in tiny_c] == [s.dtype for s in full_c]
    assert [len(s.shape) for s in tiny_c] == [len(s.shape) for s in full_c]
    assert sum(s.nbytes for s in tiny_c) < 2_000_000
    assert sum(s.nbytes for s in syn.base_spec(small)) < 2_000_000


@pytest.mark.parametrize("arch", [SD15, TINY, SD21, TINY21], ids=["sd15", "t15", "sd21", "t21"])
def test_paired_shapes_equal(arch: syn.Arch) -> None:
    base = {s.key: s for s in syn.base_spec(arch)}
    control = {s.key: s for s in syn.control_spec(arch)}
    paired = syn.paired_control_keys(arch)
    assert len(paired) == 298
    for k in paired:
        assert control[k].shape == base[_counterpart(k)].shape == control[_counterpart(k)].shape
    # The same UNet in base and control file.
    assert [s for s in control.values() if s.key.startswith(UNET_PREFIX)] == [
        s for s in base.values() if s.key.startswith(UNET_PREFIX)
    ]


def test_sd21_shapes() -> None:
    spec = {s.key: s.shape for s in syn.control_spec(SD21)}
    p = "model.diffusion_model.middle_block.1."
    assert spec[p + "proj_in.weight"] == (1280, 1280)
    assert spec[p + "proj_out.weight"] == (1280, 1280)
    assert spec[p + "transformer_blocks.0.attn2.to_k.weight"] == (1280, 1024)
    assert spec["control_model.input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert spec["control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"] == (
        320,
        1024,
    )
    assert spec["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] == (
        3072,
        1024,
    )
    assert spec["cond_stage_model.model.logit_scale"] == ()
    assert not any(k.startswith("cond_stage_model.transformer.") for k in spec)
    sd15 = {s.key: s.shape for s in syn.control_spec(SD15)}
    assert sd15[p + "proj_in.weight"] == (1280, 1280, 1, 1)
    tiny21 = {s.key: s.shape for s in syn.control_spec(TINY21)}
    assert len(tiny21[p + "proj_in.weight"]) == 2
    assert tiny21[p + "transformer_blocks.0.attn2.to_k.weight"][1] == TINY21.context_dim


def test_unchanged_keys_are_deterministic_paired_biases() -> None:
    keys = syn.unchanged_control_keys(SD15, 2)
    assert keys == syn.unchanged_control_keys(TINY, 2)
    assert keys[0] == "control_model.time_embed.0.bias"
    assert len(syn.unchanged_control_keys(SD15, 5)) == 5
    assert syn.unchanged_control_keys(SD15, 0) == []
    assert set(syn.unchanged_control_keys(SD15, 7)) <= set(syn.paired_control_keys(SD15))
    with pytest.raises(ValueError):
        syn.unchanged_control_keys(SD15, 10_000)


# ---------------------------------------------------------------------------- values


def test_values_deterministic_and_seeded() -> None:
    a = syn.control_state_dict(TINY, seed=3)
    b = syn.control_state_dict(TINY, seed=3)
    c = syn.control_state_dict(TINY, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    k = "control_model.zero_convs.0.0.weight"
    assert not torch.equal(a[k], c[k])
    # Same base seed: same embedded UNet and VAE even with a different control seed.
    d = syn.control_state_dict(TINY, seed=4, base_seed=3)
    for key in (UNET_PREFIX + "out.2.weight", "first_stage_model.encoder.conv_in.weight"):
        assert torch.equal(a[key], d[key])
    assert not torch.equal(a[k], d[k])


def test_value_model() -> None:
    base = syn.base_state_dict(TINY, seed=1)
    off = syn.control_state_dict(TINY, seed=1)
    same = syn.control_state_dict(TINY, seed=1, embedded_unet="same", unchanged_keys=3)
    unchanged2 = set(syn.unchanged_control_keys(TINY, 2))
    for key in base:
        if key.startswith(UNET_PREFIX):
            assert torch.equal(same[key], base[key])
            diff = (off[key] - base[key]).abs().max().item()
            assert 0 < diff <= 1e-3 * base[key].abs().max().item()
        elif key in off:
            assert torch.equal(off[key], base[key]), key
    for key in syn.paired_control_keys(TINY):
        delta = off[key] - base[_counterpart(key)]
        if key in unchanged2:
            assert torch.equal(off[key], base[_counterpart(key)])
        else:
            assert delta.abs().max().item() > 1e-4
            assert delta.abs().max().item() < 0.1
    assert (
        sum(torch.equal(same[k], base[_counterpart(k)]) for k in syn.paired_control_keys(TINY)) == 3
    )
    ddpm = base["alphas_cumprod"]
    assert ddpm.dtype == torch.float32 and 0 < ddpm[-1] < ddpm[0] < 1
    assert torch.equal(off["logvar"], torch.zeros(1000))
    ids = base["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(16).unsqueeze(0))
    assert base["model_ema.num_updates"].dtype == torch.int32


def test_ema_values_and_dtype() -> None:
    sd = syn.base_state_dict(TINY, ema=True, dtype=torch.float16)
    _assert_matches(
        {k: v.float() if v.dtype == torch.float16 else v for k, v in sd.items()},
        syn.base_spec(TINY, ema=True),
        ordered=True,
    )
    key = UNET_PREFIX + "time_embed.0.weight"
    assert sd[key].dtype == torch.float16
    assert sd["model_ema.num_updates"].dtype == torch.int32
    ema = sd[syn.ema_key(key)]
    assert not torch.equal(ema, sd[key])
    assert torch.allclose(ema.float(), sd[key].float(), atol=1e-3)


# ---------------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("control_fmt", "base_fmt", "wrapped", "flat"),
    [
        ("pth", "ckpt", False, False),
        ("legacy", "legacy", True, False),
        ("safetensors", "safetensors", False, False),
        ("ckpt", "pth", True, True),
    ],
)
def test_make_pair_roundtrip(
    tmp_path: Path, control_fmt: str, base_fmt: str, wrapped: bool, flat: bool
) -> None:
    control_path, base_path = syn.make_pair(
        tmp_path,
        TINY,
        seed=5,
        control_fmt=control_fmt,  # type: ignore[arg-type]
        base_fmt=base_fmt,  # type: ignore[arg-type]
        wrapped=wrapped,
        flat=flat,
    )
    assert control_path.parent == base_path.parent == tmp_path
    for p in (control_path, base_path):
        assert 100_000 < p.stat().st_size < 2_500_000
    ordered = control_fmt != "safetensors"
    control = _load_sd(control_path)
    base = _load_sd(base_path)
    _assert_matches(control, syn.control_spec(TINY), ordered)
    _assert_matches(base, syn.base_spec(TINY), ordered)
    unchanged = set(syn.unchanged_control_keys(TINY))
    for key in syn.paired_control_keys(TINY):
        delta = control[key] - base[_counterpart(key)]
        assert bool((delta == 0).all()) == (key in unchanged), key
    expected = syn.control_state_dict(TINY, seed=5)
    assert all(torch.equal(control[k], expected[k]) for k in expected)


def test_control_wrapped_and_plain_objects(tmp_path: Path) -> None:
    plain = torch.load(syn.make_control(tmp_path / "c.pth", TINY), weights_only=True)
    assert "state_dict" not in plain and len(plain) == 1484
    wrapped = torch.load(
        syn.make_control(tmp_path / "w.pth", TINY, wrapped=True), weights_only=True
    )
    assert list(wrapped) == ["state_dict"]
    with pytest.raises(ValueError):
        syn.make_control(tmp_path / "x.safetensors", TINY, fmt="safetensors", wrapped=True)
    with pytest.raises(ValueError):
        syn.make_control(tmp_path / "x.bin", TINY, fmt="npz")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["ckpt", "legacy"])
def test_lightning_base(tmp_path: Path, fmt: str) -> None:
    assert "pytorch_lightning" not in sys.modules
    path = syn.make_base(tmp_path / "base.ckpt", TINY, fmt=fmt)  # type: ignore[arg-type]
    assert "pytorch_lightning" not in sys.modules
    data = _pickle_bytes(path)
    assert b"pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint\n" in data
    if fmt == "ckpt":
        names = _globals(data)
        assert "pytorch_lightning.callbacks.model_checkpoint ModelCheckpoint" in names
        assert "numpy.core.multiarray scalar" in names
        assert "numpy dtype" in names
        assert "collections OrderedDict" in names
    # Not loadable without pytorch_lightning, as the real files.
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)
    with syn.lightning_stub() as cls:
        obj = torch.load(path, weights_only=False)
        assert "pytorch_lightning" in sys.modules
    assert "pytorch_lightning" not in sys.modules
    assert list(obj) == [
        "epoch",
        "global_step",
        "pytorch-lightning_version",
        "state_dict",
        "callbacks",
    ]
    ((key, state),) = obj["callbacks"].items()
    assert key is cls
    assert float(state["best_model_score"]) == pytest.approx(0.1234)
    _assert_matches(obj["state_dict"], syn.base_spec(TINY), ordered=True)


def test_plain_base_needs_no_stub(tmp_path: Path) -> None:
    wrapped = torch.load(syn.make_base(tmp_path / "a.ckpt", TINY, lightning=False))
    assert list(wrapped) == ["state_dict"]
    flat = torch.load(syn.make_base(tmp_path / "b.ckpt", TINY, flat=True, ema=True))
    _assert_matches(flat, syn.base_spec(TINY, ema=True), ordered=True)
    half = load_file(
        str(syn.make_base(tmp_path / "c.safetensors", TINY, fmt="safetensors", dtype=torch.float16))
    )
    assert half[UNET_PREFIX + "out.2.weight"].dtype == torch.float16
    assert half["model_ema.num_updates"].dtype == torch.int32
    assert half["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == (
        torch.int64
    )


def test_sd21_pair(tmp_path: Path) -> None:
    control_path, base_path = syn.make_pair(tmp_path, TINY21, lightning=False)
    assert control_path.name == "control_sd21_synthetic.pth"
    control = torch.load(control_path)
    base = torch.load(base_path)["state_dict"]
    _assert_matches(control, syn.control_spec(TINY21), ordered=True)
    _assert_matches(base, syn.base_spec(TINY21), ordered=True)
    for key in syn.unchanged_control_keys(TINY21):
        assert torch.equal(control[key], base[_counterpart(key)])


# ============================================================ layouts, SDXL, no torch

TINYXL = syn.tiny(SDXL)
TINIES = {"sd15": TINY, "sd21": TINY21, "sdxl": TINYXL}


@pytest.mark.parametrize(
    ("manifest", "specs", "prefix"),
    [
        ("controlnet_sd15_diffusers.tsv", lambda: syn.diffusers_controlnet_spec(SD15), ""),
        ("controlnet_sdxl_diffusers.tsv", lambda: syn.diffusers_controlnet_spec(SDXL), ""),
        ("controlnet_sdxl_ldm.tsv", lambda: syn.control_model_spec(SDXL), ""),
        ("control_sd15.tsv", lambda: syn.control_model_spec(SD15), CONTROL_PREFIX),
        ("sd15_unet_diffusers.tsv", lambda: syn.diffusers_unet_spec(SD15), ""),
        ("sdxl_unet_diffusers.tsv", lambda: syn.diffusers_unet_spec(SDXL), ""),
        ("sdxl_base_unet.tsv", lambda: syn.base_spec(SDXL), UNET_PREFIX),
    ],
)
def test_new_generators_match_manifests(manifest, specs, prefix):
    from manifests import rows

    want = [r for r in rows(manifest) if r[0].startswith(prefix)]
    assert _rows([s for s in specs() if s.key.startswith(prefix)]) == want


def test_sdxl_base_facts() -> None:
    """sd_xl_base_1.0.safetensors: 2515 tensors, 3,468,837,945 elements, 6.94 GB fp16."""
    spec = syn.base_spec(SDXL)
    assert len(spec) == 2515 and syn.spec_numel(spec) == 3_468_837_945
    assert sum(s.nbytes for s in spec) == pytest.approx(6.94e9, rel=1e-3)
    for prefix, count, numel in (
        (UNET_PREFIX, 1680, 2_567_463_684),
        ("conditioner.embedders.0.", 197, 123_060_557),
        ("conditioner.embedders.1.", 390, 694_659_841),
        ("first_stage_model.", 248, 83_653_863),
    ):
        assert sum(s.key.startswith(prefix) for s in spec) == count
        assert syn.spec_numel(spec, prefix) == numel
    assert {str(s.dtype) for s in spec} == {"float16", "int64"}
    by_key = {s.key: s for s in spec}
    ids = by_key["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    assert (ids.dtype, ids.shape) == ("int64", (1, 77))
    # embedders.0 is SD1.5's CLIP-L and the VAE is SD1.5's, under other prefixes
    sd15 = syn.base_spec(SD15)
    clip = [(s.key.replace("cond_stage_model.", "conditioner.embedders.0."), s.shape)
            for s in sd15 if s.key.startswith("cond_stage_model.")]  # fmt: skip
    assert clip == [(s.key, s.shape) for s in spec if s.key.startswith("conditioner.embedders.0.")]
    vae = [(s.key, s.shape) for s in sd15 if s.key.startswith("first_stage_model.")]
    assert vae == [(s.key, s.shape) for s in spec if s.key.startswith("first_stage_model.")]
    assert by_key["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert not any(s.key.startswith(("model_ema", "betas", "cond_stage_model")) for s in spec)
    with pytest.raises(ValueError):
        syn.base_spec(SDXL, ema=True)


def test_sdxl_counts_and_tiny() -> None:
    assert len(syn.paired_control_keys(SDXL)) == 808
    assert len(syn.control_only_keys(SDXL)) == 36
    assert syn.unchanged_control_keys(SDXL)[0] == "control_model.time_embed.0.bias"
    for fn in (syn.base_spec, syn.control_model_spec, syn.diffusers_controlnet_spec,
               syn.diffusers_unet_spec, syn.control_spec):  # fmt: skip
        full, small = fn(SDXL), fn(TINYXL)
        assert [s.key for s in small] == [s.key for s in full]
        assert [s.dtype for s in small] == [s.dtype for s in full]
        assert sum(s.nbytes for s in small) < 4_000_000
    assert TINYXL.context_dim == 40 and TINYXL.unet.adm_in_channels == 72
    assert TINYXL.unet == layouts.tiny(layouts.SDXL)


def test_arch_compat_properties() -> None:
    assert (SD15.model_channels, SD15.context_dim, SD15.linear_proj) == (320, 768, False)
    assert SD15.attention_levels == (0, 1, 2) and SD15.channel_mult == (1, 2, 4, 4)
    assert SD15.hint_block_channels == (16, 16, 32, 32, 96, 96, 256)
    assert TINY.hint_block_channels == (2, 2, 4, 4, 4, 4, 8)
    assert (TINY.model_channels, TINY.context_dim, TINY21.context_dim) == (4, 16, 24)
    assert (SD21.context_dim, SD21.linear_proj, SDXL.attention_levels) == (1024, True, (1, 2))
    assert [a.name for a in (TINY, TINY21, TINYXL)] == ["sd15", "sd21", "sdxl"]


def test_dtype() -> None:
    f16 = syn.DType("fp16")
    assert f16 == torch.float16 and torch.float16 == f16 and f16 != torch.float32
    assert f16 == "float16" and f16 == "torch.float16" and str(f16) == "float16"
    assert f16 == np.dtype(np.float16) and syn.DType(np.float32) == torch.float32
    assert syn.DType(torch.bfloat16) == "bfloat16" and syn.DType("bf16").itemsize == 2
    assert syn.DType("bfloat16") != np.dtype(np.uint16)
    assert hash(syn.DType("float32")) == hash("float32")
    assert (f16.safetensors, f16.storage, f16.is_floating_point) == ("F16", "HalfStorage", True)
    assert not syn.DType("int64").is_floating_point and syn.DType("int64").torch == torch.int64
    assert TensorSpec("a", torch.float16, (2,)) == TensorSpec("a", "float16", [2])
    with pytest.raises(ValueError):
        syn.DType("complex64")


def test_normal_values() -> None:
    a = syn._normal((1000, 1001), 0.05, "x")
    assert a.dtype == np.float32 and a.shape == (1000, 1001)
    assert abs(float(a.mean())) < 5e-4 and float(a.std()) == pytest.approx(0.05, rel=1e-2)
    assert np.array_equal(a, syn._normal((1000, 1001), 0.05, "x"))
    assert not np.array_equal(a, syn._normal((1000, 1001), 0.05, "y"))
    # odd sizes and chunk boundaries; a scalar
    for n in (1, 2, 3, syn._CHUNK - 1, syn._CHUNK, syn._CHUNK + 1):
        v = syn._normal((n,), 1.0, "n")
        assert v.shape == (n,) and np.isfinite(v).all() and np.abs(v).max() < 7
    assert syn._normal((), 1.0, "s").shape == ()


def test_bfloat16_rounds_like_torch() -> None:
    x = torch.randn(100_000) * 3
    x[:4] = torch.tensor([1.00390625, 1.01171875, -2.0078125, 0.0])  # ties to even
    got = syn._to_dtype(x.numpy(), syn.DType("bfloat16"))
    assert got.dtype == np.uint16
    assert torch.equal(torch.from_numpy(got.view(np.int16)), x.to(torch.bfloat16).view(torch.int16))


def test_threads_give_the_same_values(monkeypatch) -> None:
    plan = syn._control_plan(TINYXL, "diffusers", seed=1, base_seed=None,
                             embedded_unet="offset", unchanged_keys=2, dtype="bf16")  # fmt: skip
    plain = syn._arrays(plan)
    monkeypatch.setattr(syn, "_THREAD_MIN_NUMEL", 0)
    monkeypatch.setattr(syn, "_WINDOW_BYTES", 4096)
    threaded = syn._arrays(plan)
    assert list(plain) == list(threaded)
    assert all(np.array_equal(plain[k], threaded[k]) for k in plain)


def _read_any(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, weights_only=True, mmap=True)
    return obj.get("state_dict", obj)


@pytest.mark.parametrize(
    ("name", "layout", "fmt"),
    [
        ("sd15", "original", "pth"),
        ("sd15", "control-only", "safetensors"),
        ("sd15", "diffusers", "pth"),
        ("sd21", "original", "safetensors"),
        ("sd21", "control-only", "pth"),
        ("sd21", "diffusers", "safetensors"),
        ("sdxl", "original", "pth"),
        ("sdxl", "control-only", "pth"),
        ("sdxl", "diffusers", "safetensors"),
    ],
)
def test_control_files_every_layout(tmp_path, name, layout, fmt) -> None:
    arch = TINIES[name]
    path = syn.make_control(tmp_path / f"c.{fmt}", arch, seed=4, layout=layout)  # type: ignore[arg-type]
    specs = {"original": syn.control_spec, "control-only": syn.control_model_spec,
             "diffusers": syn.diffusers_controlnet_spec}[layout](arch)  # fmt: skip
    sd = _read_any(path)
    _assert_matches(sd, specs, ordered=fmt == "pth")
    want = syn.control_arrays(arch, layout=layout, seed=4)  # type: ignore[arg-type]
    assert all(np.array_equal(sd[k].numpy(), v) for k, v in want.items())


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_base_files_every_layout(tmp_path, name, layout) -> None:
    arch = TINIES[name]
    path = syn.make_base(tmp_path / "b.safetensors", arch, seed=2, layout=layout)  # type: ignore[arg-type]
    specs = syn.base_spec(arch) if layout == "original" else syn.diffusers_unet_spec(arch)
    sd = load_file(str(path))
    _assert_matches(sd, specs, ordered=False)
    want = syn.base_state_dict(arch, seed=2, layout=layout)  # type: ignore[arg-type]
    assert list(want) == [s.key for s in specs]
    assert all(torch.equal(sd[k], v) for k, v in want.items())


@pytest.mark.parametrize("arch", [TINY, TINYXL], ids=["sd15", "sdxl"])
def test_same_values_whatever_the_layout(arch) -> None:
    """A diffusers ControlNet holds the ldm one's values; a diffusers UNet holds B."""
    cfg = arch.unet
    ldm = syn.control_arrays(arch, layout="control-only", seed=3, base_seed=1)
    dif = syn.control_arrays(arch, layout="diffusers", seed=3, base_seed=1)
    assert len(ldm) == len(dif) == len(layouts.ldm_controlnet(cfg))
    for p in layouts.controlnet_pairs(cfg):
        assert np.array_equal(dif[p.diffusers], ldm[CONTROL_PREFIX + p.ldm]), p
    base = syn.base_arrays(arch, seed=1, dtype="float32")
    unet = syn.base_arrays(arch, layout="diffusers", seed=1)
    for p in layouts.unet_pairs(cfg):
        assert np.array_equal(unet[p.diffusers], base[UNET_PREFIX + p.ldm]), p
    if arch.unet.family == "sd1":
        orig = syn.control_arrays(arch, seed=3, base_seed=1)
        assert all(np.array_equal(orig[k], v) for k, v in ldm.items())


def test_diffusers_controlnet_minus_sdxl_base_is_a_meaningful_diff() -> None:
    """control = base + perturbation, through the layout mapping and the fp16 base."""
    arch = TINYXL
    control = syn.control_arrays(arch, layout="diffusers", seed=9, base_seed=0)
    found = layouts.infer({k: v.shape for k, v in control.items()})
    assert (found.layout, found.kind, found.family) == ("diffusers", "controlnet", "sdxl")
    base16 = syn.base_arrays(arch, seed=0)  # float16, as published
    base32 = syn.base_arrays(arch, seed=0, dtype="float32")
    assert base16[UNET_PREFIX + "out.2.weight"].dtype == np.float16
    unchanged = set(syn.unchanged_control_keys(arch))
    paired = set(syn.paired_control_keys(arch))
    for key, ldm_key in found.to_ldm().items():
        if ldm_key not in paired:
            continue
        bkey = UNET_PREFIX + ldm_key[len(CONTROL_PREFIX) :]
        d32 = np.abs(control[key] - base32[bkey]).max()
        d16 = np.abs(control[key] - base16[bkey].astype(np.float32)).max()
        if ldm_key in unchanged:
            assert d32 == 0 and 0 < d16 < 1e-3
        else:
            assert 1e-4 < d32 < 0.1 and 1e-4 < d16 < 0.1
    assert len(unchanged) == 2 and unchanged <= paired


def test_torch_zip_format(tmp_path) -> None:
    path = syn.make_control(tmp_path / "c.pth", TINYXL, layout="control-only", dtype="fp16")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert names[:2] == ["archive/data.pkl", "archive/byteorder"]
        assert names[-1] == "archive/version" and z.read("archive/version") == b"3\n"
        assert z.read("archive/byteorder") == b"little"
        assert names[2:-1] == [f"archive/data/{i}" for i in range(844)]
        assert z.testzip() is None  # CRCs
        data = path.read_bytes()
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            if info.filename.startswith("archive/data/"):
                n, m = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
                assert (info.header_offset + 30 + n + m) % 64 == 0  # storages aligned
        pkl = z.read("archive/data.pkl")
    assert pkl[:2] == b"\x80\x02"
    assert _globals(pkl) == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2",
                             "torch HalfStorage"}  # fmt: skip
    sd = torch.load(path, weights_only=True, mmap=True)
    want = syn.control_state_dict(TINYXL, layout="control-only", dtype=torch.float16)
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in want)
    assert sd._metadata[""] == {"version": 1}


def test_torch_zip_with_offsets_past_4gib(tmp_path) -> None:
    """Entries after the first 4 GiB get zip64 records (a sparse file stands in for a
    multi-GB checkpoint)."""
    plan = syn._control_plan(TINY, "control-only", seed=0, base_seed=None,
                             embedded_unet="offset", unchanged_keys=2, dtype=None)  # fmt: skip
    path = tmp_path / "big.zip"
    start = (1 << 32) + 12345
    with open(path, "wb") as f:
        f.seek(start)
        syn._write_torch_zip(f, plan, lambda sd: sd)
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        assert infos[0].header_offset == start and len(infos) == len(plan.specs) + 3
        want = syn._arrays(plan)
        for i, (key, arr) in enumerate(want.items()):
            assert z.read(f"archive/data/{i}") == arr.tobytes(), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_files(tmp_path, dtype) -> None:
    control = syn.make_control(tmp_path / "c.pth", TINY, dtype=dtype)
    sd = torch.load(control, weights_only=True)
    ref = syn.control_state_dict(TINY)
    for k, v in ref.items():
        assert sd[k].dtype == (dtype if v.dtype.is_floating_point else v.dtype)
        assert torch.equal(sd[k], v.to(sd[k].dtype))


def test_diffusers_folders(tmp_path) -> None:
    weights = syn.make_diffusers_controlnet(tmp_path / "cn", TINYXL, variant="fp16",
                                            dtype="float16")  # fmt: skip
    assert weights.name == "diffusion_pytorch_model.fp16.safetensors"
    cfg = json.loads((tmp_path / "cn" / "config.json").read_text())
    assert cfg == layouts.diffusers_controlnet_config(TINYXL.unet)
    assert layouts.config_from_diffusers(cfg) == TINYXL.unet
    assert {v.dtype for v in load_file(str(weights)).values()} == {torch.float16}
    unet = syn.make_diffusers_unet(tmp_path / "unet", TINY21)
    assert json.loads((unet.parent / "config.json").read_text())["use_linear_projection"]


def test_make_pair_sdxl_and_layouts(tmp_path) -> None:
    control, base = syn.make_pair(tmp_path / "xl", TINYXL)
    assert control == tmp_path / "xl/controlnet_sdxl_synthetic/diffusion_pytorch_model.safetensors"
    assert (control.parent / "config.json").is_file()
    assert base == tmp_path / "xl/sdxl_base_synthetic.safetensors"
    c, b = syn.make_pair(tmp_path / "v11", TINY, control_layout="control-only",
                         base_layout="diffusers")  # fmt: skip
    assert c.name == "control_v11p_sd15_synthetic.pth"
    assert b == tmp_path / "v11/sd15_unet_synthetic/diffusion_pytorch_model.safetensors"
    sd = torch.load(c, weights_only=True)
    unet = load_file(str(b))
    to_ldm = {p.diffusers: UNET_PREFIX + p.ldm for p in layouts.unet_pairs(TINY.unet)}
    base = {to_ldm[k]: v for k, v in unet.items()}
    unchanged = set(syn.unchanged_control_keys(TINY))
    for key in syn.paired_control_keys(TINY):
        delta = sd[key] - base[_counterpart(key)]
        assert bool((delta == 0).all()) == (key in unchanged), key
    assert syn.make_pair(tmp_path / "xo", TINYXL, control_layout="original")[0].name == (
        "control_sdxl_synthetic.pth"
    )


_NO_TORCH = r"""
import sys
sys.modules["torch"] = None  # import torch raises ImportError
from pathlib import Path
from cndiff import synthetic as s
out = Path(sys.argv[1])
s.make_pair(out / "demo", s.tiny(), embedded_unet="same")  # what `cndiff demo` writes
s.make_pair(out / "xl", s.tiny(s.SDXL))
s.make_base(out / "ema.ckpt", s.tiny(), ema=True)
s.make_control(out / "v11.pth", s.tiny(s.SD21), layout="control-only", dtype="bf16")
s.control_arrays(s.tiny())
for call in (lambda: s.make_base(out / "legacy.pth", s.tiny(), fmt="legacy"),
             lambda: s.control_state_dict(s.tiny())):
    try:
        call()
    except (RuntimeError, ImportError) as exc:
        print("refused:", exc)
assert sys.modules["torch"] is None
"""


def test_works_without_torch(tmp_path) -> None:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(syn.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("refused:") == 2
    assert "legacy (pre-1.6) torch format needs torch" in proc.stdout
    assert not list(tmp_path.rglob("*.partial"))
    # what was written without torch reads back with torch, equal to the reference
    control = torch.load(tmp_path / "demo/control_sd15_synthetic.pth", weights_only=True)
    want = syn.control_state_dict(TINY, embedded_unet="same")
    assert all(torch.equal(control[k], want[k]) for k in want)
    with syn.lightning_stub():
        ema = torch.load(tmp_path / "ema.ckpt", weights_only=False)["state_dict"]
    want = syn.base_state_dict(TINY, ema=True)
    assert list(ema) == list(want) and all(torch.equal(ema[k], want[k]) for k in want)
    v11 = torch.load(tmp_path / "v11.pth", weights_only=True)
    want = syn.control_state_dict(TINY21, layout="control-only", dtype=torch.bfloat16)
    assert all(torch.equal(v11[k], want[k]) for k in want)
    xl = load_file(str(tmp_path / "xl/sdxl_base_synthetic.safetensors"))
    assert all(torch.equal(xl[k], v) for k, v in syn.base_state_dict(TINYXL).items())
