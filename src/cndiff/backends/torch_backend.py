"""The torch backend: torch's kernels on any torch device (imported only when chosen).

On CUDA, chunks are read into pinned host buffers, copied to the GPU without blocking on
a CUDA stream of the worker thread's own, computed there and copied back into pinned
memory; each call waits for its stream before it returns, so the engine may reuse the
buffers at once, while other worker threads keep the GPU and the disk busy. On the CPU
(``backend="torch"``) the same code runs on ``torch.from_numpy`` views of the engine's
buffers: this is how the suite runs the GPU path's code on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from ..dtypes import F64, DType
from ..optional import require_torch
from . import Raw, combine_segments

__all__ = ["TorchBackend"]


class TorchBackend:
    """Chunks computed with torch on ``device`` (see :mod:`cndiff.backends`)."""

    name = "torch"

    def __init__(self, device: str = "cpu") -> None:
        torch = require_torch(f"the torch backend ({device})")
        self.torch = torch
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.dev = dev
        self.device = str(dev)
        self.cuda = dev.type == "cuda"
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<TorchBackend {self.device}>"

    # -- buffers and streams -----------------------------------------------------------------
    def host_buffer(self, nbytes: int) -> np.ndarray:
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=self.cuda)
        return t.numpy()

    def _stream(self):
        if not self.cuda:
            return contextlib.nullcontext()
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self.torch.cuda.Stream(self.dev)
        return self.torch.cuda.stream(stream)

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.current_stream(self.dev).synchronize()

    def _tensor(self, raw: Raw):
        """A chunk as a torch tensor of its dtype on the device (a view on the CPU)."""
        t = self.torch.from_numpy(raw.data)
        if raw.dtype.raw:
            t = t.view(raw.dtype.to_torch())
        if self.cuda:
            t = t.to(self.dev, non_blocking=True)
        return t

    # -- the interface -----------------------------------------------------------------------
    def combine(
        self, op: str | None, c: Raw, b: Raw | None, out: np.ndarray, out_dtype: DType
    ) -> float:
        torch = self.torch
        with self._stream():
            ct = self._tensor(c)
            wide = c.dtype is F64 or (b is not None and b.dtype is F64)
            p = torch.float64 if wide else torch.float32
            if b is None:
                v = ct.to(p)
                res = ct if c.dtype is out_dtype else v
            else:
                bt = self._tensor(b)
                v = ct.to(p) - bt.to(p) if op == "sub" else ct.to(p) + bt.to(p)
                res = v
            m = v.abs().max() if v.numel() else None
            if res.dtype == torch.float64:
                res = res.to(torch.float32)  # torch's own double -> half goes through float
            o = torch.from_numpy(out)
            if out_dtype.raw:
                o = o.view(out_dtype.to_torch())
            o.copy_(res, non_blocking=self.cuda)
            mx = float(m) if m is not None else 0.0
            self._sync()
        return mx

    def combine_many(self, op: str | None, c: Raw, b: Raw | None, out: np.ndarray,
                     out_dtype: DType, starts: np.ndarray) -> np.ndarray:  # fmt: skip
        return combine_segments(self, op, c, b, out, out_dtype, starts)

    def compare(self, e: Raw, b: Raw):
        torch = self.torch
        n = b.data.size
        eq = e.dtype is b.dtype and bool(np.array_equal(e.data, b.data))
        with self._stream():
            bt = self._tensor(b).to(torch.float32)
            sb = float(torch.dot(bt, bt)) if n else 0.0
            if eq or n == 0:
                self._sync()
                return (True, 0.0, 0.0, 0.0, sb, n)
            d = bt - self._tensor(e).to(torch.float32)
            mx = float(d.abs().max())
            d = d.abs()
            sa = float(d.sum(dtype=torch.float64))
            sd = float(torch.dot(d, d))
            self._sync()
        return (False, mx if not math.isnan(mx) else math.nan, sa, sd, sb, n)

    def decompose(self, d: np.ndarray, method: str, max_rank: int) -> TorchDecomposition:
        return TorchDecomposition(self, d, method, max_rank)


#: torch.svd_lowrank settings for ``method="lowrank"``
LOWRANK_NITER = 4
LOWRANK_OVERSAMPLE = 10


class TorchDecomposition:
    """The SVD of one difference matrix with ``torch.linalg`` on the backend's device
    (same methods as :class:`~cndiff.backends.numpy_backend.NumpyDecomposition`)."""

    def __init__(self, backend: TorchBackend, d: np.ndarray, method: str, max_rank: int) -> None:
        torch = backend.torch
        self.torch = torch
        self.method = method
        dt = torch.from_numpy(np.ascontiguousarray(d)).to(backend.dev)
        self.m, self.n = dt.shape
        d64 = dt.double()
        self.total_sq = float((d64 * d64).sum())
        self.sq = None
        if method == "gram":
            self.d64 = d64
            self.wide = self.m <= self.n
            g = d64 @ d64.T if self.wide else d64.T @ d64
            w, v = torch.linalg.eigh(g)
            self.sq = w.flip(0).clamp_min(0)
            self.v = v.flip(1)
        elif method == "exact":
            u, s, vh = torch.linalg.svd(dt, full_matrices=False)
            self.u, self.s, self.vh = u, s, vh
            self.sq = s.double() ** 2
        else:
            q = min(max_rank + LOWRANK_OVERSAMPLE, self.m, self.n)
            u, s, v = torch.svd_lowrank(dt, q=q, niter=LOWRANK_NITER)
            self.u, self.s, self.vh = u, s, v.T

    def rank_for(self, max_error: float) -> int:
        torch = self.torch
        assert self.sq is not None
        total = float(self.sq.sum())
        if total <= 0.0:
            return 1
        tail = torch.cat([self.sq.flip(0).cumsum(0).flip(0), self.sq.new_zeros(1)])
        ok = torch.nonzero(tail <= (max_error**2) * total).flatten()
        return max(1, int(ok[0]))

    def tail_sq(self, r: int) -> float | None:
        return float(self.sq[r:].sum()) if self.sq is not None else None

    def factors(self, r: int, split: str) -> tuple[np.ndarray, np.ndarray, float]:
        torch = self.torch
        if self.method == "gram":
            if self.wide:
                u = self.v[:, :r]
                svh = u.T @ self.d64
                s = svh.norm(dim=1)
            else:
                vr = self.v[:, :r]
                us = self.d64 @ vr
                s = us.norm(dim=0)
            tiny = s <= 1e-12 * math.sqrt(self.total_sq)
            safe = torch.where(tiny, torch.ones_like(s), s)
            if self.wide:
                vh = svh / safe[:, None]
            else:
                u, vh = us / safe, vr.T
            s = torch.where(tiny, torch.zeros_like(s), s)
        else:
            u, s, vh = self.u[:, :r], self.s[:r].double(), self.vh[:r]
        kept = float((s * s).sum())
        if split == "balanced":
            rs = s.sqrt()
            up, down = u * rs, vh * rs[:, None]
        else:
            up, down = u * s, vh
        return up.float().cpu().numpy(), down.float().cpu().numpy(), kept
