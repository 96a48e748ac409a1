"""The hashes model sites and UIs show for a model file, in one streaming pass.

========================  =================================================================
``sha256``                of the whole file (Hugging Face, Civitai "SHA256")
``autov2``                the first 10 hex digits of ``sha256`` (A1111's WebUI and Civitai
                          "AutoV2"; what image metadata calls "Model hash")
``autov1``                A1111's legacy short hash: the first 8 hex digits of the sha256 of
                          the 64 KiB at byte offset 1 MiB (0x10000 bytes at 0x100000);
                          Civitai "AutoV1"
``tensor_sha256``         safetensors only: sha256 of everything after the header (the
                          tensor data), so editing ``__metadata__`` does not change it;
                          kohya's sd-scripts store it as ``sshs_model_hash``
``autov3``                its first 12 hex digits (Civitai "AutoV3")
``crc32``                 of the whole file, 8 hex digits (Civitai "CRC32")
``blake3``                of the whole file, when the ``blake3`` package is installed
                          (Civitai "BLAKE3")
========================  =================================================================
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .progress import progress_bar
from .text import escape_path

__all__ = ["FileHashes", "file_hashes"]

_BLOCK = 8 << 20
_AUTOV1_AT, _AUTOV1_LEN = 0x100000, 0x10000


@dataclass(frozen=True, repr=False)
class FileHashes:
    """The hashes of one file (see the module documentation); None where not defined."""

    sha256: str
    autov2: str
    autov1: str
    crc32: str
    tensor_sha256: str | None = None
    autov3: str | None = None
    blake3: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        parts = [f"{k} {v}" for k, v in self.to_dict().items() if v is not None]
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"<FileHashes sha256 {self.sha256[:16]}...>"


def _blake3():
    try:
        import blake3  # type: ignore[import-not-found]
    except ImportError:
        return None
    return blake3.blake3()


def _safetensors_data_start(head: bytes, size: int) -> int | None:
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    return 8 + n if 8 + n <= size else None


def file_hashes(path: str | os.PathLike[str], progress: bool = False) -> FileHashes:
    """Every hash of the module documentation, reading ``path`` once."""
    p = Path(path)
    sha = hashlib.sha256()
    v1 = hashlib.sha256()
    data_sha = None
    b3 = _blake3()
    crc = 0
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    pos = 0
    try:
        f = open(p, "rb", buffering=0)  # noqa: SIM115 - closed below
    except OSError as exc:
        raise CheckpointError(f"{escape_path(p)}: cannot read ({exc.strerror})") from None
    with f, progress_bar(os.fstat(f.fileno()).st_size, f"hash {p.name}", progress) as bar:
        size = os.fstat(f.fileno()).st_size
        data_start = _safetensors_data_start(os.pread(f.fileno(), 16, 0), size)
        if data_start is not None:
            data_sha = hashlib.sha256()
        while True:
            try:
                n = f.readinto(buf)
            except OSError as exc:
                raise CheckpointError(f"{escape_path(p)}: cannot read ({exc.strerror})") from None
            if not n:
                break
            block = view[:n]
            sha.update(block)
            crc = zlib.crc32(block, crc)
            if b3 is not None:
                b3.update(block)
            lo, hi = max(pos, _AUTOV1_AT), min(pos + n, _AUTOV1_AT + _AUTOV1_LEN)
            if lo < hi:
                v1.update(block[lo - pos : hi - pos])
            if data_sha is not None and pos + n > data_start:
                data_sha.update(block[max(0, data_start - pos) :])
            pos += n
            bar.update(n)
    digest = sha.hexdigest()
    tensor = data_sha.hexdigest() if data_sha is not None else None
    return FileHashes(
        sha256=digest,
        autov2=digest[:10],
        autov1=v1.hexdigest()[:8],
        crc32=f"{crc:08x}",
        tensor_sha256=tensor,
        autov3=tensor[:12] if tensor else None,
        blake3=b3.hexdigest() if b3 is not None else None,
    )
