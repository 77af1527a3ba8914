"""What only the PostgreSQL store has: versioned migrations, URL redaction, a pool that
outlives a dropped connection, and LangGraph's Postgres checkpointer on the same database."""

from __future__ import annotations

import operator
import threading
from collections.abc import Iterator
from typing import Annotated, TypedDict

import psycopg
import pytest
from psycopg import sql

from scopegraph.errors import ConfigError, StoreError
from scopegraph.store import open_store
from scopegraph.store import postgres as pg
from scopegraph.store.postgres import Migration, PostgresStore, checkpointer_for_postgres, redact_url

from .conftest import closed_port
from .test_store_contract import append, assert_one_chain, grant, race, run


@pytest.fixture
def opened() -> Iterator[list[PostgresStore]]:
    """Stores a test opens; closed at teardown, before its schema is dropped."""
    stores: list[PostgresStore] = []
    yield stores
    for s in stores:
        s.close()


def migrations_table(postgres_url: str, schema: str) -> list[tuple[object, ...]]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        return conn.execute(sql.SQL("SELECT version, name, applied_at FROM {}.sg_schema_migrations "
                                    "ORDER BY version").format(sql.Identifier(schema))).fetchall()


def columns(postgres_url: str, schema: str, table: str) -> set[str]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute("SELECT column_name FROM information_schema.columns "
                            "WHERE table_schema = %s AND table_name = %s", (schema, table)).fetchall()
    return {str(r[0]) for r in rows}


# migrations ---------------------------------------------------------------------------------
def test_migrations_are_applied_once_and_reopening_applies_none(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore]) -> None:
    opened.append(PostgresStore(postgres_store_url))
    first = migrations_table(postgres_url, postgres_schema)
    assert [(v, n) for v, n, _ in first] == [(m.version, m.name) for m in pg.MIGRATIONS]
    opened.append(PostgresStore(postgres_store_url))
    assert migrations_table(postgres_url, postgres_schema) == first  # same rows, same times
    with psycopg.connect(postgres_store_url, autocommit=True) as conn:
        assert pg.migrate(conn) == []


def test_processes_starting_at_once_migrate_once(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore]) -> None:
    opened.extend(race(6, lambda i: PostgresStore(postgres_store_url)))
    assert [v for v, _, _ in migrations_table(postgres_url, postgres_schema)] == \
        [m.version for m in pg.MIGRATIONS]


def test_a_new_migration_upgrades_an_existing_store_once(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    old = PostgresStore(postgres_store_url)
    opened.append(old)
    old.upsert_run(run("run-1"))
    step = Migration(version=len(pg.MIGRATIONS) + 1, name="run notes",
                     sql="ALTER TABLE sg_runs ADD COLUMN note TEXT; CREATE INDEX sg_runs_note ON sg_runs (note);")
    monkeypatch.setattr(pg, "MIGRATIONS", (*pg.MIGRATIONS, step))
    opened.append(PostgresStore(postgres_store_url))
    opened.append(PostgresStore(postgres_store_url))
    versions = [v for v, _, _ in migrations_table(postgres_url, postgres_schema)]
    assert versions == [m.version for m in pg.MIGRATIONS]
    assert "note" in columns(postgres_url, postgres_schema, "sg_runs")
    assert opened[-1].get_run("run-1") == run("run-1")


def test_a_failing_migration_changes_nothing(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    opened.append(PostgresStore(postgres_store_url))
    before = migrations_table(postgres_url, postgres_schema)
    broken = Migration(version=len(pg.MIGRATIONS) + 1, name="broken",
                       sql="ALTER TABLE sg_runs ADD COLUMN half_done TEXT; SELECT 1 / 0;")
    monkeypatch.setattr(pg, "MIGRATIONS", (*pg.MIGRATIONS, broken))
    with pytest.raises(StoreError, match="division by zero"):
        PostgresStore(postgres_store_url)
    assert migrations_table(postgres_url, postgres_schema) == before
    assert "half_done" not in columns(postgres_url, postgres_schema, "sg_runs")


def test_a_schema_newer_than_the_code_is_refused(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore]) -> None:
    opened.append(PostgresStore(postgres_store_url))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {}.sg_schema_migrations (version, name) VALUES (999, 'future')")
                     .format(sql.Identifier(postgres_schema)))
    with pytest.raises(StoreError, match="newer than this scopegraph knows"):
        PostgresStore(postgres_store_url)


# URLs, errors and secrets -------------------------------------------------------------------
@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://alice:pa%40ss@db:5432/sg", "postgresql://alice:***@db:5432/sg"),
    ("postgresql://alice@db/sg?password=hunter2&sslmode=require", "postgresql://alice@db/sg?password=***&sslmode=require"),
    ("postgres://db/sg?options=-csearch_path%3Dx", "postgres://db/sg?options=-csearch_path%3Dx"),
    ("postgresql://alice:p@ss@db/sg", "postgresql://alice:***@db/sg"),
])
def test_urls_are_shown_without_their_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_no_message_url_or_repr_carries_the_password(postgres_url: str) -> None:
    port = closed_port()
    for url in (f"postgresql://postgres:Pa55-word@127.0.0.1:{port}/test",
                f"postgresql://postgres@127.0.0.1:{port}/test?password=Pa55-word",
                "postgresql://postgres:Pa55-word@127.0.0.1:5432/no_such_database_here"):
        with pytest.raises(StoreError) as caught:
            open_store(url)
        assert "Pa55-word" not in str(caught.value) and "\n" not in str(caught.value)
        assert "***" in str(caught.value)
    with pytest.raises(ConfigError) as bad:
        open_store("postgresql://postgres:Pa55-word@127.0.0.1/test?no_such_option=1")
    assert "Pa55-word" not in str(bad.value)
    with pytest.raises(ConfigError) as other:
        open_store("mysql://root:Pa55-word@127.0.0.1/test")
    assert "Pa55-word" not in str(other.value)


def test_a_password_in_a_working_url_stays_out_of_url_and_repr(postgres_store_url: str) -> None:
    # Trust auth ignores the password, so the store opens and we can look at it.
    url = postgres_store_url.replace("postgres@", "postgres:Pa55-word@", 1)
    store = open_store(url)
    try:
        assert isinstance(store, PostgresStore)
        assert "Pa55-word" not in store.url and "Pa55-word" not in repr(store)
        store.add_grant(grant("g1"))
        with pytest.raises(StoreError) as caught:
            store.add_grant(grant("g1"))
        assert "Pa55-word" not in str(caught.value) and "\n" not in str(caught.value)
        assert "sg_grants_pkey" in str(caught.value)
    finally:
        store.close()


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_open_store_accepts_both_postgres_schemes(postgres_store_url: str, scheme: str) -> None:
    store = open_store(postgres_store_url.replace("postgresql://", f"{scheme}://", 1))
    try:
        assert isinstance(store, PostgresStore)
        store.upsert_run(run("run-1"))
        assert store.get_run("run-1") == run("run-1")
    finally:
        store.close()


# transactions -------------------------------------------------------------------------------
def test_a_failed_statement_dooms_the_whole_transaction(
        postgres_store_url: str, opened: list[PostgresStore]) -> None:
    # PostgreSQL cannot go on after a failed statement: the block must not look committed.
    store = PostgresStore(postgres_store_url)
    opened.append(store)
    store.add_grant(grant("g1"))
    with pytest.raises(StoreError, match="rolled a transaction back"):
        with store.atomic():
            store.upsert_run(run("run-1"))
            with pytest.raises(StoreError):
                store.add_grant(grant("g1"))
    assert store.get_run("run-1") is None
    store.upsert_run(run("run-1"))  # and the store carries on
    assert store.get_run("run-1") == run("run-1")


def test_connections_the_server_dropped_are_replaced_without_failing_a_call(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore]) -> None:
    store = PostgresStore(postgres_store_url, max_connections=4)
    opened.append(store)
    race(4, lambda i: append(store, f"warm-{i}"))  # several connections sit in the pool
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                               "WHERE application_name = %s AND pid <> pg_backend_pid()",
                               (postgres_schema,)).fetchall()
    assert killed  # as a server restart or failover would
    assert append(store, "after") == 5
    assert store.get_run("run-1") is None
    assert_one_chain(store.ledger_rows())


def test_a_call_during_an_outage_fails_closed_and_work_resumes_after_it(
        postgres_url: str, postgres_schema: str, postgres_store_url: str, opened: list[PostgresStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = PostgresStore(postgres_store_url)
    opened.append(store)
    store.add_grant(grant("g1"))
    # An outage, for this store only: its connections die and new ones find nobody listening.
    monkeypatch.setattr(store._pool, "conninfo", f"postgresql://postgres@127.0.0.1:{closed_port()}/test")
    monkeypatch.setattr(store._pool, "timeout", 0.5)
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = %s", (postgres_schema,))
    for call in (lambda: store.consume_grant_use("g1"), lambda: store.grant_state("g1")):
        with pytest.raises(StoreError) as caught:
            call()
        assert "\n" not in str(caught.value)
    # The server is back; a call may wait (up to the usual timeout) for the pool's next attempt.
    monkeypatch.setattr(store._pool, "conninfo", postgres_store_url)
    monkeypatch.setattr(store._pool, "timeout", pg.POOL_TIMEOUT_SECONDS)
    assert store.consume_grant_use("g1") == "ok"
    assert store.grants_for_run("run-1")[0].uses == 1


def test_lock_waits_cross_connections_of_one_store(postgres_store_url: str, opened: list[PostgresStore]) -> None:
    # One store, two threads: the second appender waits for the first one's commit.
    store = PostgresStore(postgres_store_url)
    opened.append(store)
    holding, done = threading.Event(), threading.Event()

    def second() -> None:
        holding.wait(timeout=30)
        append(store, "second")
        done.set()

    t = threading.Thread(target=second)
    t.start()
    with store.atomic():
        append(store, "first")
        holding.set()
        assert not done.wait(timeout=0.3)  # blocked on the ledger tip
    t.join(timeout=30)
    assert [r.run_id for r in store.ledger_rows()] == ["first", "second"]


# LangGraph checkpoints ------------------------------------------------------------------------
class Counter(TypedDict):
    total: Annotated[int, operator.add]


def test_the_checkpointer_persists_a_graph_across_savers(
        postgres_store_url: str, opened: list[PostgresStore]) -> None:
    from langgraph.graph import END, START, StateGraph

    store = PostgresStore(postgres_store_url)
    opened.append(store)
    builder = StateGraph(Counter)
    builder.add_node("add", lambda state: {"total": 1})
    builder.add_edge(START, "add")
    builder.add_edge("add", END)
    config = {"configurable": {"thread_id": "run-1"}}
    pool, saver = checkpointer_for_postgres(store)
    try:
        assert builder.compile(checkpointer=saver).invoke({"total": 41}, config) == {"total": 42}
    finally:
        pool.close()
    pool, saver = checkpointer_for_postgres(postgres_store_url)  # another process, later
    try:
        assert builder.compile(checkpointer=saver).get_state(config).values == {"total": 42}
    finally:
        pool.close()


def test_checkpoint_setup_is_safe_when_processes_start_at_once(postgres_store_url: str) -> None:
    pools = race(4, lambda i: checkpointer_for_postgres(postgres_store_url)[0])
    for pool in pools:
        pool.close()


def test_an_unreachable_checkpoint_database_raises_store_error() -> None:
    with pytest.raises(StoreError) as caught:
        checkpointer_for_postgres(f"postgresql://postgres:Pa55-word@127.0.0.1:{closed_port()}/test")
    assert "Pa55-word" not in str(caught.value) and "\n" not in str(caught.value)
