"""Coverage-guided fuzzing of cndiff's checkpoint readers with atheris (libFuzzer).

Not part of the test suite (pytest collects only ``test_*.py``); run it by hand::

    pip install atheris            # (or: pip install --target DIR atheris; PYTHONPATH=DIR)
    python tests/fuzz/fuzz_readers.py -max_total_time=600 /tmp/cndiff-corpus
    python tests/fuzz/fuzz_readers.py crash-<sha1>     # replay one finding

Every input becomes one checkpoint file, built in one of seven ways chosen by its first
bytes: the raw bytes; a small valid seed (safetensors, torch zip, torch legacy, a
Lightning-style wrapped zip, and real ``torch.save`` and safetensors-library files when
torch is installed) with up to eight mutations (bit flips, bytes, truncation, insertion,
deletion, interesting integers); a pickle assembled from opcode snippets (memo DAGs,
colliding keys, BUILD states, calls on memoized objects among them), in a zip or a
legacy container; a safetensors file with a fuzzed header; a tensor view of fuzzed
geometry over a fuzzed storage; a zip archive of fuzzed records (duplicate names,
folders, versions, storages named with several dtypes); a safetensors header of fuzzed
canonical and odd entries.

The file is then checked three ways:

* :func:`hostile.check_file`: a clean refusal (a one-line, printable ``CndiffError``) or a
  successful open with every tensor inside the file and read, no code run;
* the bounds: at most :data:`MAX_SECONDS` for one input, and resident memory may not grow
  past :data:`RSS_GROWTH` above where it started (the address space is capped too, so a
  huge allocation raises MemoryError): the readers' work is bounded by the file;
* when torch is installed, :func:`differential.compare`: cndiff and
  ``torch.load(weights_only=True)`` / ``safetensors.safe_open`` agree bit for bit, or
  disagree in one of the named, deliberate ways.

libFuzzer saves the input of a finding as ``crash-*`` / ``timeout-*`` / ``oom-*``. Runs
on one core.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import atheris
import numpy  # noqa: F401  (imported before instrumentation: only cndiff is instrumented)

with atheris.instrument_imports(include=["cndiff"]):
    import hostile

    import cndiff.inputs.checkpoint  # noqa: F401
    import cndiff.inputs.opening  # noqa: F401
    import cndiff.inputs.safetensors  # noqa: F401
    import cndiff.inputs.torchfile  # noqa: F401
    import cndiff.inputs.unpickle  # noqa: F401
    import cndiff.inputs.ziplist  # noqa: F401

try:  # the differential against the reference readers, when they are installed
    import differential
except ImportError:
    differential = None

ADDRESS_SPACE = 8 << 30  # bytes; torch, numpy and atheris take a few GB of it
RSS_GROWTH = 256 << 20  # bytes of resident memory above the start
MAX_SECONDS = 2.0  # for one input (of at most a few kilobytes, or a seed)
SCRATCH = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
FILE = SCRATCH / f"cndiff-fuzz-{os.getpid()}.pth"

_TORCH_SEEDS = r"""
import io, sys, torch
from safetensors.torch import save
sd = {
    "control_model.w": torch.arange(12.0).reshape(3, 4),
    "control_model.b": torch.ones(4).half(),
    "model.diffusion_model.w": torch.zeros(3, 4),
    "control_model.t": torch.arange(6.0).reshape(2, 3).t(),
    "control_model.e": torch.zeros(0, 2),
    "control_model.s": torch.tensor(1.5, dtype=torch.bfloat16),
}
sd["control_model.v"] = sd["control_model.w"][1]  # a view sharing a storage
outs = []
for legacy in (False, True):
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    outs.append(buf.getvalue())
buf = io.BytesIO()
torch.save({"state_dict": sd, "epoch": 3}, buf)
outs.append(buf.getvalue())
outs.append(save({k: v.contiguous() for k, v in sd.items() if k != "control_model.v"},
                 metadata={"format": "pt"}))
for out in outs:
    sys.stdout.buffer.write(len(out).to_bytes(8, "little") + out)
"""


def load_seeds() -> list[bytes]:
    seeds = [build() for build in hostile.SEEDS.values()]
    try:  # real torch.save files (alignment padding, version records...) when torch is here
        out = subprocess.run([sys.executable, "-c", _TORCH_SEEDS], capture_output=True,
                             timeout=120, check=True).stdout  # fmt: skip
        while out:
            n = int.from_bytes(out[:8], "little")
            seeds.append(out[8 : 8 + n])
            out = out[8 + n :]
    except (subprocess.SubprocessError, OSError):
        print("fuzz_readers: torch not available; hand-made seeds only", file=sys.stderr)
    return seeds


SEED_BYTES: list[bytes] = []

# opcode snippets for pickle programs (see tests/test_fuzz.py's random pickles)
_GLOBALS = [
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
    ("torch", "Size"), ("torch", "float16"), ("_codecs", "encode"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy", "ndarray"),
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("os", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("copyreg", "_reconstructor"),
]  # fmt: skip
_OPS = [
    b"(", b"t", b"l", b"d", b"}", b"]", b")", b"\x85", b"\x86", b"\x87", b"s", b"u", b"a", b"e",
    b"R", b"b", b"Q", b"0", b"2", b"1", b"N", b"\x88", b"\x89", b"\x81", b"\x92", b"\x94",
    b"\x8f", b"\x90", b"\x91", b"\x93", b".",
]  # fmt: skip
_STRINGS = ["storage", "0", "1", "cpu", "control_model.a", "state_dict", "latin1", "shape"]


def _snippet(fdp: atheris.FuzzedDataProvider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 17)
    if kind == 0:
        return _OPS[fdp.ConsumeIntInRange(0, len(_OPS) - 1)]
    if kind == 1:
        return hostile.op_int(fdp.ConsumeIntInRange(-(2**40), 2**40))
    if kind == 2:
        return hostile.op_int(hostile.INTERESTING_INTS[fdp.ConsumeIntInRange(0, 20)])
    if kind == 3:
        return hostile.op_str(_STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)])
    if kind == 4:
        return hostile.op_str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8)))
    if kind == 5:
        return hostile.op_global(*_GLOBALS[fdp.ConsumeIntInRange(0, len(_GLOBALS) - 1)])
    if kind == 6:
        return hostile.op_put(fdp.ConsumeIntInRange(0, 70000))
    if kind == 7:
        return hostile.op_get(fdp.ConsumeIntInRange(0, 300))
    if kind == 8:
        key = str(fdp.ConsumeIntInRange(0, 1))
        return hostile.op_storage(key, fdp.ConsumeIntInRange(-1, 40), legacy=fdp.ConsumeBool())
    if kind == 9:
        shape = [fdp.ConsumeIntInRange(0, 6) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        stride = [fdp.ConsumeIntInRange(0, 12) for _ in range(len(shape))]
        pid = hostile.op_storage("0", 6)
        return hostile.op_tensor(pid, fdp.ConsumeIntInRange(0, 8), shape, stride)
    if kind == 10:  # a length-prefixed opcode claiming more than there is
        code = [b"X", b"B", b"\x8e", b"\x8d", b"\x96", b"\x8b", b"\x95"][
            fdp.ConsumeIntInRange(0, 6)
        ]
        width = 4 if code in (b"X", b"B", b"\x8b") else 8
        return code + fdp.ConsumeIntInRange(0, 2 ** (8 * width) - 1).to_bytes(width, "little")
    if kind == 12:  # a memo DAG of tuples (2**depth leaves), at memo slots from 0 to 110
        return hostile.dag_tuple(fdp.ConsumeIntInRange(0, 60), fdp.ConsumeIntInRange(0, 50))
    if kind == 13:  # ints (or 1-tuples of them) with one hash
        n = fdp.ConsumeIntInRange(1, 40)
        ints = [hostile.op_int(k) for k in hostile.colliding_ints(n)]
        if fdp.ConsumeBool():
            ints = [i + hostile.TUPLE1 for i in ints]
        return b"".join(ints)
    if kind == 14:  # an OrderedDict with a BUILD state naming a method
        name = ["items", "get", "keys", "values", "__class__", "_metadata", "__dict__"][
            fdp.ConsumeIntInRange(0, 6)
        ]
        od = hostile.op_call(hostile.op_global("collections", "OrderedDict"))
        return od + hostile.op_dict([(hostile.op_str(name), hostile.NONE)]) + hostile.BUILD
    if kind == 15:  # a call of an allowed callable on memo slot k, n times
        fn = _GLOBALS[fdp.ConsumeIntInRange(0, 7)]
        k = fdp.ConsumeIntInRange(0, 20)
        call = hostile.op_global(*fn) + hostile.op_get(k) + hostile.TUPLE1 + hostile.REDUCE
        return call * fdp.ConsumeIntInRange(1, 20)
    if kind == 16:  # a tensor with torch's metadata argument, or too few arguments
        pid = hostile.op_storage("0", 6)
        args = [
            pid,
            hostile.op_int(0),
            hostile.op_tuple(hostile.op_int(6)),
            hostile.op_tuple(hostile.op_int(1)),
            hostile.FALSE,
            hostile.EMPTY_DICT,
            hostile.op_dict(
                [
                    (
                        hostile.op_str(["neg", "conj", "x"][fdp.ConsumeIntInRange(0, 2)]),
                        [hostile.TRUE, hostile.FALSE][fdp.ConsumeIntInRange(0, 1)],
                    )
                ]
            ),
        ]
        fn = hostile.op_global("torch._utils", "_rebuild_tensor_v2")
        return hostile.op_call(fn, *args[: fdp.ConsumeIntInRange(3, 7)])
    if kind == 17:  # a storage named again with another dtype or size
        st = ["FloatStorage", "HalfStorage", "DoubleStorage"][fdp.ConsumeIntInRange(0, 2)]
        return hostile.op_storage("0", fdp.ConsumeIntInRange(0, 12), st, legacy=fdp.ConsumeBool())
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))


_RECORDS = [
    "data.pkl",
    "data/0",
    "data/1",
    "version",
    ".data/version",
    "byteorder",
    "data/",
    "data/0/",
]


def _zip_of_records(fdp: atheris.FuzzedDataProvider) -> bytes:
    """An archive of fuzzed records: names repeated, out of the folder, folders..."""
    folder = ["archive/", "archive/", "other/", ""][fdp.ConsumeIntInRange(0, 3)]
    pid = hostile.op_storage("0", fdp.ConsumeIntInRange(0, 8))
    pkl = hostile.pickle_of(hostile.op_dict([(hostile.op_str("w"), hostile.op_tensor(
        pid, 0, (fdp.ConsumeIntInRange(0, 6),), (1,)))]))  # fmt: skip
    entries = []
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        name = _RECORDS[fdp.ConsumeIntInRange(0, len(_RECORDS) - 1)]
        if name == "data.pkl":
            data = pkl
        elif name.endswith("version"):
            data = [b"3\n", b"3", b"0", b"11", b"x", b""][fdp.ConsumeIntInRange(0, 5)]
        elif name == "byteorder":
            data = [b"little", b"big", b"little\n", b""][fdp.ConsumeIntInRange(0, 3)]
        else:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        entries.append((("archive/" if fdp.ConsumeBool() else folder) + name, data))
    return hostile.zip_entries(entries)


def _safetensors_entries(fdp: atheris.FuzzedDataProvider) -> bytes:
    """A safetensors header of canonical entries (any spacing) and odd ones."""
    parts, offset = [], 0
    ws = [b"", b" ", b"\n  "][fdp.ConsumeIntInRange(0, 2)]
    for i in range(fdp.ConsumeIntInRange(0, 6)):
        key = [b"k%d" % i, b"k", b"__metadata__", b"\\ud800", b"\xed\xa0\x80", b"\\u001b"][
            fdp.ConsumeIntInRange(0, 5)
        ]
        n = fdp.ConsumeIntInRange(0, 4)
        end = offset + 4 * n + fdp.ConsumeIntInRange(-1, 1) * fdp.ConsumeIntInRange(0, 1)
        shape = b",".join(b"%d" % d for d in ([n] if fdp.ConsumeBool() else [1, n]))
        entry = (b'"%s":%s{"dtype":"F32",%s"shape":[%s],"data_offsets":[%d,%d]}'
                 % (key, ws, ws, shape, offset, max(end, 0)))  # fmt: skip
        if fdp.ConsumeBool():
            entry = entry[:-1] + b',"x":' + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12)) + b"}"
        parts.append(entry)
        offset = max(end, offset)
    if fdp.ConsumeBool():
        parts.insert(0, b'"__metadata__":{"a":"b"}')
    header = b"{" + (b"," + ws).join(parts) + b"}" + b" " * fdp.ConsumeIntInRange(0, 3)
    return hostile.safetensors_file(header, bytes(offset + fdp.ConsumeIntInRange(0, 8)))


def build_file(data: bytes) -> tuple[bytes, str]:
    """The file an input stands for, and its suffix (the reference reader goes by it)."""
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 6)
    if mode == 5:
        return _zip_of_records(fdp), ".pth"
    if mode == 6:
        return _safetensors_entries(fdp), ".safetensors"
    out = _build_file(fdp, mode)
    return out, ".safetensors" if out[8:9] == b"{" else ".pth"


def _build_file(fdp: atheris.FuzzedDataProvider, mode: int) -> bytes:
    if mode == 0:
        return fdp.ConsumeBytes(fdp.remaining_bytes())
    if mode == 1:
        out = SEED_BYTES[fdp.ConsumeIntInRange(0, len(SEED_BYTES) - 1)]
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            kind = hostile.MUTATIONS[fdp.ConsumeIntInRange(0, len(hostile.MUTATIONS) - 1)]
            pos = fdp.ConsumeIntInRange(0, 2**20)
            arg = fdp.ConsumeIntInRange(0, 2**12)
            extra = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 8))
            out = hostile.mutate(out, kind, pos, arg, extra)
        return out
    if mode == 2:
        program = b"".join(_snippet(fdp) for _ in range(fdp.ConsumeIntInRange(0, 40)))
        pkl = hostile.PROTO2 + program + hostile.STOP
        f32 = bytes(24)
        if fdp.ConsumeBool():
            return hostile.torch_zip(pkl, {"0": f32, "1": f32[: fdp.ConsumeIntInRange(0, 24)]})
        keys = hostile.pickle_of(hostile.MARK + hostile.op_str("0") + b"l")
        return hostile.legacy_prelude() + pkl + keys + struct.pack("<q", 6) + f32
    if mode == 3:
        header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
        delta = fdp.ConsumeIntInRange(-8, 8) if fdp.ConsumeBool() else 0
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        return struct.pack("<Q", max(0, len(header) + delta)) + header + body
    # mode 4: one tensor view of fuzzed geometry over a fuzzed storage
    numel = fdp.ConsumeIntInRange(0, 64)
    storage = ["FloatStorage", "HalfStorage", "LongStorage", "ByteStorage", "BoolStorage"][
        fdp.ConsumeIntInRange(0, 4)
    ]
    ndim = fdp.ConsumeIntInRange(0, 4)
    shape = [fdp.ConsumeIntInRange(0, 9) for _ in range(ndim)]
    stride = [fdp.ConsumeIntInRange(0, 2 ** fdp.ConsumeIntInRange(0, 40)) for _ in range(ndim)]
    offset = fdp.ConsumeIntInRange(0, 2 ** fdp.ConsumeIntInRange(0, 64))
    legacy = fdp.ConsumeBool()
    raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
    pid = hostile.op_storage("0", numel, storage, legacy=legacy)
    body = hostile.op_dict([(hostile.op_str("control_model.v"),
                             hostile.op_tensor(pid, offset, shape, stride))])  # fmt: skip
    if legacy:
        return hostile.torch_legacy(hostile.pickle_of(body), [("0", numel, raw)])
    return hostile.torch_zip(hostile.pickle_of(body), {"0": raw})


_RSS_START = 0


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' name)
    content, suffix = build_file(data)
    path = FILE.with_suffix(suffix)
    path.write_bytes(content)
    try:
        hostile.check_file(path, max_seconds=MAX_SECONDS, trace_memory=False)
        if differential is not None:
            differential.compare(path)
    finally:  # (libFuzzer exits without unwinding on a finding)
        path.unlink()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rss > _RSS_START + RSS_GROWTH:
        raise MemoryError(f"resident memory grew to {rss >> 20} MiB")


def main() -> None:
    global _RSS_START
    SEED_BYTES.extend(load_seeds())
    hostile.install_audit_hook()
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    _RSS_START = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
