"""Issue 15's break-it tests, in Chromium: who sees what, replayed and cross-request passkey
assertions, forged CSRF posts, expiry, and what pages and errors never show.

Which fail without the change they test: the replay test without ``take_challenge``'s
single use (the nonce) and the sign count; the cross-request test without the action
digest in ``answer_challenge``; the CSRF tests without ``csrf_ok``; the visibility tests
without ``Inbox.may_answer``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from scopegraph.approvals import ApprovalService
from scopegraph.ledger import Ledger
from scopegraph.store import open_store

from . import flows
from .conftest import Served, cli, enrol

# The break-it tests of who may answer, assertions, CSRF and expiry run on both stores;
# the rest are about pages and the browser, which the store does not change.
ON_SQLITE = pytest.mark.parametrize("at", ["sqlite"], indirect=True)


def api(page: Any, path: str, body: dict[str, Any], *, csrf: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST JSON from the page's own session (its cookies), as the page's script would."""
    token = page.evaluate("document.body.dataset.csrf") if csrf is None else csrf
    origin = "/".join(page.url.split("/")[:3])
    r = page.request.post(origin + path, data=json.dumps(body), headers={"Content-Type": "application/json",
                                                                "X-CSRF-Token": token})
    return r.status, r.json()


def capture_finish(page: Any) -> list[dict[str, Any]]:
    """Record every answer the page's script sends, and stop it there (nothing is recorded)."""
    seen: list[dict[str, Any]] = []

    def handle(route: Any) -> None:
        seen.append(json.loads(route.request.post_data))
        route.abort()

    page.route("**/answer/finish", handle)
    return seen


def status_of(served: Served, approval_id: str) -> str:
    store = open_store(served.at.url, create=False)
    try:
        return ApprovalService(store, clock=served.clock, ledger=Ledger(store, clock=served.clock)).get(
            approval_id).effective_status(served.clock.now())
    finally:
        store.close()


def test_an_approver_sees_and_answers_only_requests_they_may_answer(
        served: Served, approver_page: Callable[[], Any]) -> None:
    _, approval_id = served.run()
    mallory = approver_page()  # enrolled, signed in, but not on the workflow's approver list
    enrol(mallory, served.invite("mallory"))
    alice = approver_page()  # on the list, but she started the run
    enrol(alice, served.invite("alice"))
    for page in (mallory, alice):
        assert page.locator("#empty").is_visible()
        page.goto(f"{served.origin}/requests/{approval_id}")
        assert "no approval request" in page.inner_text("#error-message")
        assert "Rail Europe" not in page.content()
        assert page.request.get(f"{served.origin}/api/approvals/{approval_id}").status == 404
        assert page.request.get(f"{served.origin}/api/approvals").json() == []
        code, body = api(page, f"/api/approvals/{approval_id}/answer/begin", {"decision": "approve"})
        assert code == 409 and "no approval request" in body["error"]
    assert status_of(served, approval_id) == "pending"
    assert flows.EFFECTS == []


def test_a_replayed_or_cross_request_assertion_is_refused(served: Served, approver_page: Callable[[], Any]) -> None:
    _, first = served.run("claim one")
    _, second = served.run("claim two")
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    seen = capture_finish(bob)
    bob.goto(f"{served.origin}/requests/{first}")
    bob.fill("#reason", "ok")
    bob.click("#approve")
    bob.locator("#status.bad").wait_for()  # the finish was stopped (a locator: the CSP forbids eval)
    captured = seen[0]  # bob's passkey signed an approval of the first request; it was not sent
    bob.unroute("**/answer/finish")

    # Sent to the other request: its nonce was made for the first one.
    code, body = api(bob, f"/api/approvals/{second}/answer/finish", captured)
    assert code == 409 and "no live challenge" in body["error"]
    # With a nonce the server made for the second request: the signed challenge is another call's.
    code, begun = api(bob, f"/api/approvals/{second}/answer/begin", {"decision": "approve", "reason": "ok"})
    assert code == 200
    code, body = api(bob, f"/api/approvals/{second}/answer/finish", {**captured, "nonce": begun["nonce"]})
    assert code == 409 and "refused" in body["error"] and "challenge" in body["error"].lower()
    assert status_of(served, second) == "pending"

    # The assertion itself was good: it approves the call it was made for, once.
    code, body = api(bob, f"/api/approvals/{first}/answer/finish", captured)
    assert code == 200 and body["status"] == "approved"
    code, body = api(bob, f"/api/approvals/{first}/answer/finish", captured)  # replayed
    assert code == 409
    code, out = cli("--store", served.at.url, "audit", "verify", "--json")
    assert code == 0 and json.loads(out)["signed_answers"] == 1


def test_forged_csrf_posts_are_refused(served: Served, approver_page: Callable[[], Any]) -> None:
    _, approval_id = served.run()
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    code, body = api(bob, f"/api/approvals/{approval_id}/answer/begin", {"decision": "approve"}, csrf="forged")
    assert code == 403 and "CSRF" in body["error"]
    r = bob.request.post(f"{served.origin}/resume", form={"csrf": "forged", "approval_id": approval_id})
    assert r.status == 403 and "CSRF check failed" in r.text()
    r = bob.request.post(f"{served.origin}/logout", form={"csrf": ""})
    assert r.status == 403
    bob.goto(f"{served.origin}/")  # still signed in: the forged logout did nothing
    assert bob.locator("header .who").is_visible()
    # A post from another origin carries no session (SameSite=Strict) and is refused anyway.
    r = bob.request.post(f"{served.origin}/api/approvals/{approval_id}/answer/begin", data="{}",
                         headers={"Content-Type": "application/json", "Origin": "http://evil.example",
                                  "X-CSRF-Token": bob.evaluate("document.body.dataset.csrf")})
    assert r.status == 403
    assert status_of(served, approval_id) == "pending"


def test_expiry_is_shown_and_enforced(served: Served, approver_page: Callable[[], Any]) -> None:
    _, approval_id = served.run()
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    bob.goto(f"{served.origin}/requests/{approval_id}")
    bob.fill("#reason", "ok")
    served.clock.advance(flows.expenses.approval_ttl + 1)
    bob.click("#approve")  # the page was loaded before expiry: the server refuses
    bob.locator("#status.bad").wait_for()
    assert "expired" in bob.inner_text("#status")
    bob.goto(f"{served.origin}/requests/{approval_id}")
    assert bob.inner_text("#state") == "expired" and not bob.locator("#answer").count()
    bob.goto(f"{served.origin}/")
    assert bob.locator("#empty").is_visible()
    bob.goto(f"{served.origin}/history")
    assert "expired" in bob.inner_text("main")
    assert status_of(served, approval_id) == "expired"


@ON_SQLITE
def test_the_countdown_shows_expired_at_zero(served: Served, approver_page: Callable[[], Any]) -> None:
    _, approval_id = served.run()
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    served.clock.advance(flows.expenses.approval_ttl - 1)
    bob.goto(f"{served.origin}/requests/{approval_id}")
    bob.locator("#expires.expired", has_text="expired").wait_for(timeout=5000)


@ON_SQLITE
def test_sign_in_without_an_enrolled_passkey_and_used_invitations_are_refused(
        served: Served, approver_page: Callable[[], Any]) -> None:
    link = served.invite("bob")
    bob = approver_page()
    enrol(bob, link)
    again = approver_page()
    again.goto(link)  # single use
    again.locator("#invitee.bad").wait_for()
    assert "unknown, used or expired" in again.inner_text("#invitee")
    stranger = approver_page()  # an authenticator with no passkey for this site
    stranger.goto(f"{served.origin}/login")
    stranger.click("#login")
    stranger.locator("#status.bad").wait_for()
    assert stranger.url.endswith("/login")
    assert stranger.request.get(f"{served.origin}/api/approvals").status == 401


@ON_SQLITE
def test_pages_carry_a_strict_csp_and_a_secure_session_cookie(served: Served,
                                                              approver_page: Callable[[], Any]) -> None:
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    r = bob.request.get(f"{served.origin}/")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert r.headers["cache-control"] == "no-store"
    cookie = next(c for c in bob.context.cookies() if c["name"] == "sg_session")
    assert cookie["secure"] and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
