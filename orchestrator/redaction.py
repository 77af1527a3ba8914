"""Keeping the values of secret arguments out of messages.

A tool declares which of its arguments are secret (``@tool(roles={"api_key":
"secret"})``). When the tool fails, its exception message may quote them
(``invalid literal for int() with base 10: 'pw-…'``). The gateway keeps the message,
because it is what tells a person why the call failed, but first replaces every
secret argument's value with ``[secret:<argument>]``, wherever it occurs.

What is matched: the value as written, its ``repr``, ``ascii`` and JSON forms (a
message may quote a string escaped), and, for a list or mapping, the same forms of the
whole and of every string or number inside it. Every value is scrubbed whatever its
length: a one-character secret makes a message harder to read, never leaks. ``None``,
booleans and empty strings are not scrubbed (they would match everywhere and hide
nothing). A tool that transforms a secret before quoting it (hashes, truncates,
re-encodes it) defeats the match: such a tool must not put it in its messages.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

_MAX_DEPTH = 64  # deeper values are refused by the gateway before anything quotes them


def scrub(text: str, secrets: Iterable[tuple[str, Any]]) -> str:
    """``text`` with each ``(argument, value)`` pair's value replaced by ``[secret:<argument>]``."""
    names: dict[str, str] = {}
    for name, value in secrets:
        for form in _forms(value):
            names.setdefault(form, name)
    if not names:
        return text
    # One pass over the text, longest forms first: a placeholder is never matched again,
    # and a value is replaced whole, not its shorter forms inside it.
    pattern = re.compile("|".join(re.escape(f) for f in sorted(names, key=lambda f: (-len(f), f))))
    return pattern.sub(lambda m: f"[secret:{names[m.group(0)]}]", text)


def secret_values(names: Iterable[str], *argument_sets: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The ``(argument, value)`` pairs of the secret arguments ``names`` in each set of arguments."""
    return [(name, arguments[name]) for arguments in argument_sets for name in sorted(names)
            if isinstance(arguments, Mapping) and name in arguments]


def _forms(value: Any) -> set[str]:
    forms: set[str] = set()
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            forms.update(_string_forms(item))
        elif isinstance(item, (bytes, bytearray)):
            text = repr(bytes(item))
            forms.update({text, text[2:-1]})
            forms.update(_string_forms(bytes(item).decode("utf-8", "replace")))
        elif isinstance(item, (int, float)):
            forms.update({str(item), repr(item)})
        elif isinstance(item, (Mapping, list, tuple, set, frozenset)):
            forms.update(_whole_forms(item))
            if depth < _MAX_DEPTH:
                inner = item.values() if isinstance(item, Mapping) else item
                stack.extend((v, depth + 1) for v in inner)
        else:
            forms.update(_whole_forms(item))
    forms.discard("")
    return forms


def _string_forms(text: str) -> set[str]:
    return {text, repr(text)[1:-1], ascii(text)[1:-1], json.dumps(text)[1:-1],
            json.dumps(text, ensure_ascii=False)[1:-1]}


def _whole_forms(value: Any) -> set[str]:
    forms: set[str] = set()
    for render in (str, repr, lambda v: json.dumps(v, default=str)):
        try:
            forms.add(render(value))
        except Exception:  # a form that cannot be made cannot be quoted either
            continue
    return forms


def recorded_constraints(constraints: Mapping[str, Any], secrets: Iterable[str]) -> dict[str, Any]:
    """Constraints as the ledger records them: a value the plan pinned for a secret
    argument (``exact``, ``one_of``) is replaced by ``[secret:<argument>]``."""
    hidden = set(secrets)
    out: dict[str, Any] = {}
    for name, constraint in constraints.items():
        data = constraint.model_dump() if hasattr(constraint, "model_dump") else dict(constraint)
        if name in hidden:
            if "value" in data:
                data["value"] = f"[secret:{name}]"
            if "values" in data:
                data["values"] = [f"[secret:{name}]"] * len(data["values"])
        out[name] = data
    return out
