"""Tests of cndiff.synthetic: key layout of the synthetic checkpoints and their values."""

from __future__ import annotations

import pickletools
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cndiff import synthetic as syn
from cndiff.synthetic import CONTROL_PREFIX, SD15, SD21, UNET_PREFIX, TensorSpec

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
