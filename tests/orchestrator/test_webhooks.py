"""Webhooks against a real local receiver: signed deliveries, retries, back-off, the server's lifespan.

The receiver is a plain ``http.server`` on a free loopback port that answers each request
with the next status of its script and records what it got. Back-off waits are recorded,
never slept, so the tests assert how long the dispatcher asked to wait, not how long it took.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from scopegraph import Runtime
from scopegraph.approval_events import ApprovalEvent, ApprovalEventFeed
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.errors import ConfigError, WebhookSignatureError
from scopegraph.serve import build_app
from scopegraph.store import Store, open_store
from scopegraph.webhooks import (
    WEBHOOK_SECRET_ENV,
    DeliverySettings,
    WebhookDispatcher,
    attach_webhooks,
    signature,
    verify_signature,
)
from tests.contract.conftest import closed_port, postgres_schema, postgres_store_url, postgres_url  # noqa: F401

from .test_approvals import make_workflow, pause

SECRET = "whsec-test-5f1c0b8e2a9d4e7f"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A local HTTP endpoint: answers with ``script`` (then 200), records every request."""

    url: str
    script: list[int] = field(default_factory=list)
    got: list[Received] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[Received]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.got) >= count, timeout), f"got {len(self.got)} of {count}"
            return list(self.got)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            r = box[0]
            with r.changed:
                status = r.script.pop(0) if r.script else 200
                r.got.append(Received(headers=dict(self.headers.items()), body=body))
                r.changed.notify_all()
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(url=f"http://127.0.0.1:{server.server_address[1]}/hooks/scopegraph"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hooks.db'}"
    return str(request.getfixturevalue("postgres_store_url"))


@pytest.fixture
def hooks_clock() -> FixedClock:
    return FixedClock(start=1_800_000_000.0)


@pytest.fixture
def rt(store_at: str, hooks_clock: FixedClock) -> Iterator[Runtime]:
    runtime = Runtime(make_workflow([], approval_ttl=600.0), store=store_at, clock=hooks_clock)
    yield runtime
    runtime.close()


@pytest.fixture
def server_store(store_at: str, rt: Runtime) -> Iterator[Store]:
    """The server's own store object (the runtime made the store)."""
    store = open_store(store_at, create=False)
    yield store
    store.close()


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def settings(waits: list[float]) -> DeliverySettings:
    async def record(seconds: float) -> None:
        waits.append(seconds)

    return DeliverySettings(attempts=4, backoff=0.5, max_backoff=1.5, timeout=10.0, sleep=record)


@pytest.fixture
def make_dispatcher(server_store: Store, hooks_clock: FixedClock, settings: DeliverySettings,
                    tmp_path: Path) -> Callable[..., WebhookDispatcher]:
    def make(*urls: str, **kwargs: Any) -> WebhookDispatcher:
        feed = ApprovalEventFeed(server_store, clock=hooks_clock, expiry_settle=0.0, poll_interval=0.01)
        kwargs.setdefault("settings", settings)
        kwargs.setdefault("environ", {WEBHOOK_SECRET_ENV: SECRET})
        return WebhookDispatcher(feed, list(urls), state_path=tmp_path / "hooks.json", **kwargs)

    return make


def one_event(dispatcher: WebhookDispatcher, rt: Runtime) -> ApprovalEvent:
    start = dispatcher.feed.head()
    pause(rt)
    (event,) = dispatcher.feed.since(start)
    return event


def deliver(dispatcher: WebhookDispatcher, event: ApprovalEvent) -> Any:
    async def go() -> Any:
        async with dispatcher.client() as client:
            return await dispatcher.deliver(event, client)

    return asyncio.run(go())


# deliveries -------------------------------------------------------------------------------------
def test_each_event_arrives_signed_and_verifies_at_the_receiver(
        make_dispatcher: Callable[..., WebhookDispatcher], rt: Runtime, receiver: Receiver) -> None:
    dispatcher = make_dispatcher(receiver.url)
    start = dispatcher.feed.head()
    _, aid = pause(rt)
    rt.approvals.deny(aid, approver="bob", reason="not this one")
    events = dispatcher.feed.since(start)
    for event in events:
        (done,) = deliver(dispatcher, event)
        assert done.ok and done.attempts == 1
    got = receiver.wait_for(2)
    for event, received in zip(events, got, strict=True):
        verify_signature(SECRET, received.headers, received.body)
        assert json.loads(received.body) == event.as_json()
        assert received.headers["X-Scopegraph-Event"] == event.kind
        assert received.headers["Content-Type"] == "application/json"
    assert [json.loads(r.body)["kind"] for r in got] == ["request.created", "request.answered"]
    assert len({r.headers["X-Scopegraph-Delivery"] for r in got}) == 2
    (again,) = deliver(dispatcher, events[0])  # sent again (say after a restart): the same delivery id
    assert again.delivery_id == got[0].headers["X-Scopegraph-Delivery"]


def test_a_5xx_is_retried_with_the_same_delivery_id_and_growing_waits(
        make_dispatcher: Callable[..., WebhookDispatcher], rt: Runtime, receiver: Receiver,
        waits: list[float]) -> None:
    receiver.script = [500, 503]
    dispatcher = make_dispatcher(receiver.url)
    (done,) = deliver(dispatcher, one_event(dispatcher, rt))
    assert done.ok and done.attempts == 3
    got = receiver.wait_for(3)
    assert len({r.headers["X-Scopegraph-Delivery"] for r in got}) == 1  # the receiver can drop repeats
    for r in got:
        verify_signature(SECRET, r.headers, r.body)
    assert waits == [0.5, 1.0]


def test_a_429_and_a_refused_connection_are_retried_too(
        make_dispatcher: Callable[..., WebhookDispatcher], rt: Runtime, receiver: Receiver) -> None:
    receiver.script = [429]
    dispatcher = make_dispatcher(receiver.url, f"http://127.0.0.1:{closed_port()}/nobody")
    busy, refused = deliver(dispatcher, one_event(dispatcher, rt))
    assert busy.ok and busy.attempts == 2
    assert not refused.ok and refused.attempts == 4 and "ConnectError" in refused.problem


def test_a_4xx_is_not_retried_and_is_logged_once_without_the_secret(
        make_dispatcher: Callable[..., WebhookDispatcher], rt: Runtime, receiver: Receiver,
        caplog: pytest.LogCaptureFixture, waits: list[float]) -> None:
    receiver.script = [400]
    dispatcher = make_dispatcher(receiver.url.replace("http://", "http://user:pw-in-url@") + "?token=abc123")
    with caplog.at_level(logging.WARNING, logger="scopegraph.webhooks"):
        (done,) = deliver(dispatcher, one_event(dispatcher, rt))
    assert not done.ok and done.attempts == 1 and waits == []
    assert len(receiver.wait_for(1)) == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert "HTTP 400" in line and done.delivery_id in line and "/hooks/scopegraph" in line
    for secret in (SECRET, "pw-in-url", "abc123"):
        assert secret not in line
    assert SECRET not in repr(dispatcher)


def test_attempts_are_bounded_and_so_is_every_wait(
        make_dispatcher: Callable[..., WebhookDispatcher], rt: Runtime, receiver: Receiver,
        caplog: pytest.LogCaptureFixture, waits: list[float]) -> None:
    receiver.script = [502] * 50
    dispatcher = make_dispatcher(receiver.url, settings=DeliverySettings(
        attempts=7, backoff=0.25, max_backoff=1.0, sleep=_recorder(waits)))
    with caplog.at_level(logging.WARNING, logger="scopegraph.webhooks"):
        (done,) = deliver(dispatcher, one_event(dispatcher, rt))
    assert not done.ok and done.attempts == 7
    assert len(receiver.got) == 7
    assert waits == [0.25, 0.5, 1.0, 1.0, 1.0, 1.0]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "after 7 attempts: HTTP 502" in line


def _recorder(waits: list[float]) -> Callable[[float], Any]:
    async def record(seconds: float) -> None:
        waits.append(seconds)

    return record


# configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(("environ", "urls", "problem"), [
    ({}, ["http://127.0.0.1:9/x"], "export SCOPEGRAPH_WEBHOOK_SECRET"),
    ({WEBHOOK_SECRET_ENV: "short"}, ["http://127.0.0.1:9/x"], "shorter than 16 bytes"),
    ({WEBHOOK_SECRET_ENV: SECRET}, ["ftp://127.0.0.1/x"], "http:// or https://"),
    ({WEBHOOK_SECRET_ENV: SECRET}, ["http://127.0.0.1:99999/x"], "not a valid URL"),
    ({WEBHOOK_SECRET_ENV: SECRET}, [], "no webhook URL"),
])
def test_a_dispatcher_without_a_secret_or_with_a_bad_url_is_refused(
        server_store: Store, tmp_path: Path, environ: dict[str, str], urls: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        WebhookDispatcher(ApprovalEventFeed(server_store), urls, state_path=tmp_path / "s.json", environ=environ)


def test_serve_refuses_a_webhook_without_its_secret(
        server_store: Store, store_at: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(WEBHOOK_SECRET_ENV, raising=False)
    code = main(["--store", store_at, "serve", "--port", str(closed_port()), "--webhook", "http://127.0.0.1:9/x"])
    assert code == 2
    assert "export SCOPEGRAPH_WEBHOOK_SECRET" in capsys.readouterr().err


# verifying ------------------------------------------------------------------------------------
BODY = b'{"approval_id":"apr_1","kind":"request.created"}'


def signed(body: bytes = BODY, at: float | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time() if at is None else at))
    return {"X-Scopegraph-Timestamp": stamp, "X-Scopegraph-Signature": signature(secret, stamp, body)}


def test_verify_signature_accepts_a_fresh_delivery_whatever_the_header_case() -> None:
    verify_signature(SECRET, signed(), BODY)
    verify_signature(SECRET.encode(), {k.lower(): v for k, v in signed().items()}, BODY, tolerance=5)


@pytest.mark.parametrize(("headers", "body", "problem"), [
    (signed(), BODY.replace(b"apr_1", b"apr_2"), "does not match"),
    (signed(secret="another-secret-of-some-length"), BODY, "does not match"),
    (signed(at=1_000_000_000), BODY, "more than 300 seconds"),
    (signed(at=time.time() + 3600), BODY, "more than 300 seconds"),
    ({"X-Scopegraph-Signature": signed()["X-Scopegraph-Signature"]}, BODY, "lacks X-Scopegraph-Timestamp"),
    ({"X-Scopegraph-Timestamp": signed()["X-Scopegraph-Timestamp"]}, BODY, "lacks X-Scopegraph-Signature"),
    ({**signed(), "X-Scopegraph-Timestamp": "12.5"}, BODY, "not whole seconds"),
    ({**signed(), "X-Scopegraph-Signature": "sha256=" + "0" * 64}, BODY, "does not match"),
])
def test_verify_signature_refuses_a_tampered_stale_or_unsigned_delivery(
        headers: dict[str, str], body: bytes, problem: str) -> None:
    with pytest.raises(WebhookSignatureError, match=problem):
        verify_signature(SECRET, headers, body)


def test_a_replayed_delivery_is_refused_once_its_timestamp_is_old() -> None:
    headers = signed(at=1_800_000_000)
    verify_signature(SECRET, headers, BODY, now=1_800_000_100)
    with pytest.raises(WebhookSignatureError, match="more than 300 seconds"):
        verify_signature(SECRET, headers, BODY, now=1_800_000_301)
    with pytest.raises(WebhookSignatureError, match="does not match"):  # re-stamped without the secret
        verify_signature(SECRET, {**headers, "X-Scopegraph-Timestamp": "1800000300"}, BODY, now=1_800_000_301)


# the server's lifespan -------------------------------------------------------------------------
def test_the_server_delivers_as_runs_pause_and_a_restart_resends_nothing(
        server_store: Store, rt: Runtime, receiver: Receiver, tmp_path: Path, settings: DeliverySettings) -> None:
    state = tmp_path / "state" / "webhooks.json"

    def server() -> Any:
        app = build_app(server_store, audiences=[], clients=[])
        dispatcher = attach_webhooks(app, server_store, [receiver.url], state_path=state, settings=settings,
                                     environ={WEBHOOK_SECRET_ENV: SECRET})
        assert dispatcher is not None
        dispatcher.feed.poll_interval = 0.01
        return app

    pause(rt)  # before the first start: history, not sent
    with TestClient(server()) as client:
        assert client.get("/healthz").json() == {"ok": True}
        while not state.exists():  # the dispatcher has taken its place at the present
            time.sleep(0.01)
        at_start = state.read_text()
        _, first = pause(rt)
        got = receiver.wait_for(1)
        assert [json.loads(r.body)["approval_id"] for r in got] == [first]
        while state.read_text() == at_start:  # delivered and remembered
            time.sleep(0.01)
    rt.approvals.approve(first, approver="bob")  # while the server is down
    with TestClient(server()):
        _, second = pause(rt)
        got = receiver.wait_for(3)
    told = [(json.loads(r.body)["kind"], json.loads(r.body)["approval_id"]) for r in got]
    assert told == [("request.created", first), ("request.answered", first), ("request.created", second)]
    for r in got:
        verify_signature(SECRET, r.headers, r.body)
    assert len({r.headers["X-Scopegraph-Delivery"] for r in got}) == 3
    assert attach_webhooks(build_app(server_store, audiences=[], clients=[]), server_store, []) is None

