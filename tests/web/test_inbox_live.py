"""Issue 15's live updates, over a real uvicorn server with httpx streaming: an approver
connected to ``GET /api/events`` receives the events of the requests they may answer, and
never one about a request they may not (their own runs, or requests for other approvers).

Each reader's stream is read up to a *sentinel*, an event it must receive that happened
after every event it must not: an event that leaked would arrive in its place. This fails
without the stream's filter (``events.may_see``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from . import flows
from .conftest import Served, enrol


class Reader:
    """One approver's event stream, read as (kind, approval id) pairs in the order sent."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.iter_lines()

    def take(self, n: int) -> list[tuple[str, str]]:
        got: list[tuple[str, str]] = []
        kind = ""
        for line in self.lines:  # a missing event ends in httpx.ReadTimeout, not a hang
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                got.append((kind, json.loads(line[len("data: "):])["approval_id"]))
                if len(got) == n:
                    break
        return got


def session_cookie(page: Any) -> dict[str, str]:
    return {"Cookie": "sg_session=" + next(c["value"] for c in page.context.cookies() if c["name"] == "sg_session")}


@contextmanager
def events_of(served: Served, page: Any, *, since: str | None = None) -> Iterator[Reader]:
    """The event stream of the approver signed in on ``page`` (their session cookie)."""
    query = {"since": since} if since else {}
    with httpx.Client(timeout=httpx.Timeout(10.0, read=30.0)) as client, \
            client.stream("GET", f"{served.origin}/api/events", params=query, headers=session_cookie(page)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        yield Reader(r)


def test_the_event_stream_carries_only_requests_the_reader_may_answer(
        served: Served, approver_page: Callable[[], Any]) -> None:
    pages = {}
    for name in ("bob", "alice", "mallory"):
        pages[name] = approver_page()
        enrol(pages[name], served.invite(name))
    with events_of(served, pages["bob"]) as bob, events_of(served, pages["alice"]) as alice, \
            events_of(served, pages["mallory"]) as mallory:
        _, a = served.run("A", initiator="alice")  # bob's; alice started it; mallory is not listed
        _, c = served.run("C", initiator="carol")  # bob's and alice's
        _, b = served.run("B", initiator="alice", target=flows.PAYROLL)  # mallory's only
        _, d = served.run("D", initiator="carol")  # bob's and alice's
        _, e = served.run("E", initiator="carol", target=flows.PAYROLL)  # mallory's only
        created = "request.created"
        assert bob.take(3) == [(created, a), (created, c), (created, d)]
        assert alice.take(2) == [(created, c), (created, d)]
        assert mallory.take(2) == [(created, b), (created, e)]

        # Expiry is announced as time passes: each reader hears of its own requests' only.
        served.clock.advance(flows.expenses.approval_ttl + 5)
        expired = "request.expired"
        first = served.approvals[0]  # the fixture's own request: alice's run of expenses
        assert sorted(bob.take(4)) == sorted([(expired, first), (expired, a), (expired, c), (expired, d)])
        assert sorted(alice.take(2)) == sorted([(expired, c), (expired, d)])
        assert sorted(mallory.take(2)) == sorted([(expired, b), (expired, e)])
        _, f = served.run("F", initiator="carol")  # sentinels after the expiries
        _, g = served.run("G", initiator="carol", target=flows.PAYROLL)
        assert bob.take(1) == [(created, f)]
        assert alice.take(1) == [(created, f)]
        assert mallory.take(1) == [(created, g)]


def test_the_event_stream_needs_a_session(served: Served) -> None:
    r = httpx.get(f"{served.origin}/api/events", headers={"Cookie": "sg_session=forged"}, timeout=10)
    assert r.status_code == 401 and r.json() == {"error": "sign in first"}


def test_a_page_streams_from_when_it_was_rendered(served: Served, approver_page: Callable[[], Any]) -> None:
    """A request made after the inbox page was rendered but before its stream connected
    still arrives: the page carries the feed's cursor of its rendering (``data-since``).
    Without it the stream would start at its own connection and miss that request (the
    browser test of live updates then waited for a row that never came)."""
    bob = approver_page()
    enrol(bob, served.invite("bob"))
    page = httpx.get(f"{served.origin}/", headers=session_cookie(bob), timeout=10)
    found = re.search(r'data-since="([^"]+)"', page.text)
    assert found, "the inbox page carries no data-since cursor"
    _, made = served.run("made while the page was on its way", initiator="carol")
    with events_of(served, bob, since=found.group(1)) as stream:
        assert stream.take(1) == [("request.created", made)]
    bob.reload()
    bob.locator("body[data-live='open']").wait_for()  # the browser's own stream connected
    r = httpx.get(f"{served.origin}/api/events", params={"since": "c1.forged"}, headers=session_cookie(bob),
                  timeout=10)
    assert r.status_code == 400 and "malformed" in r.json()["error"]
