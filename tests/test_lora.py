"""Control-LoRA export: format rules, exactness, rank choice, compatibility.

The oracle for what a file means is computed here with torch from the file itself
(``W_base + up.flatten(1) @ down.flatten(1)``, as ComfyUI's ControlLora does), never with
cndiff's own rebuild."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import load_whole
from safetensors.torch import load_file, save_file

import cndiff
from cndiff import synthetic
from cndiff.backends.numpy_backend import NumpyDecomposition
from cndiff.backends.torch_backend import TorchBackend
from cndiff.errors import CndiffError, IncompatibleBaseError, OutputExistsError
from cndiff.inputs import open_checkpoint
from cndiff.inputs.views import control_view, unet_view
from cndiff.lora import MARKER_KEY, layout_counts, lora_layout
from cndiff.plan import plan_pairs

CP = "control_model."
UP = "model.diffusion_model."
SDXL_PROBE = "input_blocks.11.0.in_layers.0.weight"  # sd-webui-controlnet: absent => SDXL


def export(control, base, out, **kw):
    """A Control-LoRA through the public API; returns the result (figures in .lora)."""
    return cndiff.extract(control, base, out, format="control-lora", **kw)


def rebuild(lora_file: Path, base_file: Path, key: str) -> torch.Tensor:
    """What the loaders compute for ControlNet key ``key``, from the files, with torch."""
    lo = load_file(str(lora_file))
    name = key.removeprefix(CP)
    if name in lo:
        return lo[name].float()
    b = load_whole(base_file)[UP + name].float()
    module = name.removesuffix(".weight")
    if module + ".up" in lo:
        up, down = lo[module + ".up"].float(), lo[module + ".down"].float()
        return b + (up.flatten(1) @ down.flatten(1)).reshape(b.shape)
    return b


def _specs(arch):
    control = {s.key: s for s in synthetic.control_spec(arch)}
    base = {s.key: s for s in synthetic.base_spec(arch)}
    return control, base


def _layout(arch, **kw):
    """The Control-LoRA layout of ``arch``'s ControlNet against its base, from shapes."""
    control, base = _specs(arch)
    items = plan_pairs(control_view(control), unet_view(base))
    return lora_layout(items, **kw)


def _mirrored_weights(arch) -> list[str]:
    """control_model.* Linear/Conv2d weights that the UNet also has."""
    control, base = _specs(arch)
    return [
        k
        for k, s in control.items()
        if k.startswith(CP)
        and k.endswith(".weight")
        and len(s.shape) in (2, 4)
        and UP + k[len(CP) :] in base
    ]


# -- layout from shapes only ------------------------------------------------------------------


def test_stability_layout_matches_public_sd15_files():
    layout = _layout(synthetic.SD15, rank=128, stability_compatible=True)
    assert layout_counts(layout) == (463, 67_835_680)
    factored = [e for e in layout if e.kind == "lora"]
    assert len(factored) == 122
    kinds = {"linear": 0, "conv3": 0, "conv1": 0}
    for e in factored:
        if len(e.shape) == 2:
            kinds["linear"] += 1
        else:
            kinds["conv3" if e.shape[2:] == (3, 3) else "conv1"] += 1
        assert e.rank == min(128, e.shape[0], e.shape[1])
    assert kinds == {"linear": 82, "conv3": 24, "conv1": 16}
    names = {e.name for e in factored}
    assert {"time_embed.0", "time_embed.2", "input_blocks.0.0"} <= names


def test_default_layout_full_size_sd15():
    layout = _layout(synthetic.SD15, rank=128)
    full = [e.name for e in layout if e.kind == "weight"]
    # 320x4x3x3: rank-36 factors (12,816) would be larger than the weight (11,520)
    assert full == ["input_blocks.0.0.weight"]
    for e in layout:
        if e.kind == "lora":
            m, n = e.shape[0], math.prod(e.shape[1:])
            assert e.rank * (m + n) < m * n
    # Stability stores input_blocks.0.0 as rank-4 factors (1,424 parameters): same otherwise
    assert layout_counts(layout) == (463 - 1, 67_835_680 - 1_424 + 11_520)


@pytest.mark.parametrize("arch", [synthetic.SD15, synthetic.SD21], ids=["sd15", "sd21"])
@pytest.mark.parametrize("stability", [False, True], ids=["plain", "stability"])
def test_layout_rules(arch, stability):
    control, base = _specs(arch)
    layout = _layout(arch, rank=64, stability_compatible=stability)
    keys = [k for e in layout for k, _ in e.outputs]
    assert len(keys) == len(set(keys))
    assert not any(k.startswith(CP) for k in keys)
    mirrored = {k[len(CP) :] for k in _mirrored_weights(arch)}
    for w in mirrored:
        module = w[: -len(".weight")]
        has_lora = module + ".up" in keys
        assert has_lora == (module + ".down" in keys), w
        assert has_lora != (w in keys), f"{w}: exactly one of .weight and .up/.down"
    # everything else is copied: biases, norms, ControlNet-only modules, and nothing more
    others = {k[len(CP) :] for k in control if k.startswith(CP)} - mirrored
    assert {k for k in keys if not k.endswith((".up", ".down"))} - mirrored == others
    assert all(not k.endswith(".alpha") for k in keys)
    assert SDXL_PROBE in keys


# -- files from tiny synthetic models ---------------------------------------------------------


def test_tiny_files_follow_the_rules(pair_factory, tmp_path):
    for arch in (synthetic.tiny(), synthetic.tiny(synthetic.SD21)):
        control, base = pair_factory(arch=arch)
        res = export(control, base, tmp_path / f"{arch.name}.safetensors", rank=2)
        sd = load_file(str(res.output))
        assert len(sd) == res.keys_written
        assert sum(v.numel() for v in sd.values()) == res.lora.params
        marker = sd.pop(MARKER_KEY)
        assert marker.dtype == torch.float32 and tuple(marker.shape) == (0,)
        assert all(v.dtype == torch.float16 for v in sd.values())
        assert SDXL_PROBE in sd
        with open_checkpoint(control) as ck:
            names = {k[len(CP) :]: i.shape for k, i in ck.tensors.items() if k.startswith(CP)}
        for w in (k[len(CP) :] for k in _mirrored_weights(arch)):
            module = w[: -len(".weight")]
            shape = names[w]
            if module + ".up" in sd:
                assert w not in sd
                up, down = sd[module + ".up"], sd[module + ".down"]
                r = up.shape[1]
                if len(shape) == 2:
                    assert up.shape == (shape[0], r) and down.shape == (r, shape[1])
                else:
                    assert up.shape == (shape[0], r, 1, 1)
                    assert down.shape == (r, *shape[1:])
            else:
                assert sd[w].shape == shape
        assert {k for k in sd if not k.endswith((".up", ".down"))} >= {
            k for k in names if not k.endswith(".weight") or k.startswith("zero_convs")
        }


def test_stability_file_tiny(pair_factory, tmp_path):
    control, base = pair_factory()
    res = export(control, base, tmp_path / "s.safetensors", stability_compatible=True)
    sd = load_file(str(res.output))
    assert len(sd) == 463 and res.lora.full == 0 and res.lora.factored == 122
    assert sum(1 for k in sd if k.endswith(".up")) == 122
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k != MARKER_KEY)
    # both factors are clamped to ±(their 0.99 quantile): ~1% of the values sit at +bound
    for module in ("input_blocks.4.0.in_layers.2", "time_embed.2"):
        vals = torch.cat([sd[module + ".up"].flatten(), sd[module + ".down"].flatten()]).float()
        hi = float(vals.max())
        assert float(vals.min()) >= -hi
        assert int((vals == hi).sum()) >= 0.009 * vals.numel() - 1


@pytest.fixture(scope="module")
def lowrank_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SD1.5 pair whose mirrored Linear/Conv2d differences have rank exactly 2."""
    folder = tmp_path_factory.mktemp("lowrank")
    arch = synthetic.tiny()
    base = synthetic.base_state_dict(arch)
    ctl = synthetic.control_state_dict(arch)
    g = torch.Generator().manual_seed(1)
    for k in _mirrored_weights(arch):
        b = base[UP + k[len(CP) :]]
        m, n = b.shape[0], b[0].numel()
        d = torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g) * 0.01
        ctl[k] = b + d.reshape(b.shape)
    ctl = {k: v for k, v in ctl.items() if k.startswith(CP)}
    cpath, bpath = folder / "control_lowrank.safetensors", folder / "base.safetensors"
    save_file({k: v.contiguous() for k, v in ctl.items()}, str(cpath))
    save_file({k: v.contiguous() for k, v in base.items()}, str(bpath))
    return cpath, bpath


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("svd", ["auto", "exact", "lowrank"])
def test_known_low_rank_is_recovered(lowrank_pair, tmp_path, svd, backend):
    control, base = lowrank_pair
    res = export(control, base, tmp_path, rank=2, dtype="fp32", svd=svd, backend=backend)
    assert res.output.name == f"control_lora_rank2_{control.stem}_fp32.safetensors"
    assert res.lora.factored > 100
    assert res.lora.diff_error < 1e-5, res.lora.worst(3)
    assert all(x.diff_error < 1e-5 and x.rank == 2 for x in res.lora.layers if x.kind == "lora")
    assert res.lora.energy == pytest.approx(1.0, abs=1e-6)
    for layer in res.lora.layers[:20]:  # the file itself reproduces the control
        c = load_file(str(control))[layer.key].float()
        w = rebuild(res.output, base, layer.key)
        assert float((w - c).norm()) <= 1e-5 * float(c.norm()) + 1e-6, layer.key


def test_torch_cpu_workers_use_one_thread_each_and_restore_torch(lowrank_pair, tmp_path,
                                                                monkeypatch):  # fmt: skip
    # torch's CPU thread count is per thread (OpenMP): each worker must set its own, or
    # the workers and torch's pool fight over the cores; the caller's setting is restored
    control, base = lowrank_pair
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    before = torch.get_num_threads()
    export(control, base, tmp_path, rank=2, backend="torch", workers=2)
    assert seen and set(seen[:-1]) == {1} and seen[-1] == before
    assert torch.get_num_threads() == before
    seen.clear()
    export(control, base, tmp_path, rank=2, backend="torch", workers=1, overwrite=True)
    assert seen == []  # one worker: torch keeps its own pool


def test_rebuild_as_loaders_do_within_reported_error(lowrank_pair, tmp_path):
    control, base = lowrank_pair
    res = export(control, base, tmp_path / "r1.safetensors", rank=1)
    assert 0.01 < res.lora.diff_error < 1.0
    want = load_file(str(control))
    have_base = load_file(str(base))
    for layer in res.lora.layers:
        w = rebuild(res.output, base, layer.key)
        c = want[layer.key].float()
        d = c - have_base[UP + layer.key[len(CP) :]].float()
        err = float((w - c).norm())
        # the reported weight error is measured after rounding the factors to fp16
        assert layer.weight_error == pytest.approx(err / float(c.norm()), rel=1e-3, abs=1e-7)
        # the difference error (before rounding) is close to the same figure over ||D||
        assert err == pytest.approx(layer.diff_error * float(d.norm()), rel=0.05, abs=1e-6)
    # biases and norms are the control's absolute values
    k = "input_blocks.1.0.in_layers.0.bias"
    assert torch.equal(rebuild(res.output, base, CP + k), want[CP + k].half().float())


def test_max_error_picks_the_smallest_rank():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(60, 8, generator=g))
    s = torch.tensor([8.0, 4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    d = (u * s) @ v.T
    total = float((s**2).sum())
    tails = [math.sqrt(float((s[r:] ** 2).sum()) / total) for r in range(9)]
    decs = [NumpyDecomposition(d.numpy(), m, 40) for m in ("gram", "exact")]
    decs += [TorchBackend("cpu").decompose(d.numpy(), m, 40) for m in ("gram", "exact")]
    for dec in decs:
        for r in range(1, 8):
            # just above tails[r] -> r; just below -> r + 1
            assert dec.rank_for(tails[r] * 1.001) == r
            assert dec.rank_for(tails[r] * 0.999) == r + 1
        up, down, kept = dec.factors(3, "balanced")
        up, down = torch.from_numpy(up), torch.from_numpy(down)
        assert float((d - up @ down).norm() / d.norm()) == pytest.approx(tails[3], rel=1e-4)


def test_max_error_end_to_end(lowrank_pair, tmp_path):
    control, base = lowrank_pair
    res = export(control, base, tmp_path, max_error=1e-3, dtype="fp32")
    assert res.output.name.startswith("control_lora_maxerr0.001_")
    assert all(x.diff_error <= 1e-3 for x in res.lora.layers)
    assert {x.rank for x in res.lora.layers if x.kind == "lora"} == {2}
    loose = export(control, base, tmp_path / "l.safetensors", max_error=0.9)
    assert all(x.diff_error <= 0.9 for x in loose.lora.layers)
    assert {x.rank for x in loose.lora.layers if x.kind == "lora"} == {1}
    assert loose.bytes < res.bytes
    # the printed figure follows --max-error
    assert loose.lora.diff_error > res.lora.diff_error


def test_errors(pair_factory, tmp_path, sd15_pair):
    control, base = sd15_pair
    with pytest.raises(CndiffError, match="not both"):
        export(control, base, tmp_path, rank=4, max_error=0.1)
    with pytest.raises(CndiffError, match="lowrank"):
        export(control, base, tmp_path, max_error=0.1, svd="lowrank")
    with pytest.raises(CndiffError, match="stability"):
        export(control, base, tmp_path, max_error=0.1, stability_compatible=True)
    sd21_control, _ = pair_factory(arch=synthetic.tiny(synthetic.SD21))
    with pytest.raises(IncompatibleBaseError):
        export(sd21_control, base, tmp_path)
    out = tmp_path / "x.safetensors"
    export(control, "self", out, rank=2)
    assert export(control, "self", out, rank=2).status == "skipped"  # the same job
    with pytest.raises(OutputExistsError, match="different job"):
        export(control, "self", out, rank=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


# -- wired into extract / CLI / batch / verify / inspect -------------------------------------


def test_cli_extract_control_lora_verify_and_inspect(sd15_pair, tmp_path, capsys):
    from cndiff import inspect_file
    from cndiff.cli import main

    control, base = sd15_pair
    rc = main(["extract", str(control), str(base), "-o", str(tmp_path), "--format",
               "control-lora", "--rank", "2", "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    path = tmp_path / f"control_lora_rank2_{control.stem}_fp16.safetensors"
    assert str(path) in out and "relative error of the differences" in out
    assert "largest error" in out
    rep = inspect_file(path)
    assert rep.kind == "control-lora" and rep.arch.startswith("SD1.x")
    assert rep.metadata["cndiff.kind"] == "control-lora"
    args = ["verify", str(path), "--control", str(control), "--base", str(base), "-q", "--json"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["file_kind"] == "control-lora" and data["passed"] is True
    assert 0 < data["diff_error"] < 1 and 0 < data["weight_error"] < data["diff_error"]
    assert len(data["keys"]) == 340


def test_verify_lora_rebuild_matches_reported_error(sd15_pair, tmp_path):
    control, base = sd15_pair
    res = cndiff.extract(control, base, tmp_path, format="control-lora", rank=2, dtype="fp32")
    rep = cndiff.verify(res.output, control, base)
    full = load_whole(control)
    by_key = {k.key: k for k in rep.keys}
    num = den = 0.0
    for layer in res.lora.layers:
        key = layer.key
        w = rebuild(res.output, base, key)
        c = full[key]
        err = float(torch.linalg.vector_norm((w - c).double()))
        cn = float(torch.linalg.vector_norm(c.double()))
        num, den = num + err**2, den + cn**2
        # export and verify report what the file rebuilds to
        assert by_key[key].weight_error == pytest.approx(err / cn, rel=1e-3, abs=1e-7)
        assert layer.weight_error == pytest.approx(err / cn, rel=1e-3, abs=1e-7)
    assert rep.passed
    assert res.lora.weight_error == pytest.approx(math.sqrt(num / den), rel=1e-3)


def test_verify_lora_structural_errors(sd15_pair, tmp_path):
    control, base = sd15_pair
    res = cndiff.extract(control, base, tmp_path, format="control-lora", rank=2)
    t = load_file(str(res.output))
    t["input_blocks.1.1.proj_in.alpha"] = torch.tensor(1.0)
    del t["zero_convs.0.0.bias"]
    t["time_embed.0.weight"] = torch.zeros(1)  # both .weight and .up/.down
    bad = tmp_path / "bad.safetensors"
    save_file(t, str(bad))
    rep = cndiff.verify(bad, control, base)
    assert not rep.passed
    assert "zero_convs.0.0.bias" in rep.missing
    assert "input_blocks.1.1.proj_in.alpha" in rep.extra
    assert "time_embed.0.weight" in rep.extra
    t = load_file(str(res.output))
    t["zero_convs.0.0.bias"] = torch.full_like(t["zero_convs.0.0.bias"], float("nan"))
    save_file(t, str(bad))
    assert cndiff.verify(bad, control, base).nonfinite == ["zero_convs.0.0.bias"]


def test_lora_options_need_the_format(sd15_pair, tmp_path):
    control, base = sd15_pair
    with pytest.raises(CndiffError, match="need --format control-lora"):
        cndiff.extract(control, base, tmp_path, rank=8)
    with pytest.raises(CndiffError, match="format"):
        cndiff.extract(control, base, tmp_path, format="lycoris")
    assert list(tmp_path.iterdir()) == []


def test_batch_control_lora(sd15_pair, tmp_path):
    from cndiff import extract_many

    control, base = sd15_pair
    results = extract_many([control], base, tmp_path, format="control-lora", rank=2)
    assert [r.status for r in results] == ["written"]
    assert results[0].output.name.startswith("control_lora_rank2_")


def test_lora_provenance_metadata(sd15_pair, tmp_path):
    from safetensors import safe_open

    control, base = sd15_pair
    res = cndiff.extract(control, base, tmp_path, format="control-lora", rank=2)
    with safe_open(str(res.output), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/control-lora"
    assert meta["cndiff.kind"] == "control-lora"
    assert meta["cndiff.source"] == control.name and meta["cndiff.base"] == base.name
    assert meta["cndiff.rank"] == "2" and meta["cndiff.svd"] == "gram"
    assert "cndiff.diff_error" not in meta  # (written before the errors are known)
