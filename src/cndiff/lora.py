"""Export a ControlNet as a Control-LoRA: low-rank factors of its difference from the UNet.

A Control-LoRA (the format of Stability AI's ``control-lora-*-rank128.safetensors``) is a
flat safetensors file that ComfyUI, sd-webui-controlnet and Forge load on top of the
user's own UNet. Every Linear/Conv2d weight ``W`` of the ControlNet that the UNet also
has is stored as two factors, and the loaders rebuild it as::

    W = W_unet + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)      # no alpha, no scale

with ``up`` of shape ``(out, r)`` and ``down`` of shape ``(r, in)`` for a Linear layer,
``(out, r, 1, 1)`` and ``(r, in, kh, kw)`` for a convolution. Everything else is stored
as the ControlNet's own (absolute) values, cast to the output dtype: every bias, every
norm weight and bias, and the ControlNet-only modules (``input_hint_block``,
``zero_convs``, ``middle_block_out``); the loaders load those as they are. Keys have no
``control_model.`` prefix, and an empty float32 tensor ``lora_controlnet`` marks the file.

How ``up @ down`` approximates ``D = control - base`` (computed in float32, as
:func:`cndiff.extract` does):

* ``rank=N`` (default 128): the truncated SVD of each layer, which is the best rank-``N``
  approximation in the Frobenius norm. Where the factors would not be smaller than the
  weight itself (``r * (out + in*kh*kw) >= out * in*kh*kw``), the full weight is stored
  instead (the ControlNet's absolute weight, exact up to the output dtype).
* ``max_error=E``: per layer, the smallest rank whose relative truncation error
  ``||D - up @ down||_F / ||D||_F`` is at most ``E`` (same fallback to the full weight).
* ``stability_compatible=True``: what Stability's ComfyUI export node wrote for the public
  files: rank ``min(N, out, in_channels)`` always as factors, ``up = U*S``, ``down = Vh``,
  both clamped to ``±q`` with ``q`` the 0.99 quantile of their values. For SD1.5 at rank
  128 that is 463 keys and 67,835,680 parameters, as in the public files.

The SVD is exact by default: the eigendecomposition of the float64 Gram matrix
``D Dᵀ`` (or ``Dᵀ D``), which agrees with a float64 SVD to ~1e-14 and is about 7x faster on
a CPU than ``torch.linalg.svd`` in float32 (see ``benchmarks/lora_bench.py``).

Because the header of a safetensors file lists every shape, and with ``max_error`` the
ranks are known only after the SVDs, every layer is factorized first (one layer's ``D`` in
memory at a time; the factors, about the size of the output file, are kept) and the file
is written afterwards, atomically, like every cndiff output.

>>> from cndiff.lora import extract_control_lora
>>> r = extract_control_lora("control_sd15_canny.pth", "v1-5-pruned.ckpt", rank=128)
>>> print(r)                     # path, keys, size, overall error
>>> r.worst(5)                   # the five layers with the largest relative error
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .dtypes import F32, DType, by_name, output_dtype, short_name
from .errors import CndiffError
from .inputs import Checkpoint, open_checkpoint
from .keys import CONTROL_PREFIX, plan_diff, require_control_keys, unet_prefix
from .progress import progress_bar
from .provenance import build_metadata
from .writer import OutputEntry, SafetensorsWriter

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_RANK",
    "MARKER_KEY",
    "LoraEntry",
    "LoraLayer",
    "LoraResult",
    "lora_layout",
    "layout_counts",
    "extract_control_lora",
    "default_lora_name",
    "lora_weight",
]

log = logging.getLogger("cndiff")

#: rank used when neither ``rank`` nor ``max_error`` is given
DEFAULT_RANK = 128
#: the key that marks a Control-LoRA file (an empty float32 tensor)
MARKER_KEY = "lora_controlnet"
#: Stability's export node clamps the factors at this quantile of their values
STABILITY_CLAMP_QUANTILE = 0.99
#: torch.svd_lowrank settings for ``svd="lowrank"``
LOWRANK_NITER = 4
LOWRANK_OVERSAMPLE = 10

SvdMethod = Literal["auto", "gram", "exact", "lowrank"]
_SVD_METHODS = ("auto", "gram", "exact", "lowrank")


class _HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


# -- layout (from shapes only) ---------------------------------------------------------------


@dataclass(frozen=True)
class LoraEntry:
    """One ControlNet tensor in a Control-LoRA file.

    ``kind``: ``"lora"`` (a Linear/Conv2d weight stored as ``<module>.up`` and
    ``<module>.down`` of rank ``rank``), ``"weight"`` (such a weight stored in full because
    its factors would not be smaller) or ``"copy"`` (any other tensor, stored as it is).
    ``name`` is the output key (for ``"lora"``: the module, without ``.weight``).
    """

    name: str
    control_key: str
    base_key: str | None
    shape: tuple[int, ...]
    kind: Literal["lora", "weight", "copy"]
    rank: int | None = None

    @property
    def outputs(self) -> list[tuple[str, tuple[int, ...]]]:
        """The ``(key, shape)`` pairs this entry writes."""
        if self.kind != "lora":
            return [(self.name, self.shape)]
        assert self.rank is not None
        out, fan_in = self.shape[0], self.shape[1:]
        if len(self.shape) == 4:
            return [
                (self.name + ".up", (out, self.rank, 1, 1)),
                (self.name + ".down", (self.rank, *fan_in)),
            ]
        return [(self.name + ".up", (out, self.rank)), (self.name + ".down", (self.rank, *fan_in))]

    @property
    def params(self) -> int:
        """Number of elements written for this entry."""
        return sum(math.prod(s) for _, s in self.outputs)


def _is_factorizable(key: str, shape: tuple[int, ...], base_key: str | None) -> bool:
    """A Linear (2-D) or Conv2d (4-D) weight that the UNet also has."""
    return base_key is not None and key.endswith(".weight") and len(shape) in (2, 4)


def _matrix_dims(shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in * kh * kw): the matrix the factors approximate."""
    return shape[0], math.prod(shape[1:])


def _choose_kind(
    shape: tuple[int, ...], rank: int, stability_compatible: bool
) -> tuple[Literal["lora", "weight"], int]:
    m, n = _matrix_dims(shape)
    if stability_compatible:
        # Stability's node: rank min(N, out, in_channels), always as factors.
        return "lora", max(1, min(rank, shape[0], shape[1]))
    r = max(1, min(rank, m, n))
    if r * (m + n) >= m * n:
        return "weight", min(m, n)
    return "lora", r


def lora_layout(
    control_tensors: Mapping[str, _HasShape],
    base_tensors: Mapping[str, _HasShape],
    *,
    rank: int = DEFAULT_RANK,
    ranks: Mapping[str, int] | None = None,
    stability_compatible: bool = False,
    base_prefix: str | None = None,
    control_name: str = "control",
    base_name: str = "base",
) -> list[LoraEntry]:
    """The Control-LoRA layout of a ControlNet, from key names and shapes only.

    ``control_tensors`` / ``base_tensors`` map keys to anything with a ``shape``
    (:class:`~cndiff.checkpoint.TensorInfo` of an open checkpoint, or the
    :class:`~cndiff.synthetic.TensorSpec` of :func:`cndiff.synthetic.control_spec`), so
    the layout of a full-size model is known without reading any data. ``ranks`` gives a
    rank per control key (overriding ``rank``), e.g. as chosen by ``max_error``.
    ``base_prefix`` is where the base keeps its UNet (default: detected).

    Raises :class:`~cndiff.errors.CheckpointError` when the control has no
    ``control_model.*`` keys and :class:`~cndiff.errors.IncompatibleBaseError` when the
    base does not match (as :func:`cndiff.keys.plan_diff`).
    """
    if rank < 1:
        raise CndiffError(f"rank must be at least 1, not {rank}")
    plan = plan_diff(
        control_tensors,
        base_tensors,
        control_name=control_name,
        base_name=base_name,
        base_prefix=base_prefix,
    )
    entries: list[LoraEntry] = []
    for item in plan:
        name = item.control_key[len(CONTROL_PREFIX) :]
        if _is_factorizable(item.control_key, item.shape, item.base_key):
            r = ranks.get(item.control_key, rank) if ranks is not None else rank
            kind, r = _choose_kind(item.shape, r, stability_compatible)
            if kind == "lora":
                name = name[: -len(".weight")]
            entries.append(LoraEntry(name, item.control_key, item.base_key, item.shape, kind, r))
        else:
            entries.append(LoraEntry(name, item.control_key, item.base_key, item.shape, "copy"))
    return entries


def layout_counts(layout: Sequence[LoraEntry]) -> tuple[int, int]:
    """``(keys, parameters)`` of the file a layout describes, the marker key included."""
    keys = sum(len(e.outputs) for e in layout) + 1
    return keys, sum(e.params for e in layout)


# -- results ---------------------------------------------------------------------------------


@dataclass
class LoraLayer:
    """How well one Linear/Conv2d weight is approximated.

    ``rel_error`` is ``||W_rebuilt - W_control||_F / ||D||_F`` with ``W_rebuilt`` what the
    loaders compute from the file (``W_base + up @ down``, or the stored full weight) after
    rounding to the output dtype, and ``D = W_control - W_base``. ``trunc_error`` is the
    same before that rounding: the SVD truncation error (what ``max_error`` bounds; for
    ``stability_compatible`` it includes the clamping). ``energy`` is the fraction of
    ``||D||²`` in the kept singular values. ``kind`` is ``"lora"`` or ``"weight"`` (stored
    in full, then ``rank`` is the full rank).
    """

    key: str
    shape: tuple[int, ...]
    kind: str
    rank: int
    rel_error: float
    trunc_error: float
    energy: float
    #: ||D||_F, for weighting the overall figures
    norm: float


@dataclass
class LoraResult:
    """What :func:`extract_control_lora` wrote, and how close it is."""

    output: Path
    keys_written: int
    params: int
    bytes: int
    seconds: float
    layers: list[LoraLayer]
    #: sqrt(sum of squared layer errors) / sqrt(sum of ||D||²), over ``layers``
    overall_rel_error: float
    #: the same before rounding to the output dtype
    overall_trunc_error: float
    #: fraction of sum ||D||² kept
    energy: float
    rank: int | None
    max_error: float | None
    dtype: str = "float16"
    svd: str = "gram"
    device: str = "cpu"
    stability_compatible: bool = False
    svd_seconds: float = 0.0

    @property
    def factored(self) -> int:
        """Number of layers stored as up/down factors."""
        return sum(1 for x in self.layers if x.kind == "lora")

    @property
    def full(self) -> int:
        """Number of Linear/Conv2d weights stored in full (factors not smaller)."""
        return sum(1 for x in self.layers if x.kind == "weight")

    def worst(self, n: int = 5) -> list[LoraLayer]:
        """The ``n`` layers with the largest relative error."""
        return sorted(self.layers, key=lambda x: x.rel_error, reverse=True)[:n]

    def __str__(self) -> str:
        how = f"rank {self.rank}" if self.max_error is None else f"max error {self.max_error:g}"
        ranks = [x.rank for x in self.layers if x.kind == "lora"]
        span = f", ranks {min(ranks)}-{max(ranks)}" if ranks and self.max_error is not None else ""
        return (
            f"{self.output}: Control-LoRA ({how}{span}), {self.keys_written} tensors "
            f"({self.factored} factorized, {self.full} full), {self.params:,} parameters, "
            f"{short_name(by_name(self.dtype))}, {self.bytes / 1e6:.1f} MB in "
            f"{self.seconds:.2f} s; relative error {self.overall_rel_error:.4f} "
            f"(energy kept {self.energy:.2%})"
        )


# -- naming ----------------------------------------------------------------------------------


def default_lora_name(
    control: str | os.PathLike[str],
    rank: int | None = DEFAULT_RANK,
    dtype: str | DType = "fp16",
    *,
    max_error: float | None = None,
) -> str:
    """``control_lora_rank<N>_<control stem>_<dtype>.safetensors``
    (``control_lora_maxerr<E>_...`` with ``max_error``)."""
    tag = f"maxerr{max_error:g}" if max_error is not None else f"rank{rank or DEFAULT_RANK}"
    short = short_name(output_dtype(dtype))
    return f"control_lora_{tag}_{Path(control).stem}_{short}.safetensors"


# -- factorization ---------------------------------------------------------------------------


class _Decomposition:
    """The SVD of one difference matrix, by one of the methods; gives factors of any rank."""

    def __init__(self, d: torch.Tensor, method: str, max_rank: int) -> None:
        import torch

        self.method = method
        self.m, self.n = d.shape
        d64 = d.double()
        self.total_sq = float((d64 * d64).sum())
        #: all squared singular values, descending (None for lowrank)
        self.sq: torch.Tensor | None = None
        if method == "gram":
            self.d64 = d64
            self.wide = self.m <= self.n
            g = d64 @ d64.T if self.wide else d64.T @ d64
            w, v = torch.linalg.eigh(g)
            self.sq = w.flip(0).clamp_min(0)
            self.v = v.flip(1)
        elif method == "exact":
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            self.u, self.s, self.vh = u, s, vh
            self.sq = s.double() ** 2
        else:  # lowrank
            q = min(max_rank + LOWRANK_OVERSAMPLE, self.m, self.n)
            u, s, v = torch.svd_lowrank(d, q=q, niter=LOWRANK_NITER)
            self.u, self.s, self.vh = u, s, v.T

    def rank_for(self, max_error: float) -> int:
        """The smallest rank whose relative truncation error is at most ``max_error``."""
        import torch

        assert self.sq is not None
        total = float(self.sq.sum())
        if total <= 0.0:
            return 1
        # tail[r] = sum of sq[r:], for r = 0..len
        tail = torch.cat([self.sq.flip(0).cumsum(0).flip(0), self.sq.new_zeros(1)])
        ok = torch.nonzero(tail <= (max_error**2) * total).flatten()
        return max(1, int(ok[0]))

    def factors(self, r: int, split: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(up (m, r), down (r, n), kept energy)`` in float32.

        ``split="balanced"`` puts sqrt(S) in each factor (keeps small components out of
        float16's subnormal range); ``"stability"`` puts S in ``up`` as Stability's node does.
        """
        import torch

        if self.method == "gram":
            if self.wide:
                u = self.v[:, :r]  # (m, r) left singular vectors
                svh = u.T @ self.d64  # (r, n) = S Vh
                s = svh.norm(dim=1)
            else:
                vr = self.v[:, :r]  # (n, r) right singular vectors
                us = self.d64 @ vr  # (m, r) = U S
                s = us.norm(dim=0)
            # components with (numerically) zero singular value contribute nothing
            tiny = s <= 1e-12 * math.sqrt(self.total_sq)
            safe = torch.where(tiny, torch.ones_like(s), s)
            if self.wide:
                vh = svh / safe[:, None]
            else:
                u, vh = us / safe, vr.T
            s = torch.where(tiny, torch.zeros_like(s), s)
            kept = float((s * s).sum())
        else:
            u, s, vh = self.u[:, :r], self.s[:r].double(), self.vh[:r]
            kept = float((s * s).sum())
        if split == "balanced":
            rs = s.sqrt()
            return (u * rs).float(), (vh * rs[:, None]).float(), kept
        return (u * s).float(), vh.float(), kept


def _stability_clamp(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp both factors to ±(0.99 quantile of all their values), as Stability's node."""
    import numpy as np
    import torch

    values = torch.cat([up.flatten(), down.flatten()])
    if values.numel() < 2**24:  # torch.quantile's limit
        hi = float(torch.quantile(values, STABILITY_CLAMP_QUANTILE))
    else:
        hi = float(np.quantile(values.cpu().numpy(), STABILITY_CLAMP_QUANTILE))
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _to_output(t: torch.Tensor, dt: DType) -> torch.Tensor:
    """``t`` (float32) rounded to the output dtype, on the CPU, contiguous."""
    return t.to(dt.to_torch()).cpu().contiguous()


def _bytes(t: torch.Tensor):
    import torch

    return t.reshape(-1).view(torch.uint8).numpy()


@dataclass
class _Factored:
    entry: LoraEntry
    up: Any  # torch.Tensor in the output dtype, output shape
    down: Any
    layer: LoraLayer


def _read_f32(ck: Checkpoint, key: str, device: str) -> torch.Tensor:
    import torch

    t = ck.read_torch(key)
    return t.to(device=device, dtype=torch.float32)


def _factorize(
    entry: LoraEntry,
    ctl: Checkpoint,
    base: Checkpoint,
    *,
    rank: int,
    max_error: float | None,
    stability_compatible: bool,
    method: str,
    dt: DType,
    device: str,
) -> tuple[LoraEntry, _Factored | None, LoraLayer]:
    """Factorize one mirrored Linear/Conv2d weight. Returns the final entry (its kind and
    rank decided), the factors (None when stored in full) and the layer's figures."""
    import torch

    assert entry.base_key is not None
    c = _read_f32(ctl, entry.control_key, device)
    b = _read_f32(base, entry.base_key, device)
    m, n = _matrix_dims(entry.shape)
    d = (c - b).reshape(m, n)
    del b
    norm_sq = float((d.double() ** 2).sum())
    norm = math.sqrt(norm_sq)
    want = rank
    dec: _Decomposition | None = None
    if max_error is not None:
        dec = _Decomposition(d, method, min(m, n))
        want = dec.rank_for(max_error)
    kind, r = _choose_kind(entry.shape, want, stability_compatible)
    if kind == "weight":
        # The control's own weight, rounded once to the output dtype.
        rebuilt = _to_output(c, dt).to(device=device, dtype=torch.float32).reshape(m, n)
        err = float((rebuilt - (c.reshape(m, n))).double().norm())
        layer = LoraLayer(
            entry.control_key, entry.shape, "weight", r, err / norm if norm else 0.0, 0.0, 1.0, norm
        )
        final = LoraEntry(
            entry.control_key[len(CONTROL_PREFIX) :],
            entry.control_key,
            entry.base_key,
            entry.shape,
            "weight",
            r,
        )
        return final, None, layer
    del c
    if dec is None:
        dec = _Decomposition(d, method, r)
    up, down, kept = dec.factors(r, "stability" if stability_compatible else "balanced")
    del dec
    if stability_compatible:
        up, down = _stability_clamp(up, down)
        trunc = float((d - up @ down).double().norm())
    else:
        trunc = math.sqrt(max(norm_sq - kept, 0.0))
    up_o, down_o = _to_output(up, dt), _to_output(down, dt)
    dev_up = up_o.to(device=device, dtype=torch.float32)
    dev_down = down_o.to(device=device, dtype=torch.float32)
    err = float((d - dev_up @ dev_down).double().norm())
    energy = kept / (norm * norm) if norm else 1.0
    layer = LoraLayer(
        entry.control_key,
        entry.shape,
        "lora",
        r,
        err / norm if norm else 0.0,
        trunc / norm if norm else 0.0,
        min(energy, 1.0),
        norm,
    )
    name = entry.control_key[len(CONTROL_PREFIX) : -len(".weight")]
    final = LoraEntry(name, entry.control_key, entry.base_key, entry.shape, "lora", r)
    (_, up_shape), (_, down_shape) = final.outputs
    return final, _Factored(final, up_o.reshape(up_shape), down_o.reshape(down_shape), layer), layer


def _resolve_svd(svd: str, max_error: float | None) -> str:
    s = str(svd).lower()
    if s not in _SVD_METHODS:
        raise CndiffError(f"unknown svd method {svd!r}; use one of {', '.join(_SVD_METHODS)}")
    if s == "auto":
        return "gram"
    if s == "lowrank" and max_error is not None:
        raise CndiffError(
            "svd='lowrank' computes only the leading singular values, so it cannot choose "
            "ranks by max_error; use svd='auto'"
        )
    return s


def extract_control_lora(
    control: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    max_error: float | None = None,
    stability_compatible: bool = False,
    dtype: str = "fp16",
    device: str = "auto",
    overwrite: bool = False,
    svd: SvdMethod = "auto",
    progress: bool = False,
) -> LoraResult:
    """Export an original ControlNet checkpoint as a Control-LoRA.

    Every Linear/Conv2d weight the ControlNet shares with the UNet is stored as low-rank
    factors ``up``/``down`` of ``D = control - base``; biases, norms and the ControlNet's
    own modules are stored as they are (see the module documentation for the format and
    how loaders rebuild it). All factors are computed first (one layer's ``D`` in memory at
    a time), then the file is written; no partial file is ever left behind.

    Args:
        control: an original ``control_sd15_*.pth`` (or ``.ckpt``/``.safetensors``).
        base: the SD checkpoint the ControlNet was built on, or ``"self"`` for the UNet
            copy embedded in ``control``.
        out: output file or existing folder; default:
            ``control_lora_rank<N>_<name>_<dtype>.safetensors`` beside ``control``.
        rank: rank of every layer (default 128 when ``max_error`` is not given). Layers
            whose factors would not be smaller than the weight are stored in full.
        max_error: instead of ``rank``: per layer, the smallest rank whose relative
            truncation error ``||D - up@down||_F / ||D||_F`` is at most this.
        stability_compatible: reproduce Stability's export node (rank
            ``min(rank, out, in_channels)`` everywhere, factors clamped at their 0.99
            quantile); not with ``max_error``.
        dtype: ``"fp16"`` (default), ``"bf16"`` or ``"fp32"``.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``: where the SVDs run.
        overwrite: replace an existing output (otherwise that is an error).
        svd: ``"auto"`` (= ``"gram"``), ``"gram"`` (float64 eigendecomposition of the Gram
            matrix; exact, fastest on a CPU), ``"exact"`` (``torch.linalg.svd`` in float32)
            or ``"lowrank"`` (``torch.svd_lowrank``, randomized: a slightly larger error).
        progress: show a tqdm progress bar (one step per layer) on stderr.

    Returns:
        A :class:`LoraResult`: path, counts, bytes, seconds, per-layer and overall errors.

    Raises:
        CndiffError: bad arguments, missing or corrupt input, a base that does not match,
            an existing output... No output file is left behind.
    """
    import torch

    from .api import open_base, prepare_target
    from .engine import resolve_device

    t0 = time.perf_counter()
    if rank is not None and max_error is not None:
        raise CndiffError("give a rank or a max_error, not both")
    if max_error is not None:
        if not (0.0 <= max_error < 1.0):
            raise CndiffError(f"max_error must be in [0, 1), not {max_error}")
        if stability_compatible:
            raise CndiffError("stability_compatible uses one rank for every layer; give rank")
    else:
        rank = DEFAULT_RANK if rank is None else int(rank)
        if rank < 1:
            raise CndiffError(f"rank must be at least 1, not {rank}")
    dt = output_dtype(dtype)
    method = _resolve_svd(svd, max_error)
    dev = resolve_device(device)
    with ExitStack() as stack:
        ctl = open_checkpoint(control)
        stack.callback(ctl.close)
        require_control_keys(ctl.tensors, ctl.path.name)
        is_self = str(base) == "self"
        bse, prefix = open_base(base, ctl)
        if not is_self:
            stack.callback(bse.close)
        layout = lora_layout(
            ctl.tensors,
            bse.tensors,
            rank=rank or DEFAULT_RANK,
            stability_compatible=stability_compatible,
            base_prefix=prefix,
            control_name=ctl.path.name,
            base_name="the embedded UNet" if is_self else bse.path.name,
        )
        name = default_lora_name(ctl.path, rank, dt, max_error=max_error)
        target = prepare_target(ctl.path, out, name, [ctl.path, bse.path], overwrite=overwrite)

        # 1. factorize every mirrored Linear/Conv2d weight (kept in the output dtype)
        t_svd = time.perf_counter()
        final: list[LoraEntry] = []
        factors: dict[str, _Factored] = {}
        layers: list[LoraLayer] = []
        todo = [e for e in layout if e.kind != "copy"]
        bar = progress_bar(len(todo), ctl.path.name, progress, unit="layer")
        try:
            for e in layout:
                if e.kind == "copy":
                    final.append(e)
                    continue
                with torch.no_grad():
                    fe, fac, layer = _factorize(
                        e,
                        ctl,
                        bse,
                        rank=rank or DEFAULT_RANK,
                        max_error=max_error,
                        stability_compatible=stability_compatible,
                        method=method,
                        dt=dt,
                        device=dev,
                    )
                final.append(fe)
                layers.append(layer)
                if fac is not None:
                    factors[fe.control_key] = fac
                log.debug(
                    "%s: %s rank %d, relative error %.5f, energy %.4f",
                    layer.key,
                    layer.kind,
                    layer.rank,
                    layer.rel_error,
                    layer.energy,
                )
                bar.update(1)
        finally:
            bar.close()
        svd_seconds = time.perf_counter() - t_svd

        # 2. write: header first, then every tensor in layout order
        entries = [OutputEntry(k, dt, s) for e in final for k, s in e.outputs]
        entries.append(OutputEntry(MARKER_KEY, F32, (0,)))
        overall, overall_trunc, energy = _overall(layers)
        meta = build_metadata(
            kind="control-lora",
            control=ctl,
            base=bse,
            base_is_self=is_self,
            dtype=dt.name,
            adapter="control-lora",
            extra={
                "cndiff.rank": "" if rank is None or max_error is not None else str(rank),
                "cndiff.max_error": "" if max_error is None else f"{max_error:g}",
                "cndiff.stability_compatible": str(bool(stability_compatible)).lower(),
                "cndiff.svd": method,
                "cndiff.rel_error": f"{overall:.6g}",
            },
        )
        with SafetensorsWriter(target, entries, meta, overwrite=overwrite) as w:
            for e in final:
                if e.kind == "lora":
                    fac = factors.pop(e.control_key)
                    w.write(_bytes(fac.up))
                    w.write(_bytes(fac.down))
                else:
                    t = ctl.read_torch(e.control_key).to(torch.float32)
                    w.write(_bytes(_to_output(t, dt)))
            w.write(b"")
            ctl.check_unchanged()
            bse.check_unchanged()
            w.commit()
            size = w.size
        keys, params = layout_counts(final)
    result = LoraResult(
        output=target,
        keys_written=keys,
        params=params,
        bytes=size,
        seconds=time.perf_counter() - t0,
        layers=layers,
        overall_rel_error=overall,
        overall_trunc_error=overall_trunc,
        energy=energy,
        rank=None if max_error is not None else rank,
        max_error=max_error,
        dtype=dt.name,
        svd=method,
        device=dev,
        stability_compatible=stability_compatible,
        svd_seconds=svd_seconds,
    )
    log.info("%s", result)
    return result


def _overall(layers: Sequence[LoraLayer]) -> tuple[float, float, float]:
    total = sum(x.norm**2 for x in layers)
    if total <= 0.0:
        return 0.0, 0.0, 1.0
    err = math.sqrt(sum((x.rel_error * x.norm) ** 2 for x in layers) / total)
    trunc = math.sqrt(sum((x.trunc_error * x.norm) ** 2 for x in layers) / total)
    energy = sum(x.energy * x.norm**2 for x in layers) / total
    return err, trunc, energy


# -- verification ----------------------------------------------------------------------------


def lora_weight(
    lora_ckpt: str | os.PathLike[str] | Checkpoint,
    base_ckpt: str | os.PathLike[str] | Checkpoint,
    control_key: str,
    base_prefix: str | None = None,
) -> torch.Tensor:
    """Rebuild one ControlNet weight from a Control-LoRA as the loaders do, in float32.

    ``control_key`` is the ControlNet key, with or without ``control_model.``. The result
    is ``W_base + (up.flatten(1) @ down.flatten(1)).reshape(W.shape)`` when the file has
    factors for the module, the file's tensor when it has the key itself, and the base's
    tensor otherwise (what ComfyUI and sd-webui-controlnet then use).
    ``base_prefix``: where the base keeps its UNet (default: detected).
    """
    import torch

    name = control_key.removeprefix(CONTROL_PREFIX)
    with ExitStack() as stack:
        lo = lora_ckpt if isinstance(lora_ckpt, Checkpoint) else open_checkpoint(lora_ckpt)
        if not isinstance(lora_ckpt, Checkpoint):
            stack.callback(lo.close)
        if MARKER_KEY not in lo.tensors:
            raise CndiffError(f"{lo.path.name} is not a Control-LoRA (no {MARKER_KEY} key)")
        if name in lo.tensors:
            return lo.read_torch(name).to(torch.float32)
        bs = base_ckpt if isinstance(base_ckpt, Checkpoint) else open_checkpoint(base_ckpt)
        if not isinstance(base_ckpt, Checkpoint):
            stack.callback(bs.close)
        prefix = unet_prefix(bs.tensors) if base_prefix is None else base_prefix
        base_key = prefix + name
        if base_key not in bs.tensors:
            raise CndiffError(f"neither {lo.path.name} nor {bs.path.name} has {name!r}")
        w = bs.read_torch(base_key).to(torch.float32)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module + ".up" in lo.tensors:
            up = lo.read_torch(module + ".up").to(torch.float32)
            down = lo.read_torch(module + ".down").to(torch.float32)
            w = w + (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        return w
