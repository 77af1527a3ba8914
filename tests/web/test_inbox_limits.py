"""Issue 15's rate limits, triggered: sign-in attempts per client address and answers per
approver. Past the limit the server answers 429 with a one-line message saying when to try
again (and ``Retry-After``); the page shows it. Both fail without ``RateLimiter.refused``
in the routes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from scopegraph.web.inbox_routes import ANSWERS_PER_MINUTE, LOGIN_ATTEMPTS_PER_MINUTE
from scopegraph.web.security import RateLimiter

from .conftest import Served, enrol
from .test_inbox_attacks import api, status_of

ON_SQLITE = pytest.mark.parametrize("at", ["sqlite"], indirect=True)


@ON_SQLITE
def test_sign_in_attempts_are_limited_per_address(served: Served, approver_page: Callable[[], Any]) -> None:
    page = approver_page()
    page.goto(f"{served.origin}/login")
    begin = f"{served.origin}/auth/login/begin"
    for _ in range(LOGIN_ATTEMPTS_PER_MINUTE):
        assert page.request.post(begin, data="{}", headers={"Content-Type": "application/json"}).status == 200
    r = page.request.post(begin, data="{}", headers={"Content-Type": "application/json"})
    assert r.status == 429 and int(r.headers["retry-after"]) >= 1
    assert re.fullmatch(r"too many sign-in attempts from your address: try again in \d+ s", r.json()["error"])
    page.click("#login")  # the page says so, on one line
    page.locator("#status.bad").wait_for()
    assert page.inner_text("#status").startswith("too many sign-in attempts")
    assert page.url.endswith("/login")


@ON_SQLITE
def test_answers_are_limited_per_approver(served: Served, approver_page: Callable[[], Any]) -> None:
    approval_id = served.approvals[0]
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    carol = approver_page()
    enrol(carol, served.invite("carol"))
    path = f"/api/approvals/{approval_id}/answer/begin"
    for _ in range(ANSWERS_PER_MINUTE):
        assert api(bob, path, {"decision": "approve", "reason": "ok"})[0] == 200
    code, body = api(bob, path, {"decision": "approve", "reason": "ok"})
    assert code == 429 and re.fullmatch(r"too many answers from you in a minute: try again in \d+ s", body["error"])
    bob.goto(f"{served.origin}/requests/{approval_id}")
    bob.fill("#reason", "ok")
    bob.click("#approve")
    bob.locator("#status.bad").wait_for()
    assert bob.inner_text("#status").startswith("too many answers")
    assert api(carol, path, {"decision": "approve", "reason": "ok"})[0] == 200  # per approver: carol may
    assert status_of(served, approval_id) == "pending"


def test_the_limit_is_a_sliding_window() -> None:
    now = [0.0]
    limit = RateLimiter(2, 60.0, now=lambda: now[0])
    assert limit.refused("k", "too many") is None and limit.refused("k", "too many") is None
    refused = limit.refused("k", "too many")
    assert refused is not None and refused.status_code == 429 and refused.headers["retry-after"] == "60"
    assert json.loads(bytes(refused.body)) == {"error": "too many: try again in 60 s"}
    assert limit.refused("other", "too many") is None  # per key
    now[0] = 45.0
    assert limit.retry_after("k") == 15 and limit.refused("k", "too many") is not None
    now[0] = 60.0  # the first two fall out of the window
    assert limit.refused("k", "too many") is None
