"""The browser tests' fixtures: a store on each backend with a paused run, the inbox served
by uvicorn in a thread, and Debian's Chromium driven by Playwright, each approver on a
page of their own with Chromium's virtual WebAuthn authenticator (CDP ``WebAuthn``).

Nothing is downloaded: Playwright launches ``/usr/bin/chromium`` (``.ci/run`` installs it).
Screenshots go to ``tmp_path``, and to ``docs/`` too when ``SCOPEGRAPH_DOCS_SCREENSHOTS=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.loader import load_workflow
from scopegraph.runtime import Runtime
from scopegraph.serve import build_app, open_inbox, site_for
from scopegraph.store import open_store
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401
from tests.orchestrator.trust_helpers import Where, where

from . import flows

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@dataclass
class Served:
    """A running inbox: its store, clock and origin; ``run()`` pauses a new run for approval."""

    at: Where
    clock: FixedClock
    origin: str
    tmp: Path
    runs: list[str] = field(default_factory=list)
    approvals: list[str] = field(default_factory=list)  # in the order made (the fixture's first)

    def run(self, task: str = "Reimburse receipt r-1042", *, initiator: str = "alice",
            target: str = flows.TARGET) -> tuple[str, str]:
        """Start a run (by alice, of ``expenses`` unless told); it pauses for approval.
        Returns (run id, approval id)."""
        with Runtime(load_workflow(target), store=self.at.url, target=target, clock=self.clock) as rt:
            report = rt.run(task, initiator=initiator)
            assert report.status == "paused", report.summary()
            pending = [a for a in rt.approvals.list(run_id=report.run_id) if a.status == "pending"]
        self.runs.append(report.run_id)
        self.approvals.append(pending[0].id)
        return report.run_id, pending[0].id

    def invite(self, name: str) -> str:
        code, out = cli("--store", self.at.url, "approvers", "invite", name, "--url", self.origin, "--json")
        assert code == 0, out
        return str(json.loads(out)["link"])

    def screenshot(self, page: Any, name: str, *, docs: bool = False) -> Path:
        path = self.tmp / name
        page.screenshot(path=str(path), full_page=True)
        if docs and os.environ.get("SCOPEGRAPH_DOCS_SCREENSHOTS") == "1":
            DOCS.mkdir(exist_ok=True)
            page.screenshot(path=str(DOCS / name), full_page=True)
        return path


@pytest.fixture(params=["sqlite", "postgresql"])
def at(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    return where(request, tmp_path)


@pytest.fixture
def served(at: Where, tmp_path: Path) -> Iterator[Served]:
    """The inbox over a fresh store (made by a first run), on a free port of localhost."""
    import uvicorn

    flows.EFFECTS.clear()
    clock = FixedClock(start=time.time())
    port = free_port()
    origin = f"http://localhost:{port}"
    s = Served(at=at, clock=clock, origin=origin, tmp=tmp_path)
    s.run()  # makes the store, its keystore and a first paused run
    store = open_store(at.url, create=False)
    inbox = open_inbox(store, at.url, site_for(host="127.0.0.1", port=port, public_url=origin, tls=False),
                       clock=clock)
    app = build_app(store, audiences=[], clients=[], inbox=inbox)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the inbox did not start"
        time.sleep(0.02)
    try:
        yield s
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        inbox.trust.close()
        store.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does this)", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def approver_page(browser: Any) -> Iterator[Callable[[], Any]]:
    """A new page in a context of its own, with a virtual passkey authenticator attached."""
    contexts: list[Any] = []

    def make() -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        cdp = context.new_cdp_session(page)
        cdp.send("WebAuthn.enable")
        cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
            "protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
            "isUserVerified": True, "automaticPresenceSimulation": True}})
        page.cdp = cdp  # keep the session (and its authenticator) alive with the page
        return page

    yield make
    for context in contexts:
        context.close()


def enrol(page: Any, link: str) -> None:
    """Open an invitation link, make the passkey, land signed in on the inbox."""
    page.goto(link)
    page.locator("#enrol:not([disabled])").click()
    page.wait_for_url("**/")
    page.locator("header .who").wait_for()
