"""Compute backends: the arithmetic of every command, behind one small interface.

A backend turns chunks of raw tensor bytes into output bytes. Two implement it:

* :class:`~cndiff.backends.numpy_backend.NumpyBackend` — the CPU default; never imports
  torch (which costs ~1.5 s and 200 MB of memory on its own);
* :class:`~cndiff.backends.torch_backend.TorchBackend` — torch's kernels on any torch
  device: ``cuda`` (pinned host buffers, one CUDA stream per worker thread) or ``cpu``
  (``backend="torch"``), which is how the GPU code runs in CI on a machine without one.

Both give the same bytes (the suite compares them). The interface:

``host_buffer(nbytes)``
    a reusable uint8 host buffer that tensor chunks are read into (pinned on CUDA);
``combine(op, c, b, out, out_dtype)``
    ``out = cast(c op b)`` (``op`` ``"sub"`` or ``"add"``; ``b`` None: ``cast(c)``), see
    *Arithmetic* below; returns max ``|c op b|`` (or ``|c|``): NaN when a value is NaN,
    inf when one is infinite;
``combine_many(op, c, b, out, out_dtype, starts)``
    ``combine`` over consecutive segments ``[starts[j], starts[j+1])`` (many small tensors
    read together), each one's max into the returned float64 array;
``compare(e, b)``
    statistics of ``b - e`` for the base check;
``decompose(d, method, max_rank)``
    the SVD of one Control-LoRA difference matrix (:class:`Decomposition`).

Where both operands of an element are NaN, which of the two payloads the result keeps is
the hardware's choice (it may differ between backends); NaN it is in every case.

Arithmetic (the reference ``extract_controlnet_diff.py`` on torch, bit for bit): both
operands are converted to ``P`` = float32, or float64 when either is float64 (torch's
type promotion, with float32 as the floor: integers, bool, float16, bfloat16 and float8
become float32); ``d = c - b`` in ``P``, one IEEE operation, correctly rounded; then
``d`` is rounded to the output dtype, round-to-nearest-even, through float32 when ``P`` is
float64 (as torch's ``.to()`` does). NaN becomes NaN (bfloat16: ``0xFFFF``, float16: sign
and top payload bits kept, as torch's x86 kernels do).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol

import numpy as np

from ..dtypes import DType
from ..errors import CndiffError
from ..optional import require_torch

__all__ = [
    "Backend",
    "Raw",
    "Decomposition",
    "select_backend",
    "combine_segments",
    "OPS",
]

#: the ways ``combine`` joins a control chunk with a base chunk
OPS = ("sub", "add")


class Raw(NamedTuple):
    """A chunk as read from a file: ``data`` holds the values, or the raw bits for
    bfloat16 and float8 (``DType.numpy``), of ``dtype``."""

    data: np.ndarray
    dtype: DType


class Decomposition(Protocol):
    """The SVD of one difference matrix ``D`` (``m x n``), by one method."""

    #: ``||D||_F^2``
    total_sq: float

    def rank_for(self, max_error: float) -> int:
        """The smallest rank whose relative truncation error is at most ``max_error``."""

    def factors(self, r: int, split: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``(up (m, r), down (r, n), kept energy)``, float32 numpy arrays."""

    def tail_sq(self, r: int) -> float | None:
        """``||D - D_r||_F^2``, the sum of the squared singular values past ``r`` (None
        when the method does not compute them all: ``lowrank``)."""


class Backend(Protocol):
    """What every compute backend offers (see the module documentation)."""

    name: str
    device: str

    def host_buffer(self, nbytes: int) -> np.ndarray: ...

    def combine(
        self, op: str | None, c: Raw, b: Raw | None, out: np.ndarray, out_dtype: DType
    ) -> float: ...

    def combine_many(
        self, op: str | None, c: Raw, b: Raw | None, out: np.ndarray, out_dtype: DType,
        starts: np.ndarray,
    ) -> np.ndarray: ...

    def compare(self, e: Raw, b: Raw) -> tuple[bool, float, float, float, float, int]: ...

    def decompose(self, d: np.ndarray, method: str, max_rank: int) -> Decomposition: ...


def _nvidia_present() -> bool:
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def select_backend(device: str = "auto", backend: str = "auto") -> Backend:
    """The backend for validated ``device`` and ``backend`` options (see
    :class:`~cndiff.options.Options`).

    ``device="auto"`` is CUDA when torch is installed and sees a GPU (torch is imported
    only when an NVIDIA device node exists, so CPU-only machines never pay for it), else
    the CPU, where ``backend="auto"`` means numpy.
    """
    from .numpy_backend import NumpyBackend

    if device == "cpu" or (device == "auto" and (backend == "numpy" or not _nvidia_present())):
        if backend == "torch":
            from .torch_backend import TorchBackend

            return TorchBackend("cpu")
        return NumpyBackend()
    if device == "auto":
        try:
            import torch
        except ImportError:
            return NumpyBackend() if backend != "torch" else select_backend("cpu", backend)
        if not torch.cuda.is_available():
            return select_backend("cpu", backend)
        device = "cuda"
    torch = require_torch(f"--device {device}")
    if not torch.cuda.is_available():
        raise CndiffError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    from .torch_backend import TorchBackend

    return TorchBackend(device)


def combine_segments(backend: Backend, op: str | None, c: Raw, b: Raw | None, out: np.ndarray,
                     out_dtype: DType, starts: np.ndarray) -> np.ndarray:  # fmt: skip
    """``combine_many`` by one ``combine`` per segment (what backends without a fused
    version do)."""
    maxes = np.empty(len(starts) - 1, np.float64)
    for j in range(len(maxes)):
        lo, hi = int(starts[j]), int(starts[j + 1])
        bj = None if b is None else Raw(b.data[lo:hi], b.dtype)
        maxes[j] = backend.combine(op, Raw(c.data[lo:hi], c.dtype), bj, out[lo:hi], out_dtype)
    return maxes
