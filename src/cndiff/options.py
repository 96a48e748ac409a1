"""Every option of every command, in one dataclass, validated once.

The command line maps each flag onto one field (``--chunk-mb`` -> ``chunk_mb``,
``--no-check-base`` -> ``check_base=False``, ``--hash`` -> ``hash_inputs``...), and the
library functions take the same names as keyword arguments, so an option means the same
thing alone, in a batch, from the command line and from a notebook.

>>> from cndiff import Options
>>> Options(dtype="bf16", workers=2)
Options(dtype='bf16', workers=2)
>>> Options(chunk_mb=0)
Traceback (most recent call last):
cndiff.errors.OptionError: chunk_mb (--chunk-mb) must be a number from 0.001 to 256 (MB), not 0
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields
from typing import Any

from .dtypes import DType, output_dtype, short_name
from .errors import OptionError

__all__ = ["Options", "FORMATS", "SVD_METHODS", "DEFAULT_RANK", "build_options"]

#: output formats of ``extract``
FORMATS = ("difference", "control-lora")
#: ways to decompose a Control-LoRA layer
SVD_METHODS = ("auto", "gram", "exact", "lowrank")
#: Control-LoRA rank when neither ``rank`` nor ``max_error`` is given
DEFAULT_RANK = 128
BACKENDS = ("auto", "numpy", "torch")

_CHUNK_MB = (0.001, 256.0)
_WORKERS = (1, 64)
_RANK = (1, 65536)


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


@dataclass(frozen=True, repr=False)
class Options:
    """How a job runs. Every field has a default; unknown or out-of-range values raise
    :class:`~cndiff.errors.OptionError` (a :class:`~cndiff.errors.CndiffError`) when the
    object is made, before any file is opened.

    Attributes:
        dtype: output dtype, ``fp16`` (default), ``bf16`` or ``fp32`` (``float16``...
            also accepted).
        device: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        backend: ``auto`` (numpy on the CPU, torch on a GPU), ``numpy`` or ``torch``
            (torch's kernels, also on the CPU: the same bytes as numpy).
        overwrite: replace an existing output (otherwise an existing output of the same
            job is skipped, and of another job refused).
        drop_unchanged: difference models: leave out keys whose difference is below 1e-6
            everywhere, as the original script does (loaders then load those keys without
            the UNet added, which is wrong; by default they are kept as zeros).
        check_base: compare the base with the SD UNet embedded in an original control
            file, in the same pass (a warning when they differ).
        hash_inputs: record the inputs' hashes in the output's metadata (one more read
            of each input file, whole).
        chunk_mb: float32 megabytes per chunk, 0.001 to 256 (bounds memory).
        workers: compute threads, 1 to 64 (default: ``min(4, CPUs)``).
        progress: show progress bars (tqdm; notebook-aware).
        format: ``difference`` (default) or ``control-lora``.
        rank: Control-LoRA: rank of every factorized layer (default 128).
        max_error: Control-LoRA: instead of a rank, per layer the smallest rank whose
            relative error of the difference, ``||D - up@down|| / ||D||``, is at most
            this (0 <= E < 1).
        stability_compatible: Control-LoRA: the layout of Stability's published files.
        svd: Control-LoRA: ``auto``, ``gram``, ``exact`` or ``lowrank``.
    """

    dtype: str = "fp16"
    device: str = "auto"
    backend: str = "auto"
    overwrite: bool = False
    drop_unchanged: bool = False
    check_base: bool = True
    hash_inputs: bool = False
    chunk_mb: float = 4.0
    workers: int | None = None
    progress: bool = False
    format: str = "difference"
    rank: int | None = None
    max_error: float | None = None
    stability_compatible: bool = False
    svd: str = "auto"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "dtype", short_name(output_dtype(self.dtype)))
        except Exception:
            raise OptionError(
                f"{_flag('dtype')} must be fp16, bf16 or fp32, not {_show(self.dtype)}"
            ) from None
        for name in ("overwrite", "drop_unchanged", "check_base", "hash_inputs", "progress",
                     "stability_compatible"):  # fmt: skip
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{_flag(name)} must be True or False, "
                                  f"not {_show(getattr(self, name))}")  # fmt: skip
        device = str(self.device).lower()
        if not (device in ("auto", "cpu", "cuda") or _is_cuda_index(device)):
            raise OptionError(f"{_flag('device')} must be auto, cpu, cuda or cuda:N, "
                              f"not {_show(self.device)}")  # fmt: skip
        set_(self, "device", device)
        backend = str(self.backend).lower()
        if backend not in BACKENDS:
            raise OptionError(f"{_flag('backend')} must be auto, numpy or torch, "
                              f"not {_show(self.backend)}")  # fmt: skip
        if backend == "numpy" and device.startswith("cuda"):
            raise OptionError("--backend numpy runs on the CPU only; use --backend torch "
                              "(or auto) with --device cuda")  # fmt: skip
        set_(self, "backend", backend)
        set_(self, "chunk_mb", _number("chunk_mb", self.chunk_mb, *_CHUNK_MB, "MB"))
        if self.workers is not None:
            set_(self, "workers", _integer("workers", self.workers, *_WORKERS))
        fmt = str(self.format).lower()
        if fmt not in FORMATS:
            raise OptionError(f"{_flag('format')} must be difference or control-lora, "
                              f"not {_show(self.format)}")  # fmt: skip
        set_(self, "format", fmt)
        svd = str(self.svd).lower()
        if svd not in SVD_METHODS:
            raise OptionError(f"{_flag('svd')} must be one of {', '.join(SVD_METHODS)}, "
                              f"not {_show(self.svd)}")  # fmt: skip
        set_(self, "svd", svd)
        if self.rank is not None:
            set_(self, "rank", _integer("rank", self.rank, *_RANK))
        if self.max_error is not None:
            e = _number("max_error", self.max_error, 0.0, 1.0, "")
            if e >= 1.0:
                raise OptionError(f"{_flag('max_error')} must be at least 0 and below 1, "
                                  f"not {_show(self.max_error)}")  # fmt: skip
            set_(self, "max_error", e)
        self._check_combinations()

    def _check_combinations(self) -> None:
        lora = self.format == "control-lora"
        lora_set = [n for n in ("rank", "max_error") if getattr(self, n) is not None]
        lora_set += ["stability_compatible"] if self.stability_compatible else []
        lora_set += ["svd"] if self.svd != "auto" else []
        if not lora and lora_set:
            names = ", ".join(f"--{n.replace('_', '-')}" for n in lora_set)
            raise OptionError(f"{names} need --format control-lora (format='control-lora')")
        if lora and self.drop_unchanged:
            raise OptionError(
                "--drop-unchanged applies to difference models only: a Control-LoRA keeps "
                "every key (sd-webui-controlnet needs them all)"
            )
        if self.rank is not None and self.max_error is not None:
            raise OptionError("give --rank or --max-error, not both")
        if self.max_error is not None and self.stability_compatible:
            raise OptionError("--stability-compatible uses one rank for every layer; give "
                              "--rank instead of --max-error")  # fmt: skip
        if self.max_error is not None and self.svd == "lowrank":
            raise OptionError("--svd lowrank computes only the leading singular values, so it "
                              "cannot choose ranks by --max-error; use --svd auto")  # fmt: skip

    # -- derived values ------------------------------------------------------------------
    @property
    def out_dtype(self) -> DType:
        """The output :class:`~cndiff.dtypes.DType`."""
        return output_dtype(self.dtype)

    @property
    def chunk_elems(self) -> int:
        """Elements per chunk (``chunk_mb`` of float32)."""
        return max(1, int(self.chunk_mb * 1024 * 1024) // 4)

    @property
    def n_workers(self) -> int:
        """Compute threads: ``workers``, or ``min(4, CPUs)``."""
        return self.workers if self.workers is not None else max(1, min(4, os.cpu_count() or 1))

    @property
    def lora_rank(self) -> int:
        """The rank a Control-LoRA uses where ``max_error`` does not choose one."""
        return self.rank if self.rank is not None else DEFAULT_RANK

    def replace(self, **changes: Any) -> Options:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"Options({', '.join(changed)})"


def _show(value: Any) -> str:
    from .text import safe_repr

    return safe_repr(value, 40)


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit() and len(index) <= 3


def _number(name: str, value: Any, lo: float, hi: float, unit: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    v = float(value) if ok else math.nan
    if not (ok and math.isfinite(v) and lo <= v <= hi):
        what = f"a number from {lo:g} to {hi:g}" + (f" ({unit})" if unit else "")
        raise OptionError(f"{_flag(name)} must be {what}, not {_show(value)}")
    return v


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        if isinstance(value, float) and value.is_integer() and lo <= value <= hi:
            return int(value)
        raise OptionError(f"{_flag(name)} must be a whole number from {lo} to {hi}, "
                          f"not {_show(value)}")  # fmt: skip
    return value


def build_options(options: Options | None = None, **kwargs: Any) -> Options:
    """``options`` (or the defaults) with ``kwargs`` applied: how every library function
    turns its keyword arguments into one validated :class:`Options`."""
    known = {f.name for f in fields(Options)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise OptionError(
            f"unknown option {unknown[0]!r}; the options are: {', '.join(sorted(known))}"
        )
    if options is None:
        return Options(**kwargs)
    if not isinstance(options, Options):
        raise OptionError(f"options must be a cndiff.Options, not {type(options).__name__}")
    return dataclasses.replace(options, **kwargs) if kwargs else options
