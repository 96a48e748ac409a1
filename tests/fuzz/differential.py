"""The differential check shared by ``tests/test_readers_differential.py`` (Hypothesis,
in CI) and ``fuzz_readers.py`` (atheris): cndiff's readers against the reference readers.

:func:`compare` reads a file with ``cndiff.open_checkpoint`` and with the reference reader
(``torch.load(weights_only=True)`` for torch files, ``safetensors.safe_open`` for
``.safetensors``) and asserts that they agree: both refuse it, or both open it and every
tensor is the same bit for bit, with the same dtype and shape. A disagreement must be one
of the deliberate exceptions listed here, each with the reason; anything else is a
failure.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from cndiff import open_checkpoint
from cndiff.errors import CheckpointError

__all__ = ["CNDIFF_REFUSES", "REFERENCE_REFUSES", "compare"]


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
        r"bad CRC-32",
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
        r"does not match|storage .* missing|bad storage key list",
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
    (
        r"two entries named",
        "a zip archive with two records of one name: torch reads the first, Python's zipfile "
        "the last; cndiff once read the other copy than torch",
    ),
    (
        r"not a flat JSON object|more than 65536 entries",
        "a safetensors entry with a nested or 64 KiB-long unknown field, or more than "
        "65,536 metadata entries: the Rust parser skips or keeps them; cndiff bounds what "
        "one entry may cost before building it",
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


# cndiff's bounds on work and memory: files the reference readers may take hours over
_TOO_COSTLY = r"steps, far more|MiB of objects|nested more than|same hash"


def reference(path: Path) -> dict[str, torch.Tensor] | BaseException:
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
    # (dict.get: torch may return an OrderedDict whose pickled state shadows .get)
    inner = dict.get(obj, "state_dict")
    sd = inner if isinstance(inner, dict) else obj
    return {k: v for k, v in dict.items(sd) if isinstance(v, torch.Tensor)}


def cndiff_tensors(path: Path) -> dict[str, tuple[str, tuple, bytes]] | CheckpointError:
    try:
        with open_checkpoint(path) as ck:
            return {
                k: (i.dtype.name, i.shape, np.ascontiguousarray(ck.read(k)).tobytes())
                for k, i in ck.tensors.items()
            }
    except CheckpointError as exc:
        return exc


def tensor_bytes(t: torch.Tensor) -> bytes:
    fresh = torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())  # contiguous strides
    return fresh.reshape(-1).view(torch.uint8).numpy().tobytes()


def _why(patterns: list[tuple[str, str]], text: str) -> str | None:
    return next((why for pat, why in patterns if re.search(pat, text)), None)


def compare(path: Path, *, must_open: bool = False) -> str:
    """Read ``path`` with both readers; assert they agree or name the deliberate
    exception. Returns "both-open", "both-refuse" or "cndiff-refuses: <why>" / ..."""
    got = cndiff_tensors(path)
    if isinstance(got, CheckpointError) and re.search(_TOO_COSTLY, str(got)):
        return "cndiff-refuses: too costly to read (the reference may take hours: not asked)"
    ref = reference(path)
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
        assert data == tensor_bytes(t), f"{path.name}: {k!r} differs"
    return "both-open"


#: the views of a tensor the generated state dicts use (see :func:`view_of`)
VIEWS = ("plain", "t", "step", "narrow", "expand", "param")


def view_of(t: torch.Tensor, view: str) -> torch.Tensor:
    """``t`` as the named view, where its shape and dtype allow (else ``t`` itself):
    transposed, every second row, from the second row, a row expanded three times, or
    a float Parameter."""
    if view == "t" and t.dim() >= 2:
        return t.transpose(0, 1)
    if view == "step" and t.dim() >= 1 and t.shape[0] > 1:
        return t[::2]
    if view == "narrow" and t.dim() >= 1 and t.shape[0] > 1:
        return t[1:]
    if view == "expand" and t.dim() >= 1 and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:])
    if view == "param" and t.dtype.is_floating_point:
        return torch.nn.Parameter(t, requires_grad=False)
    return t
