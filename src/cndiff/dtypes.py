"""Tensor element types, without importing torch.

cndiff's CPU path runs on numpy alone: importing torch costs about 1.4 s and 220 MB of
memory, several times what the whole extraction of a ControlNet needs. This table names
every dtype a checkpoint may hold, with its size, its safetensors code, its torch name and
the numpy dtype used to hold it (bfloat16 and float8 have no numpy type: they are held as
raw unsigned integers of the same width and converted by :mod:`cndiff.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CndiffError

__all__ = [
    "DType",
    "DTYPES",
    "by_name",
    "by_safetensors",
    "OUTPUT_DTYPES",
    "output_dtype",
    "short_name",
]


@dataclass(frozen=True)
class DType:
    """One element type. ``name`` is torch's name without ``torch.`` (``float16``...)."""

    name: str
    itemsize: int
    safetensors: str
    #: numpy type holding the values (or their raw bits, see ``raw``)
    numpy: np.dtype
    #: True when ``numpy`` holds raw bits (bfloat16, float8) rather than the values
    raw: bool = False
    is_float: bool = False

    def __repr__(self) -> str:
        return self.name

    def to_torch(self):  # -> torch.dtype; imports torch
        from .optional import require_torch

        return getattr(require_torch(f"{self.name} tensors as torch tensors"), self.name)


def _d(name: str, size: int, code: str, npt: str, raw: bool = False, fl: bool = False) -> DType:
    return DType(name, size, code, np.dtype(npt), raw, fl)


DTYPES: tuple[DType, ...] = (
    _d("float64", 8, "F64", "<f8", fl=True),
    _d("float32", 4, "F32", "<f4", fl=True),
    _d("float16", 2, "F16", "<f2", fl=True),
    _d("bfloat16", 2, "BF16", "<u2", raw=True, fl=True),
    _d("float8_e4m3fn", 1, "F8_E4M3", "u1", raw=True, fl=True),
    _d("float8_e5m2", 1, "F8_E5M2", "u1", raw=True, fl=True),
    _d("int64", 8, "I64", "<i8"),
    _d("int32", 4, "I32", "<i4"),
    _d("int16", 2, "I16", "<i2"),
    _d("int8", 1, "I8", "i1"),
    _d("uint8", 1, "U8", "u1"),
    _d("bool", 1, "BOOL", "?"),
)

_BY_NAME = {d.name: d for d in DTYPES}
_BY_CODE = {d.safetensors: d for d in DTYPES}
_ALIASES = {
    "fp64": "float64",
    "double": "float64",
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
}

#: the dtypes an output may be written in, by their command-line names
OUTPUT_DTYPES = {
    "fp16": _BY_NAME["float16"],
    "bf16": _BY_NAME["bfloat16"],
    "fp32": _BY_NAME["float32"],
}

F32 = _BY_NAME["float32"]
F16 = _BY_NAME["float16"]
BF16 = _BY_NAME["bfloat16"]
F64 = _BY_NAME["float64"]
F8_E4M3 = _BY_NAME["float8_e4m3fn"]
F8_E5M2 = _BY_NAME["float8_e5m2"]


def by_name(name: str) -> DType:
    """Look a dtype up by name (``float16``, ``fp16``, ``half``, ``torch.float16``...)."""
    key = str(name).removeprefix("torch.").lower()
    key = _ALIASES.get(key, key)
    try:
        return _BY_NAME[key]
    except KeyError:
        raise CndiffError(f"unknown dtype {name!r}; use one of fp16, bf16, fp32") from None


def by_safetensors(code: str) -> DType | None:
    """The dtype of a safetensors code (``F16``...), or None when unknown."""
    return _BY_CODE.get(code)


def output_dtype(dtype: str | DType) -> DType:
    """The output dtype named by ``dtype`` (``fp16``, ``bf16``, ``fp32`` or their long
    names); anything else is a :class:`CndiffError`."""
    dt = dtype if isinstance(dtype, DType) else OUTPUT_DTYPES.get(str(dtype).lower())
    if dt is None:
        dt = by_name(str(dtype))
    if dt not in OUTPUT_DTYPES.values():
        raise CndiffError(f"output dtype must be fp16, bf16 or fp32, not {dtype!r}")
    return dt


def short_name(dtype: DType) -> str:
    """``fp16``, ``bf16`` or ``fp32``: how file names and the command line say it."""
    return {v.name: k for k, v in OUTPUT_DTYPES.items()}.get(dtype.name, dtype.name)
