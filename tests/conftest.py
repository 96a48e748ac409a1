"""Shared fixtures: synthetic checkpoint pairs and the naive reference algorithm."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cndiff import synthetic

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_whole(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint entirely, as the original script does (trusted test files only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    with synthetic.lightning_stub():
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    return obj.get("state_dict", obj)


def naive_diff(control: Path, base: Path | str, dtype: str, drop_unchanged: bool = False):
    """The reference algorithm, in memory: what every cndiff output must equal bit for bit."""
    c = load_whole(control)
    b = c if str(base) == "self" else load_whole(base)
    tdt = _TORCH_DTYPES[dtype]
    out: dict[str, torch.Tensor] = {}
    for k, v in c.items():
        if not k.startswith("control_model."):
            continue
        bk = "model.diffusion_model." + k[len("control_model.") :]
        if bk in b:
            d = v.to(torch.float32) - b[bk].to(torch.float32)
            if drop_unchanged and torch.max(torch.abs(d)) < 1e-6:
                continue
        else:
            d = v
        out[k] = d.to(tdt)
    out["difference"] = torch.tensor(1.0).to(tdt)
    return out


def assert_bit_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        g, w = got[k], want[k]
        assert g.dtype == w.dtype, k
        assert g.shape == w.shape, k
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


@pytest.fixture(scope="session")
def sd15_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SD1.5 control (.pth, fp32) and its Lightning-style base (.ckpt)."""
    folder = tmp_path_factory.mktemp("sd15")
    return synthetic.make_pair(folder, synthetic.tiny())


@pytest.fixture(scope="session")
def pair_factory(tmp_path_factory):
    """Make (and cache) tiny pairs with the given make_pair options."""
    cache: dict[tuple, tuple[Path, Path]] = {}

    def make(**kw) -> tuple[Path, Path]:
        arch = kw.pop("arch", synthetic.tiny())
        key = (arch.name, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp("pair")
            cache[key] = synthetic.make_pair(folder, arch, **kw)
        return cache[key]

    return make
