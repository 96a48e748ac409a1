"""Reading the key manifests of ``shared/fixtures`` (not part of the repository).

Two formats: ``key<TAB>dtype<TAB>[a, b]`` under a ``key dtype shape`` header
(``control_sd15.tsv``, ``sd15_base.tsv``), and ``key<TAB>dtype<TAB>AxB`` after one
``#`` comment line that may end with ``Config: {json}`` (the others). Correspondence
files hold ``diffusers key<TAB>ldm key`` rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"

Row = tuple[str, str, tuple[int, ...]]


def path_of(name: str) -> Path:
    """The manifest's path, or skip the test when shared/ is not there."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"fixture {path} not available (shared/ is not part of the repo)")
    return path


def _lines(name: str) -> list[str]:
    return [
        line
        for line in path_of(name).read_text().splitlines()
        if line and not line.startswith("#") and line != "key\tdtype\tshape"
    ]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.split(r"[x,]", text.strip("[] ")) if x.strip())


def rows(name: str) -> list[Row]:
    """``(key, dtype, shape)`` rows of a key manifest, in file order."""
    out = []
    for line in _lines(name):
        key, dtype, shape = line.split("\t")
        out.append((key, dtype, _shape(shape)))
    return out


def pairs(name: str) -> list[tuple[str, str]]:
    """``(diffusers key, ldm key)`` rows of a correspondence manifest, in file order."""
    return [tuple(line.split("\t")) for line in _lines(name)]  # type: ignore[misc]


def config(name: str) -> dict:
    """The diffusers config quoted in a manifest's comment line."""
    head = path_of(name).read_text().splitlines()[0]
    return json.loads(head[head.index("Config: ") + len("Config: ") :])
