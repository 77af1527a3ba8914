"""RFC 8785 canonical JSON: the repository's test vectors, and what JCS refuses."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scopegraph.approvers import answer_message
from scopegraph.canonical import action_digest, action_digest_v2, canonical_json, jcs, jcs_sha256_hex
from scopegraph.ledger import LEDGER_RECORD_V2, record_hash_v2

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


def test_the_ledger_record_v2_vectors_are_what_record_hash_v2_computes_and_chain() -> None:
    """Issue 12: a verifier elsewhere recomputes each record's hash from the documented layout."""
    by_name = {v["name"]: v for v in VECTORS["vectors"]}
    first, second = (json.loads(by_name[n]["input"]) for n in ("ledger-record-v2-layout", "ledger-record-v2-chained"))
    for record, vector in ((first, by_name["ledger-record-v2-layout"]), (second, by_name["ledger-record-v2-chained"])):
        assert record.pop("type") == LEDGER_RECORD_V2
        assert record_hash_v2(seq=record["seq"], run_id=record["run_id"], kind=record["kind"], at=record["at"],
                              data=record["data"], prev_hash=record["prev"]) == vector["sha256"]
    assert second["prev"] == by_name["ledger-record-v2-layout"]["sha256"] and first["prev"] == "0" * 64


def test_the_approval_answer_vector_is_the_message_approvers_sign() -> None:
    [vector] = [v for v in VECTORS["vectors"] if v["name"] == "approval-answer-v1-layout"]
    fields = json.loads(vector["input"])
    message = answer_message(approval_id=fields["approval_id"], digest=fields["digest"],
                             decision=fields["decision"], approver=fields["approver"].upper(), reason=fields["reason"])
    assert message == vector["canonical"].encode("utf-8")  # the approver's name normalised: "BOB" signs as "bob"


def test_a_ledger_written_now_hashes_every_record_with_layout_v2(tmp_path: Path) -> None:
    from scopegraph.clock import FixedClock
    from scopegraph.ledger import Ledger
    from scopegraph.store import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    try:
        ledger = Ledger(store, clock=FixedClock(1_800_000_000.5))
        ledger.append("decision", "r1", step_id="s1", reasons=["caf\u00e9", "\U0001f600"], big=2**60, nan=float("nan"))
        [row] = store.ledger_rows()
        data = json.loads(row.data)
        assert row.data.encode() == jcs(data)  # stored in its RFC 8785 form
        assert data["big"] == str(2**60) and data["nan"] == "nan"  # what JCS cannot hold, as text
        assert row.hash == record_hash_v2(seq=1, run_id="r1", kind="decision", at=row.at, data=data,
                                          prev_hash="0" * 64)
    finally:
        store.close()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@given(_JSON)
def test_the_ledgers_fast_canonical_form_is_rfc_8785(value: Any) -> None:
    """The ledger's shortcut (Python's sorted JSON where it is the same bytes) never differs from JCS."""
    from scopegraph.ledger import jcs_bytes, jcs_safe

    safe = jcs_safe(value)
    assert jcs_bytes(safe) == jcs(safe)


_ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@given(_ANY_JSON)
def test_jcs_is_the_rfc8785_reference_whichever_path_it_takes(value: Any) -> None:
    """``jcs`` writes the usual value with Python's JSON encoder: the same bytes as the reference."""
    import rfc8785

    from scopegraph.canonical import python_json_is_jcs, sorted_json

    assert jcs(value) == rfc8785.dumps(value)
    if python_json_is_jcs(value):
        assert sorted_json(value).encode("utf-8") == rfc8785.dumps(value)


@pytest.mark.parametrize("value", [1.0, -0.0, 1e16, 1e-5, 2.5e-7, 1e21, 123456789012345680.0,
                                   {"\ue000": 1, "\U0001f600": 2}, {"a": [0.5, 2.0]}])
def test_values_python_writes_otherwise_take_the_reference_path(value: Any) -> None:
    """Integral, tiny or huge floats and keys from U+D800 on: Python's JSON differs from JCS there."""
    import rfc8785

    from scopegraph.canonical import python_json_is_jcs

    assert not python_json_is_jcs(value)
    assert jcs(value) == rfc8785.dumps(value)


@pytest.mark.parametrize("value", [["\ud800"], 2**53, {"a": float("nan")}, {1: "a"}])
def test_what_jcs_cannot_hold_is_refused_on_either_path(value: Any) -> None:
    with pytest.raises(ValueError):
        jcs(value)


_HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=0x1f, max_codepoint=0x7f)) | st.text()


@given(_HEADER_TEXT, _HEADER_TEXT, _HEADER_TEXT, st.integers(min_value=1, max_value=2**53 - 1),
       st.floats(min_value=0, max_value=4e9, allow_nan=False) | st.integers(min_value=0, max_value=2**40),
       st.dictionaries(st.text(max_size=6), _ANY_JSON, max_size=4))
def test_a_ledger_record_hash_is_sha256_of_the_rfc8785_record(run_id: str, kind: str, prev: str, seq: int,
                                                             at: float, data: dict[str, Any]) -> None:
    """The record hash writes its header fields and payload by fast paths: the same digest
    as SHA-256 over the reference RFC 8785 bytes of the whole typed record."""
    import hashlib

    import rfc8785

    from scopegraph.ledger import LEDGER_RECORD_V2, record_hash_v2

    record = {"type": LEDGER_RECORD_V2, "seq": seq, "run_id": run_id, "kind": kind, "at": at, "prev": prev,
              "data": data}
    try:
        reference = rfc8785.dumps(record)
    except (rfc8785.CanonicalizationError, UnicodeEncodeError):  # a lone surrogate: refused either way
        with pytest.raises(ValueError):
            record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=data, prev_hash=prev)
        return
    assert record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=data,
                          prev_hash=prev) == hashlib.sha256(reference).hexdigest()


@given(seq=st.integers(min_value=-3, max_value=2**53 + 3) | st.sampled_from([0, 1, 2**53 - 1, 2**53]),
       run_id=st.text(max_size=8) | st.just("run-1"), kind=st.text(max_size=8) | st.just("decision"),
       prev_hash=st.text(max_size=8) | st.just("ab" * 32),
       at=st.sampled_from([1.5, 1_764_693_000.123456, 1_800_000_000.0]))
def test_a_ledger_record_hash_is_sha256_of_the_rfc8785_record_for_any_header(
        seq: int, run_id: str, kind: str, prev_hash: str, at: float) -> None:
    """The plain-ASCII header is written without a call per field; quotes, backslashes,
    control and non-ASCII characters and out-of-range numbers take the general way: the
    hash is the reference's either way."""
    import rfc8785

    data = {"step_id": "s1", "policy_ids": ["p1", "p2"], "reasons": ["because \"x\""]}
    record = {"type": LEDGER_RECORD_V2, "seq": seq, "run_id": run_id, "kind": kind, "at": at,
              "prev": prev_hash, "data": data}
    try:
        expected = hashlib.sha256(rfc8785.dumps(record)).hexdigest()
    except Exception:  # what JCS cannot hold (a lone surrogate, an integer past 2**53-1)
        with pytest.raises(ValueError):
            record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=data, prev_hash=prev_hash)
        return
    assert record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=data, prev_hash=prev_hash) == expected


@pytest.mark.parametrize("inner", [[], ["a"], ["\ud800"], [1.0], [0.5], [[]], [{"a": 1}], [2**53]])
@pytest.mark.parametrize("depth", [62, 63, 64, 65])
def test_a_payload_list_decides_alike_at_the_depth_limit(inner: list[Any], depth: int) -> None:
    """A list in a payload dict is checked in the dict's loop: at and past the depth limit it
    decides as the general way does (nested too deep: the reference path)."""
    import rfc8785

    from scopegraph.canonical import python_json_is_jcs, sorted_json

    value: Any = {"list": inner, "s": "x"}
    for _ in range(depth):
        value = {"k": value}
    try:
        reference = rfc8785.dumps(value)
    except Exception:
        assert not python_json_is_jcs(value)
        return
    if python_json_is_jcs(value):
        assert sorted_json(value).encode("utf-8") == reference
    # The list lies at ``depth + 1``, what it holds at ``depth + 2``: nothing past 64 is
    # written by Python's encoder; an integral float or a lone surrogate never is.
    flat = inner in ([], ["a"], [0.5]) and depth + 1 <= 64
    nested = inner in ([[]], [{"a": 1}]) and depth + 2 <= 64
    assert python_json_is_jcs(value) == (flat or nested)
