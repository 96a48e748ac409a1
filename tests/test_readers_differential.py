"""cndiff's readers against the reference readers, file by file.

For every file below, ``cndiff.open_checkpoint`` and the reference reader
(``torch.load(weights_only=True)`` for torch files, ``safetensors.safe_open`` for
safetensors) must agree: either both refuse the file, or both open it and every tensor
is the same bit for bit, with the same dtype and shape. Where they may disagree, the
disagreement is one of the deliberate exceptions listed in :data:`CNDIFF_REFUSES` (cndiff
refuses a file the reference reads, and why) or :data:`REFERENCE_REFUSES` (the reference
refuses a file cndiff reads, and why); any other disagreement fails the test.

The files: Hypothesis-generated state dicts written by ``torch.save`` (zip and legacy
formats, every dtype cndiff reads, views, shared storages, wrapped state dicts,
parameters, odd keys) and by the safetensors library, and byte-level mutations of them
and of the hand-made seeds of ``tests/fuzz/hostile.py``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
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


#: cndiff refuses, the reference reads: (pattern of cndiff's message, why)
CNDIFF_REFUSES: list[tuple[str, str]] = [
    (
        r"one dtype and one size",
        "a storage named with two dtypes or two sizes: torch.save cannot write it, and "
        "torch.load silently reads every view with the first one's",
    ),
    (
        r"compressed|encrypted",
        "a deflated record: torch inflates it; cndiff reads tensors in place and never "
        "inflates (a zip bomb), and torch.save never compresses",
    ),
    (
        r"Bad CRC|CRC-32|Bad magic number|File name in directory",
        "a pickle/version/byteorder record whose CRC or local header is wrong: torch does "
        "not check CRCs; cndiff reads these small records through zipfile, which does",
    ),
    (
        r"memo index \d+ at byte",
        "a memo index beyond the opcodes read so far: no pickler writes one (the C unpickler "
        "once allocated gigabytes for it)",
    ),
    (
        r"steps, far more|MiB of objects|nested more than|same hash",
        "cndiff's bounds on the work and memory of unpickling (never reached by a real "
        "checkpoint, which takes 2 or 3 steps per byte)",
    ),
    (
        r"share bytes|another name in its local header",
        "zip records that share bytes, or whose local header names another record: "
        "torch reads them; one byte has one meaning for cndiff",
    ),
    (
        r"does not match|storage '.*' missing|bad storage key list",
        "a legacy storage listed twice, or named but never listed: torch reads it twice, "
        "or hands out uninitialized memory",
    ),
    (
        r"more than the whole file",
        "a view (stride 0) reading more elements than the file holds: torch makes a "
        "view; cndiff would materialize it",
    ),
    (
        r"negated or conjugated|metadata cndiff does not know",
        "a lazy negative/conjugate view (torch.load negates the stored values); cndiff "
        "reads stored bytes, so it refuses rather than return the wrong sign",
    ),
    (
        r"marked as a folder",
        "a record marked as a folder (MS-DOS attribute 0x10): torch's reader skips its "
        "bytes and torch.load returns uninitialized memory for the tensor",
    ),
    (
        r"neither safetensors nor a torch file",
        "a legacy file that does not start with a pickle PROTO opcode: torch unpickles "
        "whatever is there; cndiff tells the formats apart by their first bytes",
    ),
    (
        r"is stored in \d+ bytes but claims",
        "a stored record whose compressed and uncompressed sizes differ: the zip readers "
        "disagree on which one counts",
    ),
    (
        r"appears twice",
        "a key twice in a safetensors header (or in __metadata__): the Rust parser keeps "
        "one copy silently",
    ),
    (r"not a string", "a tensor whose key is not a string: cndiff's outputs name tensors"),
    (
        r"not a readable zip archive|truncated or corrupt|is corrupt \(",
        "a zip structure Python's zipfile refuses and torch's miniz tolerates (a bad "
        "central directory field, a too-new version, a wrong local header)",
    ),
    (r"STOP opcode", "a pickle with trailing junk in place of its STOP that torch skips"),
    (
        r"odd number of items|needs a MARK|stack underflow|not a dict|not a list",
        "malformed pickles torch's pure-Python unpickler happens to accept",
    ),
    (
        r"unsupported persistent id|malformed storage id|unknown storage type",
        "persistent ids that torch tolerates in positions cndiff does not",
    ),
    (r"not UTF-8", "a pickled string that is not UTF-8 (torch decodes with surrogatepass)"),
    (r"empty tensor starts at element", "an empty view past its storage"),
    (r"has an impossible shape|too large", "an empty tensor of absurd shape (0, 2**70)"),
    (
        r"rebuilt with \d+ arguments|not rebuilt from a tensor",
        "rebuild calls with extra or missing arguments torch ignores",
    ),
    (r"a bare pickle|legacy torch file version", "a legacy file with a wrong magic/version"),
    (r"unsupported torch file version", "a version record torch parses more loosely"),
    (r"reaches element", "a view past its storage that torch's checks miss"),
]

#: the reference refuses, cndiff reads: (pattern of the reference's error, why)
REFERENCE_REFUSES: list[tuple[str, str]] = [
    (
        r"PytorchStreamReader failed|internal miniz error",
        "zip fields miniz checks and Python's zipfile ignores (disk numbers, entry counts "
        "of the end record...): they do not change which bytes a record holds",
    ),
    (
        r"Unsupported global|weights_only",
        "globals torch's safe loader refuses but cndiff maps to inert placeholders "
        "(Lightning's ModelCheckpoint, numpy scalars): real SD checkpoints carry them",
    ),
    (
        r"Unsupported operand|Can only|unsupported persistent id encountered",
        "pickle opcodes or targets outside what torch's safe loader implements (protocol "
        "4 FRAME/MEMOIZE/SHORT_BINUNICODE, BUILD on an Opaque placeholder...)",
    ),
    (
        r"HeaderTooLarge|HeaderTooSmall|InvalidHeader|MetadataIncompleteBuffer|"
        r"InvalidHeaderDeserialization|invalid|Error while deserializing",
        "safetensors headers the Rust parser refuses and cndiff reads: lone surrogates "
        "escaped in keys (valid JSON), data past the last tensor, and unknown fields",
    ),
]


def _reference(path: Path) -> dict[str, torch.Tensor] | BaseException:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        return exc
    if not isinstance(obj, dict):
        return TypeError(f"top level is {type(obj).__name__}")
    # unwrapped and filtered as cndiff does: string keys of tensors at the top level, or
    # under "state_dict"
    sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
    return {k: v for k, v in dict.items(sd) if isinstance(v, torch.Tensor)}


def _cndiff(path: Path) -> dict[str, tuple[str, tuple, bytes]] | CheckpointError:
    try:
        with open_checkpoint(path) as ck:
            return {
                k: (i.dtype.name, i.shape, np.ascontiguousarray(ck.read(k)).tobytes())
                for k, i in ck.tensors.items()
            }
    except CheckpointError as exc:
        return exc


def _bytes(t: torch.Tensor) -> bytes:
    fresh = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # contiguous strides
    return fresh.reshape(-1).view(torch.uint8).numpy().tobytes()


def _why(patterns: list[tuple[str, str]], text: str) -> str | None:
    return next((why for pat, why in patterns if re.search(pat, text)), None)


def compare(path: Path, *, must_open: bool = False) -> str:
    """Read ``path`` with both readers; assert they agree or name the deliberate
    exception. Returns "both-open", "both-refuse" or "cndiff-refuses: <why>" / ..."""
    ref = _reference(path)
    got = _cndiff(path)
    if isinstance(got, CheckpointError) and isinstance(ref, BaseException):
        assert not must_open, f"{path.name}: both refuse: {got} / {ref!r:.200}"
        return "both-refuse"
    if isinstance(got, CheckpointError):
        why = _why(CNDIFF_REFUSES, str(got))
        assert why and not must_open, (
            f"{path.name}: cndiff refuses ({got}) what the reference reads ({len(ref)} tensors)"
        )
        return f"cndiff-refuses: {why}"
    if isinstance(ref, BaseException):
        why = _why(REFERENCE_REFUSES, f"{type(ref).__name__}: {ref}")
        assert why and not must_open, (
            f"{path.name}: cndiff reads ({len(got)} tensors) what the reference refuses: "
            f"{type(ref).__name__}: {str(ref)[:300]}"
        )
        return f"reference-refuses: {why}"
    assert set(got) == set(ref), f"{path.name}: keys {sorted(got)} vs {sorted(ref)}"
    for k, t in ref.items():
        dtype, shape, data = got[k]
        assert dtype == str(t.dtype).removeprefix("torch."), (k, dtype, t.dtype)
        assert shape == tuple(t.shape), (k, shape, t.shape)
        assert data == _bytes(t), f"{path.name}: {k!r} differs"
    return "both-open"


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
    view = draw(st.sampled_from(["plain", "t", "step", "narrow", "expand", "param"]))
    if view == "t" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "step" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[::2]
    elif view == "narrow" and t.dim() >= 1 and t.shape[0] > 1:
        t = t[1:]
    elif view == "expand" and t.dim() >= 1 and t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    elif view == "param" and dtype.is_floating_point:
        t = torch.nn.Parameter(t, requires_grad=False)
    return t


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
