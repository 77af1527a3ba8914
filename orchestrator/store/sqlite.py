"""The embedded store: one SQLite file shared with LangGraph's SQLite checkpointer."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tenacity import RetryError, retry, retry_if_exception, stop_after_delay, wait_random

from ..errors import StoreError
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

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sg_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sg_keys (
    name TEXT PRIMARY KEY, private_pem BLOB NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sg_grants (
    jti TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    subject TEXT NOT NULL, issued_at REAL NOT NULL, expires_at REAL NOT NULL,
    max_uses INTEGER NOT NULL, uses INTEGER NOT NULL DEFAULT 0,
    revoked_at REAL, revoke_reason TEXT);
CREATE INDEX IF NOT EXISTS sg_grants_run ON sg_grants (run_id);
CREATE TABLE IF NOT EXISTS sg_uses (
    id INTEGER PRIMARY KEY AUTOINCREMENT, jti TEXT NOT NULL, run_id TEXT NOT NULL,
    step_id TEXT NOT NULL, tool TEXT NOT NULL, attempt INTEGER NOT NULL, outcome TEXT NOT NULL,
    decision TEXT NOT NULL, policy_ids TEXT NOT NULL, at REAL NOT NULL, observed TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS sg_uses_run ON sg_uses (run_id);
CREATE TABLE IF NOT EXISTS sg_approvals (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, payload TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sg_approvals_run ON sg_approvals (run_id);
CREATE TABLE IF NOT EXISTS sg_calls (
    key TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    status TEXT NOT NULL, result TEXT, started_at REAL NOT NULL, finished_at REAL);
CREATE TABLE IF NOT EXISTS sg_ledger (
    seq INTEGER PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL, at REAL NOT NULL,
    data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS sg_ledger_run ON sg_ledger (run_id);
CREATE TABLE IF NOT EXISTS sg_ledger_tip (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sg_ledger_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL,
    domain TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sg_runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, target TEXT NOT NULL,
    initiator TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, lease_owner TEXT, lease_until REAL);
"""


class SqliteStore:
    """A ``Store`` in one SQLite file (WAL mode, one serialised connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.RLock()
        # Only the thread holding the (reentrant) lock touches this: no other guard needed.
        self._depth = 0
        self._doomed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._set_up()
        except RetryError as exc:
            raise StoreError(f"cannot open store {self.url!r}: {exc.last_attempt.exception()}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {self.url!r}: {exc}") from exc

    # Switching a fresh file to WAL while another process does the same can fail with
    # "database is locked" without waiting on the busy timeout: retry that, briefly.
    @retry(retry=retry_if_exception(lambda e: isinstance(e, sqlite3.OperationalError) and "locked" in str(e)),
           stop=stop_after_delay(10), wait=wait_random(0.005, 0.05))
    def _set_up(self) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash; only an OS crash can
        # lose the last transactions, the trade LangGraph's own saver makes.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("BEGIN IMMEDIATE")  # waits on the busy timeout, unlike executescript
        try:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._conn.execute(statement)
            self._conn.execute(
                "INSERT OR IGNORE INTO sg_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """Group several store calls into one transaction: all of them land, or none.

        Nested ``atomic`` blocks and the store's own methods join the outermost one.
        """
        with self._tx():
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._depth:  # already inside this thread's transaction: join it
                self._depth += 1
                try:
                    yield self._conn
                except sqlite3.Error as exc:
                    # A failed statement dooms the whole transaction, as on PostgreSQL,
                    # even if the caller catches the error and carries on.
                    self._doomed = True
                    raise StoreError(f"store {self.url!r} failed: {exc}") from exc
                finally:
                    self._depth -= 1
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._depth, self._doomed = 1, False
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                finally:
                    self._depth = 0
                if self._doomed:
                    self._conn.execute("ROLLBACK")
                    raise StoreError(f"store {self.url!r}: a statement in this transaction failed; "
                                     "nothing of it was written")
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.url!r} failed: {exc}") from exc

    def _read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.url!r} failed: {exc}") from exc

    # keys ---------------------------------------------------------------------------
    def load_signing_key(self, name: str) -> bytes | None:
        rows = self._read("SELECT private_pem FROM sg_keys WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None  # type: ignore[call-overload]

    def save_signing_key(self, name: str, private_pem: bytes, created_at: float) -> bytes:
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO sg_keys (name, private_pem, created_at) VALUES (?, ?, ?)",
                (name, private_pem, created_at),
            )
            row = c.execute("SELECT private_pem FROM sg_keys WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    # grants -------------------------------------------------------------------------
    def add_grant(self, grant: GrantRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_grants (jti, run_id, step_id, tool, subject, issued_at, "
                "expires_at, max_uses, uses) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (grant.jti, grant.run_id, grant.step_id, grant.tool, grant.subject,
                 grant.issued_at, grant.expires_at, grant.max_uses),
            )

    def consume_grant_use(self, jti: str) -> GrantState:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sg_grants SET uses = uses + 1 "
                "WHERE jti = ? AND revoked_at IS NULL AND uses < max_uses",
                (jti,),
            )
            if cur.rowcount == 1:
                return "ok"
            return refused_grant_state(c.execute(
                "SELECT revoked_at, uses, max_uses FROM sg_grants WHERE jti = ?", (jti,)
            ).fetchone())

    def grant_state(self, jti: str) -> GrantState:
        rows = self._read("SELECT revoked_at, uses, max_uses FROM sg_grants WHERE jti = ?", (jti,))
        if rows and rows[0][0] is None and rows[0][1] < rows[0][2]:  # type: ignore[operator]
            return "ok"
        return refused_grant_state(rows[0] if rows else None)

    def revoke_grant(self, jti: str, *, reason: str, at: float) -> bool:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sg_grants SET revoked_at = ?, revoke_reason = ? "
                "WHERE jti = ? AND revoked_at IS NULL",
                (at, reason, jti),
            )
            return cur.rowcount == 1

    def revoke_run(self, run_id: str, *, reason: str, at: float) -> int:
        with self._tx() as c:
            cur = c.execute(
                "UPDATE sg_grants SET revoked_at = ?, revoke_reason = ? "
                "WHERE run_id = ? AND revoked_at IS NULL",
                (at, reason, run_id),
            )
            return cur.rowcount

    def grants_for_run(self, run_id: str) -> list[GrantRecord]:
        rows = self._read(
            f"SELECT {GRANT_COLUMNS} FROM sg_grants WHERE run_id = ? ORDER BY issued_at, jti",
            (run_id,),
        )
        return [grant_from_row(r) for r in rows]

    # uses ---------------------------------------------------------------------------
    def record_use(self, use: UseRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_uses (jti, run_id, step_id, tool, attempt, outcome, decision, "
                "policy_ids, at, observed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (use.jti, use.run_id, use.step_id, use.tool, use.attempt, use.outcome,
                 use.decision, json.dumps(list(use.policy_ids)), use.at,
                 json.dumps(dict(use.observed), default=str)),
            )

    def uses_for_run(self, run_id: str) -> list[UseRecord]:
        rows = self._read(
            "SELECT jti, run_id, step_id, tool, attempt, outcome, decision, policy_ids, at, observed "
            "FROM sg_uses WHERE run_id = ? ORDER BY id",
            (run_id,),
        )
        return [
            UseRecord(jti=r[0], run_id=r[1], step_id=r[2], tool=r[3], attempt=r[4],  # type: ignore[arg-type]
                      outcome=r[5], decision=r[6], policy_ids=tuple(json.loads(r[7])), at=r[8],  # type: ignore[arg-type]
                      observed=json.loads(r[9]))  # type: ignore[arg-type]
            for r in rows
        ]

    # approvals ----------------------------------------------------------------------
    def add_approval(self, approval_id: str, run_id: str, payload: str) -> str:
        with self._tx() as c:
            c.execute(
                "INSERT OR IGNORE INTO sg_approvals (id, run_id, payload, seq) VALUES "
                "(?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM sg_approvals))",
                (approval_id, run_id, payload),
            )
            return str(c.execute("SELECT payload FROM sg_approvals WHERE id = ?", (approval_id,)).fetchone()[0])

    def get_approval(self, approval_id: str) -> str | None:
        rows = self._read("SELECT payload FROM sg_approvals WHERE id = ?", (approval_id,))
        return str(rows[0][0]) if rows else None

    def list_approvals(self, *, run_id: str | None = None) -> list[str]:
        if run_id is None:
            rows = self._read("SELECT payload FROM sg_approvals ORDER BY seq")
        else:
            rows = self._read("SELECT payload FROM sg_approvals WHERE run_id = ? ORDER BY seq", (run_id,))
        return [str(r[0]) for r in rows]

    def update_approval(self, approval_id: str, mutate: Callable[[str], str]) -> str | None:
        # BEGIN IMMEDIATE takes the write lock first: read-check-write is atomic across
        # threads and processes, which is what makes consumption exactly-once.
        with self._tx() as c:
            row = c.execute("SELECT payload FROM sg_approvals WHERE id = ?", (approval_id,)).fetchone()
            if row is None:
                return None
            updated = mutate(str(row[0]))
            c.execute("UPDATE sg_approvals SET payload = ? WHERE id = ?", (updated, approval_id))
            return updated

    # idempotent tool calls -------------------------------------------------------------
    def begin_call(self, key: str, *, run_id: str, step_id: str, tool: str, at: float) -> CallRecord | None:
        with self._tx() as c:
            row = c.execute("SELECT status, result FROM sg_calls WHERE key = ?", (key,)).fetchone()
            if row is not None:
                return CallRecord(key=key, status=row[0], result=row[1])
            c.execute(
                "INSERT INTO sg_calls (key, run_id, step_id, tool, status, started_at) "
                "VALUES (?, ?, ?, ?, 'started', ?)",
                (key, run_id, step_id, tool, at),
            )
            return None

    def finish_call(self, key: str, *, status: str, result: str | None, at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE sg_calls SET status = ?, result = ?, finished_at = ? WHERE key = ?",
                      (status, result, at, key))

    # ledger ---------------------------------------------------------------------------
    def append_ledger(self, *, run_id: str, kind: str, at: float, data: str,
                      seal: Callable[[int, str], str]) -> int:
        with self._tx() as c:
            # The tip, not the last row, says where the chain ends: deleting records from the
            # end leaves a gap the next append cannot paper over.
            last = c.execute("SELECT seq, hash FROM sg_ledger_tip WHERE id = 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, "0" * 64)
            digest = seal(seq, prev)
            c.execute(
                "INSERT INTO sg_ledger (seq, run_id, kind, at, data, prev_hash, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, run_id, kind, at, data, prev, digest),
            )
            c.execute("INSERT INTO sg_ledger_tip (id, seq, hash) VALUES (1, ?, ?) "
                      "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                      (seq, digest))
            return int(seq)

    def ledger_rows(self, *, run_id: str | None = None) -> list[LedgerRow]:
        sql = "SELECT seq, run_id, kind, at, data, prev_hash, hash FROM sg_ledger"
        rows = (self._read(sql + " WHERE run_id = ? ORDER BY seq", (run_id,)) if run_id is not None
                else self._read(sql + " ORDER BY seq"))
        return [LedgerRow(seq=r[0], run_id=r[1], kind=r[2], at=r[3], data=r[4],  # type: ignore[arg-type]
                          prev_hash=r[5], hash=r[6]) for r in rows]  # type: ignore[arg-type]

    def ledger_last(self) -> tuple[int, str] | None:
        rows = self._read("SELECT seq, hash FROM sg_ledger_tip WHERE id = 1")
        return (int(rows[0][0]), str(rows[0][1])) if rows else None  # type: ignore[call-overload]

    def save_ledger_head(self, head: LedgerHead) -> None:
        with self._tx() as c:
            # Never move the signed head backwards: a slower signer must not undo a newer one.
            c.execute(
                "INSERT INTO sg_ledger_head (id, seq, hash, domain, signature) VALUES (1, ?, ?, ?, ?) "
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
        return LedgerHead(seq=r[0], hash=r[1], domain=r[2], signature=r[3])  # type: ignore[arg-type]

    # runs ---------------------------------------------------------------------------
    def upsert_run(self, run: RunRecord) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO sg_runs (run_id, workflow, target, initiator, status, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                "status = excluded.status, updated_at = excluded.updated_at",
                (run.run_id, run.workflow, run.target, run.initiator, run.status,
                 run.created_at, run.updated_at),
            )

    def acquire_run(self, run_id: str, *, owner: str, until: float, now: float,
                    owner_alive: Callable[[str], bool]) -> str | None:
        with self._tx() as c:
            row = c.execute("SELECT lease_owner, lease_until FROM sg_runs WHERE run_id = ?",
                            (run_id,)).fetchone()
            if row is None:
                return None  # no record: nothing to guard
            holder = lease_holder(row, owner=owner, now=now, owner_alive=owner_alive)
            if holder is not None:
                return holder
            c.execute("UPDATE sg_runs SET lease_owner = ?, lease_until = ? WHERE run_id = ?",
                      (owner, until, run_id))
            return None

    def set_run_status(self, run_id: str, status: str, *, at: float) -> None:
        with self._tx() as c:
            c.execute("UPDATE sg_runs SET status = ?, updated_at = ? WHERE run_id = ?", (status, at, run_id))

    def release_run(self, run_id: str, *, owner: str) -> None:
        with self._tx() as c:
            c.execute("UPDATE sg_runs SET lease_owner = NULL, lease_until = NULL "
                      "WHERE run_id = ? AND lease_owner = ?", (run_id, owner))

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM sg_runs WHERE run_id = ?", (run_id,))
        return run_from_row(rows[0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"

    # operator views (read-only queries for ``trace_view`` and ``usage_report``) ----------
    def list_runs(self, *, workflow: str | None = None) -> list[RunRecord]:
        sql = f"SELECT {RUN_COLUMNS} FROM sg_runs"
        rows = (self._read(sql + " WHERE workflow = ? ORDER BY created_at, run_id", (workflow,))
                if workflow is not None else self._read(sql + " ORDER BY created_at, run_id"))
        return [run_from_row(r) for r in rows]


