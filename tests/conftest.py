"""Shared fixtures: a store in ``tmp_path``, a fixed clock, a small workflow factory.

Also a guard that blocks network connections that leave the machine: a test that
really needs the network says so with ``@pytest.mark.network``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from scopegraph import Runtime, Tool, Workflow
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.clock import FixedClock
from scopegraph.credentials import Grant
from scopegraph.gateway import CallContext, RetrySettings

from .helpers import READ_PLAN, STANDARD_TOOLS, mint_grant

# No example database under the working tree; no deadline and no "too slow" health check
# (SQLite and Cedar timings vary, and other tests may load the machine meanwhile).
settings.register_profile("scopegraph", database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("scopegraph")


# network guard ---------------------------------------------------------------------------
class NetworkBlockedError(OSError):
    """A test tried to reach a non-loopback address without ``@pytest.mark.network``."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "network: the test may open connections to non-loopback addresses"
    )


_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_loopback_host(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _allowed(family: int, address: object) -> bool:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True  # Unix sockets and friends never leave the machine
    host = address[0] if isinstance(address, tuple) and address else address
    return _is_loopback_host(host)


@pytest.fixture(autouse=True)
def _network_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("network") is not None:
        return
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_getaddrinfo = socket.getaddrinfo

    def refuse(what: object) -> NetworkBlockedError:
        return NetworkBlockedError(
            f"network access to {what!r} is blocked in tests; mark the test with @pytest.mark.network"
        )

    def connect(self: socket.socket, address: Any) -> None:
        if not _allowed(self.family, address):
            raise refuse(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        if not _allowed(self.family, address):
            raise refuse(address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: bytes, *args: Any) -> int:
        address = args[-1]
        if not _allowed(self.family, address):
            raise refuse(address)
        return real_sendto(self, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _is_loopback_host(host):
            raise refuse(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# store, clock ----------------------------------------------------------------------------
@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "scopegraph.db"


@pytest.fixture
def store_url(store_path: Path) -> str:
    """A fresh SQLite store URL under ``tmp_path``."""
    return f"sqlite:///{store_path}"


@pytest.fixture
def clock() -> FixedClock:
    """A clock that moves only when a test advances it."""
    return FixedClock(start=1_800_000_000.0)


@pytest.fixture
def sleeps() -> list[float]:
    """Waits the retry loop asked for; nothing really sleeps."""
    return []


@pytest.fixture
def no_sleep_retry(sleeps: list[float]) -> RetrySettings:
    return RetrySettings(attempts=3, sleep=sleeps.append)


# a small workflow --------------------------------------------------------------------------
@pytest.fixture
def make_workflow(no_sleep_retry: RetrySettings) -> Callable[..., Workflow]:
    """Build a workflow: the standard tools, a scripted planner, a direct executor.

    ``plan`` is the planner's fixed plan (or a function of the task); any other keyword
    goes to ``Workflow`` (``tools=``, ``executor=``, ``policies=``, ``grant_max_uses=``…).
    """

    def make(plan: Any = READ_PLAN, *, name: str = "testwf", tools: Sequence[Tool] = STANDARD_TOOLS,
             executor: Any = None, planner: Any = None, **kwargs: Any) -> Workflow:
        kwargs.setdefault("retry", no_sleep_retry)
        return Workflow(
            name=name,
            tools=list(tools),
            planner=planner if planner is not None else ScriptedPlanner(plan),
            executor=executor if executor is not None else DirectExecutor(builders={
                "read_doc": lambda ctx: {"path": "/docs/readme.txt"},
                "lookup": lambda ctx: {"limit": 5},
            }),
            **kwargs,
        )

    return make


@pytest.fixture
def make_runtime(store_url: str, clock: FixedClock) -> Iterator[Callable[..., Runtime]]:
    """Open a ``Runtime`` on the test's store and clock; every one is closed at teardown."""
    opened: list[Runtime] = []

    def make(workflow: Workflow, **kwargs: Any) -> Runtime:
        kwargs.setdefault("store", store_url)
        kwargs.setdefault("clock", clock)
        rt = Runtime(workflow, **kwargs)
        opened.append(rt)
        return rt

    yield make
    for rt in reversed(opened):
        try:
            rt.close()
        except Exception:  # a test may have closed the store on purpose
            pass


# grants for gateway tests ------------------------------------------------------------------
@pytest.fixture
def runtime(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Runtime:
    """A runtime of the standard workflow; its gateway, issuer and store are real."""
    return make_runtime(make_workflow())


@pytest.fixture
def mint(runtime: Runtime) -> Callable[..., tuple[Grant, CallContext]]:
    """Mint a real grant with ``runtime.issuer``: see ``helpers.mint_grant``."""

    def make(tool_name: str, **kwargs: Any) -> tuple[Grant, CallContext]:
        return mint_grant(runtime, tool_name, **kwargs)

    return make
