"""The numpy backend: the CPU default. Never imports torch.

numpy has no bfloat16 or float8 type and its float32 -> float16 cast converts one element
at a time, so the conversions are whole-array integer kernels here, bit-exact with
torch's (checked over every float32 bit pattern for float16, see tests/test_backends.py).

Where the optional native module ``cndiff._kernels`` was built (it is, by ``pip install``
on a machine with a C compiler), float32 chunks go through its fused kernels instead:
subtraction, max |d| and rounding in one pass, F16C/AVX2 where the CPU has them. Both paths
give the same bits; ``NumpyBackend(native=False)`` uses numpy alone.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from ..dtypes import BF16, F8_E4M3, F8_E5M2, F16, F32, F64, DType
from ..errors import CndiffError
from . import Raw, combine_segments

try:
    from .. import _kernels as native_kernels
except ImportError:  # not built (no C compiler at install): numpy alone, the same bits
    native_kernels = None

_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}
_OP = {None: 0, "sub": 1, "add": 2}

__all__ = [
    "NumpyBackend",
    "to_float32",
    "to_float64",
    "cast_from_float32",
    "max_abs",
    "compare_chunk",
    "float8_table",
]


# -- element conversions ---------------------------------------------------------------------


def float8_table(dtype: DType) -> np.ndarray:
    """The 256 float32 values of a float8 type (torch's ``float8_e4m3fn``/``e5m2``),
    indexed by the byte; NaNs keep their sign and payload, quieted, as torch's do."""
    if dtype is F8_E4M3:
        ebits, mbits, bias, has_inf = 4, 3, 7, False
    elif dtype is F8_E5M2:
        ebits, mbits, bias, has_inf = 5, 2, 15, True
    else:
        raise ValueError(dtype)
    b = np.arange(256, dtype=np.uint32)
    sign = (b >> 7) << 31
    exp = (b >> mbits) & ((1 << ebits) - 1)
    mant = b & ((1 << mbits) - 1)
    top = (1 << ebits) - 1
    vals = np.where(
        exp == 0,
        np.ldexp(mant.astype(np.float64), 1 - bias - mbits),
        np.ldexp((mant + (1 << mbits)).astype(np.float64), exp.astype(np.int32) - bias - mbits),
    ).astype(np.float32)
    bits = vals.view(np.uint32) | sign
    special = (exp == top) if has_inf else ((exp == top) & (mant == (1 << mbits) - 1))
    nan = special & (mant != 0) if has_inf else special
    inf = special & (mant == 0) if has_inf else np.zeros(256, bool)
    bits = np.where(nan, sign | 0x7FC00000 | (mant << (23 - mbits)), bits)
    bits = np.where(inf, sign | 0x7F800000, bits)
    return bits.astype(np.uint32).view(np.float32)


_F8_TABLES: dict[str, np.ndarray] = {}


def _f8(dtype: DType) -> np.ndarray:
    table = _F8_TABLES.get(dtype.name)
    if table is None:
        table = _F8_TABLES.setdefault(dtype.name, float8_table(dtype))
    return table


def to_float32(raw: Raw, out: np.ndarray, kernels: Any = None) -> np.ndarray:
    """Convert a chunk to float32 in ``out`` (float64 and integers rounded to nearest).
    ``kernels``: the native kernels, when the caller uses them: float16 is then converted
    by F16C (numpy's bits, NaN payloads included; several times faster)."""
    data, dtype = raw
    if dtype is F16 and kernels is not None:
        kernels.half_to_float(data.view(np.uint16), out)
    elif dtype is BF16:
        u = out.view(np.uint32)
        np.copyto(u, data, casting="unsafe")
        np.left_shift(u, 16, out=u)
    elif dtype is F8_E4M3 or dtype is F8_E5M2:
        np.take(_f8(dtype), data, out=out)
    elif dtype.raw:
        raise CndiffError(f"cannot compute with tensors stored as {dtype.name}")
    else:  # float32, float16 (exact), float64 (rounded as torch does), integers, bool
        np.copyto(out, data, casting="unsafe")
    return out


def to_float64(raw: Raw, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Convert a chunk to float64 in ``out`` (exact for every float type); ``scratch`` is
    a float32 array of the same size."""
    data, dtype = raw
    if dtype.raw:
        np.copyto(out, to_float32(raw, scratch))
    else:
        np.copyto(out, data, casting="unsafe")
    return out


def _bf16_round(d: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
    """float32 -> bfloat16 bits, round to nearest even; NaN -> 0xFFFF (torch on x86)."""
    u = d.view(np.uint32)
    np.right_shift(u, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, u, out=tmp)
    np.right_shift(tmp, 16, out=tmp)
    np.copyto(out, tmp, casting="unsafe")
    nan = np.isnan(d)
    if nan.any():
        out[nan] = 0xFFFF


def _f16_round(d: np.ndarray, out: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> None:
    """float32 -> float16, round to nearest even, in whole-array integer steps.

    numpy's own cast converts one element at a time (about 3 ns each); this is about
    twice as fast and gives the same bits for every finite value and infinity (checked
    over all 2^32 float32 bit patterns). NaN keeps its sign and top payload bits and
    becomes quiet, as x86's F16C conversion (torch) does.
    """
    u = d.view(np.uint32)
    np.bitwise_and(u, 0x7FFFFFFF, out=t1)  # |d| as bits
    # normal results: add the exponent rebias and the rounding increment (0xFFF plus the
    # lowest kept bit: ties to even), carry into the exponent, shift down
    np.right_shift(t1, 13, out=t2)
    np.bitwise_and(t2, 1, out=t2)
    np.add(t2, t1, out=t2)
    np.add(t2, np.uint32(0xC8000FFF), out=t2)  # (15 - 127) << 23, plus 0xFFF, mod 2^32
    np.right_shift(t2, 13, out=t2)
    small = t1 < 0x38800000  # below fp16's smallest normal: let a float add round it
    if small.any():
        idx = np.flatnonzero(small)
        sub = t1.view(np.float32)[idx] + np.float32(0.5)
        t2[idx] = sub.view(np.uint32) - np.uint32(0x3F000000)
    big = t1 >= 0x477FF000  # rounds to 65520 or more: infinity (NaN: quiet, payload kept)
    if big.any():
        idx = np.flatnonzero(big)
        a = t1[idx]
        t2[idx] = np.where(a > 0x7F800000, 0x7E00 | ((a >> 13) & 0x3FF), 0x7C00)
    np.right_shift(u, 16, out=t1)
    np.bitwise_and(t1, 0x8000, out=t1)
    np.bitwise_or(t2, t1, out=t2)
    np.copyto(out.view(np.uint16), t2, casting="unsafe")


def cast_from_float32(
    d: np.ndarray, dtype: DType, out: np.ndarray, tmp: np.ndarray, tmp2: np.ndarray
) -> None:
    """Round float32 ``d`` into ``out`` (values, or bits for bfloat16) of ``dtype``;
    ``tmp`` and ``tmp2`` are uint32 scratch arrays of ``d``'s size."""
    if dtype is BF16:
        _bf16_round(d, out, tmp)
    elif dtype is F16:
        _f16_round(d, out, tmp, tmp2)
    else:
        np.copyto(out, d, casting="unsafe")


def max_abs(d: np.ndarray) -> float:
    """max |d|: NaN when any value is NaN."""
    if d.size == 0:
        return 0.0
    hi = float(d.max())
    lo = float(d.min())
    if math.isnan(hi) or math.isnan(lo):
        return math.nan
    return max(hi, -lo)


def compare_chunk(e: np.ndarray, b: np.ndarray, eq: bool, scratch: np.ndarray | None = None):
    """Statistics of ``b - e`` (float32) for the base check: (identical, max |d|, sum |d|,
    sum d^2, sum b^2, count). Sums of squares use float32 BLAS dots: this is a
    classification, not a measurement that needs every digit."""
    n = b.size
    sb = float(np.dot(b, b)) if n else 0.0
    if eq or n == 0:
        return (True, 0.0, 0.0, 0.0, sb, n)
    d = np.subtract(b, e, out=scratch) if scratch is not None else np.subtract(b, e)
    mx = max_abs(d)
    np.abs(d, out=d)
    sa = float(np.add.reduce(d, dtype=np.float64))
    sd = float(np.dot(d, d))
    return (False, mx, sa, sd, sb, n)


# -- scratch buffers ---------------------------------------------------------------------------


class _Scratch:
    """One worker thread's reusable arrays (no allocation per chunk)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.c32 = np.empty(n, np.float32)
        self.b32 = np.empty(n, np.float32)
        self.d32 = np.empty(n, np.float32)
        self.t1 = np.empty(n, np.uint32)
        self.t2 = np.empty(n, np.uint32)
        self._f64: tuple[np.ndarray, np.ndarray] | None = None

    def f64(self) -> tuple[np.ndarray, np.ndarray]:
        if self._f64 is None:
            self._f64 = (np.empty(self.n, np.float64), np.empty(self.n, np.float64))
        return self._f64


# -- the backend ---------------------------------------------------------------------------------


class NumpyBackend:
    """Chunks computed with numpy on the CPU (see :mod:`cndiff.backends`)."""

    name = "numpy"
    device = "cpu"

    def __init__(self, native: bool | None = None) -> None:
        """``native``: use the native kernels (None: when they were built)."""
        self._local = threading.local()
        self.kernels = native_kernels if native is not False else None
        if native and native_kernels is None:
            raise CndiffError("the native kernels (cndiff._kernels) were not built here")

    def __repr__(self) -> str:
        return f"<NumpyBackend cpu{' native' if self.kernels is not None else ''}>"

    def _scratch(self, n: int) -> _Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None or s.n < n:
            s = self._local.scratch = _Scratch(n)
        return s

    def _f32(self, raw: Raw, out: np.ndarray) -> np.ndarray:
        """The chunk as float32: itself, or converted into ``out``."""
        return raw.data if raw.dtype is F32 else to_float32(raw, out, self.kernels)

    def _fused_inputs(
        self, c: Raw, b: Raw | None, s: _Scratch, n: int
    ) -> tuple[np.ndarray, np.ndarray | None, bool, bool]:
        """The native pass's inputs: float32 arrays, or float16 bits that it converts as it
        reads them (in a subtraction or an addition: no pass of its own)."""
        if b is None:
            return self._f32(c, s.c32[:n]), None, False, False
        c_half, b_half = c.dtype is F16, b.dtype is F16
        cf = c.data.view(np.uint16) if c_half else self._f32(c, s.c32[:n])
        bf = b.data.view(np.uint16) if b_half else self._f32(b, s.b32[:n])
        return cf, bf, c_half, b_half

    def host_buffer(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def combine(
        self, op: str | None, c: Raw, b: Raw | None, out: np.ndarray, out_dtype: DType
    ) -> float:
        n = c.data.size
        s = self._scratch(n)
        k = self.kernels
        if k is not None and c.dtype is not F64 and (b is None or b.dtype is not F64) \
                and not (b is None and c.dtype is out_dtype):  # fmt: skip
            # one fused pass over float32: d = c op b, max |d|, rounded into out
            cf, bf, ch, bh = self._fused_inputs(c, b, s, n)
            return k.combine(cf, bf, out, _OP[op if b is not None else None],
                             _KIND[out_dtype.name], ch, bh)  # fmt: skip
        if b is None:
            if c.dtype is F64:
                c64 = c.data
                m = max_abs(c64)
                d = out if out_dtype is F32 else s.d32[:n]
                np.copyto(d, c64, casting="unsafe")
            else:
                d = self._f32(c, s.c32[:n])
                m = max_abs(d)
                if c.dtype is out_dtype:
                    np.copyto(out, c.data)  # the stored bits, NaN payloads included
                    return m
                if out_dtype is F32:
                    np.copyto(out, d)
                    return m
        else:
            ufunc = np.subtract if op == "sub" else np.add
            if c.dtype is F64 or b.dtype is F64:
                a64, b64 = s.f64()
                c64 = c.data if c.dtype is F64 else to_float64(c, a64[:n], s.c32[:n])
                bb64 = b.data if b.dtype is F64 else to_float64(b, b64[:n], s.b32[:n])
                d64 = ufunc(c64, bb64, out=a64[:n])
                m = max_abs(d64)
                d = out if out_dtype is F32 else s.d32[:n]
                np.copyto(d, d64, casting="unsafe")
            else:
                cf = self._f32(c, s.c32[:n])
                bf = self._f32(b, s.b32[:n])
                d = out if out_dtype is F32 else s.d32[:n]
                ufunc(cf, bf, out=d)
                m = max_abs(d)
        if out_dtype is not F32:
            cast_from_float32(d, out_dtype, out, s.t1[:n], s.t2[:n])
        return m

    def combine_many(self, op: str | None, c: Raw, b: Raw | None, out: np.ndarray,
                     out_dtype: DType, starts: np.ndarray) -> np.ndarray:  # fmt: skip
        k = self.kernels
        if k is None or c.dtype is F64 or (b is not None and b.dtype is F64) or (
            b is None and c.dtype is out_dtype
        ):
            return combine_segments(self, op, c, b, out, out_dtype, starts)
        n = c.data.size
        s = self._scratch(n)
        cf, bf, ch, bh = self._fused_inputs(c, b, s, n)
        maxes = np.empty(len(starts) - 1, np.float64)
        k.combine_segments(cf, bf, out, _OP[op if b is not None else None],
                           _KIND[out_dtype.name], starts, maxes, ch, bh)  # fmt: skip
        return maxes

    def compare(self, e: Raw, b: Raw):
        n = b.data.size
        s = self._scratch(n)
        k = self.kernels
        if k is not None:
            eq = e.dtype is b.dtype and k.same_bytes(e.data, b.data)
        else:
            eq = e.dtype is b.dtype and bool(np.array_equal(e.data, b.data))
        bf = self._f32(b, s.b32[:n])
        if k is not None and eq:
            return (True, 0.0, 0.0, 0.0, float(np.dot(bf, bf)) if n else 0.0, n)
        ef = self._f32(e, s.c32[:n])
        if k is not None and n:
            mx, sa, sd, sb = k.compare(ef, bf)
            return (False, mx, sa, sd, sb, n)
        return compare_chunk(ef, bf, eq, s.d32[:n])

    def decompose(self, d: np.ndarray, method: str, max_rank: int) -> NumpyDecomposition:
        return NumpyDecomposition(d, method, max_rank)


# -- Control-LoRA decompositions --------------------------------------------------------------

#: randomized SVD settings for ``method="lowrank"``
LOWRANK_NITER = 4
LOWRANK_OVERSAMPLE = 10


class NumpyDecomposition:
    """The SVD of one float32 difference matrix with numpy's LAPACK.

    ``gram``: eigendecomposition of the float64 Gram matrix ``D Dᵀ`` (or ``Dᵀ D``),
    agreeing with a float64 SVD to ~1e-14; ``exact``: ``numpy.linalg.svd`` in float32;
    ``lowrank``: a randomized range finder (fixed seed) with power iterations, for the
    leading ``max_rank`` singular values only.
    """

    def __init__(self, d: np.ndarray, method: str, max_rank: int) -> None:
        self.method = method
        self.m, self.n = d.shape
        d64 = d.astype(np.float64)
        self.total_sq = float(np.dot(d64.reshape(-1), d64.reshape(-1)))
        self.sq: np.ndarray | None = None
        if method == "gram":
            self.d64 = d64
            self.wide = self.m <= self.n
            g = d64 @ d64.T if self.wide else d64.T @ d64
            w, v = np.linalg.eigh(g)
            self.sq = np.maximum(w[::-1], 0.0)
            self.v = v[:, ::-1]
        elif method == "exact":
            u, s, vh = np.linalg.svd(d, full_matrices=False)
            self.u, self.s, self.vh = u, s, vh
            self.sq = s.astype(np.float64) ** 2
        else:  # lowrank
            q = min(max_rank + LOWRANK_OVERSAMPLE, self.m, self.n)
            rng = np.random.default_rng(0)
            y = d64 @ rng.standard_normal((self.n, q))
            basis, _ = np.linalg.qr(y)
            for _ in range(LOWRANK_NITER):
                z, _ = np.linalg.qr(d64.T @ basis)
                basis, _ = np.linalg.qr(d64 @ z)
            ub, s, vh = np.linalg.svd(basis.T @ d64, full_matrices=False)
            self.u, self.s, self.vh = basis @ ub, s, vh

    def rank_for(self, max_error: float) -> int:
        assert self.sq is not None
        total = float(self.sq.sum())
        if total <= 0.0:
            return 1
        tail = np.concatenate([np.cumsum(self.sq[::-1])[::-1], [0.0]])
        ok = np.flatnonzero(tail <= (max_error**2) * total)
        return max(1, int(ok[0]))

    def tail_sq(self, r: int) -> float | None:
        return float(self.sq[r:].sum()) if self.sq is not None else None

    def factors(self, r: int, split: str) -> tuple[np.ndarray, np.ndarray, float]:
        if self.method == "gram":
            if self.wide:
                u = self.v[:, :r]  # (m, r) left singular vectors
                svh = u.T @ self.d64  # (r, n) = S Vh
                s = np.linalg.norm(svh, axis=1)
            else:
                vr = self.v[:, :r]  # (n, r) right singular vectors
                us = self.d64 @ vr  # (m, r) = U S
                s = np.linalg.norm(us, axis=0)
            # components with (numerically) zero singular value contribute nothing
            tiny = s <= 1e-12 * math.sqrt(self.total_sq)
            safe = np.where(tiny, 1.0, s)
            if self.wide:
                vh = svh / safe[:, None]
            else:
                u, vh = us / safe, vr.T
            s = np.where(tiny, 0.0, s)
        else:
            u, s, vh = self.u[:, :r], self.s[:r].astype(np.float64), self.vh[:r]
        kept = float(np.dot(s, s))
        if split == "balanced":
            rs = np.sqrt(s)
            return (u * rs).astype(np.float32), (vh * rs[:, None]).astype(np.float32), kept
        return (u * s).astype(np.float32), np.asarray(vh, dtype=np.float32), kept
