"""Coverage-guided fuzzing of cndiff's checkpoint readers with atheris (libFuzzer).

Not part of the test suite (pytest collects only ``test_*.py``); run it by hand::

    pip install atheris
    python tests/fuzz/fuzz_readers.py -max_total_time=600 /tmp/cndiff-corpus
    python tests/fuzz/fuzz_readers.py crash-<sha1>     # replay one finding

Every input becomes one checkpoint file, built in one of five ways chosen by its first
bytes: the raw bytes; a small valid seed (safetensors, torch zip, torch legacy, a
Lightning-style wrapped zip, and real ``torch.save`` files when torch is installed) with
up to eight mutations (bit flips, bytes, truncation, insertion, deletion, interesting
integers); a pickle assembled from opcode snippets, in a zip or a legacy container; a
safetensors file with a fuzzed header; a tensor view of fuzzed geometry over a fuzzed
storage. The file is then opened and every tensor read through :func:`hostile.check_file`:
anything but a clean refusal (a one-line ``CndiffError``) or a successful open with every
tensor inside the file is a finding, as is an audit event that means code ran, more
than 5 s for one input, or memory: the address space is capped (``RLIMIT_AS``, so a huge
allocation raises MemoryError) and resident memory may not grow past 512 MiB above where
it started. libFuzzer saves the input of a finding as ``crash-*`` / ``timeout-*`` /
``oom-*``. Runs on one core.
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
    import cndiff.inputs.unpickle  # noqa: F401

ADDRESS_SPACE = 6 << 30  # bytes; numpy and atheris take a few hundred MB of it
RSS_GROWTH = 512 << 20  # bytes of resident memory above the start
SCRATCH = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
FILE = SCRATCH / f"cndiff-fuzz-{os.getpid()}.pth"

_TORCH_SEEDS = r"""
import io, sys, torch
sd = {
    "control_model.w": torch.arange(12.0).reshape(3, 4),
    "control_model.b": torch.ones(4).half(),
    "model.diffusion_model.w": torch.zeros(3, 4),
    "control_model.t": torch.arange(6.0).reshape(2, 3).t(),
    "control_model.e": torch.zeros(0, 2),
    "control_model.s": torch.tensor(1.5, dtype=torch.bfloat16),
}
for legacy in (False, True):
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    sys.stdout.buffer.write(len(buf.getvalue()).to_bytes(8, "little") + buf.getvalue())
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
    kind = fdp.ConsumeIntInRange(0, 11)
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
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))


def build_file(data: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 4)
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
    FILE.write_bytes(build_file(data))
    try:
        hostile.check_file(FILE, max_seconds=5.0, trace_memory=False)
    finally:  # (libFuzzer exits without unwinding on a finding)
        FILE.unlink()
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
