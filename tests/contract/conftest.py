"""Fixtures for the store contract: one ``backend`` per store implementation.

Every PostgreSQL test gets a schema of its own (created here, dropped at teardown) and
reaches it through ``options=-csearch_path=…`` in the URL, so tests never see each
other's rows. PostgreSQL must be reachable: if it is not, the PostgreSQL tests fail
(they never skip, which would hide a broken store). ``$SCOPEGRAPH_TEST_POSTGRES_URL``
names the server; the default is the development machines' trust-auth server.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from scopegraph.store import Store, open_store

POSTGRES_URL = os.environ.get("SCOPEGRAPH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
START_HINT = "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@dataclass
class Backend:
    """One store implementation under test: a fresh URL, and stores opened on it."""

    name: str
    url: str
    unreachable_url: str  # a URL of this kind whose store cannot be opened
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        """Another store object on the same data: its own connection(s), like another process."""
        store = open_store(self.url)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in reversed(self.opened):
            try:
                store.close()
            except Exception:  # a test may have closed it already
                pass
        self.opened.clear()


def with_params(url: str, **params: str) -> str:
    """``url`` with query parameters added (values are put in verbatim: pre-encode them)."""
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released just now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The server's URL, once it has answered; a failure (not a skip) otherwise."""
    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=5, autocommit=True).close()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL!r} ({first}); {START_HINT}", pytrace=False)
    return POSTGRES_URL


@pytest.fixture
def postgres_schema(postgres_url: str) -> Iterator[str]:
    """A fresh, empty schema; dropped with everything in it at teardown."""
    name = f"sg_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def postgres_store_url(postgres_url: str, postgres_schema: str, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> str:
    """A store URL whose tables live in the test's own schema, with its own keystore and
    witness in ``tmp_path`` (a PostgreSQL store's default ones are in the working directory)."""
    monkeypatch.setenv("SCOPEGRAPH_KEYSTORE", str(tmp_path / "pg-keys"))
    monkeypatch.setenv("SCOPEGRAPH_WITNESS", str(tmp_path / "pg-witness.jsonl"))
    return with_params(postgres_url, options=f"-csearch_path%3D{postgres_schema}",
                       application_name=postgres_schema)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        blocker = tmp_path / "not-a-directory"
        blocker.write_text("a file where the store's directory should be")
        b = Backend(name="sqlite", url=f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}",
                    unreachable_url=f"sqlite:///{blocker / 'scopegraph.db'}")
    else:
        url = request.getfixturevalue("postgres_store_url")
        b = Backend(name="postgresql", url=url,
                    unreachable_url=f"postgresql://postgres:pw-s3cret@127.0.0.1:{closed_port()}/test")
    try:
        yield b
    finally:
        b.close_all()


@pytest.fixture
def store(backend: Backend) -> Store:
    """A store on the backend's fresh data."""
    return backend.open()
