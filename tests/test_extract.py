"""extract(): bit-equality with the naive reference, key sets, dtypes, options."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
from conftest import assert_bit_equal, load_whole, naive_diff
from safetensors import safe_open
from safetensors.torch import load_file

import cndiff
from cndiff import synthetic

SD15_COUNTS = {"subtracted": 298, "copied": 42}


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize(
    "control_fmt,wrapped",
    [("pth", False), ("pth", True), ("legacy", False), ("safetensors", False)],
)
def test_bit_equal_to_naive(pair_factory, tmp_path, dtype, control_fmt, wrapped):
    control, base = pair_factory(control_fmt=control_fmt, wrapped=wrapped)
    r = cndiff.extract(control, base, tmp_path, dtype=dtype)
    want = naive_diff(control, base, dtype)
    got = load_file(str(r.output))
    assert_bit_equal(got, want)
    assert r.output.name == f"diff_{control.stem}_{dtype}.safetensors"
    assert (r.subtracted, r.copied) == (298, 42)
    assert r.keys_written == 341
    assert r.bytes == r.output.stat().st_size
    assert r.dtype == {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]


@pytest.mark.parametrize("base_fmt,flat", [("ckpt", False), ("ckpt", True), ("safetensors", True),
                                           ("legacy", False)])  # fmt: skip
def test_base_formats(pair_factory, tmp_path, base_fmt, flat):
    control, base = pair_factory(base_fmt=base_fmt, flat=flat)
    r = cndiff.extract(control, base, tmp_path / "out.safetensors")
    assert_bit_equal(load_file(str(r.output)), naive_diff(control, base, "fp16"))


def test_fp16_base_against_fp32_control_promotes(pair_factory, tmp_path):
    control, base = pair_factory(base_dtype=torch.float16, base_fmt="safetensors")
    assert load_whole(base)["model.diffusion_model.time_embed.0.weight"].dtype == torch.float16
    r = cndiff.extract(control, base, tmp_path, dtype="fp32")
    got = load_file(str(r.output))
    assert_bit_equal(got, naive_diff(control, base, "fp32"))
    # the subtraction really happened in float32 (an fp16 subtraction would round)
    c = load_whole(control)["control_model.time_embed.0.weight"]
    b = load_whole(base)["model.diffusion_model.time_embed.0.weight"]
    assert torch.equal(got["control_model.time_embed.0.weight"], c - b.float())


def test_fp16_control(pair_factory, tmp_path):
    control, base = pair_factory(control_dtype=torch.float16, control_fmt="safetensors")
    for dtype in ("fp16", "fp32", "bf16"):
        r = cndiff.extract(control, base, tmp_path, dtype=dtype, overwrite=True)
        assert_bit_equal(load_file(str(r.output)), naive_diff(control, base, dtype))


def test_unchanged_keys_kept_with_warning(sd15_pair, tmp_path, caplog):
    control, base = sd15_pair
    unchanged = synthetic.unchanged_control_keys(synthetic.tiny(), 2)
    with caplog.at_level(logging.WARNING, logger="cndiff"):
        r = cndiff.extract(control, base, tmp_path)
    assert sorted(r.unchanged) == sorted(unchanged)
    assert r.dropped == []
    got = load_file(str(r.output))
    for k in unchanged:
        assert k in got and not got[k].any()
    assert any(unchanged[0] in rec.getMessage() for rec in caplog.records)


def test_zero_control_only_keys_are_not_called_unchanged(tmp_path):
    # a fresh ControlNet's zero convolutions are all zeros: they have no base to equal,
    # so they are copied, and neither reported as unchanged nor dropped
    from safetensors.numpy import save_file

    arch = synthetic.tiny()
    _, base = synthetic.make_pair(tmp_path, arch, base_fmt="safetensors")
    c = synthetic.control_arrays(arch, layout="control-only")
    zero = [k for k in c if ".zero_convs." in k or "middle_block_out" in k]
    for k in zero:
        c[k] = c[k] * 0
    save_file(dict(c), str(tmp_path / "fresh.safetensors"))
    unchanged = synthetic.unchanged_control_keys(arch, 2)
    for drop in (False, True):
        r = cndiff.extract(tmp_path / "fresh.safetensors", base, tmp_path / f"{drop}.safetensors",
                           drop_unchanged=drop)  # fmt: skip
        assert sorted(r.dropped if drop else r.unchanged) == sorted(unchanged)
        assert set(zero) <= set(load_file(str(r.output)))


def test_drop_unchanged_reproduces_original(sd15_pair, tmp_path):
    control, base = sd15_pair
    unchanged = synthetic.unchanged_control_keys(synthetic.tiny(), 2)
    r = cndiff.extract(control, base, tmp_path, drop_unchanged=True)
    got = load_file(str(r.output))
    assert_bit_equal(got, naive_diff(control, base, "fp16", drop_unchanged=True))
    assert sorted(r.dropped) == sorted(unchanged)
    assert not set(unchanged) & set(got)
    assert r.keys_written == 341 - 2
    with safe_open(str(r.output), "pt") as f:
        assert f.metadata()["cndiff.dropped_keys"].split(",") == r.dropped


def test_sd21_pair(pair_factory, tmp_path):
    arch = synthetic.tiny(synthetic.SD21)
    control, base = pair_factory(arch=arch)
    r = cndiff.extract(control, base, tmp_path)
    got = load_file(str(r.output))
    assert_bit_equal(got, naive_diff(control, base, "fp16"))
    # SD2.x: linear proj_in, context width of the arch in attn2.to_k
    assert got["control_model.input_blocks.1.1.proj_in.weight"].dim() == 2
    assert (
        got["control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
        == arch.context_dim
    )
    assert (r.subtracted, r.copied) == (298, 42)


def test_base_self_equals_base_with_same_unet(pair_factory, tmp_path):
    control, base = pair_factory(embedded_unet="same")
    a = cndiff.extract(control, "self", tmp_path / "self.safetensors")
    b = cndiff.extract(control, base, tmp_path / "file.safetensors")
    assert a.output.read_bytes() != b""
    ga, gb = load_file(str(a.output)), load_file(str(b.output))
    assert_bit_equal(ga, gb)
    assert_bit_equal(ga, naive_diff(control, "self", "fp16"))


def test_chunking_and_workers_do_not_change_bytes(sd15_pair, tmp_path):
    control, base = sd15_pair
    ref = cndiff.extract(control, base, tmp_path / "a.safetensors").output.read_bytes()
    for chunk_mb, workers in [(0.001, 1), (0.002, 3), (64, 2)]:
        out = tmp_path / f"b{workers}.safetensors"
        cndiff.extract(control, base, out, chunk_mb=chunk_mb, workers=workers)
        assert out.read_bytes() == ref


def test_header_metadata_and_layout(sd15_pair, tmp_path):
    control, base = sd15_pair
    r = cndiff.extract(control, base, tmp_path)
    raw = r.output.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert meta["format"] == "pt"
    assert meta["cndiff.version"] == cndiff.__version__
    assert meta["cndiff.kind"] == "difference"
    assert meta["cndiff.source"] == control.name
    assert meta["cndiff.source_size"] == str(control.stat().st_size)
    assert meta["cndiff.base"] == base.name
    assert meta["cndiff.base_size"] == str(base.stat().st_size)
    assert meta["cndiff.dtype"] == "float16"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/controlnet"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert "cndiff.source_sha256" not in meta
    # data regions are contiguous, in order, and fill the file exactly
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert header["difference"] == {"dtype": "F16", "shape": [], "data_offsets": spans[-1]}
    with safe_open(str(r.output), "pt") as f:
        assert f.get_tensor("difference").item() == 1.0


def test_result_is_deterministic(sd15_pair, tmp_path):
    control, base = sd15_pair
    a = cndiff.extract(control, base, tmp_path / "1.safetensors")
    b = cndiff.extract(control, base, tmp_path / "2.safetensors")
    assert a.output.read_bytes() == b.output.read_bytes()
    import hashlib

    assert a.sha256 == hashlib.sha256(a.output.read_bytes()).hexdigest() == b.sha256


def test_writer_sha256_is_the_files_while_the_caller_reuses_its_buffer(tmp_path):
    """The writer hashes behind the caller, from its own copies: the digest is the file's
    even when the caller overwrites its buffer right after each write, and for writes of
    every size (tiny ones copied, large ones in reused buffers that grow and shrink, more
    writes than buffers)."""
    import hashlib

    import numpy as np

    from cndiff.dtypes import F16
    from cndiff.writer import OutputEntry, SafetensorsWriter

    sizes = [3, 40_000, 3_000_000, 70_000, 5_000_000, 1, 200_000, 2_500_000, 65_536] * 2
    entries = [OutputEntry(f"t{i}", F16, (n,)) for i, n in enumerate(sizes)]
    buf = np.empty(max(sizes), np.float16)
    rng = np.random.default_rng(7)
    wanted = []
    target = tmp_path / "o.safetensors"
    with SafetensorsWriter(target, entries) as w:
        for n in sizes:
            buf[:n] = rng.standard_normal(n).astype(np.float16)
            wanted.append(buf[:n].tobytes())
            w.write(buf[:n])
            buf[:n] = 0  # reused at once, as the engine reuses its slots
        w.commit()
    data = target.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    assert data[8 + hlen :] == b"".join(wanted)
    assert w.sha256 == hashlib.sha256(data).hexdigest()


def test_writer_keeps_a_lent_buffer_until_written_and_hashed(tmp_path):
    """``write(data, release)``: no copy; ``release`` is called once per write, only after
    the bytes are written and hashed (here it scribbles over the buffer at once, as the
    engine reuses a slot), and no more than the writer's depth are held at a time."""
    import hashlib
    import threading

    import numpy as np

    from cndiff.dtypes import F16
    from cndiff.writer import OutputEntry, SafetensorsWriter

    sizes = [3, 40_000, 3_000_000, 70_000, 5_000_000, 1, 200_000, 2_500_000, 65_536] * 3
    entries = [OutputEntry(f"t{i}", F16, (n,)) for i, n in enumerate(sizes)]
    rng = np.random.default_rng(11)
    wanted, released, held, most = [], [], [0], [0]
    lock = threading.Lock()

    def lend(buf: np.ndarray, i: int):
        with lock:
            held[0] += 1
            most[0] = max(most[0], held[0])

        def release() -> None:
            buf[:] = 0  # reused at once
            with lock:
                held[0] -= 1
                released.append(i)

        return release

    target = tmp_path / "o.safetensors"
    with SafetensorsWriter(target, entries) as w:
        for i, n in enumerate(sizes):
            buf = rng.standard_normal(n).astype(np.float16)
            wanted.append(buf.tobytes())
            w.write(buf, lend(buf, i))
        w.commit()
    data = target.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    assert data[8 + hlen :] == b"".join(wanted)
    assert w.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(released) == list(range(len(sizes))) and held[0] == 0
    assert most[0] <= 4 + 1  # the writer's depth (and the one being handed over)


def test_never_reads_non_control_tensors(sd15_pair, tmp_path, monkeypatch):
    from cndiff.inputs import checkpoint as ck

    control, base = sd15_pair
    read_keys: list[str] = []
    orig = ck.Checkpoint.read_into

    def spy(self, key, out, start=0):
        read_keys.append(key)
        return orig(self, key, out, start)

    monkeypatch.setattr(ck.Checkpoint, "read_into", spy)
    cndiff.extract(control, base, tmp_path)
    assert read_keys
    assert all(k.startswith(("control_model.", "model.diffusion_model.")) for k in read_keys)
    # from the control file only control_model.* is read
    assert {k for k in read_keys if k.startswith("control_model.")} == {
        k for k in load_whole(control) if k.startswith("control_model.")
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_cuda_bit_identical_to_cpu(pair_factory, tmp_path, dtype):
    control, base = pair_factory(base_dtype=torch.float16, base_fmt="safetensors")
    cpu = cndiff.extract(control, base, tmp_path / "cpu.safetensors", dtype=dtype, device="cpu")
    gpu = cndiff.extract(control, base, tmp_path / "gpu.safetensors", dtype=dtype, device="cuda")
    assert gpu.device.startswith("cuda")
    assert cpu.output.read_bytes() == gpu.output.read_bytes()
