"""The arguments digest the ledger holds keeps its bytes: ``usage_report`` recomputes it
from records written by earlier releases, whichever encoder writes it now."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scopegraph.call_checks import digest_of


def _as_written_before(arguments: Any) -> str:
    """The digest as earlier releases wrote it (``json.dumps`` with ``default=str``)."""
    text = json.dumps({"arguments": arguments}, default=str, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


@given(st.dictionaries(st.text(max_size=8), _VALUES, max_size=5))
def test_the_digest_of_any_arguments_is_the_one_earlier_releases_wrote(arguments: dict[str, Any]) -> None:
    assert digest_of(arguments) == _as_written_before(arguments)


@pytest.mark.parametrize("arguments", [
    {"path": "/a\x7fb"},                  # DEL: ASCII, yet escaped by ``ensure_ascii``
    {"name": "Zoë", "to": "ü@example.org"},  # non-ASCII text
    {"ratio": float("nan"), "n": float("inf")},
    {"when": __import__("datetime").date(2026, 1, 2)},  # not JSON: written as its ``str``
    {"t": (1, "two")},
    {"k": {1: "x", 2.5: "y"}},
])
def test_the_values_the_fast_encoder_writes_otherwise_keep_their_old_digest(arguments: dict[str, Any]) -> None:
    assert digest_of(arguments) == _as_written_before(arguments)


def test_arguments_that_cannot_be_written_have_no_digest() -> None:
    looped: dict[str, Any] = {}
    looped["self"] = looped
    assert digest_of(looped) is None
