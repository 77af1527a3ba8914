"""The shared store: PostgreSQL, for several workers on several machines.

Everything the SQLite store keeps, in the same shape, behind the same ``Store``
protocol. What SQLite gets from ``BEGIN IMMEDIATE`` (one writer at a time) PostgreSQL
gets from row locks, taken where a read decides a write:

- ``update_approval`` and ``acquire_run`` read their row ``FOR UPDATE``;
- ``append_ledger`` locks the one row of ``sg_ledger_tip`` (the last record's sequence
  number and hash) and moves it on in the same transaction, so appenders in any number
  of processes form one chain. A record deleted from the end is not silently chained
  over: the next record keeps counting from the tip, leaving a gap ``verify`` reports;
- single-statement updates (grant uses, revocations) rely on PostgreSQL re-checking
  their ``WHERE`` against the newest row version under READ COMMITTED.

The runtime's transactions take grant, approval and call rows before the ledger tip, and
the tip before the signed head; only a run's own row is locked after the tip (at the
run's end, by its lease holder alone). Should two transactions still wait on each other,
PostgreSQL ends one of them with a deadlock error, which surfaces as a ``StoreError``.

Tables are created and upgraded by ``MIGRATIONS``: numbered SQL steps applied in order,
each recorded in ``sg_schema_migrations``, all inside one transaction that holds an
advisory lock, so two processes opening a fresh database at once do not race.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, TupleRow
from psycopg_pool import ConnectionPool

from ..errors import ConfigError, StoreError
from .base import (
    GRANT_COLUMNS,
    RUN_COLUMNS,
    CallRecord,
    GrantRecord,
    GrantState,
    LedgerHead,
    LedgerRow,
    RunRecord,
    UseRecord,
    grant_from_row,
    lease_holder,
    refused_grant_state,
    run_from_row,
)

if TYPE_CHECKING:
    from langgraph.checkpoint.postgres import PostgresSaver

CONNECT_TIMEOUT_SECONDS = 10
POOL_TIMEOUT_SECONDS = 10.0
CHECKPOINT_SETUP_WAIT_SECONDS = 60

# Keys of the advisory locks that serialise schema set-up across processes.
_MIGRATION_LOCK = 0x73675F6D69677261  # "sg_migra"
_CHECKPOINT_SETUP_LOCK = 0x73675F636B707473  # "sg_ckpts"


@dataclass(frozen=True, kw_only=True)
class Migration:
    """One numbered step of the schema; applied once, in order, never edited afterwards."""

    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(version=1, name="initial tables", sql="""
CREATE TABLE sg_keys (
    name TEXT PRIMARY KEY, private_pem BYTEA NOT NULL, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE sg_grants (
    jti TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    subject TEXT NOT NULL, issued_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    max_uses BIGINT NOT NULL, uses BIGINT NOT NULL DEFAULT 0,
    revoked_at DOUBLE PRECISION, revoke_reason TEXT);
CREATE INDEX sg_grants_run ON sg_grants (run_id);
CREATE TABLE sg_uses (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, jti TEXT NOT NULL, run_id TEXT NOT NULL,
    step_id TEXT NOT NULL, tool TEXT NOT NULL, attempt BIGINT NOT NULL, outcome TEXT NOT NULL,
    decision TEXT NOT NULL, policy_ids TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    observed TEXT NOT NULL DEFAULT '{}');
CREATE INDEX sg_uses_run ON sg_uses (run_id, id);
CREATE TABLE sg_approvals (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, payload TEXT NOT NULL,
    seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE);
CREATE INDEX sg_approvals_run ON sg_approvals (run_id, seq);
CREATE TABLE sg_calls (
    key TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    status TEXT NOT NULL, result TEXT, started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION);
CREATE TABLE sg_ledger (
    seq BIGINT PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX sg_ledger_run ON sg_ledger (run_id, seq);
CREATE TABLE sg_ledger_tip (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT NOT NULL);
INSERT INTO sg_ledger_tip (id, seq, hash) VALUES (1, 0, repeat('0', 64));
CREATE TABLE sg_ledger_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT NOT NULL,
    domain TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE sg_runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, target TEXT NOT NULL,
    initiator TEXT NOT NULL, status TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL, lease_owner TEXT, lease_until DOUBLE PRECISION);
CREATE INDEX sg_runs_workflow ON sg_runs (workflow, created_at);
"""),
)

_LEDGER_COLUMNS = "seq, run_id, kind, at, data, prev_hash, hash"


class _ThreadTx(threading.local):
    """The connection of the transaction this thread is inside, if any."""

    conn: psycopg.Connection[TupleRow] | None = None


class PostgresStore:
    """A ``Store`` in PostgreSQL: a pool of up to ``max_connections`` connections.

    Each thread's transaction has a connection of its own while it lasts; reads outside
    a transaction borrow one per statement. ``url`` is the URL with any password
    replaced by ``***``: safe to print, but not enough to connect with.

    Raises:
        ConfigError: the URL is not a valid libpq URL.
        StoreError: the database cannot be reached, or its schema cannot be brought up to date.
    """

    def __init__(self, url: str, *, max_connections: int = 10) -> None:
        self._conninfo = url
        self.url = redact_url(url)
        self._secrets = _secrets_of(url)
        self._local = _ThreadTx()
        self._max_connections = max_connections
        kwargs = _connect_kwargs(url, self.url, self._secrets)
        try:
            with psycopg.connect(url, **kwargs) as conn:
                migrate(conn)
        except psycopg.Error as exc:
            raise self._error(exc, "cannot be opened") from exc
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=max_connections, timeout=POOL_TIMEOUT_SECONDS,
            # Give up a reconnection series soon: the pool's backoff doubles the gaps
            # between attempts, and after a long outage a late series would keep calls
            # failing long after the server is back. The next call starts a fresh one.
            reconnect_timeout=POOL_TIMEOUT_SECONDS, open=False, name="scopegraph-store",
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            self._pool.close()
            raise self._error(exc, "cannot be opened") from exc

    # transactions -------------------------------------------------------------------
    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Group several store calls into one transaction: all of them land, or none.

        Nested ``atomic`` blocks and the store's own methods, called from the same
        thread, join the outermost one. Other threads use their own connections.

        Raises:
            StoreError: the database failed, or a statement inside the block failed
                (PostgreSQL then rolls the whole transaction back, even if the
                failure was caught inside the block).
        """
        with self._tx():
            yield

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[TupleRow]]:
        joined = self._local.conn
        if joined is not None:  # already inside this thread's transaction: join it
            try:
                yield joined
            except psycopg.Error as exc:
                raise self._error(exc) from exc
            return
        try:
            conn, _ = self._checkout("BEGIN")
            self._local.conn = conn
            try:
                try:
                    yield conn
                except BaseException:
                    _rollback_quietly(conn)
                    raise
                if conn.info.transaction_status == TransactionStatus.INERROR:
                    # COMMIT would silently roll back; say so instead of pretending.
                    conn.execute("ROLLBACK")
                    raise StoreError(f"store {self.url!r} rolled a transaction back after a failed statement")
                conn.execute("COMMIT")
            finally:
                self._local.conn = None
                self._pool.putconn(conn)  # one left broken or mid-transaction is discarded or reset
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[TupleRow]:
        joined = self._local.conn
        try:
            if joined is not None:
                return joined.execute(sql, params).fetchall()
            conn, cur = self._checkout(sql, params)
            try:
                return cur.fetchall()
            finally:
                self._pool.putconn(conn)
        except psycopg.Error as exc:
            raise self._error(exc) from exc

    def _checkout(self, sql: str, params: tuple[object, ...] = ()
                  ) -> tuple[psycopg.Connection[TupleRow], psycopg.Cursor[TupleRow]]:
        """A pooled connection with ``sql`` (a read, or ``BEGIN``) run on it; the caller puts it back.

        A connection the server dropped while it sat in the pool (a restart, a failover)
        fails on that first statement, before anything was done: it is discarded and the
        statement runs again on the next one, until the pool has no dead ones left.
        """
        for _ in range(self._max_connections):
            conn = self._pool.getconn()
            try:
                return conn, conn.execute(sql, params)
            except psycopg.OperationalError:
                dead = conn.broken  # read before the pool closes it
                self._pool.putconn(conn)
                if not dead:
                    raise
            except BaseException:
                self._pool.putconn(conn)
                raise
        conn = self._pool.getconn()  # every pooled connection was dead: this one is new
        try:
            return conn, conn.execute(sql, params)
        except BaseException:
            self._pool.putconn(conn)
            raise

    def _error(self, exc: BaseException, doing: str = "failed") -> StoreError:
        return StoreError(f"store {self.url!r} {doing}: {_one_line(exc, self._secrets)}")

    # keys ---------------------------------------------------------------------------
    def load_signing_key(self, name: str) -> bytes | None:
        rows = self._read("SELECT private_pem FROM sg_keys WHERE name = %s", (name,))
        return bytes(rows[0][0]) if rows else None

    def save_signing_key(self, name: str, private_pem: bytes, created_at: float) -> bytes:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_keys (name, private_pem, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, private_pem, created_at),
            )
            row = c.execute("SELECT private_pem FROM sg_keys WHERE name = %s", (name,)).fetchone()
        assert row is not None  # inserted above, or there already
        return bytes(row[0])

    # grants -------------------------------------------------------------------------
    def add_grant(self, grant: GrantRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_grants (jti, run_id, step_id, tool, subject, issued_at, "
                "expires_at, max_uses, uses) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 0)",
                (grant.jti, grant.run_id, grant.step_id, grant.tool, grant.subject,
                 grant.issued_at, grant.expires_at, grant.max_uses),
            )

    def consume_grant_use(self, jti: str) -> GrantState:
        with self._tx() as c:
            # Concurrent updaters of the row wait for each other and re-check the WHERE
            # against the winner's row: exactly ``max_uses`` of them succeed.
            cur = c.execute(
                "UPDATE sg_grants SET uses = uses + 1 "
                "WHERE jti = %s AND revoked_at IS NULL AND uses < max_uses",
                (jti,),
            )
            if cur.rowcount == 1:
                return "ok"
            return refused_grant_state(c.execute(
                "SELECT revoked_at, uses, max_uses FROM sg_grants WHERE jti = %s", (jti,)
            ).fetchone())

    def grant_state(self, jti: str) -> GrantState:
        rows = self._read("SELECT revoked_at, uses, max_uses FROM sg_grants WHERE jti = %s", (jti,))
        if rows and rows[0][0] is None and rows[0][1] < rows[0][2]:
            return "ok"
        return refused_grant_state(rows[0] if rows else None)

    def revoke_grant(self, jti: str, *, reason: str, at: float) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sg_grants SET revoked_at = %s, revoke_reason = %s "
                "WHERE jti = %s AND revoked_at IS NULL",
                (at, reason, jti),
            )
            return cur.rowcount == 1

    def revoke_run(self, run_id: str, *, reason: str, at: float) -> int:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sg_grants SET revoked_at = %s, revoke_reason = %s "
                "WHERE run_id = %s AND revoked_at IS NULL",
                (at, reason, run_id),
            )
            return cur.rowcount

    def grants_for_run(self, run_id: str) -> list[GrantRecord]:
        rows = self._read(
            f"SELECT {GRANT_COLUMNS} FROM sg_grants WHERE run_id = %s ORDER BY issued_at, jti", (run_id,))
        return [grant_from_row(r) for r in rows]

    # uses ---------------------------------------------------------------------------
    def record_use(self, use: UseRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_uses (jti, run_id, step_id, tool, attempt, outcome, decision, "
                "policy_ids, at, observed) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (use.jti, use.run_id, use.step_id, use.tool, use.attempt, use.outcome,
                 use.decision, json.dumps(list(use.policy_ids)), use.at,
                 json.dumps(dict(use.observed), default=str)),
            )

    def uses_for_run(self, run_id: str) -> list[UseRecord]:
        rows = self._read(
            "SELECT jti, run_id, step_id, tool, attempt, outcome, decision, policy_ids, at, observed "
            "FROM sg_uses WHERE run_id = %s ORDER BY id",
            (run_id,),
        )
        return [
            UseRecord(jti=r[0], run_id=r[1], step_id=r[2], tool=r[3], attempt=r[4], outcome=r[5],
                      decision=r[6], policy_ids=tuple(json.loads(r[7])), at=r[8], observed=json.loads(r[9]))
            for r in rows
        ]

    # approvals ----------------------------------------------------------------------
    def add_approval(self, approval_id: str, run_id: str, payload: str) -> str:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_approvals (id, run_id, payload) VALUES (%s, %s, %s) "
                "ON CONFLICT (id) DO NOTHING",
                (approval_id, run_id, payload),
            )
            row = c.execute("SELECT payload FROM sg_approvals WHERE id = %s", (approval_id,)).fetchone()
        assert row is not None  # inserted above, or there already
        return str(row[0])

    def get_approval(self, approval_id: str) -> str | None:
        rows = self._read("SELECT payload FROM sg_approvals WHERE id = %s", (approval_id,))
        return str(rows[0][0]) if rows else None

    def list_approvals(self, *, run_id: str | None = None) -> list[str]:
        if run_id is None:
            rows = self._read("SELECT payload FROM sg_approvals ORDER BY seq")
        else:
            rows = self._read("SELECT payload FROM sg_approvals WHERE run_id = %s ORDER BY seq", (run_id,))
        return [str(r[0]) for r in rows]

    def update_approval(self, approval_id: str, mutate: Callable[[str], str]) -> str | None:
        # The row lock makes read-check-write atomic across processes: a second consumer
        # waits here and then sees the first one's write, which is what makes
        # consumption exactly-once.
        with self._tx() as c:
            row = c.execute(
                "SELECT payload FROM sg_approvals WHERE id = %s FOR UPDATE", (approval_id,)).fetchone()
            if row is None:
                return None
            updated = mutate(str(row[0]))
            c.execute("UPDATE sg_approvals SET payload = %s WHERE id = %s", (updated, approval_id))
            return updated

    # idempotent tool calls -------------------------------------------------------------
    def begin_call(self, key: str, *, run_id: str, step_id: str, tool: str, at: float) -> CallRecord | None:
        with self._tx() as c:
            # Insert first: a concurrent inserter of the same key waits for us and finds our row.
            cur = c.execute(
                "INSERT INTO sg_calls (key, run_id, step_id, tool, status, started_at) "
                "VALUES (%s, %s, %s, %s, 'started', %s) ON CONFLICT (key) DO NOTHING",
                (key, run_id, step_id, tool, at),
            )
            if cur.rowcount == 1:
                return None
            row = c.execute("SELECT status, result FROM sg_calls WHERE key = %s", (key,)).fetchone()
        assert row is not None  # the conflict was with this row
        return CallRecord(key=key, status=row[0], result=row[1])

    def finish_call(self, key: str, *, status: str, result: str | None, at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE sg_calls SET status = %s, result = %s, finished_at = %s WHERE key = %s",
                      (status, result, at, key))

    # ledger ---------------------------------------------------------------------------
    def append_ledger(self, *, run_id: str, kind: str, at: float, data: str,
                      seal: Callable[[int, str], str]) -> int:
        with self._tx() as c:
            # One appender at a time, across processes: the tip row is locked until commit,
            # and a waiting appender's FOR UPDATE returns the tip its predecessor committed.
            tip = c.execute("SELECT seq, hash FROM sg_ledger_tip WHERE id = 1 FOR UPDATE").fetchone()
            if tip is None:
                raise StoreError(f"store {self.url!r} has no ledger tip row; its schema was altered")
            seq, prev = int(tip[0]) + 1, str(tip[1])
            digest = seal(seq, prev)
            c.execute(
                f"WITH appended AS (INSERT INTO sg_ledger ({_LEDGER_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)) "
                "UPDATE sg_ledger_tip SET seq = %s, hash = %s WHERE id = 1",
                (seq, run_id, kind, at, data, prev, digest, seq, digest),
            )
            return seq

    def ledger_rows(self, *, run_id: str | None = None) -> list[LedgerRow]:
        sql = f"SELECT {_LEDGER_COLUMNS} FROM sg_ledger"
        rows = (self._read(sql + " WHERE run_id = %s ORDER BY seq", (run_id,)) if run_id is not None
                else self._read(sql + " ORDER BY seq"))
        return [LedgerRow(seq=r[0], run_id=r[1], kind=r[2], at=r[3], data=r[4], prev_hash=r[5], hash=r[6])
                for r in rows]

    def ledger_last(self) -> tuple[int, str] | None:
        rows = self._read("SELECT seq, hash FROM sg_ledger ORDER BY seq DESC LIMIT 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def save_ledger_head(self, head: LedgerHead) -> None:
        with self._tx() as c:
            # Never move the signed head backwards: a slower signer must not undo a newer one.
            c.execute(
                "INSERT INTO sg_ledger_head (id, seq, hash, domain, signature) VALUES (1, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
                "domain = excluded.domain, signature = excluded.signature "
                "WHERE excluded.seq >= sg_ledger_head.seq",
                (head.seq, head.hash, head.domain, head.signature),
            )

    def ledger_head(self) -> LedgerHead | None:
        rows = self._read("SELECT seq, hash, domain, signature FROM sg_ledger_head WHERE id = 1")
        if not rows:
            return None
        r = rows[0]
        return LedgerHead(seq=r[0], hash=r[1], domain=r[2], signature=r[3])

    # runs ---------------------------------------------------------------------------
    def upsert_run(self, run: RunRecord) -> None:
        with self._tx() as c:
            c.execute(
                f"INSERT INTO sg_runs ({RUN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
                (run.run_id, run.workflow, run.target, run.initiator, run.status,
                 run.created_at, run.updated_at),
            )

    def acquire_run(self, run_id: str, *, owner: str, until: float, now: float,
                    owner_alive: Callable[[str], bool]) -> str | None:
        with self._tx() as c:
            row = c.execute("SELECT lease_owner, lease_until FROM sg_runs WHERE run_id = %s FOR UPDATE",
                            (run_id,)).fetchone()
            if row is None:
                return None  # no record: nothing to guard
            holder = lease_holder(row, owner=owner, now=now, owner_alive=owner_alive)
            if holder is not None:
                return holder
            c.execute("UPDATE sg_runs SET lease_owner = %s, lease_until = %s WHERE run_id = %s",
                      (owner, until, run_id))
            return None

    def set_run_status(self, run_id: str, status: str, *, at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE sg_runs SET status = %s, updated_at = %s WHERE run_id = %s", (status, at, run_id))

    def release_run(self, run_id: str, *, owner: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE sg_runs SET lease_owner = NULL, lease_until = NULL "
                      "WHERE run_id = %s AND lease_owner = %s", (run_id, owner))

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM sg_runs WHERE run_id = %s", (run_id,))
        return run_from_row(rows[0]) if rows else None

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    # operator views (read-only queries for ``trace_view`` and ``usage_report``) ----------
    def list_runs(self, *, workflow: str | None = None) -> list[RunRecord]:
        sql = f"SELECT {RUN_COLUMNS} FROM sg_runs"
        rows = (self._read(sql + " WHERE workflow = %s ORDER BY created_at, run_id", (workflow,))
                if workflow is not None else self._read(sql + " ORDER BY created_at, run_id"))
        return [run_from_row(r) for r in rows]


# migrations -----------------------------------------------------------------------------
def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply the ``MIGRATIONS`` this database lacks, in order, in one transaction.

    The advisory lock makes a second process opening the same database wait, then find
    the work done. Returns the versions applied now.

    Raises:
        StoreError: the database holds a schema newer than this code knows.
        psycopg.Error: the database failed.
    """
    applied_now: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS sg_schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        applied = {int(r[0]) for r in conn.execute("SELECT version FROM sg_schema_migrations").fetchall()}
        known = MIGRATIONS[-1].version
        if applied and max(applied) > known:
            raise StoreError(f"the store's schema is at version {max(applied)}, newer than this "
                             f"scopegraph knows ({known}); upgrade scopegraph")
        for step in MIGRATIONS:
            if step.version in applied:
                continue
            conn.execute(step.sql)
            conn.execute("INSERT INTO sg_schema_migrations (version, name) VALUES (%s, %s)",
                         (step.version, step.name))
            applied_now.append(step.version)
    return applied_now


# LangGraph checkpoints --------------------------------------------------------------------
def checkpointer_for_postgres(
    store: PostgresStore | str,
) -> tuple[ConnectionPool[psycopg.Connection[DictRow]], PostgresSaver]:
    """A set-up LangGraph ``PostgresSaver`` on the store's database, and the pool to close.

    Pass the ``PostgresStore`` rather than its ``url``: the URL it shows has its
    password redacted. LangGraph is imported here, not at module level, so the store
    layer depends on it only when the runtime asks for checkpoints.

    Raises:
        StoreError: the database cannot be reached or the checkpoint tables cannot be made.
    """
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row

    conninfo = store._conninfo if isinstance(store, PostgresStore) else store
    shown = redact_url(conninfo)
    secrets = _secrets_of(conninfo)
    kwargs: dict[str, Any] = {**_connect_kwargs(conninfo, shown, secrets), "prepare_threshold": 0,
                              "row_factory": dict_row}
    try:
        # A direct connection fails fast when the server is down, where a pool would
        # keep retrying.
        with psycopg.connect(conninfo, **kwargs) as conn:
            _lock_for_checkpoint_setup(conn, shown)
            PostgresSaver(conn).setup()  # the lock ends with the session
    except psycopg.Error as exc:
        raise StoreError(f"cannot open checkpoints in {shown!r}: {_one_line(exc, secrets)}") from exc
    # The saver serialises its own use of the pool behind a lock; a second connection
    # only covers the swap after one breaks.
    pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
        conninfo, kwargs=kwargs, min_size=1, max_size=2, timeout=POOL_TIMEOUT_SECONDS,
        reconnect_timeout=POOL_TIMEOUT_SECONDS, open=False, name="scopegraph-checkpoints",
        connection_class=psycopg.Connection,
    )
    try:
        pool.open(wait=True, timeout=POOL_TIMEOUT_SECONDS)
    except psycopg.Error as exc:
        pool.close()
        raise StoreError(f"cannot open checkpoints in {shown!r}: {_one_line(exc, secrets)}") from exc
    saver = PostgresSaver(pool)
    return pool, saver


def _lock_for_checkpoint_setup(conn: psycopg.Connection[Any], shown: str) -> None:
    """Take the session lock that lets one process at a time run the saver's ``setup``.

    ``setup`` creates indexes CONCURRENTLY, which waits for every older transaction in
    the database to end, including a statement blocked in ``pg_advisory_lock``: waiting
    there would deadlock, so this polls with short ``pg_try_advisory_lock`` statements.
    """
    deadline = time.monotonic() + CHECKPOINT_SETUP_WAIT_SECONDS
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (_CHECKPOINT_SETUP_LOCK,)).fetchone()
        if row is not None and row["locked"]:
            return
        if time.monotonic() > deadline:
            raise StoreError(f"cannot open checkpoints in {shown!r}: another process has been setting "
                             f"them up for over {CHECKPOINT_SETUP_WAIT_SECONDS} s")
        time.sleep(0.05)


# helpers --------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``url`` with the password (in the user part or a ``password=`` parameter) shown as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable store URL>"
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    pairs = []
    for pair in parts.query.split("&") if parts.query else []:
        name, eq, _ = pair.partition("=")
        pairs.append(f"{name}=***" if unquote(name).lower() == "password" and eq else pair)
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(pairs), parts.fragment))


def _secrets_of(url: str) -> tuple[str, ...]:
    """Every spelling of the URL's passwords, to scrub from error messages."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found.update((raw, unquote(raw)))
        for pair in parts.query.split("&") if parts.query else []:
            name, _, value = pair.partition("=")
            if unquote(name).lower() == "password":
                found.update((value, unquote(value)))
    except ValueError:
        pass
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def _connect_kwargs(url: str, shown: str, secrets: tuple[str, ...]) -> dict[str, Any]:
    """Connection settings: autocommit (transactions are explicit), a bounded connect wait."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigError(f"invalid store URL {shown!r}: {_one_line(exc, secrets)}") from exc
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    if "application_name" not in params:
        kwargs["application_name"] = "scopegraph"
    return kwargs


def _one_line(exc: BaseException, secrets: tuple[str, ...]) -> str:
    """The first line of ``exc``'s message (details may quote row values), secrets scrubbed."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    for secret in secrets:
        text = text.replace(secret, "***")
    return text or type(exc).__name__


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        pass  # a broken connection has no transaction left; the pool discards it




def _run(r: TupleRow) -> RunRecord:
    return run_from_row(r)
