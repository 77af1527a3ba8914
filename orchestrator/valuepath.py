"""Paths into a step's output: which values a ``from_step`` constraint or a ``for_each`` names.

A path is a small, fixed language, so a plan can say *where* in an earlier result a
value must come from without running code:

- ``""`` is the whole output;
- ``name`` is a key of a mapping (letters, digits, ``_`` and ``-``); ``a.b`` goes down;
- ``[3]`` is one item of a list (from 0), ``[*]`` every item of it.

``files[*].id`` names the ``id`` of every file in ``files``; ``largest.id`` one value.
``select`` returns each value found with its concrete path (every ``[*]`` replaced by
the index it stood for), so a repeated step's n-th item can be named exactly:
``people[2].email``. A path that leads nowhere selects nothing; it is never an error
at run time (a missing value allows nothing).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MAX_PATH_LENGTH = 256
_TOKEN = re.compile(r"(?P<key>[A-Za-z0-9_-]+)|\[(?P<index>\d{1,9}|\*)\]")


class PathError(ValueError):
    """A path that is not in the path language."""


def parse_path(path: str) -> tuple[str | int | None, ...]:
    """The steps of ``path``: a key (``str``), an index (``int``) or every item (``None``).

    Raises:
        PathError: the path is too long or not in the language.
    """
    if not isinstance(path, str):
        raise PathError(f"path {path!r} must be a string")
    if len(path) > MAX_PATH_LENGTH:
        raise PathError(f"path of {len(path)} characters is longer than {MAX_PATH_LENGTH}")
    steps: list[str | int | None] = []
    at = 0
    while at < len(path):
        if steps and path[at] == "." and at + 1 < len(path) and path[at + 1] != "[":
            at += 1  # a dot separates keys: ``a.b``, not ``a.[0]``
        elif steps and path[at] != "[":
            raise PathError(f"path {path!r} has {path[at]!r} at {at}: use '.' between keys")
        match = _TOKEN.match(path, at)
        if match is None or match.end() == at:
            raise PathError(f"path {path!r} is not a path: use keys, '.', '[N]' and '[*]' (at {at})")
        if match.group("key") is not None:
            steps.append(match.group("key"))
        elif match.group("index") == "*":
            steps.append(None)
        else:
            steps.append(int(match.group("index")))
        at = match.end()
    return tuple(steps)


def select(value: Any, path: str) -> list[tuple[str, Any]]:
    """Every value ``path`` names in ``value``, with its concrete path, in document order.

    Raises:
        PathError: ``path`` is not in the language.
    """
    found: list[tuple[str, Any]] = [("", value)]
    for step in parse_path(path):
        following: list[tuple[str, Any]] = []
        for where, item in found:
            if isinstance(step, str):
                if isinstance(item, Mapping) and step in item:
                    following.append((f"{where}.{step}" if where else step, item[step]))
            elif isinstance(item, (list, tuple)):
                indexes = range(len(item)) if step is None else ([step] if step < len(item) else [])
                following.extend((f"{where}[{i}]", item[i]) for i in indexes)
        found = following
    return found


def join(path: str, more: str) -> str:
    """``more`` below ``path`` (either may be empty)."""
    if not more:
        return path
    if not path or more.startswith("["):
        return path + more
    return f"{path}.{more}"
