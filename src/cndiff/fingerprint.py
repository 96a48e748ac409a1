"""Which base is this? Compare a base with the UNet copy an original ControlNet embeds.

Every original ``control_sd15_*.pth`` carries the SD1.5 UNet it was trained against
(``model.diffusion_model.*``, the non-EMA weights of ``v1-5-pruned.ckpt``). Comparing
the base a user passes with that copy, over the keys the difference uses, tells whether
it is the very same model, the same model with small differences (EMA vs non-EMA
weights), or another model (a fine-tune): a diff is exact only against the first.
The comparison runs in the extraction pass itself (see ``Stream.embedded_prefix``):
each chunk's statistics (a backend's ``compare``) are added to a :class:`BaseMatchStats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BaseMatch", "BaseMatchStats", "classify_base", "CLOSE_REL_RMS"]

#: below this relative RMS difference the base is "the same model with small differences"
#: (EMA vs non-EMA SD1.5 weights differ by far less); above, another model. A heuristic
#: threshold for a warning, not a bound.
CLOSE_REL_RMS = 0.02


@dataclass
class BaseMatchStats:
    """How the base compares with the control file's embedded UNet, so far."""

    keys: int = 0
    elements: int = 0
    identical: bool = True
    max_abs: float = 0.0
    sum_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_base: float = 0.0

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.elements if self.elements else 0.0

    @property
    def rel_rms(self) -> float:
        """||base - embedded|| / ||base|| (Frobenius, over every compared element)."""
        return math.sqrt(self.sum_sq_diff / self.sum_sq_base) if self.sum_sq_base else 0.0

    def add(self, chunk: tuple[bool, float, float, float, float, int], first: bool) -> None:
        """Add one chunk's statistics (``first``: the chunk starts a new key)."""
        eq, mx, sa, sd, sb, n = chunk
        self.identical &= eq
        self.max_abs = max(self.max_abs, mx) if not math.isnan(mx) else math.nan
        self.sum_abs += sa
        self.sum_sq_diff += sd
        self.sum_sq_base += sb
        self.elements += n
        self.keys += first


@dataclass(frozen=True)
class BaseMatch:
    """The verdict: ``kind`` is ``identical``, ``close`` or ``different``."""

    kind: str
    keys: int
    max_abs: float
    mean_abs: float
    rel_rms: float

    def __str__(self) -> str:
        return self.message

    @property
    def message(self) -> str:
        if self.kind == "identical":
            return (
                f"base check: the base is identical to the UNet embedded in the control file "
                f"({self.keys} keys): the base the ControlNet was trained from"
            )
        what = (
            "the same model with small differences (e.g. EMA vs non-EMA weights)"
            if self.kind == "close"
            else "another model (a fine-tune?)"
        )
        return (
            f"base check: the base differs from the UNet embedded in the control file: "
            f"{what}; max |difference| {self.max_abs:.3g}, mean {self.mean_abs:.3g}, "
            f"relative RMS {self.rel_rms:.3g} over {self.keys} keys. The diff reproduces the "
            "ControlNet exactly only on the base it was taken against"
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "keys": self.keys,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "rel_rms": self.rel_rms,
        }


def classify_base(stats: BaseMatchStats) -> BaseMatch:
    """Turn the accumulated comparison into a verdict."""
    if stats.identical:
        kind = "identical"
    elif stats.rel_rms < CLOSE_REL_RMS:
        kind = "close"
    else:
        kind = "different"
    return BaseMatch(kind, stats.keys, stats.max_abs, stats.mean_abs, stats.rel_rms)
