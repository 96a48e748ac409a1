"""cndiff's readers against the reference readers, file by file.

For every file below, ``cndiff.open_checkpoint`` and the reference reader
(``torch.load(weights_only=True)`` for torch files, ``safetensors.safe_open`` for
safetensors) must agree: either both refuse the file, or both open it and every tensor
is the same bit for bit, with the same dtype and shape. Where they may disagree, the
disagreement is one of the deliberate exceptions listed in ``fuzz/differential.py``:
``CNDIFF_REFUSES`` (cndiff refuses a file the reference reads, and why) or
``REFERENCE_REFUSES`` (the reference refuses a file cndiff reads, and why); any other
disagreement fails the test.

The files: Hypothesis-generated state dicts written by ``torch.save`` (zip and legacy
formats, every dtype cndiff reads, views, shared storages, wrapped state dicts,
parameters, odd keys) and by the safetensors library, and byte-level mutations of them
and of the hand-made seeds of ``tests/fuzz/hostile.py``.
"""

from __future__ import annotations

import io
import os
import pickletools

import numpy as np
import pytest
import torch
from fuzz.differential import VIEWS, compare, view_of
from fuzz.hostile import MUTATIONS, SEEDS, mutate
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save

from cndiff import open_checkpoint
from cndiff.errors import CheckpointError

SCALE = float(os.environ.get("CNDIFF_FUZZ_EXAMPLES", "1"))
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=os.environ.get("CNDIFF_FUZZ_RANDOM") != "1",
    suppress_health_check=list(HealthCheck),
)


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


# -- state dicts written by torch.save ------------------------------------------------------

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
KEYS = st.one_of(
    st.sampled_from(["control_model.a", "model.diffusion_model.b", "w", ""]),
    st.text(min_size=1, max_size=6),  # any code point, lone surrogates included
)


def make_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bits (NaNs and subnormals included) of ``dtype`` and ``shape``."""
    n = int(np.prod(shape)) if shape else 1
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.random.default_rng(seed).integers(0, 256, n * itemsize, dtype=np.uint8)
    if dtype == torch.bool:
        raw = raw & 1
    return torch.from_numpy(raw).view(dtype).reshape(shape)


@st.composite
def tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    t = make_tensor(dtype, shape, draw(st.integers(0, 2**16)))
    return view_of(t, draw(st.sampled_from(VIEWS)))


@st.composite
def state_dicts(draw) -> dict:
    sd: dict = {}
    for key, t in draw(st.lists(st.tuples(KEYS, tensors()), max_size=5)):
        sd[key] = t
        if draw(st.booleans()) and t.numel() > 1:  # a second view of the same storage
            sd[key + ".view"] = t.reshape(-1)[1:]
    if draw(st.booleans()):
        sd["epoch"] = draw(st.integers(-5, 2**40))
        sd["note"] = draw(st.text(max_size=5))
        sd["list"] = [1, 2.5, "x", None]
    if draw(st.booleans()):
        sd = {"state_dict": sd, "global_step": 3}
    return sd


def _save(obj: dict, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@settings(FUZZ, max_examples=examples(120))
@given(sd=state_dicts(), legacy=st.booleans())
def test_torch_save_files_read_as_torch_reads_them(tmp_path_factory, sd, legacy):
    path = tmp_path_factory.mktemp("diff") / "model.pth"
    path.write_bytes(_save(sd, legacy))
    compare(path, must_open=True)


def test_negative_views_are_refused_not_misread(tmp_path):
    """torch.save records a lazy negation bit (``_neg_view``) and torch.load negates the
    stored values: reading the stored bytes would return the wrong sign."""
    path = tmp_path / "neg.pth"
    path.write_bytes(_save({"a": torch.arange(3.0)._neg_view()}, legacy=False))
    assert torch.load(str(path), weights_only=True)["a"].tolist() == [-0.0, -1.0, -2.0]
    with pytest.raises(CheckpointError, match="negated"):
        open_checkpoint(path)
    assert compare(path).startswith("cndiff-refuses")


def test_protocol_4_pickles(tmp_path):
    """torch.save(pickle_protocol=4) writes FRAME, MEMOIZE, SHORT_BINUNICODE: cndiff
    reads them; torch's own safe loader may not (a named exception)."""
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "p4.pth"
    buf = io.BytesIO()
    torch.save(sd, buf, pickle_protocol=4)
    path.write_bytes(buf.getvalue())
    assert compare(path) in ("both-open",) or compare(path).startswith("reference-refuses")
    with open_checkpoint(path) as ck:
        assert ck.read("a").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_every_cut_of_a_state_dict_pickle_is_refused_as_ending_early():
    """The opcodes of a state dict's pickle read their arguments in place: cut anywhere
    (in an opcode, in its argument, in a string), the pickle ends early; whole, it gives
    what torch.load gives. (Protocol 2 as torch writes it: BININT1/2/BININT sizes, more
    than 256 memo entries, so LONG_BINPUT and BINGET too.)"""
    import zipfile

    from cndiff.inputs.unpickle import PickleEndsError, TensorRef, restricted_load

    sd = {f"layer{i}.weight": torch.zeros(i % 3 + 1, 300 * i + 1) for i in range(60)}
    sd["big"] = torch.zeros(70000)
    with zipfile.ZipFile(io.BytesIO(_save(sd, legacy=False))) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    at: dict[str, list[int]] = {}
    for op, _, pos in pickletools.genops(data):
        at.setdefault(op.name, []).append(pos)
    assert {"BININT", "BININT1", "BININT2", "LONG_BINPUT", "BINGET", "BINUNICODE"} <= set(at)
    whole = restricted_load(data, pids="zip")
    assert whole.end == len(data)
    got = {k: (v.shape, v.stride, v.offset) for k, v in whole.obj.items()}
    assert all(isinstance(v, TensorRef) for v in whole.obj.values())
    assert got == {k: (tuple(t.shape), t.stride(), t.storage_offset()) for k, t in sd.items()}
    # every cut in and just after the first and last two opcodes of each kind
    starts = sorted(p for ps in at.values() for p in ps) + [len(data)]
    cuts: set[int] = set()
    for ps in at.values():
        for p in ps[:2] + ps[-2:]:
            cuts.update(range(p, starts[starts.index(p) + 1] + 1))
    for cut in sorted(cuts - {len(data)}):
        with pytest.raises(PickleEndsError):
            restricted_load(data[:cut], pids="zip")


# -- safetensors files written by the safetensors library ----------------------------------

ST_DTYPES = [d for d in DTYPES if d != torch.bool] + [torch.bool]


@settings(FUZZ, max_examples=examples(60))
@given(
    items=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=8).filter(
                lambda k: k.encode("utf-8", "ignore") == k.encode("utf-8", "surrogatepass")
            ),
            st.sampled_from(ST_DTYPES),
            st.lists(st.integers(0, 4), max_size=3),
            st.integers(0, 2**16),
        ),
        max_size=5,
        unique_by=lambda x: x[0],
    ),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=8))),
)
def test_safetensors_files_read_as_safetensors_reads_them(tmp_path_factory, items, metadata):
    # (safetensors 0.8 writes '{},"__metadata__":{}}' for no tensors and empty metadata)
    assume(items or metadata != {})
    sd = {key: make_tensor(dtype, tuple(shape), seed) for key, dtype, shape, seed in items}
    path = tmp_path_factory.mktemp("diff") / "model.safetensors"
    path.write_bytes(st_save(sd, metadata=metadata))
    compare(path, must_open=True)
    with open_checkpoint(path) as ck, safe_open(str(path), "pt") as f:
        assert ck.metadata == (f.metadata() or {})


# -- byte-level mutations --------------------------------------------------------------------


def _torch_seeds() -> dict[str, bytes]:
    sd = {
        "control_model.w": torch.arange(12.0).reshape(3, 4),
        "control_model.b": torch.ones(4).half(),
        "control_model.t": torch.arange(6.0).reshape(2, 3).t(),
        "control_model.e": torch.zeros(0, 2),
        "control_model.s": torch.tensor(1.5, dtype=torch.bfloat16),
    }
    sd["control_model.v"] = sd["control_model.w"][1]
    return {
        "torch_zip": _save(sd, legacy=False),
        "torch_legacy": _save(sd, legacy=True),
        "torch_wrapped": _save({"state_dict": sd, "epoch": 1}, legacy=False),
        "st_lib": st_save({k: v.contiguous() for k, v in sd.items() if k != "control_model.v"}),
    }


SEED_FILES = {**{k: f() for k, f in SEEDS.items()}, **_torch_seeds()}
mutation = st.tuples(
    st.sampled_from(MUTATIONS),
    st.integers(0, 2**16),
    st.integers(0, 2**12),
    st.binary(min_size=1, max_size=8),
)


@pytest.mark.parametrize("seed", sorted(SEED_FILES))
def test_seeds_agree(tmp_path, seed):
    suffix = ".safetensors" if seed.startswith("st") or seed == "safetensors" else ".pth"
    path = tmp_path / f"{seed}{suffix}"
    path.write_bytes(SEED_FILES[seed])
    outcome = compare(path)
    if seed in ("wrapped",):  # a Lightning callback: torch's safe loader refuses it
        assert outcome.startswith("reference-refuses")
    else:
        assert outcome == "both-open", outcome


@settings(FUZZ, max_examples=examples(300))
@given(
    seed=st.sampled_from(sorted(SEED_FILES)), mutations=st.lists(mutation, min_size=1, max_size=3)
)
def test_mutated_files_agree(tmp_path_factory, seed, mutations):
    data = SEED_FILES[seed]
    for kind, pos, arg, extra in mutations:
        data = mutate(data, kind, pos, arg, extra)
    suffix = ".safetensors" if seed.startswith("st") or seed == "safetensors" else ".pth"
    path = tmp_path_factory.mktemp("mut") / f"m{suffix}"
    path.write_bytes(data)
    compare(path)
