"""A PostgreSQL store pinned to a schema (``options=-csearch_path=NAME``) that does not exist yet:
commands that write create it; commands that read say there is no store; a role that may not
create it gets the one command that does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from scopegraph.cli import main
from scopegraph.errors import StoreError
from scopegraph.store import open_store
from scopegraph.workers import install_queue

from .conftest import with_params
from .test_store_contract import append, run


def pinned(postgres_url: str, search_path: str, *, user: str | None = None) -> str:
    url = postgres_url if user is None else postgres_url.replace("postgres@", f"{user}@", 1)
    return with_params(url, options=f"-csearch_path%3D{search_path}")


def schema_exists(postgres_url: str, name: str) -> bool:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        return conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (sql.Identifier(name).as_string(conn),)
                            ).fetchone() == (True,)


def tables_in(postgres_url: str, name: str) -> set[str]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (name,))}


@pytest.fixture
def missing_schema(postgres_url: str) -> Iterator[str]:
    """The name of a schema nobody has created; dropped at teardown if a test made it."""
    name = f"sg_test_new_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def unprivileged_role(postgres_url: str) -> Iterator[str]:
    """A role that may connect but not create schemas in the database."""
    name = f"sg_test_role_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        owned = conn.execute("SELECT nspname FROM pg_namespace WHERE nspowner = to_regrole(%s)", (name,)).fetchall()
        for (schema,) in owned:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def runs_in(postgres_url: str, schema: str) -> set[str]:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        table = sql.SQL("SELECT run_id FROM {}.sg_runs").format(sql.Identifier(schema)).as_string(conn)
        return {r[0] for r in conn.execute(table)}


def test_a_store_that_writes_creates_its_missing_schema(postgres_url: str, missing_schema: str) -> None:
    # The database is shared (a developer's ``--store postgresql://…/test`` writes to ``public``):
    # what this store must not do is write there, whatever is there already.
    public_before = tables_in(postgres_url, "public")
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    store = open_store(pinned(postgres_url, missing_schema))
    try:
        store.upsert_run(run(run_id))
        assert append(store, step="a") == 1
    finally:
        store.close()
    assert {"sg_runs", "sg_ledger", "sg_schema_migrations"} <= tables_in(postgres_url, missing_schema)
    assert runs_in(postgres_url, missing_schema) == {run_id}
    assert tables_in(postgres_url, "public") == public_before
    if "sg_runs" in public_before:
        assert run_id not in runs_in(postgres_url, "public")


def test_a_quoted_mixed_case_schema_is_created_as_written(postgres_url: str, missing_schema: str) -> None:
    name = missing_schema.replace("sg_test_new_", "Sg_Test_New_")
    try:
        open_store(pinned(postgres_url, f"%22{name}%22")).close()
        assert "sg_runs" in tables_in(postgres_url, name)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def test_a_store_opened_only_to_read_never_creates_the_schema(postgres_url: str, missing_schema: str) -> None:
    url = pinned(postgres_url, missing_schema)
    with pytest.raises(StoreError) as caught:
        open_store(url, create=False)
    assert str(caught.value) == f"no store at {url!r}: schema {missing_schema!r} does not exist"
    assert not schema_exists(postgres_url, missing_schema)


def test_a_store_opened_only_to_read_in_an_empty_schema_says_it_holds_no_tables(
        postgres_url: str, postgres_schema: str, postgres_store_url: str) -> None:
    with pytest.raises(StoreError, match=f"no store at .*: schema {postgres_schema!r} holds no scopegraph tables"):
        open_store(postgres_store_url, create=False)
    assert tables_in(postgres_url, postgres_schema) == set()
    open_store(postgres_store_url).close()  # once a store is there, reading it works
    open_store(postgres_store_url, create=False).close()


def test_read_only_commands_on_a_missing_schema_exit_2_and_create_nothing(
        postgres_url: str, missing_schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = pinned(postgres_url, missing_schema)
    for argv in (["approvals", "list"], ["trace", "run-1"], ["report"], ["audit", "verify"]):
        assert main(["--store", url, *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.strip() == (
            f"scopegraph: error: no store at {url!r}: schema {missing_schema!r} does not exist"), argv
    assert not schema_exists(postgres_url, missing_schema)


def test_a_role_that_may_not_create_the_schema_is_told_the_command_that_does(
        postgres_url: str, missing_schema: str, unprivileged_role: str) -> None:
    url = pinned(postgres_url, missing_schema, user=unprivileged_role)
    command = f'CREATE SCHEMA "{missing_schema}" AUTHORIZATION "{unprivileged_role}";'
    with pytest.raises(StoreError) as caught:
        open_store(url)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(f"as a database owner, run: {command}")
    assert f"schema {missing_schema!r} does not exist and role {unprivileged_role!r} may not create it" in message
    with pytest.raises(StoreError) as queue:  # the queue says the same, not the queue library's words
        install_queue(url)
    assert str(queue.value).endswith(command)
    with psycopg.connect(postgres_url, autocommit=True) as owner:  # the command works as given
        owner.execute(command)
    store = open_store(url)
    try:
        store.upsert_run(run("run-1"))
        assert store.get_run("run-1") == run("run-1")
    finally:
        store.close()
    install_queue(url)
    assert "procrastinate_jobs" in tables_in(postgres_url, missing_schema)


def test_submitting_to_a_missing_schema_creates_it_with_the_queue_inside(
        postgres_url: str, missing_schema: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = pinned(postgres_url, missing_schema)
    assert main(["--store", url, "submit", "tests.workers.flows:reads", "--task", "read it", "--json"]) == 0, \
        capsys.readouterr().err
    tables = tables_in(postgres_url, missing_schema)
    assert {"procrastinate_jobs", "sg_runs"} <= tables
    assert "procrastinate_jobs" not in tables_in(postgres_url, "public")
    store = open_store(url, create=False)
    try:
        assert [r.status for r in store.list_runs()] == ["queued"]
    finally:
        store.close()
