"""Text that came from a file, made safe for messages and terminals.

Key names, metadata values and file names are chosen by whoever wrote the file. Before
any of them reaches a message, a log line or a table:

* :func:`safe_repr` bounds the work and the length of a ``repr`` (huge ints, deep
  nesting, megabyte strings) *before* the text is built;
* :func:`escape` makes a string printable on one line: control characters (ESC, BEL,
  CR, LF, NUL, the C1 range, bidi overrides) and lone surrogates become visible escapes,
  so an escape sequence cannot clear the screen or fake a line of output.
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["safe_repr", "escape", "escape_path", "MAX_TEXT"]

#: the longest text from a file shown in one place, by default
MAX_TEXT = 200

# Characters that move the cursor, change the display or reorder text; shown escaped.
_BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
# the same set as one character class: a clean string (nearly all) costs one C scan
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e"
    "\u2066-\u2069\u2028\u2029\ufeff]"
)


def _is_unsafe(ch: str) -> bool:
    o = ord(ch)
    return (
        o < 0x20
        or 0x7F <= o < 0xA0
        or 0xD800 <= o < 0xE000  # lone surrogates (not encodable as UTF-8)
        or o in _BIDI
        or o in (0x2028, 0x2029, 0xFEFF)
    )


def escape(text: Any, limit: int = MAX_TEXT) -> str:
    """``text`` (a str, or anything with a ``str()``) as one printable line, at most about
    ``limit`` characters: control characters, lone surrogates and bidi controls become
    ``\\x1b``-style escapes (a backslash is doubled only where it could be mistaken for
    one); longer text is cut with ``...``."""
    if not isinstance(text, str):
        text = safe_repr(text, limit) if not isinstance(text, os.PathLike) else os.fspath(text)
        if not isinstance(text, str):  # a bytes path
            text = text.decode("utf-8", "surrogateescape")
    cut = len(text) > limit
    text = text[:limit]
    if _UNSAFE.search(text):
        parts = []
        for c in text:
            if not _is_unsafe(c):
                parts.append(c)
            elif c in "\n\r\t":
                parts.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
            elif ord(c) < 0x100:
                parts.append(f"\\x{ord(c):02x}")
            else:
                parts.append(f"\\u{ord(c):04x}")
        text = "".join(parts)
    return text + "..." if cut else text


def escape_path(path: Any, limit: int = 400) -> str:
    """A file path for a message: escaped like :func:`escape`, with a longer limit."""
    return escape(os.fspath(path) if isinstance(path, os.PathLike) else path, limit)


def safe_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about hostile data: never
    raises (huge ints, deep nesting), never builds more than a bounded amount of text, and
    the result is printable (see :func:`escape`)."""
    if isinstance(value, (str, bytes)):
        value = value[: limit + 1]
    elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<{value.bit_length()}-bit int>"
    elif isinstance(value, (tuple, list)):
        # never walk a container whole: a DAG of shared tuples can be exponential
        return _bounded_seq(value, limit)
    elif not isinstance(value, (int, float, bool, type(None))):
        return f"<{type(value).__name__}>"
    try:
        text = repr(value)
    except Exception:  # ValueError (int digits), anything else
        text = f"<{type(value).__name__}>"
    text = escape(text, limit + 10)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bounded_seq(value: tuple | list, limit: int, depth: int = 0) -> str:
    """repr of a tuple or list, built piece by piece and stopped at ``limit``."""
    open_, close = ("(", ")") if isinstance(value, tuple) else ("[", "]")
    if depth > 4:
        return open_ + "..." + close
    out = open_
    for i, v in enumerate(value):
        if len(out) > limit:
            return out[: limit - 3] + "..."
        if i:
            out += ", "
        if isinstance(v, (tuple, list)):
            out += _bounded_seq(v, limit - len(out), depth + 1)
        else:
            out += safe_repr(v, max(10, limit - len(out)))
        if i > limit:
            break
    if isinstance(value, tuple) and len(value) == 1:
        out += ","
    out += close
    return out if len(out) <= limit else out[: limit - 3] + "..."
