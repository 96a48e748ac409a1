"""The short listing of plain zip archives (``ziplist.list_canonical``) against zipfile.

``list_entries`` lists a plain archive itself and hands any other to zipfile. So where
``list_canonical`` answers, zipfile must list the same entries (names as stored, flags,
method, CRC, sizes, attributes, local-header offsets); where zipfile refuses an archive,
``list_canonical`` must give nothing. And opening a checkpoint must give the same index,
or the same refusal, with the short listing as without it.

The corpus: torch.save's archives, the synthetic SD files, hand-made zip64 archives (a
control past 4 GB is one), archives with a comment or data before them (left to
zipfile), and byte-level mutants of them aimed at their central directory and end
records. Each test also checks that the short listing answered where it should: one that
always gave nothing would pass the rest.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from fuzz.hostile import MUTATIONS, mutate, torch_zip

from cndiff import open_checkpoint
from cndiff.errors import CheckpointError
from cndiff.inputs import ziplist
from cndiff.inputs.ziplist import list_by_zipfile, list_canonical, list_entries


def listings(data: bytes, tmp_path: Path) -> tuple:
    """(short listing, zipfile's listing or its refusal) of ``data``."""
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        fast = list_canonical(fd, len(data))
        try:
            ref: object = list_by_zipfile("a.zip", fd, len(data))
        except CheckpointError as exc:
            ref = exc
    finally:
        os.close(fd)
    return fast, ref


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _local(name: bytes, data: bytes, extra: bytes = b"") -> bytes:
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, 0, 0, 0, 0, 0, len(data), len(data),
                       len(name), len(extra)) + name + extra + data  # fmt: skip


def zip64_archive(entries: list[tuple[bytes, bytes]], big: tuple[str, ...], *,
                  end64: bool = True, flags: int = 0x800,
                  extra_for: dict[bytes, bytes] | None = None) -> bytes:  # fmt: skip
    """A stored archive written by hand: the fields in ``big`` ("size", "csize",
    "offset") of every entry are 0xFFFFFFFF in the central directory, their values in a
    zip64 extra field (in that order, as APPNOTE 4.5.3 has them); with ``end64``, zip64
    end records before the end record. ``extra_for``: the extra field of these entries
    instead."""
    body, central = b"", b""
    for name, data in entries:
        offset = len(body)
        body += _local(name, data)
        values = {"size": len(data), "csize": len(data), "offset": offset}
        extra_values = [values[k] for k in ("size", "csize", "offset") if k in big]
        extra = struct.pack("<HH", 1, 8 * len(extra_values)) + b"".join(
            struct.pack("<Q", v) for v in extra_values
        ) if extra_values else b""  # fmt: skip
        extra = (extra_for or {}).get(name, extra)
        cd = {k: 0xFFFF_FFFF if k in big else v for k, v in values.items()}
        central += struct.pack(
            "<4s4B4HL2L5H2L", b"PK\x01\x02", 45, 3, 45, 0, flags, 0, 0, 0x21,
            zipfile.crc32(data), cd["csize"], cd["size"], len(name), len(extra), 0, 0, 0,
            0o644 << 16, cd["offset"],
        ) + name + extra  # fmt: skip
    cd_at, n = len(body), len(entries)
    out = body + central
    if end64:
        record_at = len(out)
        out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n, n,
                           len(central), cd_at)  # fmt: skip
        out += struct.pack("<4sLQL", b"PK\x06\x07", 0, record_at, 1)
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFF_FFFF,
                           0xFFFF_FFFF, 0)  # fmt: skip
    else:
        out += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(central), cd_at, 0)
    return out


ENTRIES = [(b"archive/data.pkl", b"\x80\x02}q\x00."), (b"archive/version", b"3\n"),
           (b"archive/data/0", bytes(range(24)))]  # fmt: skip
BIG_FIELDS = [(), ("size",), ("csize",), ("offset",), ("size", "csize"),
              ("size", "offset"), ("csize", "offset"), ("size", "csize", "offset")]  # fmt: skip


def test_torch_archives_are_listed_as_zipfile_lists_them(tmp_path):
    blobs = [
        saved({}),
        saved({"a": torch.ones(3)}),
        saved({f"k{i}": torch.arange(i + 1, dtype=torch.float16) for i in range(300)}),
        saved({"state_dict": {"w": torch.zeros(2, 2)}, "epoch": 3}),
        torch_zip(b"\x80\x02}q\x00.", {"0": b"\0" * 24}, prefix="odd name/ü"),
    ]
    for blob in blobs:
        fast, ref = listings(blob, tmp_path)
        assert fast is not None and fast == ref
    # a name that is not UTF-8 and not flagged as such: zipfile decodes it as cp437
    blob = zip64_archive([(b"arch\xe9/data.pkl", b"x")], (), end64=False, flags=0)
    fast, ref = listings(blob, tmp_path)
    assert fast == ref and fast[0].raw == b"arch\xe9/data.pkl"
    assert fast[0].orig_filename == "arch\u0398/data.pkl"  # cp437's 0xE9


def test_synthetic_sd_files_are_listed_as_zipfile_lists_them(pair_factory, tmp_path):
    for path in [*pair_factory(), *pair_factory(ema=True, wrapped=True)]:
        data = Path(path).read_bytes()
        if not data.startswith(b"PK"):
            continue
        fast, ref = listings(data, tmp_path)
        assert fast is not None and fast == ref and len(fast) > 100


@pytest.mark.parametrize("big", BIG_FIELDS)
@pytest.mark.parametrize("end64", [True, False])
def test_zip64_fields_and_end_records(tmp_path, big, end64):
    fast, ref = listings(zip64_archive(ENTRIES, big, end64=end64), tmp_path)
    assert fast is not None and fast == ref
    assert [e.raw for e in fast] == [n for n, _ in ENTRIES]
    assert [e.file_size for e in fast] == [len(d) for _, d in ENTRIES]


def test_other_archives_are_left_to_zipfile(tmp_path):
    plain = saved({"a": torch.ones(3)})
    buf = io.BytesIO(plain)
    with zipfile.ZipFile(buf, "a") as z:
        z.comment = b"a comment"
    commented = buf.getvalue()
    prepended = b"junk" * 100 + plain  # zipfile's "concat": offsets move by 400
    for data in (commented, prepended):
        fast, ref = listings(data, tmp_path)
        assert fast is None and isinstance(ref, list) and ref
        path = tmp_path / "b.zip"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert list_entries("b.zip", fd, len(data)) == ref
        finally:
            os.close(fd)
    # an empty archive: nothing to list, both ways
    assert listings(b"PK\x05\x06" + bytes(18), tmp_path) == ([], [])
    for data in (b"", b"PK", bytes(100)):
        fast, ref = listings(data, tmp_path)
        assert fast is None and isinstance(ref, CheckpointError)


@pytest.mark.parametrize(
    "extra",
    [
        struct.pack("<HHQ", 1, 8, 24),  # two values needed, one there
        struct.pack("<HHQ", 1, 12, 24) + b"\0" * 4,  # 12 bytes: still one value
        struct.pack("<HH", 1, 16) + b"\0" * 8,  # longer than the entry's extra field
        struct.pack("<HHQQ", 1, 16, 24, 24) + b"\0\0\0",  # + 3 bytes: no field
        struct.pack("<HHQQ", 1, 16, 24, 24) + struct.pack("<HH", 0x7075, 0),
        struct.pack("<HH", 0x5455, 1) + b"\0" + struct.pack("<HHQQ", 1, 16, 24, 24),
    ],
    ids=["short", "short-12", "past-end", "3-left-over", "then-unicode-path", "after-time"],
)
def test_odd_extra_fields(tmp_path, extra):
    """Where zipfile refuses an extra field, the short listing gives nothing; where it
    reads it, the short listing gives zipfile's entries or nothing."""
    data = zip64_archive(ENTRIES, ("size", "csize"), extra_for={ENTRIES[2][0]: extra})
    fast, ref = listings(data, tmp_path)
    if isinstance(ref, CheckpointError):
        assert fast is None
    else:
        assert fast is None or fast == ref
    if extra.endswith(b"\0\0\0") and len(extra) == 23:
        assert fast == ref and fast[2].file_size == 24


def _mutants(seed: bytes, n: int, rng: random.Random) -> list[bytes]:
    """``n`` mutants of ``seed``, most aimed at its central directory and end records."""
    (cd_at,) = struct.unpack_from("<L", seed, len(seed) - 6)
    if cd_at == 0xFFFF_FFFF:
        (cd_at,) = struct.unpack_from("<Q", seed, len(seed) - 22 - 20 - 56 + 48)
    out = []
    for _ in range(n):
        data = seed
        for _ in range(rng.choice((1, 1, 2, 3))):
            tail = rng.random() < 0.9 and len(data) > cd_at
            pos = rng.randrange(cd_at, len(data)) if tail else rng.randrange(len(data))
            data = mutate(data, rng.choice(MUTATIONS), pos, rng.randrange(1 << 12),
                          rng.randbytes(rng.randrange(1, 9)))  # fmt: skip
        out.append(data)
    return out


def test_mutants_listed_only_as_zipfile_lists_them(tmp_path):
    rng = random.Random(20261205)
    seeds = [
        saved({f"k{i}": torch.ones(i + 1) for i in range(6)}),
        zip64_archive(ENTRIES, ("size", "csize", "offset")),
        zip64_archive(ENTRIES, ("offset",), end64=False),
    ]
    answered = left = 0
    for seed in seeds:
        for data in _mutants(seed, 1000, rng):
            fast, ref = listings(data, tmp_path)
            if fast is None:
                left += 1
                continue
            answered += 1
            assert fast == ref, data
    # both ways taken, many times each
    assert answered > 500 and left > 500, (answered, left)


def _opened(path: Path) -> tuple:
    try:
        with open_checkpoint(path) as ck:
            return ("read", ck.format, ck.wrapped, sorted(ck.extras),
                    {k: (i.dtype.name, i.shape, i.offset, i.stride)
                     for k, i in ck.tensors.items()})  # fmt: skip
    except CheckpointError as exc:
        return ("refused", str(exc))


def test_opening_is_the_same_without_the_short_listing(tmp_path, monkeypatch):
    """Checkpoints and mutants of them open to the same index (or the same refusal,
    word for word) whether the short listing or zipfile lists their archive."""
    rng = random.Random(7)
    seeds = [saved({f"k{i}": torch.ones(i + 1) for i in range(6)}),
             saved({"state_dict": {"w": torch.zeros(2, 3).t()}, "step": 1})]  # fmt: skip
    path = tmp_path / "m.pth"
    answered = 0
    for seed in seeds:
        for data in [seed, *_mutants(seed, 400, rng)]:
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            try:
                answered += list_canonical(fd, len(data)) is not None
            finally:
                os.close(fd)
            with_short = _opened(path)
            monkeypatch.setattr(ziplist, "list_canonical", lambda fd, size: None)
            without = _opened(path)
            monkeypatch.undo()
            assert with_short == without
    assert answered > 100, answered
