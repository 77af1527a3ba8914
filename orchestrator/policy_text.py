"""Positions in Cedar policy text, so that a policy error can name ``file:line:column``.

cedarpy reports parse and validation errors without source locations. This module
finds them from the text itself: a small tokenizer (strings, ``//`` comments,
identifiers, operators), the policy statements (each ends with ``;``), and, for a
syntax error, the shortest prefix of the text that fails with an error other than
"unexpected end of input": the parser read that far before it met the bad token. It
knows nothing of cedarpy; the parser is passed in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>//[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"?)
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9]+)
  | (?P<op>::|==|!=|<=|>=|&&|\|\||.)
""", re.VERBOSE | re.DOTALL)
_QUOTED = re.compile(r"`([^`]+)`")
_UNEXPECTED = re.compile(r"unexpected token `(.+)`")
END_OF_INPUT = "unexpected end of input"


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


def tokens(text: str) -> list[Token]:
    """The tokens of ``text``, without whitespace and comments."""
    found = []
    for m in _TOKEN.finditer(text):
        if m.lastgroup not in ("space", "comment"):
            found.append(Token(m.group(), m.start(), m.end()))
    return found


def statements(text: str) -> list[list[Token]]:
    """The policies of ``text`` as token lists, in order; each ends with its ``;``."""
    out: list[list[Token]] = [[]]
    for tok in tokens(text):
        out[-1].append(tok)
        if tok.text == ";":
            out.append([])
    return [s for s in out if s]


def line_col(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of ``offset`` in ``text``."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def where(text: str, offset: int) -> str:
    line, col = line_col(text, offset)
    return f"{line}:{col}"


def syntax_error_offset(text: str, message: str, parse_error: Callable[[str], str | None]) -> int:
    """Where the syntax error ``message`` (from parsing all of ``text``) lies.

    ``parse_error(prefix)`` parses a prefix and returns its error message, or ``None``.
    """
    toks = tokens(text)
    if not toks or END_OF_INPUT in message:
        return toks[-1].end if toks else len(text)
    unexpected = _UNEXPECTED.fullmatch(message)
    if unexpected and unexpected.group(1) != ";":
        # The parser recovers at ``}`` and ``;`` and may then report the end of a cut-off
        # prefix instead: end each candidate prefix with ``;`` so the first error shows.
        for tok in toks:
            if tok.text == unexpected.group(1) and parse_error(text[:tok.end] + "\n;") == message:
                return tok.start

    def fails_before_end(k: int) -> bool:
        error = parse_error(text[:toks[k - 1].end])
        return error is not None and END_OF_INPUT not in error

    lo, hi = 1, len(toks)  # the full text fails; find the fewest tokens that do
    if not fails_before_end(hi):
        return toks[-1].end
    while lo < hi:
        mid = (lo + hi) // 2
        if fails_before_end(mid):
            hi = mid
        else:
            lo = mid + 1
    bad = toks[hi - 1]
    if message.startswith(("unexpected token", "invalid token")):
        return bad.start
    # An error found after parsing (an unknown function, say): the statement that holds
    # the token, at the fragment the message quotes if it can be found there.
    for statement in statements(text):
        if statement[0].start <= bad.start <= statement[-1].start:
            return fragment_offset(statement, message)
    return bad.start


def fragment_offset(statement: Sequence[Token], message: str, *, skip: Sequence[str] = ()) -> int:
    """Where the first `quoted` fragment of ``message`` occurs in ``statement``; else its start."""
    for quoted in _QUOTED.findall(message):
        if quoted in skip:
            continue
        found = find_sequence(statement, quoted)
        if found is not None:
            return found
    return statement[0].start


def find_sequence(statement: Sequence[Token], fragment: str) -> int | None:
    """Offset of the first run of tokens in ``statement`` that spells ``fragment``."""
    wanted = [t.text for t in tokens(fragment)]
    if not wanted:
        return None
    texts = [t.text for t in statement]
    for i in range(len(texts) - len(wanted) + 1):
        if texts[i:i + len(wanted)] == wanted:
            return statement[i].start
    return None
