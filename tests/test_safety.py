"""No checkpoint can run code; real Lightning checkpoints load without pytorch_lightning."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch

import cndiff
from cndiff import open_checkpoint, synthetic
from cndiff.errors import CheckpointError, UnsafeCheckpointError


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_calling_os_system_is_refused(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    sd = {"control_model.x": torch.zeros(2), "boom": _Exploit(marker)}
    torch.save(sd, str(path), _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"'(posix|os)\.system'"):
        open_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        cndiff.extract(path, "self", tmp_path)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]


def test_eval_and_getattr_are_refused(tmp_path):
    path = tmp_path / "evil2.pth"
    torch.save({"a": _EvalExploit()}, str(path))
    with pytest.raises(UnsafeCheckpointError, match=r"(__builtin__|builtins)\.eval"):
        open_checkpoint(path)
    raw = b"\x80\x02cbuiltins\ngetattr\nq\x00."
    bare = tmp_path / "bare.ckpt"
    bare.write_bytes(raw)
    with pytest.raises(UnsafeCheckpointError, match="builtins.getattr"):
        open_checkpoint(bare)


def test_bare_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.ckpt"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(CheckpointError, match="bare pickle"):
        open_checkpoint(path)


def test_lightning_base_loads_without_pytorch_lightning(sd15_pair):
    _, base = sd15_pair
    assert "pytorch_lightning" not in sys.modules
    with open_checkpoint(base) as ck:
        assert ck.wrapped
        assert {"callbacks", "epoch", "global_step"} <= set(ck.extras)
        assert len([k for k in ck.tensors if k.startswith("model.diffusion_model.")]) == 686
    assert "pytorch_lightning" not in sys.modules
    # torch's own safe loader refuses the same file, which is why the original crashes
    with pytest.raises(Exception, match="ModelCheckpoint|Unsupported global"):
        torch.load(str(base), weights_only=True)


def test_cuda_saved_tensors_open_on_cpu(tmp_path):
    # Rewrite the location tag of a CPU save to "cuda:0", as a file saved from a GPU has.
    import zipfile

    src = tmp_path / "cpu.pth"
    torch.save({"control_model.a": torch.arange(4.0)}, str(src))
    dst = tmp_path / "gpu.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            zout.writestr(item, data)
    with open_checkpoint(dst) as ck:
        assert ck.read("control_model.a").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_storage_smaller_than_view_is_refused(tmp_path):
    path = tmp_path / "short.pth"
    t = torch.arange(8.0)
    torch.save({"a": t}, str(path))
    import zipfile

    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("data.pkl"):
                # shape (8,) -> (80,): the view reaches past its 8-element storage
                data = data.replace(b"K\x08\x85", b"KP\x85", 1)
            zout.writestr(item, data)
    with pytest.raises(CheckpointError, match="reaches element"):
        open_checkpoint(bad)


def test_synthetic_base_pickle_mentions_lightning(sd15_pair):
    import zipfile

    _, base = sd15_pair
    with zipfile.ZipFile(base) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        assert b"pytorch_lightning.callbacks.model_checkpoint" in z.read(pkl)
    assert synthetic is not None


@pytest.mark.parametrize("enabled", [True, False])
def test_opening_pauses_the_garbage_collector_and_restores_it(tmp_path, enabled):
    """The collector is paused while an index is read (a state dict's pickle builds tens of
    thousands of objects): whatever it was before comes back, after a refusal too."""
    import gc

    good = tmp_path / "good.pth"
    torch.save({"a": torch.ones(3)}, good)
    bad = tmp_path / "bad.pth"
    with open(bad, "wb") as f:
        pickle.dump({"a": os.system}, f, protocol=2)
    seen: list[bool] = []
    real = cndiff.inputs.torchfile.restricted_load

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cndiff.inputs.torchfile, "restricted_load", spy)
            open_checkpoint(good).close()
            assert gc.isenabled() is enabled
            with pytest.raises(CheckpointError):
                open_checkpoint(bad)
            assert gc.isenabled() is enabled
        assert seen == [False, False]
    finally:
        (gc.enable if was else gc.disable)()
