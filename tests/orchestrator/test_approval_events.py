"""The approval event feed, from real runs that pause for approval, on SQLite and PostgreSQL.

What it must do: announce each request once when it is created, each answer once (a
two-person request: two), each expiry once while the request is still pending, and give
every event a cursor from which a reader resumes without missing or repeating anything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime
from scopegraph.approval_events import ApprovalEvent, ApprovalEventFeed
from scopegraph.clock import FixedClock
from scopegraph.errors import ConfigError
from scopegraph.store import Store, open_store
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401

from .test_approvals import ARGS_A, INITIATOR, make_workflow, pause, two_person_policy

TTL = 600.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return str(request.getfixturevalue("postgres_store_url"))


@pytest.fixture
def events_clock() -> FixedClock:
    return FixedClock(start=1_800_000_000.0)


@pytest.fixture
def open_rt(store_at: str, events_clock: FixedClock, tmp_path: Path) -> Iterator[Callable[..., Runtime]]:
    opened: list[Runtime] = []

    def make(*, two_person: bool = False) -> Runtime:
        extra: dict[str, Any] = {"policies": [two_person_policy(tmp_path)], "baseline": False} if two_person else {}
        rt = Runtime(make_workflow([], approval_ttl=TTL, **extra), store=store_at, clock=events_clock)
        opened.append(rt)
        return rt

    yield make
    for rt in reversed(opened):
        rt.close()


@pytest.fixture
def feed_on() -> Iterator[Callable[..., ApprovalEventFeed]]:
    """A feed on a store object of its own, as the server's would be."""
    stores: list[Store] = []

    def make(store_at: str, clock: FixedClock, **kwargs: Any) -> ApprovalEventFeed:
        stores.append(open_store(store_at))
        kwargs.setdefault("expiry_settle", 0.0)
        return ApprovalEventFeed(stores[-1], clock=clock, **kwargs)

    yield make
    for store in stores:
        store.close()


def brief(events: list[ApprovalEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.approval_id) for e in events]


def test_a_two_person_request_is_created_answered_twice_and_announced_once_each(
        open_rt: Callable[..., Runtime], store_at: str, events_clock: FixedClock,
        feed_on: Callable[..., ApprovalEventFeed]) -> None:
    rt = open_rt(two_person=True)
    feed = feed_on(store_at, events_clock)
    start = feed.head()
    assert feed.since(start) == []

    report, aid = pause(rt)
    created = feed.since(start)
    assert brief(created) == [("request.created", aid)]
    assert (created[0].run_id, created[0].tool) == (report.run_id, "file_expense")
    assert created[0].at == rt.approvals.get(aid).created_at

    events_clock.advance(5)
    rt.approvals.approve(aid, approver="bob", reason="receipt seen")
    events_clock.advance(5)
    rt.approvals.approve(aid, approver="carol")
    answered = feed.since(created[-1].cursor)
    assert brief(answered) == [("request.answered", aid)] * 2
    assert [(e.approver, e.answer, e.status) for e in answered] == [
        ("bob", "approve", "pending"), ("carol", "approve", "approved")]
    assert [e.at for e in answered] == [v.at for v in rt.approvals.get(aid).approvals]

    done = rt.resume(report.run_id)
    assert done.status == "completed", done.summary()
    assert feed.since(answered[-1].cursor) == []  # consuming the approval is no event
    # Approved in time: its expiry passing is no event.
    events_clock.advance(TTL * 2)
    assert feed.since(answered[-1].cursor) == []
    # From the start, the whole story once, oldest first.
    assert brief(feed.since(start)) == [("request.created", aid)] + [("request.answered", aid)] * 2
    assert feed.since(None)[0].kind == "request.created"


def test_a_request_left_pending_expires_once_and_an_answered_one_never(
        open_rt: Callable[..., Runtime], store_at: str, events_clock: FixedClock,
        feed_on: Callable[..., ApprovalEventFeed]) -> None:
    rt = open_rt()
    feed = feed_on(store_at, events_clock)
    start = feed.head()
    _, left = pause(rt)
    _, denied = pause(rt)
    rt.approvals.deny(denied, approver="bob", reason="duplicate claim")
    seen = feed.since(start)
    assert brief(seen) == [("request.created", left), ("request.created", denied), ("request.answered", denied)]

    events_clock.advance(TTL - 1)
    assert feed.since(seen[-1].cursor) == []  # not yet
    events_clock.advance(1)
    expired = feed.since(seen[-1].cursor)
    assert brief(expired) == [("request.expired", left)]
    assert expired[0].at == rt.approvals.get(left).expires_at
    events_clock.advance(3600)
    assert feed.since(expired[0].cursor) == []
    # A reader that first looks now learns of the request and of its expiry, in that order.
    late = brief(feed_on(store_at, events_clock).since(start))
    assert late == brief(seen) + [("request.expired", left)]


def test_every_cursor_resumes_exactly_after_its_event(
        open_rt: Callable[..., Runtime], store_at: str, events_clock: FixedClock,
        feed_on: Callable[..., ApprovalEventFeed]) -> None:
    """Break-it: whichever event a reader stopped at, and however many reads the story took,
    resuming from its cursor gives exactly the rest (nothing missed, nothing twice)."""
    rt = open_rt(two_person=True)
    start = feed_on(store_at, events_clock).head()
    story: list[ApprovalEvent] = []
    live = feed_on(store_at, events_clock)
    cursor = start

    def read() -> None:
        nonlocal cursor
        got = live.since(cursor)
        story.extend(got)
        cursor = got[-1].cursor if got else cursor

    _, a = pause(rt)
    read()
    events_clock.advance(60)
    _, b = pause(rt)
    rt.approvals.approve(a, approver="bob")
    events_clock.advance(60)
    _, c = pause(rt)
    read()
    events_clock.advance(TTL - 100)  # a expires (pending, one of two approvals); b and c not yet
    read()
    rt.approvals.approve(b, approver="bob")
    rt.approvals.approve(b, approver="carol")
    events_clock.advance(TTL)  # c expires
    read()
    kinds = brief(story)
    assert kinds == [("request.created", a), ("request.created", b), ("request.answered", a),
                     ("request.created", c), ("request.expired", a), ("request.answered", b),
                     ("request.answered", b), ("request.expired", c)]
    assert live.since(cursor) == []

    for i, event in enumerate(story):
        for reader in (live, feed_on(store_at, events_clock)):  # the same feed, and a fresh one
            rest = brief(reader.since(event.cursor))
            # One read may order the rest differently from the reads that first told it
            # (the ledger's events, then the expiries), never a request's expiry first.
            assert sorted(rest) == sorted(kinds[i + 1:]), f"resuming after event {i}"
            assert_expiry_last(rest)
    told = feed_on(store_at, events_clock).since(None)  # the whole story in one read
    history = brief(told)
    assert sorted(history) == sorted(kinds)
    assert_expiry_last(history)
    for i, event in enumerate(told):
        assert sorted(brief(live.since(event.cursor))) == sorted(history[i + 1:]), f"after event {i} of one read"


def assert_expiry_last(events: list[tuple[str, str]]) -> None:
    for n, (kind, approval_id) in enumerate(events):
        if kind == "request.expired":
            assert approval_id not in {aid for _, aid in events[n + 1:]}, events


def test_events_carry_no_argument_values_and_an_iso_time(
        open_rt: Callable[..., Runtime], store_at: str, events_clock: FixedClock,
        feed_on: Callable[..., ApprovalEventFeed]) -> None:
    rt = open_rt()
    feed = feed_on(store_at, events_clock)
    start = feed.head()
    _, aid = pause(rt)
    rt.approvals.deny(aid, approver="bob", reason="see ticket 4711")
    events = feed.since(start)
    for event in events:
        body = json.dumps(event.as_json())
        for value in ARGS_A.values():
            assert json.dumps(value) not in body and str(value) not in body
        assert "4711" not in body  # an approver's reason is not broadcast either
    created, denied = (e.as_json() for e in events)
    assert created["at_iso"] == "2027-01-15T08:00:00.000Z"
    assert set(created) == {"kind", "approval_id", "run_id", "tool", "at", "at_iso", "cursor"}
    assert (denied["approver"], denied["answer"], denied["status"]) == ("bob", "deny", "denied")
    assert INITIATOR not in body


def test_follow_yields_new_events_as_they_happen(
        open_rt: Callable[..., Runtime], store_at: str, events_clock: FixedClock,
        feed_on: Callable[..., ApprovalEventFeed]) -> None:
    rt = open_rt()
    feed = feed_on(store_at, events_clock, poll_interval=0.01)

    async def scenario() -> list[ApprovalEvent]:
        got: list[ApprovalEvent] = []
        stream = feed.follow(feed.head())
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)  # the feed polls and finds nothing yet
        assert not first.done()
        _, aid = await asyncio.to_thread(pause, rt)
        got.append(await asyncio.wait_for(first, 30))
        await asyncio.to_thread(rt.approvals.approve, aid, approver="bob")
        got.append(await asyncio.wait_for(stream.__anext__(), 30))
        await stream.aclose()
        return got

    assert [e.kind for e in asyncio.run(scenario())] == ["request.created", "request.answered"]


@pytest.mark.parametrize("cursor", ["", "c1.", "c1.bm90IGpzb24", "c1.WzEsW1sxLCJ4IiwiYSJdXV0", "x" * 5000, "apr_1"])
def test_a_malformed_cursor_is_refused_in_one_line(store_at: str, events_clock: FixedClock, cursor: str,
                                                    feed_on: Callable[..., ApprovalEventFeed]) -> None:
    with pytest.raises(ConfigError, match="malformed approval event cursor") as caught:
        feed_on(store_at, events_clock).since(cursor)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200
