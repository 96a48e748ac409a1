"""The native pickle machine (``cndiff._pickle_vm``) against the Python machine.

``restricted_load`` gives a zip-format pickle to the C machine first. That one either
reads it or gives nothing, and then the Python machine reads the pickle from the start.
So where the C machine answers, its answer must be the Python machine's: the same
objects, the same end, the same storages in the same order. And it must give nothing for
every pickle the Python machine refuses.

The corpus:
- torch.save's pickles of generated state dicts;
- a Lightning checkpoint (callback state with numpy scalars, ``_codecs.encode``);
- the synthetic SD files;
- the hand-made hostile seeds;
- thousands of byte-level mutations of them.

Each test also checks that the fast path was taken at all: a C machine that always gave
nothing would pass the rest.
"""

from __future__ import annotations

import io
import math
import random
import zipfile

import numpy as np
import pytest
import torch
from fuzz.differential import VIEWS, view_of
from fuzz.hostile import (
    MARK,
    MUTATIONS,
    SEEDS,
    SETITEMS,
    TUPLE,
    mutate,
    op_get,
    op_int,
    op_put,
    op_str,
)
from fuzz.hostile import pickle_of as whole_pickle

from cndiff import open_checkpoint, synthetic
from cndiff.errors import CheckpointError
from cndiff.inputs import unpickle
from cndiff.inputs.unpickle import (
    Opaque,
    StorageRef,
    TensorRef,
    native_load,
    restricted_load,
    work_limit,
)

pytestmark = pytest.mark.skipif(unpickle.native_vm is None, reason="cndiff._pickle_vm not built")


def canon(obj):
    """``obj`` as plain comparable data. The allowed globals and stand-in classes are
    fresh for every machine, so they are compared by name."""
    t = type(obj)
    if isinstance(obj, dict):
        return (t.__name__, [(canon(k), canon(v)) for k, v in obj.items()])
    if t is tuple or t is list:
        return (t.__name__, [canon(x) for x in obj])
    if t is TensorRef:
        return ("tensor", canon(obj.storage), obj.offset, obj.shape, obj.stride)
    if t is StorageRef:
        return ("storage", obj.key, obj.dtype.name, obj.numel, obj.location)
    if isinstance(obj, Opaque):
        return ("opaque", obj.qualname, canon(obj.args), canon(obj.state))
    if hasattr(obj, "describe") and not isinstance(obj, (str, bytes)):
        return ("global", obj.describe)
    if t is float:
        return ("float", "nan" if math.isnan(obj) else obj.hex())
    return (t.__name__, obj)


def outcome(data: bytes, **kw) -> tuple:
    try:
        u = restricted_load(data, pids="zip", **kw)
    except CheckpointError as exc:
        return ("refused", type(exc).__name__, str(exc))
    return ("read", canon(u.obj), u.end, canon(u.storages))


def pickle_of(blob: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return pickle_of(buf.getvalue())


def same_reading(data: bytes) -> bool:
    """Both machines give the same outcome; True when the C machine answered."""
    fast = native_load(data)
    slow = outcome(data, native=False)
    assert outcome(data) == slow
    if fast is None:
        return False
    assert slow[0] == "read", slow
    assert ("read", canon(fast.obj), fast.end, canon(fast.storages)) == slow
    # (as in the Python machine, a storage named twice is one object)
    assert all(t.storage is fast.storages[t.storage.key] for t in tensors_in(fast.obj))
    return True


def tensors_in(obj) -> list[TensorRef]:
    if isinstance(obj, TensorRef):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool]  # fmt: skip


def random_state_dict(rng: random.Random) -> dict:
    sd: dict = {}
    for i in range(rng.randint(0, 6)):
        shape = tuple(rng.choice([0, 1, 2, 3, 4]) for _ in range(rng.randint(0, 3)))
        t = torch.zeros(shape, dtype=rng.choice(DTYPES))
        view = rng.choice([*VIEWS, "shared"])
        if view == "shared" and t.numel() > 1:
            sd[f"v{i}"] = t.reshape(-1)[1:]
        t = view_of(t, view)
        sd[rng.choice(["control_model.", "model.diffusion_model.", "", "é☃"]) + f"w{i}"] = t
    if rng.random() < 0.5:
        sd["epoch"] = rng.choice([0, 7, -5, 300, 70000, -(2**31)])
        sd["note"] = rng.choice(["", "x", "ünï"])
        sd["list"] = [1, 2.5, "x", None, True, b"raw"]
        sd["nested"] = {"a": (1, 2), "b": {}}
    if rng.random() < 0.5:
        sd = {"state_dict": sd, "global_step": rng.randint(0, 255)}
    return sd


def lightning_checkpoint() -> bytes:
    """A state dict wrapped as PyTorch Lightning 1.x saved one (the SD releases): the
    callbacks keyed by their class, numpy scalars, strings; torch.save's pickle."""
    sd = {"model.diffusion_model.w": torch.ones(2, 3), "cond_stage_model.b": torch.zeros(3)}
    with synthetic.lightning_stub() as model_checkpoint:
        cb = {
            "monitor": None,
            "best_model_score": np.float64(0.1234),
            "best_model_path": "",
            "current_score": np.float64(-1.5),
            "dirpath": "/logs/checkpoints",
        }
        return saved({"epoch": 6, "global_step": 840000, "pytorch-lightning_version": "1.4.2",
                      "callbacks": {model_checkpoint: cb}, "state_dict": sd})  # fmt: skip


def test_torch_save_pickles_read_the_same_and_fast():
    rng = random.Random(1)
    fast = 0
    for _ in range(60):
        fast += same_reading(saved(random_state_dict(rng)))
    assert fast == 60  # (all of them: these use only the opcodes and calls it reads)


def test_lightning_checkpoint_reads_the_same_and_fast():
    data = lightning_checkpoint()
    assert b"ModelCheckpoint" in data and b"_codecs" in data and b"scalar" in data
    assert same_reading(data)
    got = native_load(data).obj
    (cb,) = got["callbacks"].values()
    assert [type(k).__name__ for k in got["callbacks"]] == ["_Global"]
    assert cb["best_model_score"].qualname.endswith("multiarray.scalar")
    assert cb["dirpath"] == "/logs/checkpoints"


def test_synthetic_sd_files_read_the_same_and_fast(pair_factory):
    paths = [*pair_factory(), *pair_factory(ema=True, wrapped=True)]
    for path in paths:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
        assert same_reading(data), path


def test_open_checkpoint_takes_the_fast_path(sd15_pair, monkeypatch):
    calls = []

    class Spy:
        @staticmethod
        def load(*args):
            got = real.load(*args)
            calls.append(got is not None)
            return got

    real = unpickle.native_vm
    monkeypatch.setattr(unpickle, "native_vm", Spy)
    for path in sd15_pair:
        open_checkpoint(path).close()
    assert calls == [True, True]


def test_without_the_native_machine_the_python_one_reads(sd15_pair, monkeypatch):
    control, _ = sd15_pair
    with open_checkpoint(control) as ck:
        index = dict(ck.tensors)
        want = {k: ck.read(k).tobytes() for k in list(ck.tensors)[:20]}
    monkeypatch.setattr(unpickle, "native_vm", None)
    with open_checkpoint(control) as ck:
        assert ck.tensors == index
        assert {k: ck.read(k).tobytes() for k in want} == want


def mutation_seeds() -> list[bytes]:
    seeds = [pickle_of(SEEDS[name]()) for name in ("zip", "wrapped")]
    seeds.append(lightning_checkpoint())
    rng = random.Random(2)
    seeds += [saved(random_state_dict(rng)) for _ in range(3)]
    assert all(native_load(s) is not None for s in seeds)
    return seeds


@pytest.mark.parametrize("seed", range(6))
def test_mutated_pickles_read_the_same_or_are_left_to_python(seed):
    """Bits flipped, bytes set, cut, inserted, deleted, ints overwritten (the hostile
    fuzzer's mutations): wherever the C machine answers, the Python machine gives the
    same; everywhere, restricted_load's outcome (or refusal, message and all) is the
    Python machine's."""
    data = mutation_seeds()[seed]
    rng = random.Random(seed)
    answered = 0
    for _ in range(500):
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        kind = rng.choice(MUTATIONS)
        m = mutate(data, kind, rng.randrange(len(data)), rng.randrange(1 << 16), extra)
        answered += same_reading(m)
    assert answered > 0  # some mutations (in a string, a size) still read


def test_budgets_are_charged_exactly_as_the_python_machine_charges():
    """The smallest memory budget and step count the Python machine reads a pickle with
    are the C machine's too: one less, and both give up (the C machine leaves the
    refusal and its message to the Python machine)."""
    for data in (lightning_checkpoint(), saved(random_state_dict(random.Random(5)))):
        for what in ("budget", "work"):
            lo, hi = 0, (1 << 30) if what == "budget" else work_limit(len(data))
            while lo < hi:  # the least that reads
                mid = (lo + hi) // 2
                if outcome(data, native=False, **{what: mid})[0] == "read":
                    hi = mid
                else:
                    lo = mid + 1
            assert native_load(data, **{what: lo}) is not None, what
            assert native_load(data, **{what: lo - 1}) is None, what
            refused = outcome(data, native=False, **{what: lo - 1})
            assert refused[0] == "refused" and outcome(data, **{what: lo - 1}) == refused


def test_tuples_holding_a_big_tuple_many_times_are_left_to_python():
    """``{"a": t, "b": (t, t, ... t)}`` for a memoized tuple ``t`` of 50,000 items, held
    50,000 times: 350 kB. The C machine looks into each held tuple (to bound how deep
    tuples nest); that has its own step budget, and it gives up within it instead of
    taking 2.5e9 steps. The Python machine (which knows its tuples' depths) reads it."""
    big = MARK + op_int(1) * 50_000 + TUPLE + op_put(0)
    held = MARK + op_get(0) * 50_000 + TUPLE
    data = whole_pickle(b"}" + MARK + op_str("a") + big + op_str("b") + held + SETITEMS)
    assert native_load(data) is None
    got = restricted_load(data, pids="zip").obj  # (not canon(): that walks 2.5e9 items)
    assert len(got["b"]) == 50_000 and all(x is got["a"] for x in got["b"])


def test_pickles_past_the_size_limit_go_to_python(monkeypatch):
    data = saved({"a": torch.ones(2)})
    assert native_load(data) is not None
    monkeypatch.setattr(unpickle, "NATIVE_MAX_BYTES", len(data) - 1)
    assert native_load(data) is None
    assert outcome(data) == outcome(data, native=False)


def test_an_exception_in_a_call_leaves_the_pickle_to_python_but_ctrl_c_is_raised(
    monkeypatch,
):
    """The rare steps run the Python machine's own methods (here _codecs.encode of the
    Lightning state's numpy scalars): an error there gives the pickle to the Python
    machine; Ctrl-C there is raised, not swallowed."""
    data = lightning_checkpoint()
    real = unpickle._Machine.call_codecs_encode

    def failing(error):
        def call(self, args):
            real(self, args)
            raise error

        return call

    monkeypatch.setattr(unpickle._Machine, "call_codecs_encode", failing(ValueError("no")))
    assert native_load(data) is None
    monkeypatch.setattr(unpickle._Machine, "call_codecs_encode", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        native_load(data)


def test_only_zip_storages_take_the_fast_path():
    """A pickle read for a legacy file (or with no storages allowed) is the Python
    machine's: here a zip-format persistent id where none may appear is refused."""
    data = saved({"a": torch.ones(2)})
    with pytest.raises(CheckpointError, match="persistent id"):
        restricted_load(data, pids=None)
