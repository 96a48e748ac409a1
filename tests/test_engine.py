"""The numpy kernels: bit-identical to torch's casts (the reference) on every kind of value."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import cndiff
from cndiff import engine
from cndiff.dtypes import BF16, F16


def _all_patterns(step: int) -> np.ndarray:
    """Every ``step``-th float32 bit pattern, plus every special neighbourhood."""
    u = np.arange(0, 1 << 32, step, dtype=np.uint64).astype(np.uint32)
    specials = []
    for centre in [0, 0x33000000, 0x387FE000, 0x38800000, 0x477FE000, 0x477FF000, 0x47800000,
                   0x7F800000, 0x7FC00000, 0x3F800000]:  # fmt: skip
        specials.append(np.arange(centre - 4096, centre + 4096, dtype=np.int64))
    sp = np.concatenate(specials) % (1 << 32)
    sp = np.concatenate([sp, sp | (1 << 31)]).astype(np.uint32)
    return np.concatenate([u, sp])


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_numpy_casts_match_torch_bit_for_bit(dtype):
    u = _all_patterns(251)
    x = u.view(np.float32)
    out = np.empty(x.size, dtype=dtype.numpy)
    tmp = np.empty(x.size, dtype=np.uint32)
    tmp2 = np.empty(x.size, dtype=np.uint32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dtype is F16:
            engine._f16_round(x, out, tmp, tmp2)
        else:
            engine._bf16_round(x, out, tmp)
    ref = torch.from_numpy(x).to(dtype.to_torch()).view(torch.int16).numpy().view(np.uint16)
    got = out.view(np.uint16)
    finite = ~np.isnan(x)
    assert np.array_equal(got[finite], ref[finite])
    # NaN stays NaN (fp16: same bits as torch's x86 conversion; bf16: canonical 0x7FC0)
    nan = ~finite
    assert np.all((got[nan] & 0x7FFF) > (0x7C00 if dtype is F16 else 0x7F80))


def test_numpy_path_used_when_torch_is_not_loaded(sd15_pair, tmp_path, monkeypatch):
    control, base = sd15_pair
    with_torch = cndiff.extract(control, base, tmp_path / "a.safetensors", dtype="fp16")
    monkeypatch.setattr(engine, "_loaded_torch", lambda: None)
    for dtype in ("fp16", "bf16"):
        a = cndiff.extract(control, base, tmp_path / f"np_{dtype}.safetensors", dtype=dtype)
        monkeypatch.undo()
        b = cndiff.extract(control, base, tmp_path / f"t_{dtype}.safetensors", dtype=dtype)
        monkeypatch.setattr(engine, "_loaded_torch", lambda: None)
        assert a.output.read_bytes() == b.output.read_bytes()
    assert with_torch.output.read_bytes() == (tmp_path / "t_fp16.safetensors").read_bytes()
