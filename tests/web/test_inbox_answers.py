"""Answers beyond a plain approval, in Chromium: deny with a proposed alternative call (a
valid one recorded with the denial; an invalid one refused at once, before any passkey is
asked, with a one-line error naming the problem, and nothing recorded), and two-person
progress ("1 of 2 approvals") after the first answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from scopegraph.approvals import ApprovalRequest, ApprovalService
from scopegraph.ledger import Ledger
from scopegraph.store import open_store

from . import flows
from .conftest import Served, enrol
from .test_inbox_attacks import capture_finish

pytestmark = pytest.mark.parametrize("at", ["sqlite"], indirect=True)


def request_of(served: Served, approval_id: str) -> ApprovalRequest:
    store = open_store(served.at.url, create=False)
    try:
        return ApprovalService(store, clock=served.clock, ledger=Ledger(store, clock=served.clock)).get(approval_id)
    finally:
        store.close()


def deny_proposing(page: Any, reason: str, proposal: str) -> None:
    page.fill("#reason", reason)
    if not page.locator("#answer details").evaluate("d => d.open"):
        page.locator("#answer details summary").click()
    page.fill("#propose", proposal)
    page.click("#deny")


def test_a_proposal_is_checked_at_once_and_a_valid_one_is_recorded_with_the_denial(
        served: Served, approver_page: Callable[[], Any]) -> None:
    approval_id = served.approvals[0]
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    sent = capture_finish(bob)  # an answer that reached the passkey step would show here
    bob.goto(f"{served.origin}/requests/{approval_id}")
    refusals = {
        '{"amount": 20000}': "argument 'amount' is outside the scope of step 'file': it must be",
        '{"employee": "e-99"}': "argument 'employee' is outside the scope of step 'file'",
        '{"tip": 5}': "invalid arguments for tool 'file_expense': tip: Extra inputs are not permitted",
        '{"amount": "lots"}': "invalid arguments for tool 'file_expense': amount:",  # the wrong type
        '{"amount": 4250}': "it proposes the same call as the request",
        '[100]': "propose is a JSON object of arguments",
        '{"amount": ': "The proposal is not valid JSON.",
    }
    for proposal, problem in refusals.items():
        bob.evaluate("document.getElementById('status').textContent = ''")
        deny_proposing(bob, "too much", proposal)
        bob.locator("#status.bad:not(:empty)").wait_for()
        said = bob.inner_text("#status")
        assert problem in said and "\n" not in said.strip(), (proposal, said)
        assert "8841" not in said  # the secret argument's value is never echoed
        bob.locator("#deny:not([disabled])").wait_for()
    served.screenshot(bob, "proposal-refused.png")
    assert sent == []  # refused before any passkey was asked: nothing was signed
    refused = request_of(served, approval_id)
    assert refused.status == "pending" and refused.answers() == []

    bob.unroute("**/answer/finish")
    deny_proposing(bob, "file it at the capped amount", '{"amount": 100}')
    bob.locator("#state", has_text="denied").wait_for()
    assert "proposed instead: amount=100" in bob.inner_text("#answers")
    served.screenshot(bob, "proposal-recorded.png")
    denied = request_of(served, approval_id)
    assert denied.status == "denied" and denied.proposed_arguments == {"amount": 100}
    [answer] = denied.answers()
    assert answer["method"] == "passkey" and answer["reason"] == "file it at the capped amount"
    assert flows.EFFECTS == []


def test_two_person_progress_shows_after_the_first_answer(served: Served,
                                                          approver_page: Callable[[], Any]) -> None:
    run_id, approval_id = served.run("A reviewed claim", target=flows.REVIEWED)
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    carol = approver_page()
    enrol(carol, served.invite("carol"))
    row = carol.locator(f"tr[data-id='{approval_id}']")
    assert "0 of 2" in row.inner_text()

    bob.goto(f"{served.origin}/requests/{approval_id}")
    assert bob.inner_text("#progress") == "0 of 2 approvals"
    bob.fill("#reason", "first look: fine")
    bob.click("#approve")
    bob.locator("#progress", has_text="1 of 2 approvals").wait_for()
    assert bob.inner_text("#state") == "pending" and not bob.locator("#answer").count()
    assert "waits for 1 more approver" in bob.inner_text("#waiting")
    served.screenshot(bob, "two-person-waiting.png")
    carol.locator(f"tr[data-id='{approval_id}'] td", has_text="1 of 2").wait_for()  # live, without a reload

    carol.goto(f"{served.origin}/requests/{approval_id}")
    assert carol.inner_text("#progress") == "1 of 2 approvals"
    carol.fill("#reason", "second look: fine")
    carol.click("#approve")
    carol.locator("#state", has_text="approved").wait_for()
    assert carol.inner_text("#progress") == "2 of 2 approvals"
    carol.click("#resume")
    carol.locator("#notice").wait_for()
    assert "completed" in carol.inner_text("#notice")
    assert flows.EFFECTS == [{"employee": "e-17", "amount": 4250, "vendor": "Rail Europe"}]
    assert [g["approver"] for g in request_of(served, approval_id).answers()] == ["bob", "carol"]
    assert json.dumps(run_id)  # the run the two answers resumed
