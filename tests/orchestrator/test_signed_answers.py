"""Approvers who prove who they are (issue 12, point 2), on SQLite and PostgreSQL.

Once approvers are enrolled with their Ed25519 public keys, an answer counts only with a
valid signature by the answering approver's enrolled key, over that approval's action
digest and the answer itself; the signature is kept with the answer and in the ledger,
and ``audit verify`` checks every one again, offline. The initiator never answers her
own request, under any spelling; an enrolment the keystore did not vouch for is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph import Runtime
from scopegraph.approvers import Principal, sign_answer
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.errors import ApprovalError, ConfigError
from scopegraph.ledger import Ledger
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401

from .test_approvals import ARGS_A, INITIATOR, make_workflow
from .trust_helpers import Where, where

KEYS = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol", "eve")}


def public(name: str) -> str:
    return KEYS[name].public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def ssh(name: str) -> str:
    return KEYS[name].public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                serialization.PublicFormat.OpenSSH).decode() + f" {name}@laptop"


@pytest.fixture(params=["sqlite", "postgresql"])
def at(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    return where(request, tmp_path)


@pytest.fixture
def effects() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def open_rt(at: Where, clock: FixedClock, effects: list[dict[str, Any]]) -> Iterator[Callable[..., Runtime]]:
    opened: list[Runtime] = []

    def make(**kwargs: Any) -> Runtime:
        rt = Runtime(make_workflow(effects, **kwargs), store=at.url, clock=clock)
        opened.append(rt)
        return rt

    yield make
    for rt in reversed(opened):
        rt.close()


@pytest.fixture
def enrolled(open_rt: Callable[..., Runtime]) -> Runtime:
    rt = open_rt()
    rt.approvers.add("alice", ssh("alice"))  # an OpenSSH line
    rt.approvers.add("Bob", public("bob"))  # PEM; the name is kept as given, compared as "bob"
    rt.approvers.add("carol", public("carol"))
    return rt


def paused(rt: Runtime, initiator: str | Principal = INITIATOR) -> str:
    report = rt.run("Reimburse receipt r-1042", initiator=initiator)
    assert report.status == "paused", report.summary()
    [step] = report.steps
    assert step.approval_id is not None
    return step.approval_id


def sig(rt: Runtime, aid: str, key: str, *, approver: str, decision: str = "approve", reason: str = "") -> str:
    a = rt.approvals.get(aid)
    return sign_answer(KEYS[key], approval_id=aid, digest=a.digest, decision=decision,  # type: ignore[arg-type]
                       approver=approver, reason=reason)


# answers must be signed by the answering approver's enrolled key ---------------------------------
def test_a_signed_answer_is_accepted_kept_with_the_answer_and_in_the_ledger(
        enrolled: Runtime, effects: list[dict[str, Any]]) -> None:
    rt = enrolled
    aid = paused(rt)
    signature = sig(rt, aid, "bob", approver="bob", reason="receipt checked")
    approved = rt.approvals.approve(aid, approver="bob", reason="receipt checked", signature=signature)
    assert approved.status == "approved"
    [vote] = approved.approvals
    assert vote.signature == signature and vote.kid == rt.approvers.find("bob").kid
    [answer] = approved.answers()
    assert answer["signed"] is True and answer["kid"] == vote.kid
    [record] = [r for r in rt.ledger.records() if r["kind"] == "approval_decided"]
    assert record["signature"] == signature and record["kid"] == vote.kid and record["approver"] == "bob"
    assert rt.resume(approved.run_id).status == "completed" and effects == [ARGS_A]
    verdict = Ledger(rt.store, clock=rt.clock).verify()
    assert verdict.ok and verdict.signed_answers == 1, verdict


@pytest.mark.parametrize("signature", ["", None, "not-base64!", "AAAA"])
def test_an_answer_without_or_with_a_malformed_signature_is_refused(enrolled: Runtime, signature: Any) -> None:
    aid = paused(enrolled)
    with pytest.raises(ApprovalError, match="needs a signed answer|malformed|does not verify"):
        enrolled.approvals.approve(aid, approver="bob", signature=signature)
    with pytest.raises(ApprovalError, match="needs a signed answer|malformed|does not verify"):
        enrolled.approvals.deny(aid, approver="bob", reason="no", signature=signature)
    assert enrolled.approvals.get(aid).status == "pending"


def test_a_wrong_signature_is_refused(enrolled: Runtime) -> None:
    rt = enrolled
    aid = paused(rt)
    cases = {
        "by another key": sig(rt, aid, "eve", approver="bob"),
        "over a denial": sig(rt, aid, "bob", approver="bob", decision="deny"),
        "over another reason": sig(rt, aid, "bob", approver="bob", reason="something else"),
    }
    for case, signature in cases.items():
        with pytest.raises(ApprovalError, match="does not verify"):
            rt.approvals.approve(aid, approver="bob", signature=signature)
        assert rt.approvals.get(aid).status == "pending", case
    other = paused(rt)  # a signature over another request's digest
    with pytest.raises(ApprovalError, match="does not verify"):
        rt.approvals.approve(aid, approver="bob", signature=sig(rt, other, "bob", approver="bob"))
    assert [r for r in rt.ledger.records() if r["kind"] == "approval_decided"] == []


def test_an_enrolled_approver_cannot_answer_as_another(enrolled: Runtime) -> None:
    rt = enrolled
    aid = paused(rt)
    # carol signs with her own key, but says she is bob ...
    with pytest.raises(ApprovalError, match="does not verify"):
        rt.approvals.approve(aid, approver="bob", signature=sig(rt, aid, "carol", approver="bob"))
    # ... or signs an answer naming carol and presents it as bob's
    with pytest.raises(ApprovalError):
        rt.approvals.approve(aid, approver="bob", signature=sig(rt, aid, "carol", approver="carol"))
    assert rt.approvals.get(aid).status == "pending"
    # an unenrolled name cannot answer at all
    with pytest.raises(ApprovalError, match="not an allowed approver|not an enrolled approver"):
        rt.approvals.approve(aid, approver="mallory", signature=sig(rt, aid, "eve", approver="mallory"))


@pytest.mark.parametrize("spelling", ["alice", "ALICE", "Alice", "ａｌｉｃｅ", "\u0041\u029fice"])
def test_the_initiator_cannot_answer_under_any_spelling_even_with_her_enrolled_key(
        enrolled: Runtime, spelling: str) -> None:
    rt = enrolled
    aid = paused(rt, initiator=Principal.of("Alice", authenticated_by="application"))
    signature = sig(rt, aid, "alice", approver="alice")
    with pytest.raises(ApprovalError, match="may not approve|is not an allowed approver|invalid"):
        rt.approvals.approve(aid, approver=spelling, signature=signature)
    assert rt.approvals.get(aid).status == "pending"
    [started] = [r for r in rt.ledger.records() if r["kind"] == "run_started"]
    assert started["initiator_principal"] == "alice" and started["initiator_authenticated_by"] == "application"


def test_the_initiator_is_the_operating_system_user_by_default(enrolled: Runtime) -> None:
    import getpass

    rt = enrolled
    report = rt.run("Reimburse receipt r-1042")
    [started] = [r for r in rt.ledger.records(report.run_id) if r["kind"] == "run_started"]
    assert started["initiator"] == getpass.getuser() and started["initiator_authenticated_by"] == "os-user"


def test_a_removed_approver_answers_no_more_but_their_past_answers_verify(enrolled: Runtime) -> None:
    rt = enrolled
    first = paused(rt)
    rt.approvals.approve(first, approver="bob", signature=sig(rt, first, "bob", approver="bob"))
    assert rt.approvers.remove("BOB")
    second = paused(rt)
    with pytest.raises(ApprovalError, match="not an enrolled approver"):
        rt.approvals.approve(second, approver="bob", signature=sig(rt, second, "bob", approver="bob"))
    verdict = Ledger(rt.store, clock=rt.clock).verify()
    assert verdict.ok and verdict.signed_answers == 1, verdict


def test_names_are_enrolled_once_under_any_spelling_and_must_be_valid(enrolled: Runtime) -> None:
    with pytest.raises(ConfigError, match="enrolled already"):
        enrolled.approvers.add("BOB", public("eve"))
    for bad in ("bob ", "b ob", "bo\u200bb", ""):
        with pytest.raises(ConfigError, match="invalid approver name|must not be empty"):
            enrolled.approvers.add(bad, public("eve"))
    with pytest.raises(ConfigError, match="Ed25519|neither"):
        enrolled.approvers.add("dave", "ssh-rsa AAAAB3NzaC1yc2E dave")


# a workflow can require signed answers -------------------------------------------------------------
def test_a_workflow_that_requires_signed_answers_refuses_unsigned_ones_before_anyone_is_enrolled(
        open_rt: Callable[..., Runtime]) -> None:
    rt = open_rt(require_signed_answers=True)
    aid = paused(rt)
    assert rt.approvals.get(aid).signed_answers is True
    with pytest.raises(ApprovalError, match="needs a signed answer"):
        rt.approvals.approve(aid, approver="bob")
    with pytest.raises(ApprovalError, match="not an enrolled approver"):
        rt.approvals.approve(aid, approver="bob", signature=sig(rt, aid, "bob", approver="bob"))
    rt.approvers.add("bob", public("bob"))
    assert rt.approvals.approve(aid, approver="bob", signature=sig(rt, aid, "bob", approver="bob")).status == "approved"


def test_without_enrolled_approvers_answers_stay_unsigned_as_before(open_rt: Callable[..., Runtime]) -> None:
    rt = open_rt()
    aid = paused(rt)
    with pytest.raises(ApprovalError, match="no approver is enrolled"):
        rt.approvals.approve(aid, approver="bob", signature=sig(rt, aid, "bob", approver="bob"))
    assert rt.approvals.approve(aid, approver="bob").status == "approved"
    assert Ledger(rt.store, clock=rt.clock).verify().ok


# what someone who can write the store cannot do ------------------------------------------------------
def test_an_approver_planted_or_rekeyed_in_the_store_is_refused_and_reported(
        enrolled: Runtime, at: Where) -> None:
    rt = enrolled
    aid = paused(rt)
    # eve swaps bob's public key for hers, and enrols herself, behind scopegraph's back
    at.sql("UPDATE sg_approvers SET public_pem = ? WHERE name = 'bob'", (public("eve"),))
    at.sql("INSERT INTO sg_approvers (name, display, public_pem, kid, enrolled_at, endorsement) "
           "VALUES ('eve', 'eve', ?, 'x', 1, 'forged.AAAA')", (public("eve"),))
    with pytest.raises(ApprovalError, match="not made with this store's keystore"):
        rt.approvals.approve(aid, approver="bob", signature=sig(rt, aid, "eve", approver="bob"))
    with pytest.raises(ApprovalError, match="not made with this store's keystore|not an allowed approver"):
        rt.approvals.approve(aid, approver="eve", signature=sig(rt, aid, "eve", approver="eve"))
    verdict = Ledger(rt.store, clock=rt.clock).verify()
    assert not verdict.ok
    assert any("'eve'" in p and "no record of the enrolment" in p for p in verdict.problems), verdict.problems


def test_a_removal_undone_in_the_store_is_reported(enrolled: Runtime, at: Where) -> None:
    rt = enrolled
    rt.approvers.remove("carol")
    at.sql("UPDATE sg_approvers SET removed_at = NULL WHERE name = 'carol'")
    verdict = Ledger(rt.store, clock=rt.clock).verify()
    assert not verdict.ok and any("'carol' was removed" in p for p in verdict.problems), verdict.problems


def test_audit_verify_checks_every_signature_again(enrolled: Runtime, at: Where,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rt = enrolled
    aid = paused(rt)
    rt.approvals.deny(aid, approver="carol", reason="wrong vendor",
                      signature=sig(rt, aid, "carol", approver="carol", decision="deny", reason="wrong vendor"))
    rt.close()
    assert main(["--store", at.url, "audit", "verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signed_answers"] == 1
    # The signature kept in the ledger is checked against the enrolled key, not trusted:
    # re-enrol carol with eve's key (as the keystore would, to make it look genuine) ...
    store_rt = Runtime(make_workflow([]), store=at.url, clock=rt.clock)
    try:
        store_rt.approvers.remove("carol")
        store_rt.approvers.add("carol", public("eve"))
        # ... and point her first enrolment at it: the old signature no longer verifies.
        at.sql("UPDATE sg_approvers SET public_pem = ?, kid = (SELECT kid FROM sg_approvers WHERE name = 'carol' "
               "AND removed_at IS NULL) WHERE name = 'carol' AND removed_at IS NOT NULL", (public("eve"),))
    finally:
        store_rt.close()
    assert main(["--store", at.url, "audit", "verify"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("TAMPERED:") and "carol" in out
