"""Issue 15 in a real browser, on SQLite and PostgreSQL: invite → enrol a passkey → sign in →
see the pending request → approve with a fresh assertion over that call → the run resumes
and completes → ``audit verify`` checks the passkey answer offline."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any

from scopegraph.workers import Worker

from . import flows
from .conftest import Served, cli, enrol


def test_invite_enrol_sign_in_approve_resume_and_verify(served: Served,
                                                         approver_page: Callable[[], Any]) -> None:
    run_id, approval_id = served.run("Reimburse receipt r-1043")  # a second request: newest first
    bob = approver_page()
    enrol(bob, served.invite("bob"))

    rows = bob.locator("#requests tbody tr")
    assert rows.count() == 2
    assert rows.first.get_attribute("data-id") == approval_id
    first = rows.first.inner_text()
    assert "file_expense" in first and "write" in first and "expenses" in first and "0 of 1" in first
    assert re.match(r"in 1[45]m", bob.locator(".countdown").first.inner_text())  # the countdown runs
    served.screenshot(bob, "inbox.png", docs=served.at.backend == "sqlite")

    # Signing out and in again: the passkey is discoverable, found by the authenticator.
    bob.locator("header .who button").click()
    bob.wait_for_url("**/login")
    bob.locator("#login").click()
    bob.wait_for_url("**/")

    bob.locator(f"tr[data-id='{approval_id}'] a.tool").click()
    bob.wait_for_url(f"**/requests/{approval_id}")
    call = bob.locator("#arguments").inner_text()
    assert "Rail Europe" in call and "4250" in call
    assert "8841" not in bob.content() and "[secret:card_pin]" in call  # a secret argument stays masked
    assert "the plan" in call  # employee is pinned by the plan
    assert "file the travel claim" in bob.inner_text("main")
    served.screenshot(bob, "request.png", docs=served.at.backend == "sqlite")

    bob.fill("#reason", "receipt checked")
    bob.click("#approve")
    bob.locator("#state", has_text="approved").wait_for()
    answers = bob.locator("#answers").inner_text()
    assert "approve by bob" in answers and "passkey" in answers

    if served.at.backend == "sqlite":
        bob.click("#resume")
        bob.locator("#notice").wait_for()
        assert "completed" in bob.locator("#notice").inner_text()
    else:  # a worker takes the resume job the answer queued
        worker = threading.Thread(target=Worker(served.at.url).run, kwargs={"once": True})
        worker.start()
        worker.join(timeout=120)
    assert flows.EFFECTS == [{"employee": "e-17", "amount": 4250, "vendor": "Rail Europe"}]
    code, out = cli("--store", served.at.url, "resume", run_id, "--json") if served.at.backend == "sqlite" \
        else (0, json.dumps({"status": "completed"}))
    assert code == 0 and json.loads(out)["status"] == "completed"  # resuming again changes nothing
    assert len(flows.EFFECTS) == 1

    code, out = cli("--store", served.at.url, "audit", "verify", "--json")
    verified = json.loads(out)
    assert code == 0 and verified["ok"], verified
    assert verified["signed_answers"] == 1


def test_new_requests_and_answers_appear_without_reload(served: Served, approver_page: Callable[[], Any]) -> None:
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    carol = approver_page()
    enrol(carol, served.invite("carol"))
    assert bob.locator("#requests tbody tr").count() == 1
    _, approval_id = served.run("Reimburse receipt r-2001")  # the page is told (server-sent events)
    bob.locator(f"tr[data-id='{approval_id}']").wait_for()
    carol.locator(f"tr[data-id='{approval_id}']").wait_for()
    bob.goto(f"{served.origin}/requests/{approval_id}")
    bob.fill("#reason", "fine")
    bob.click("#approve")
    bob.locator("#state", has_text="approved").wait_for()
    carol.locator(f"tr[data-id='{approval_id}']").wait_for(state="detached")  # answered elsewhere: gone
