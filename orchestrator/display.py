"""Showing text that someone else wrote on a terminal, safely.

Planner output (a step's purpose, a plan's error), approvers' reasons and tools' error
messages end up in the run summary, ``scopegraph trace``, ``approvals show`` and the
approval prompt. A control character there (``\\x1b[2J`` clears the screen, ``\\r``
overwrites a line) or a bidirectional override (``\\u202e`` shows ``txt.exe`` as
``exe.txt``) could make a person approve something other than what they read.
``printable`` shows every such character as a visible escape instead.
"""

from __future__ import annotations

import unicodedata

# Control characters (Cc), format characters (Cf: bidirectional overrides and isolates,
# zero-width characters, the byte-order mark), line and paragraph separators, and lone
# surrogates (which a terminal cannot encode).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def printable(text: str) -> str:
    """``text`` with control, format and bidirectional characters shown as escapes.

    ``\\x1b`` stays visible as the four characters ``\\x1b``, ``U+202E`` as ``\\u202e``,
    a newline as ``\\n``; every other character, including non-ASCII letters and
    symbols, is kept as it is.
    """
    if text.isprintable() and text.isascii():
        return text  # the common case: nothing to look at
    return "".join(_escape(ch) if unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch for ch in text)


def printable_lines(lines: list[str]) -> str:
    """Lines drawn by us, holding text written by others, joined for a terminal."""
    return "\n".join(printable(line) for line in lines)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
