"""What commands return: one family of small result objects.

Every command that writes a file returns a :class:`Result` (or a subclass): the output,
what it is (``kind``), its dtype, size, time and the sha256 computed while it was
written; ``status`` is ``written``, ``skipped`` (a complete output of the same job was
there) or ``failed`` (``reason`` says why; batches only). Each has a one-line ``str``, a
short ``repr`` for notebooks and ``to_dict()`` for JSON. A batch returns a
:class:`BatchResult`, a list of results whose ``str`` is the summary table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .fingerprint import BaseMatch
from .text import escape, escape_path

__all__ = ["Result", "ExtractResult", "LoraLayer", "LoraSummary", "BatchResult"]

#: statuses of a result
STATUSES = ("written", "skipped", "failed")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@dataclass(repr=False)
class Result:
    """What one command did to one file (see the module documentation)."""

    source: Path
    output: Path | None
    kind: str
    dtype: str
    status: str = "written"
    bytes: int = 0
    seconds: float = 0.0
    #: sha256 of the output, computed while it was written (None when nothing was written)
    sha256: str | None = None
    reason: str = ""

    @property
    def short_hash(self) -> str:
        """The first 10 hex digits of the sha256 (what model sites call AutoV2)."""
        return self.sha256[:10] if self.sha256 else ""

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (paths as strings), and ``short_hash``."""
        d = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        d["short_hash"] = self.short_hash or None
        return d

    def _summary(self) -> str:
        return f"{self.kind}, {self.dtype}, {_mb(self.bytes)} in {self.seconds:.2f} s"

    def __str__(self) -> str:
        if self.status == "failed":
            return f"{escape_path(self.source)}: failed: {self.reason}"
        if self.status == "skipped":
            return f"{escape_path(self.output or self.source)}: skipped ({self.reason})"
        return f"{escape_path(self.output or self.source)}: {self._summary()}"

    def __repr__(self) -> str:
        name = escape((self.output or self.source).name, 60)
        return f"<{type(self).__name__} {self.status} {name!r} {self.kind}>"


@dataclass(repr=False)
class LoraLayer:
    """How well one Linear/Conv2d weight is approximated in a Control-LoRA.

    ``diff_error`` is the relative error of the difference, ``||D - up@down||_F /
    ||D||_F`` with ``D = W_control - W_base``, before the factors are rounded to the
    output dtype: what ``max_error`` bounds (for ``stability_compatible`` it includes the
    clamping). ``weight_error`` is the relative error of the weight the loaders rebuild,
    ``||W_rebuilt - W_control||_F / ||W_control||_F``, after that rounding. ``energy``
    is the fraction of ``||D||²`` in the kept singular values. ``kind`` is ``lora``
    (factors) or ``weight`` (stored in full; ``rank`` is then the full rank).
    """

    key: str
    shape: tuple[int, ...]
    kind: str
    rank: int
    diff_error: float
    weight_error: float
    energy: float
    #: ||D||_F and ||W_control||_F, for weighting the overall figures
    norm: float
    weight_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def __repr__(self) -> str:
        return (f"<LoraLayer {escape(self.key, 60)!r} {self.kind} rank {self.rank}, "
                f"difference error {self.diff_error:.4g}>")  # fmt: skip


@dataclass(repr=False)
class LoraSummary:
    """The Control-LoRA figures of an export (``ExtractResult.lora``)."""

    layers: list[LoraLayer]
    rank: int | None
    max_error: float | None
    svd: str
    stability_compatible: bool = False
    params: int = 0
    svd_seconds: float = 0.0

    @property
    def factored(self) -> int:
        """Layers stored as up/down factors."""
        return sum(1 for x in self.layers if x.kind == "lora")

    @property
    def full(self) -> int:
        """Linear/Conv2d weights stored in full (factors would not be smaller)."""
        return sum(1 for x in self.layers if x.kind == "weight")

    @property
    def diff_error(self) -> float:
        """Overall relative error of the differences: sqrt(sum ||D - up@down||²) /
        sqrt(sum ||D||²) over the layers."""
        total = sum(x.norm**2 for x in self.layers)
        if total <= 0.0:
            return 0.0
        return math.sqrt(sum((x.diff_error * x.norm) ** 2 for x in self.layers) / total)

    @property
    def weight_error(self) -> float:
        """Overall relative error of the rebuilt weights: sqrt(sum ||W - W_control||²) /
        sqrt(sum ||W_control||²) over the layers, after rounding to the output dtype."""
        total = sum(x.weight_norm**2 for x in self.layers)
        if total <= 0.0:
            return 0.0
        num = sum((x.weight_error * x.weight_norm) ** 2 for x in self.layers)
        return math.sqrt(num / total)

    @property
    def energy(self) -> float:
        """Fraction of sum ||D||² kept by the factors."""
        total = sum(x.norm**2 for x in self.layers)
        if total <= 0.0:
            return 1.0
        return sum(x.energy * x.norm**2 for x in self.layers) / total

    def worst(self, n: int = 5) -> list[LoraLayer]:
        """The ``n`` layers with the largest relative error of the difference."""
        return sorted(self.layers, key=lambda x: x.diff_error, reverse=True)[:n]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        d.update(diff_error=self.diff_error, weight_error=self.weight_error,
                 energy=self.energy, factored=self.factored, full=self.full)  # fmt: skip
        return d

    def __str__(self) -> str:
        how = f"rank {self.rank}" if self.max_error is None else f"max error {self.max_error:g}"
        ranks = [x.rank for x in self.layers if x.kind == "lora"]
        span = f", ranks {min(ranks)}-{max(ranks)}" if ranks and self.max_error is not None else ""
        return (
            f"Control-LoRA {how}{span}: {self.factored} layers factorized, {self.full} in "
            f"full, {self.params:,} parameters; relative error of the differences "
            f"{self.diff_error:.4f} (energy kept {self.energy:.2%}), of the rebuilt weights "
            f"{self.weight_error:.2e}"
        )

    def __repr__(self) -> str:
        return f"<LoraSummary {len(self.layers)} layers, difference error {self.diff_error:.4g}>"


@dataclass(repr=False)
class ExtractResult(Result):
    """What ``extract`` (any format), ``apply`` and the drop-in wrote.

    ``paired`` counts the tensors combined with the base (``control - base`` for a
    difference model and a Control-LoRA, ``diff + base`` for ``apply``) and ``copied``
    those stored as they are; ``unchanged`` lists keys equal to the base (kept as zeros,
    or left out with ``drop_unchanged``, then also in ``dropped``); ``nonfinite`` keys
    whose output holds NaN or infinity; ``base_match`` how the base compares with the
    control file's embedded UNet (None: not checked); ``lora`` the Control-LoRA figures.
    """

    keys_written: int = 0
    paired: int = 0
    copied: int = 0
    device: str = "cpu"
    backend: str = "numpy"
    unchanged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    base_match: BaseMatch | None = None
    lora: LoraSummary | None = None

    @property
    def subtracted(self) -> int:
        """Tensors stored as ``control - base`` (difference models)."""
        return self.paired

    def _summary(self) -> str:
        verb = {"standalone": "added", "control-lora": "factorized or full"}.get(
            self.kind, "subtracted"
        )
        counts = f"{self.paired} {verb}, {self.copied} copied" if self.paired else "copied"
        text = (
            f"{self.kind}, {self.keys_written} tensors ({counts}), "
            f"{self.dtype}, {_mb(self.bytes)} in {self.seconds:.2f} s"
        )
        if self.lora is not None:
            text += f"; {self.lora}"
        return text

    def __repr__(self) -> str:
        name = escape((self.output or self.source).name, 60)
        return (
            f"<ExtractResult {self.status} {name!r} {self.kind}, {self.keys_written} tensors, "
            f"{_mb(self.bytes)}>"
        )


class BatchResult(list):
    """The results of a batch, in the order the models were given; ``str`` is the summary
    table, ``to_dict()`` a list of each result's dict."""

    def __init__(self, results: Iterable[Result] = ()) -> None:
        super().__init__(results)

    @property
    def failed(self) -> list[Result]:
        return [r for r in self if r.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self) for s in STATUSES}

    def __str__(self) -> str:
        rows = [("model", "status", "size", "seconds", "sha256")]
        for r in self:
            status = r.status
            if r.reason and r.status != "written":
                status += f": {r.reason}"
            secs = f"{r.seconds:.1f}" if r.status == "written" else "-"
            sha = f"{r.short_hash}  {r.sha256}" if r.sha256 else "-"
            rows.append((escape(r.source.name, 80), escape(status, 400),
                         _mb(r.bytes) if r.bytes else "-", secs, sha))  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for row in rows:
            cells = [row[i].rjust(widths[i]) if i == 2 else row[i].ljust(widths[i])
                     for i in range(4)]  # fmt: skip
            lines.append("  ".join(cells + [row[4]]).rstrip())
        c = self.counts()
        lines.append(f"{c['written']} written, {c['skipped']} skipped, {c['failed']} failed")
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"<BatchResult {len(self)} models: {c['written']} written, {c['skipped']} "
                f"skipped, {c['failed']} failed>")  # fmt: skip
