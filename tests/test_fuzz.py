"""Hostile and broken checkpoints: every one is refused with a clear CndiffError, or opens
with every tensor inside the file, in bounded time and memory, without running code.

Explicit cases name each class of bad input (see tests/README.md for the table); the
Hypothesis tests mutate small valid files and generate headers, pickles and tensor views
at random. ``CNDIFF_FUZZ_EXAMPLES`` scales the number of examples (default 1), and
``CNDIFF_FUZZ_RANDOM=1`` draws new ones on every run instead of a fixed sequence.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fuzz.hostile import (
    APPEND,
    BUILD,
    DUP,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    FALSE,
    INTERESTING_INTS,
    MARK,
    MUTATIONS,
    NONE,
    POP,
    PROTO2,
    REDUCE,
    SEEDS,
    SETITEM,
    SETITEMS,
    STOP,
    TUPLE1,
    check_bytes,
    check_file,
    contiguous,
    legacy_prelude,
    mutate,
    op_call,
    op_dict,
    op_get,
    op_global,
    op_int,
    op_put,
    op_storage,
    op_str,
    op_tensor,
    op_tuple,
    pickle_of,
    safetensors_file,
    seed_legacy,
    seed_safetensors,
    seed_zip,
    torch_legacy,
    torch_zip,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cndiff
from cndiff import open_checkpoint, synthetic
from cndiff.dtypes import F32, by_name
from cndiff.errors import CheckpointError, CndiffError, UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[1]
SCALE = float(os.environ.get("CNDIFF_FUZZ_EXAMPLES", "1"))
FUZZ = settings(
    deadline=None,
    database=None,
    derandomize=os.environ.get("CNDIFF_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory(prefix="cndiff-fuzz-") as d:
        yield Path(d)


# -- builders for the explicit cases -----------------------------------------------------------

F32_6 = np.arange(6, dtype=np.float32).tobytes()
PWN_MARKER = os.path.join(tempfile.gettempdir(), f"cndiff-fuzz-pwned-{os.getpid()}")
PWN = f"touch {PWN_MARKER}"


def entry(dtype="F32", shape=(1,), offs=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


def st_file(header, data=b"\0" * 16, **kw) -> bytes:
    return safetensors_file(header, data, **kw)


def in_zip(body: bytes, storages=None) -> bytes:
    """A torch zip archive whose pickle is ``body`` (a complete pickle is made of it)."""
    return torch_zip(pickle_of(body), {"0": F32_6} if storages is None else storages)


def tensor(
    offset=0, shape=(6,), stride=None, numel=6, storage="FloatStorage", legacy=False
) -> bytes:
    pid = op_storage("0", numel, storage, legacy=legacy)
    return op_tensor(pid, offset, shape, contiguous(shape) if stride is None else stride)


def sd(*items: tuple[str, bytes]) -> bytes:
    return op_dict([(op_str(k), v) for k, v in items])


def _central_entries(data: bytes):
    """(position, name) of each central-directory entry of a zip archive."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _, offset = struct.unpack("<HII", data[eocd + 10 : eocd + 20])
    pos = offset
    for _ in range(count):
        n, m, k = struct.unpack("<HHH", data[pos + 28 : pos + 34])
        yield pos, data[pos + 46 : pos + 46 + n].decode()
        pos += 46 + n + m + k


def patch_central(data: bytes, member: str, field: int, raw: bytes) -> bytes:
    for pos, name in _central_entries(data):
        if name.endswith(member):
            at = pos + field
            return data[:at] + raw + data[at + len(raw) :]
    raise KeyError(member)


def patch_local(data: bytes, member: str, field: int, raw: bytes) -> bytes:
    for pos, name in _central_entries(data):
        if name.endswith(member):
            (local,) = struct.unpack("<I", data[pos + 42 : pos + 46])
            at = local + field
            return data[:at] + raw + data[at + len(raw) :]
    raise KeyError(member)


def legacy_with(body: bytes, storages=None) -> bytes:
    pkl = pickle_of(body)
    return torch_legacy(pkl, [("0", 6, F32_6)] if storages is None else storages)


def deep_tuple(depth: int) -> bytes:
    return EMPTY_TUPLE + TUPLE1 * depth


def huge_key_dict(value: bytes) -> bytes:
    return EMPTY_DICT + op_int(10**5000) + value + SETITEM


# name -> (file bytes, None when it must open, or a regex its error message must match)
OPENS = None
CASES: dict[str, tuple] = {
    # safetensors: the 8-byte length and the JSON header
    "st_valid": (seed_safetensors, OPENS),
    "st_empty_file": (lambda: b"", "empty"),
    "st_length_only": (lambda: struct.pack("<Q", 10), "not a checkpoint"),
    "st_length_2^63": (lambda: st_file({"a": entry()}, header_len=2**63), "claims"),
    "st_length_past_end": (lambda: st_file({"a": entry()}, b"", header_len=500), "truncated"),
    "st_length_short": (lambda: st_file('{"a": {"dtype": "F32"}}', header_len=12), "corrupt"),
    "st_not_json": (lambda: st_file("{not json at all}"), "corrupt safetensors header"),
    "st_not_utf8": (lambda: st_file(b'{"\xff\xfe": 1}'), "corrupt safetensors header"),
    "st_entry_not_object": (lambda: st_file({"a": 1}), "corrupt safetensors header entry"),
    "st_deep_nesting": (
        lambda: st_file('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"),
        "not a flat JSON object",
    ),
    "st_duplicate_key": (
        lambda: st_file(
            '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
        ),
        "appears twice",
    ),
    "st_unknown_dtype": (lambda: st_file({"a": entry("F128")}), "unknown dtype"),
    "st_dtype_not_string": (lambda: st_file({"a": entry(5)}), "unknown dtype"),
    "st_shape_negative": (lambda: st_file({"a": entry(shape=[-1])}), "invalid shape"),
    "st_shape_float": (lambda: st_file({"a": entry(shape=[1.0])}), "invalid shape"),
    "st_shape_bool": (lambda: st_file({"a": entry(shape=[True])}), "invalid shape"),
    "st_shape_65_dims": (lambda: st_file({"a": entry(shape=[1] * 65)}), "invalid shape"),
    # (the product of these sizes takes minutes to compute; the length is checked first)
    "st_shape_200k_huge_dims": (
        lambda: st_file({"a": entry(shape=[2**62] * 200_000 + [0], offs=(0, 0))}),
        "not a flat JSON object",
    ),
    "st_empty_with_huge_dim": (
        lambda: st_file({"a": entry(shape=[0, 2**70], offs=(0, 0))}),
        "impossible shape",
    ),
    "st_1tb_tensor": (
        lambda: st_file({"a": entry(shape=[2**38], offs=(0, 2**40))}),
        "truncated: tensor 'a' ends at byte",
    ),
    "st_size_mismatch": (lambda: st_file({"a": entry(shape=[2], offs=(0, 4))}), "needs 8"),
    "st_offsets_reversed": (lambda: st_file({"a": entry(offs=(4, 0))}), "invalid data_offsets"),
    "st_offsets_negative": (lambda: st_file({"a": entry(offs=(-4, 0))}), "invalid data_off"),
    "st_offsets_three": (lambda: st_file({"a": entry(offs=(0, 4, 8))}), "invalid data_off"),
    "st_offsets_float": (lambda: st_file({"a": entry(offs=(0.0, 4))}), "invalid data_off"),
    "st_offsets_past_end": (lambda: st_file({"a": entry()}, b"\0\0"), "truncated"),
    "st_overlap": (
        lambda: st_file({"a": entry(shape=[2], offs=(0, 8)), "b": entry(shape=[2], offs=(4, 12))}),
        "overlap",
    ),
    "st_same_range_twice": (lambda: st_file({"a": entry(), "b": entry()}), "overlap"),
    # an empty tensor sorted between two overlapping ones hid the overlap
    "st_overlap_hidden_by_empty": (
        lambda: st_file(
            {
                "a": entry(shape=[4], offs=(0, 16)),
                "e": entry(shape=[0], offs=(8, 8)),
                "c": entry(shape=[1], offs=(12, 16)),
            }
        ),
        "overlap",
    ),
    "st_metadata_not_object": (lambda: st_file({"__metadata__": []}), "__metadata__"),
    "st_metadata_not_str": (lambda: st_file({"__metadata__": {"a": 1}}), "__metadata__"),
    "st_odd_keys": (lambda: st_file({"\ud800\x00 \u202e": entry(), "": entry(offs=(4, 8))}), OPENS),
    "st_gaps_and_unused_bytes": (lambda: st_file({"a": entry(offs=(8, 12))}, b"\0" * 64), OPENS),
    # torch zip: the archive
    "zip_valid": (seed_zip, OPENS),
    "zip_truncated_half": (lambda: seed_zip()[: len(seed_zip()) // 2], "truncated or corrupt"),
    "zip_no_end_record": (lambda: seed_zip()[:-22], "truncated or corrupt"),
    "zip_not_torch": (lambda: torch_zip(b"", {}, prefix="a/b"), "not a torch checkpoint"),
    "zip_pickle_deflated": (
        lambda: torch_zip(pickle_of(sd()), {}, pkl_compress=zipfile.ZIP_DEFLATED),
        "compressed or encrypted",
    ),
    "zip_pickle_encrypted": (
        lambda: patch_central(in_zip(sd()), "data.pkl", 8, b"\x01\x00"),
        "compressed or encrypted",
    ),
    "zip_pickle_unknown_method": (
        lambda: patch_central(in_zip(sd()), "data.pkl", 10, b"\x63\x00"),
        "compressed or encrypted",
    ),
    "zip_pickle_patch_flag": (  # flag bit 5: zipfile raises NotImplementedError
        lambda: patch_central(in_zip(sd()), "data.pkl", 8, b"\x20\x00"),
        "corrupt",
    ),
    "zip_version_too_new": (  # zipfile raises NotImplementedError while listing
        lambda: patch_central(in_zip(sd()), "data.pkl", 6, b"\xff\x00"),
        "truncated or corrupt",
    ),
    "zip_big_endian": (
        lambda: torch_zip(pickle_of(sd()), {}, byteorder=b"big"),
        "big-endian",
    ),
    "zip_storage_deflated": (
        lambda: torch_zip(
            pickle_of(sd(("a", tensor()))), {"0": F32_6}, storage_compress=zipfile.ZIP_DEFLATED
        ),
        "compressed; not supported",
    ),
    "zip_storage_missing": (lambda: in_zip(sd(("a", tensor())), {}), "missing from the archive"),
    "zip_storage_short": (
        lambda: in_zip(sd(("a", tensor())), {"0": F32_6[:8]}),
        "claims 24 bytes but the archive holds 8",
    ),
    "zip_storage_past_end": (  # its local header's extra field runs its data past the end
        lambda: patch_local(in_zip(sd(("a", tensor()))), "data/0", 28, b"\xff\xff"),
        "is truncated: 'archive/data/0' ends at byte",
    ),
    "zip_storage_header_past_end": (  # its local header lies past the end of the file
        lambda: patch_central(in_zip(sd(("a", tensor()))), "data/0", 42, b"\xf0\xff\x00\x00"),
        "bad zip entry for 'archive/data/0'",
    ),
    "zip_view_past_storage": (lambda: in_zip(sd(("a", tensor(shape=(80,))))), "reaches element"),
    "zip_1tb_tensor": (
        lambda: in_zip(sd(("a", tensor(shape=(2**38,), numel=2**38)))),
        "claims 1099511627776 bytes",
    ),
    "zip_expanded_view_1gib": (  # one stored float, read as 2**28 of them
        lambda: in_zip(sd(("a", tensor(shape=(2**28,), stride=(0,), numel=1))), {"0": F32_6[:4]}),
        "more than the whole file",
    ),
    "zip_self_overlapping_view": (
        lambda: in_zip(
            sd(("a", tensor(shape=(2**14, 2**14), stride=(1, 1), numel=2**15))),
            {"0": b"\0" * 2**17},
        ),
        "more than the whole file",
    ),
    "zip_negative_offset": (lambda: in_zip(sd(("a", tensor(offset=-1)))), "storage offset"),
    "zip_negative_stride": (lambda: in_zip(sd(("a", tensor(stride=(-1,))))), "not up to 64"),
    "zip_65_dims": (lambda: in_zip(sd(("a", tensor(shape=(1,) * 65)))), "not up to 64"),
    "zip_rank_mismatch": (lambda: in_zip(sd(("a", tensor(stride=(1, 1))))), "differ in length"),
    "zip_empty_huge_shape": (
        lambda: in_zip(sd(("a", tensor(shape=(0, 2**70), stride=(1, 1))))),
        "too large",
    ),
    # torch.save writes t[1:] of a (2, 0) tensor as an empty view past its empty storage
    "zip_empty_past_storage": (lambda: in_zip(sd(("a", tensor(offset=10**6, shape=(0,))))), OPENS),
    "zip_views_share_storage": (
        lambda: in_zip(sd(("a", tensor()), ("b", tensor(2, (2, 2), (1, 2))))),
        OPENS,
    ),
    # torch pickles: code execution
    "pkl_os_system": (lambda: in_zip(op_call(op_global("os", "system"), op_str(PWN))), "os.sys"),
    "pkl_posix_system": (
        lambda: in_zip(op_call(op_global("posix", "system"), op_str(PWN))),
        "posix.system",
    ),
    "pkl_eval": (lambda: in_zip(op_call(op_global("builtins", "eval"), op_str("1"))), "eval"),
    "pkl_exec": (lambda: in_zip(op_call(op_global("builtins", "exec"), op_str("1"))), "exec"),
    "pkl_getattr": (
        lambda: in_zip(op_call(op_global("builtins", "getattr"), op_global("os", "system"))),
        "builtins.getattr",
    ),
    "pkl___import__": (lambda: in_zip(op_global("builtins", "__import__")), "__import__"),
    "pkl_subprocess": (lambda: in_zip(op_global("subprocess", "Popen")), "subprocess.Popen"),
    "pkl_torch_load": (lambda: in_zip(op_global("torch", "load")), "torch.load"),
    "pkl_stack_global": (
        lambda: torch_zip(b"\x80\x04" + op_str("os") + op_str("system") + b"\x93" + STOP, {}),
        "os.system",
    ),
    "pkl_inst_opcode": (lambda: in_zip(MARK + op_str("id") + b"ios\nsystem\n"), "os.system"),
    "pkl_obj_opcode": (
        lambda: in_zip(MARK + op_global("builtins", "eval") + op_str("1") + b"o"),
        "builtins.eval",
    ),
    "pkl_newobj": (
        lambda: in_zip(op_global("os", "_wrap_close") + EMPTY_TUPLE + b"\x81"),
        "os._wrap_close",
    ),
    "pkl_extension_code": (lambda: in_zip(b"\x82\x01"), "corrupt"),
    # torch pickles: the allowed callables, misused
    "pkl_allowed_wrong_args": (
        lambda: in_zip(op_call(op_global("collections", "OrderedDict"), op_int(5))),
        "corrupt",
    ),
    "pkl_rebuild_not_a_storage": (
        lambda: in_zip(sd(("a", op_tensor(op_int(3), 0, (1,), (1,))))),
        "not a storage",
    ),
    "pkl_call_a_dtype": (lambda: in_zip(op_call(op_global("torch", "float32"))), "calls"),
    "pkl_codecs_rot13": (
        lambda: in_zip(op_call(op_global("_codecs", "encode"), op_str("x"), op_str("rot13"))),
        "_codecs.encode",
    ),
    # BUILD writes pickled state into an object: a checked view, a dtype, a storage type
    "pkl_build_enlarges_view": (
        lambda: in_zip(
            sd(("a", tensor() + op_dict([(op_str("shape"), op_tuple(op_int(2**30)))]) + BUILD))
        ),
        "set the state of a tensor",
    ),
    "pkl_build_on_dtype": (
        lambda: in_zip(
            op_global("torch", "float32") + op_dict([(op_str("itemsize"), op_int(1000))]) + BUILD
        ),
        "set the state",
    ),
    "pkl_build_on_storage_type": (
        lambda: in_zip(
            op_global("torch", "FloatStorage")
            + op_dict([(op_str("dtype"), op_int(1))])
            + BUILD
            + POP
            + sd(("a", tensor()))
        ),
        "set the state of torch.FloatStorage",
    ),
    "pkl_build_on_function": (
        lambda: in_zip(
            op_global("torch._utils", "_rebuild_tensor_v2")
            + op_dict([(op_str("x"), op_int(1))])
            + BUILD
        ),
        "set the state",
    ),
    # torch pickles: lengths, memo, nesting, size
    "pkl_binunicode_2^32": (lambda: in_zip(b"X" + struct.pack("<I", 2**32 - 1) + b"ab"), "STOP"),
    "pkl_binbytes8_2^62": (lambda: in_zip(b"\x8e" + struct.pack("<Q", 2**62) + b"ab"), "STOP"),
    "pkl_bytearray8_2^40": (lambda: in_zip(b"\x96" + struct.pack("<Q", 2**40) + b"ab"), "STOP"),
    "pkl_long4_2^31": (lambda: in_zip(b"\x8b" + struct.pack("<i", 2**31 - 1) + b"ab"), "STOP"),
    "pkl_frame_2^62": (
        lambda: torch_zip(b"\x80\x04\x95" + struct.pack("<Q", 2**62) + NONE + STOP, {}),
        "STOP",
    ),
    "pkl_out_of_band_buffer": (lambda: in_zip(b"\x97"), "out-of-band"),
    # a 12-byte pickle whose memo index made the C unpickler allocate and clear 2 GiB
    "pkl_memo_index_2^27": (lambda: in_zip(NONE + b"r" + struct.pack("<I", 2**27)), "memo"),
    "pkl_memo_index_2^32": (lambda: in_zip(NONE + b"r" + struct.pack("<I", 2**32 - 1)), "memo"),
    "pkl_memo_get_unset": (lambda: in_zip(op_get(5)), "never stored"),
    "pkl_memo_self_reference": (
        lambda: in_zip(sd(("loop", EMPTY_LIST + op_put(0) + op_get(0) + APPEND), ("a", tensor()))),
        OPENS,
    ),
    "pkl_memo_shared_tensor": (
        lambda: in_zip(
            EMPTY_DICT
            + MARK
            + op_str("a")
            + tensor()
            + op_put(9)
            + op_str("b")
            + op_get(9)
            + SETITEMS
        ),
        OPENS,
    ),
    "pkl_recursive_state_dict": (
        lambda: in_zip(EMPTY_DICT + op_put(0) + op_str("state_dict") + op_get(0) + SETITEM),
        OPENS,
    ),
    "pkl_deep_nesting": (lambda: in_zip(sd(("x", deep_tuple(100_000)))), "nested more than"),
    # (lists nest harmlessly: nothing hashes them, and CPython frees them iteratively)
    "pkl_deep_lists": (lambda: in_zip(EMPTY_LIST * 5000 + APPEND * 4999), "a pickled list"),
    "pkl_too_many_objects": (
        lambda: in_zip(EMPTY_LIST + MARK + EMPTY_DICT * 1_200_000 + b"e"),
        "MiB of objects",
    ),
    "pkl_huge_int_key": (lambda: in_zip(huge_key_dict(EMPTY_LIST)), OPENS),
    "pkl_huge_int_key_wrapped": (
        lambda: in_zip(
            EMPTY_DICT
            + MARK
            + op_int(10**5000)
            + op_int(1)
            + op_str("state_dict")
            + EMPTY_DICT
            + SETITEMS
        ),
        OPENS,
    ),
    "pkl_huge_int_tensor_key": (lambda: in_zip(huge_key_dict(tensor())), "not a string"),
    "pkl_huge_int_numel": (
        lambda: in_zip(sd(("a", op_tensor(op_storage("0", 10**5000), 0, (1,), (1,))))),
        "bit int",
    ),
    "pkl_deep_tuple_key": (
        lambda: in_zip(EMPTY_DICT + deep_tuple(90) + tensor() + SETITEM),
        "not a string",
    ),
    "pkl_persid_text": (lambda: in_zip(b"Pabc\n"), "unsupported persistent id"),
    "pkl_storage_type_is_dtype": (
        lambda: in_zip(sd(("a", op_tensor(op_storage("0", 6, "float32"), 0, (6,), (1,))))),
        "unknown storage type",
    ),
    "pkl_storage_numel_negative": (lambda: in_zip(sd(("a", tensor(numel=-1)))), "has size"),
    "pkl_top_level_list": (lambda: in_zip(EMPTY_LIST), "holds a pickled list"),
    "pkl_empty": (lambda: torch_zip(b"", {}), "STOP"),
    "pkl_unknown_opcode": (lambda: torch_zip(PROTO2 + b"\xff" + STOP, {}), "corrupt"),
    "pkl_no_stop": (lambda: torch_zip(PROTO2 + NONE, {}), "STOP"),
    "pkl_stack_underflow": (lambda: torch_zip(PROTO2 + SETITEM + STOP, {}), "underflow"),
    "pkl_setitems_without_mark": (lambda: in_zip(EMPTY_DICT + SETITEMS), "needs a MARK"),
    "pkl_unhashable_key": (lambda: in_zip(EMPTY_DICT + EMPTY_LIST + NONE + SETITEM), "corrupt"),
    "pkl_wrapped_lightning": (SEEDS["wrapped"], OPENS),
    # torch legacy format
    "legacy_valid": (seed_legacy, OPENS),
    "legacy_truncated_in_pickle": (lambda: seed_legacy()[:200], "STOP"),
    "legacy_truncated_in_data": (lambda: seed_legacy()[:-3], "truncated"),
    "legacy_bare_pickle": (lambda: PROTO2 + EMPTY_DICT + STOP, "bare pickle"),
    "legacy_magic_only": (lambda: legacy_prelude()[:12], "STOP"),
    "legacy_numel_mismatch": (
        lambda: legacy_with(sd(("a", tensor(legacy=True))), [("0", 5, F32_6)]),
        "does not match",
    ),
    "legacy_storage_not_listed": (
        lambda: legacy_with(sd(("a", tensor(legacy=True))), []),
        "missing",
    ),
    "legacy_view_metadata": (
        lambda: legacy_with(
            sd(
                (
                    "a",
                    op_tensor(
                        op_tuple(
                            op_str("storage"),
                            op_global("torch", "FloatStorage"),
                            op_str("0"),
                            op_str("cpu"),
                            op_int(6),
                            op_tuple(op_str("1"), op_int(0), op_int(2)),
                        )
                        + b"Q",
                        0,
                        (2,),
                        (1,),
                    ),
                )
            ),
        ),
        "views are not supported",
    ),
    "legacy_keys_not_a_list": (
        lambda: legacy_prelude() + pickle_of(sd()) + pickle_of(EMPTY_DICT),
        "bad storage key list",
    ),
    # the file's pickle was read through a buffered reader, which allocated the claimed 2 GB
    "legacy_binunicode_2^31": (
        lambda: legacy_prelude() + PROTO2 + b"X" + struct.pack("<I", 2**31 - 1) + b"ab",
        "STOP",
    ),
    "legacy_memo_index_2^27": (
        lambda: legacy_prelude() + pickle_of(NONE + b"r" + struct.pack("<I", 2**27)),
        "memo",
    ),
    "legacy_magic_is_huge_int": (
        lambda: pickle_of(op_int(10**5000)) + b"\0" * 8,
        "bare pickle",
    ),
}


UNTRACED = {"pkl_too_many_objects"}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file(case, scratch):
    build, expect = CASES[case]
    # (tracemalloc makes scanning a million opcodes take 20 s; the time bound still holds)
    trace = case not in UNTRACED
    outcome = check_bytes(build(), scratch, f"{case}.pth", trace_memory=trace)
    assert not os.path.exists(PWN_MARKER)
    if expect is OPENS:
        assert outcome.kind == "opened", outcome.message
    else:
        assert outcome.kind == "refused", f"{case} opened ({outcome.tensors} tensors)"
        assert re.search(expect, outcome.message), outcome.message


def test_unsafe_globals_raise_unsafe_error(scratch):
    path = scratch / "evil.pth"
    path.write_bytes(in_zip(op_call(op_global("os", "system"), op_str(f"touch {scratch}/x"))))
    with pytest.raises(UnsafeCheckpointError, match="'os.system'"):
        open_checkpoint(path)
    assert not (scratch / "x").exists()


def test_build_cannot_corrupt_global_dtypes(scratch):
    """BUILD on torch.float32 used to write into cndiff's shared F32 (a frozen dataclass):
    every later file in the process would have been read with the wrong item size."""
    attack = in_zip(
        op_global("torch", "float32") + op_dict([(op_str("itemsize"), op_int(1000))]) + BUILD
    )
    check_bytes(attack, scratch)
    assert F32.itemsize == 4 and by_name("float32").itemsize == 4
    assert check_bytes(seed_zip(), scratch).kind == "opened"


def test_deep_tuple_as_dict_key_does_not_crash(tmp_path):
    """Hashing a tuple nested 1,000,000 deep overflowed the C stack (segfault). Run in a
    child process so that a regression shows as a failed test, not a dead test run."""
    path = tmp_path / "deep.pth"
    path.write_bytes(in_zip(EMPTY_DICT + deep_tuple(1_000_000) + NONE + SETITEM))
    code = (
        "import sys; from cndiff import open_checkpoint\n"
        "try:\n    open_checkpoint(sys.argv[1])\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.startswith("CheckpointError") and "nested more than" in proc.stdout


def test_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "model.pth"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            open_checkpoint(fifo)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("open_checkpoint waited for a writer on a FIFO")
    assert isinstance(result[0], CheckpointError) and "not a regular file" in str(result[0])


@pytest.mark.parametrize(
    "path,expect",
    [
        ("/dev/zero", "not a regular file"),
        ("/dev/null", "not a regular file"),
        ("bad\0name.pth", "not a usable path|no such file"),
        ("x" * 5000 + ".pth", "not a usable path"),
    ],
)
def test_odd_paths(path, expect):
    if path.startswith("/dev/") and not os.path.exists(path):
        pytest.skip(f"no {path} here")
    with pytest.raises(CheckpointError, match=expect):
        open_checkpoint(path)


def test_symlink_loop(tmp_path):
    (tmp_path / "a.pth").symlink_to(tmp_path / "b.pth")
    (tmp_path / "b.pth").symlink_to(tmp_path / "a.pth")
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "a.pth")


def test_legacy_pickle_longer_than_the_first_window(scratch):
    """Legacy pickles are scanned in growing windows (1 MiB first): one of 3 MB opens."""
    body = sd(("note", op_str("x" * 3_000_000)), ("control_model.a", tensor(legacy=True)))
    path = scratch / "big_legacy.pth"
    path.write_bytes(legacy_with(body))
    with open_checkpoint(path) as ck:
        assert ck.format == "torch-legacy" and list(ck.tensors) == ["control_model.a"]
        assert ck.read("control_model.a").tolist() == list(range(6))


def test_non_contiguous_tensor_is_read_once_per_tensor(scratch):
    """Every chunk of a non-contiguous tensor used to re-read the whole tensor (quadratic:
    hours for a hostile multi-GB transposed tensor); now it is materialized once."""
    n = 256
    data = np.arange(n * n, dtype=np.float32)
    pid = op_storage("0", n * n)
    path = scratch / "t.pth"
    path.write_bytes(
        torch_zip(pickle_of(sd(("a", op_tensor(pid, 0, (n, n), (1, n))))), {"0": data.tobytes()})
    )
    with open_checkpoint(path) as ck:
        out = np.empty(n, dtype=np.float32)
        got = [ck.read_into("a", out, i * n).copy() for i in range(n)]
        assert ck.bytes_read == n * n * 4
    assert np.array_equal(np.concatenate(got), data.reshape(n, n).T.reshape(-1))


# -- Hypothesis: mutations of small valid files ----------------------------------------------

mutation = st.tuples(
    st.sampled_from(MUTATIONS),
    st.integers(0, 2**16),
    st.integers(0, 2**12),
    st.binary(min_size=1, max_size=8),
)


@settings(FUZZ, max_examples=examples(250))
@given(seed=st.sampled_from(sorted(SEEDS)), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_files(scratch, seed, mutations):
    data = SEEDS[seed]()
    for kind, pos, arg, extra in mutations:
        data = mutate(data, kind, pos, arg, extra)
    check_bytes(data, scratch)


# -- Hypothesis: safetensors headers ---------------------------------------------------------

ints = st.one_of(st.integers(-3, 40), st.sampled_from(INTERESTING_INTS), st.integers())
json_scalar = st.one_of(
    ints, st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=4)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
dtype_code = st.one_of(
    st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3"]), json_value
)
st_entry = st.one_of(
    st.fixed_dictionaries(
        {
            "dtype": dtype_code,
            "shape": st.one_of(st.lists(ints, max_size=4), json_value),
            "data_offsets": st.one_of(st.lists(ints, min_size=2, max_size=2), json_value),
        }
    ),
    json_value,
)


@settings(FUZZ, max_examples=examples(150))
@given(
    entries=st.dictionaries(st.text(max_size=6), st_entry, max_size=5),
    metadata=st.one_of(st.none(), json_value),
    data_len=st.integers(0, 96),
    dup=st.booleans(),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 8]),
)
def test_random_safetensors_headers(scratch, entries, metadata, data_len, dup, length_delta):
    import json

    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header)
    if dup and entries:  # the first entry again, as a duplicate key
        k = next(iter(entries))
        raw = raw[:-1] + ", " + json.dumps({k: entries[k]})[1:]
    body = raw.encode("utf-8", "surrogatepass")
    data = safetensors_file(body, bytes(range(96))[:data_len], header_len=len(body) + length_delta)
    out = check_bytes(data, scratch)
    if dup and entries:
        assert out.kind == "refused"


# -- Hypothesis: tensor views, with numpy as the oracle ---------------------------------------

dims = st.lists(st.integers(0, 5), max_size=3)


@settings(FUZZ, max_examples=examples(150))
@given(
    numel=st.integers(0, 40),
    extra=st.sampled_from([0, 0, 0, 0, -1, 1, 8]),
    offset=st.one_of(st.integers(0, 45), st.sampled_from([2**31, 2**63])),
    shape=dims,
    stride=st.lists(st.one_of(st.integers(0, 12), st.sampled_from([2**20, 2**40])), max_size=3),
    dtype=st.sampled_from(["FloatStorage", "HalfStorage", "LongStorage", "ByteStorage"]),
    legacy=st.booleans(),
)
def test_random_views(scratch, numel, extra, offset, shape, stride, dtype, legacy):
    np_dtype = {
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "LongStorage": np.int64,
        "ByteStorage": np.uint8,
    }[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    member = max(0, numel * itemsize + extra)  # the bytes stored for the storage
    raw = np.random.default_rng(numel).integers(0, 255, member, dtype=np.uint8).tobytes()
    stride = (stride + [1, 1, 1])[: len(shape)] if len(stride) != len(shape) else stride
    pid = op_storage("0", numel, dtype, legacy=legacy)
    body = sd(("control_model.v", op_tensor(pid, offset, shape, stride)))
    if legacy:
        data = torch_legacy(pickle_of(body), [("0", numel, raw[: numel * itemsize])])
    else:
        data = torch_zip(pickle_of(body), {"0": raw})
    path = scratch / "view.pth"
    path.write_bytes(data)
    out = check_file(path)
    n = int(np.prod(shape)) if shape else 1
    # a zip record must hold exactly the storage (torch refuses any other size); a legacy
    # storage must be complete
    stored = len(raw) >= numel * itemsize if legacy else len(raw) == numel * itemsize
    if n == 0:  # an empty view reads nothing, wherever it starts (torch.save writes such)
        inside = offset < 2**63
    else:
        inside = offset + sum((d - 1) * s for d, s in zip(shape, stride)) < numel
    fits = n * itemsize <= len(data)
    assert (out.kind == "opened") == (stored and inside and fits), out.message
    if out.kind == "opened" and n:
        storage = np.frombuffer(raw[: numel * itemsize], dtype=np_dtype)
        want = np.lib.stride_tricks.as_strided(
            storage[offset:], shape, [s * itemsize for s in stride]
        )
        with open_checkpoint(path) as ck:
            got = ck.read("control_model.v")
            assert got.shape == want.shape and got.tobytes() == want.tobytes()  # (NaNs too)


# -- Hypothesis: random pickles ----------------------------------------------------------------

GLOBALS = [
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "Size"),
    ("torch", "float16"),
    ("_codecs", "encode"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("os", "system"),
    ("builtins", "eval"),
    ("builtins", "getattr"),
    ("builtins", "setattr"),
    ("copyreg", "_reconstructor"),
    ("torch", "load"),
    ("__main__", "x"),
]
snippet = st.one_of(
    st.sampled_from(
        [
            MARK,
            b"t",
            b"l",
            b"d",
            EMPTY_DICT,
            EMPTY_LIST,
            EMPTY_TUPLE,
            TUPLE1,
            b"\x86",
            b"\x87",
            SETITEM,
            SETITEMS,
            APPEND,
            b"e",
            REDUCE,
            BUILD,
            b"Q",
            POP,
            DUP,
            b"1",
            NONE,
            FALSE,
            b"\x81",
            b"\x94",
            b"\x8f",
            b"\x90",
            b"\x91",
        ]
    ),
    st.integers().map(op_int),
    st.sampled_from(INTERESTING_INTS).map(op_int),
    st.sampled_from(["storage", "0", "cpu", "control_model.a", "state_dict", "latin1"]).map(op_str),
    st.text(max_size=5).map(op_str),
    st.sampled_from(GLOBALS).map(lambda g: op_global(*g)),
    st.integers(0, 300).map(op_put),
    st.integers(0, 300).map(op_get),
    st.builds(op_storage, st.sampled_from(["0", "1"]), st.integers(-1, 12)),
    st.builds(lambda o, sh, sr: tensor(o, sh, sr, 6), st.integers(0, 8), dims, dims),
    st.binary(max_size=6),
)


@settings(FUZZ, max_examples=examples(250))
@given(program=st.lists(snippet, max_size=24), container=st.sampled_from(["zip", "legacy"]))
def test_random_pickles(scratch, program, container):
    pkl = PROTO2 + b"".join(program) + STOP
    if container == "zip":
        data = torch_zip(pkl, {"0": F32_6, "1": F32_6})
    else:
        data = (
            legacy_prelude()
            + pkl
            + pickle_of(MARK + op_str("0") + b"l")
            + struct.pack("<q", 6)
            + F32_6
        )
    check_bytes(data, scratch)


# -- through extract ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return synthetic.make_pair(tmp_path_factory.mktemp("fuzzpair"), synthetic.tiny())


@settings(FUZZ, max_examples=examples(12), suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(mutation, min_size=1, max_size=3), which=st.sampled_from(["ctl", "base"]))
def test_extract_with_mutated_inputs(tiny_pair, mutations, which):
    control, base = tiny_pair
    with tempfile.TemporaryDirectory(prefix="cndiff-fuzz-x-") as d:
        folder = Path(d)
        src = control if which == "ctl" else base
        data = src.read_bytes()
        # bias the mutations to the index: the last 4 KiB (zip directory) or the pickle
        for kind, pos, arg, extra in mutations:
            region = len(data) - 4096 if pos % 2 else 0
            data = mutate(data, kind, region + pos % 4096, arg, extra)
        bad = folder / src.name
        bad.write_bytes(data)
        ctl, bse = (bad, base) if which == "ctl" else (control, bad)
        out = folder / "out"
        out.mkdir()
        try:
            result = cndiff.extract(ctl, bse, out, device="cpu")
        except CndiffError as exc:
            assert "\n" not in str(exc)
            assert list(out.iterdir()) == []
        else:
            from safetensors import safe_open

            assert [p.name for p in out.iterdir()] == [result.output.name]
            with safe_open(str(result.output), "np") as f:
                assert "difference" in set(f.keys())


def test_extract_refuses_hostile_inputs(tmp_path, tiny_pair):
    control, base = tiny_pair
    evil = tmp_path / "control_evil.pth"
    enlarge = op_dict([(op_str("shape"), op_tuple(op_int(2**30)))]) + BUILD
    evil.write_bytes(in_zip(sd(("control_model.a", tensor() + enlarge))))
    with pytest.raises(CheckpointError, match="set the state"):
        cndiff.extract(evil, base, tmp_path)
    legacy = tmp_path / "base.ckpt"
    legacy.write_bytes(legacy_prelude() + pickle_of(NONE + b"r" + struct.pack("<I", 2**27)))
    with pytest.raises(CheckpointError, match="memo"):
        cndiff.extract(control, legacy, tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        cndiff.extract(control, evil_base(tmp_path), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base.ckpt",
        "control_evil.pth",
        "os.ckpt",
    ]
    assert not os.path.exists(PWN_MARKER)


def evil_base(folder: Path) -> Path:
    path = folder / "os.ckpt"
    path.write_bytes(in_zip(op_call(op_global("os", "system"), op_str(PWN))))
    return path
