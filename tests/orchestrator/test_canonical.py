"""RFC 8785 canonical JSON: the repository's test vectors, and what JCS refuses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from scopegraph.canonical import action_digest, action_digest_v2, canonical_json, jcs, jcs_sha256_hex

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "canonical.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_jcs_reproduces_the_vector_file(vector: dict[str, str]) -> None:
    value = json.loads(vector["input"])
    assert jcs(value) == vector["canonical"].encode("utf-8")
    assert hashlib.sha256(vector["canonical"].encode("utf-8")).hexdigest() == vector["sha256"]
    assert jcs_sha256_hex(value) == vector["sha256"]


def test_the_vectors_cover_what_python_canonical_json_gets_wrong() -> None:
    """Key order by UTF-16 unit and ECMAScript numbers: where the old form differs from JCS."""
    by_name = {v["name"]: v for v in VECTORS["vectors"]}
    for name in ("keys-sorted-by-utf16-code-units", "numbers-in-ecmascript-form"):
        value = json.loads(by_name[name]["input"])
        assert canonical_json(value).encode() != jcs(value), name


def test_the_action_digest_v2_vector_is_what_action_digest_v2_computes() -> None:
    [vector] = [v for v in VECTORS["vectors"] if v["name"] == "action-digest-v2-layout"]
    fields = json.loads(vector["input"])
    assert fields.pop("type") == "scopegraph.action.v2"
    assert action_digest_v2(**fields) == vector["sha256"]
    assert action_digest(**fields) != vector["sha256"]  # v1 digests are untouched (stored approvals use them)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2**53, -(2**53), "\ud800", {1: "non-string key"},
                                 {"k": object()}, b"bytes"])
def test_jcs_refuses_what_other_languages_could_not_reproduce(bad: Any) -> None:
    with pytest.raises(ValueError, match=r"cannot be canonicalised \(RFC 8785\)"):
        jcs(bad)
