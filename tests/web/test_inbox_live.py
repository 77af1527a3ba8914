"""Issue 15's live updates, over a real uvicorn server with httpx streaming: an approver
connected to ``GET /api/events`` receives the events of the requests they may answer, and
never one about a request they may not (their own runs, or requests for other approvers).

Each reader's stream is read up to a *sentinel*, an event it must receive that happened
after every event it must not: an event that leaked would arrive in its place. This fails
without the stream's filter (``events.may_see``).
"""

from __future__ import annotations

import json
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


@contextmanager
def events_of(served: Served, page: Any) -> Iterator[Reader]:
    """The event stream of the approver signed in on ``page`` (their session cookie)."""
    cookie = next(c["value"] for c in page.context.cookies() if c["name"] == "sg_session")
    with httpx.Client(timeout=httpx.Timeout(10.0, read=30.0)) as client, \
            client.stream("GET", f"{served.origin}/api/events", headers={"Cookie": f"sg_session={cookie}"}) as r:
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
