"""Every statement of the SQL stores, written once: the ``Store`` methods over any driver.

A backend (``SqliteStore``, ``PostgresStore``) supplies a connection with a transaction
begun on it, the end of that transaction, reads outside one, and the mapping of its
driver's errors; this class does the rest, in the words of the backend's ``Dialect``.

Transactions. Every write method runs in a transaction; inside ``atomic()`` the calls of
one thread join that one transaction (a nested block is not a savepoint), so a caller can
put any number of store operations in one commit. Ledger appends inside a transaction are
chained in order from the tip read (and, on PostgreSQL, locked) at the first append; their
rows are inserted together, in one statement, before the transaction reads the ledger or
commits, and the tip row is written once, just before the commit. A statement that fails
dooms its transaction, even if the caller catches the error: nothing of it is written.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

from ..errors import StoreError
from .base import (
    GRANT_COLUMNS,
    RUN_COLUMNS,
    ApproverRecord,
    CallRecord,
    GrantRecord,
    GrantState,
    LedgerHead,
    LedgerRow,
    RunRecord,
    StoreCounts,
    TrustKeyRecord,
    UseRecord,
    grant_from_row,
    lease_holder,
    refused_grant_state,
    run_from_row,
)
from .dialect import Dialect
from .secrets import SecretRecords
from .web_records import WebRecords

_LEDGER_COLUMNS = "seq, run_id, kind, at, data, prev_hash, hash"
_TRUST_KEY_COLUMNS = "purpose, kid, generation, public_jwk, origin, created_at, retired_at, endorsement"
_APPROVER_COLUMNS = "name, display, public_pem, kid, enrolled_at, removed_at, endorsement"
_LEDGER_ROWS_PER_INSERT = 100  # 7 parameters a row: well under SQLite's and PostgreSQL's limits
# ``json.dumps(..., default=str)`` makes an encoder per call; this one is made once (same text).
_observed_json = json.JSONEncoder(default=str).encode
_USE_COLUMNS = "jti, run_id, step_id, tool, attempt, outcome, decision, policy_ids, at, observed"


class Tx:
    """One open transaction: its connection, and where it has moved the ledger's tip to.

    With ``pipeline`` (a backend that pipelines, PostgreSQL), statements are sent without
    waiting for their results; reading a result (``rowcount``, ``fetchone``, ``fetchall``)
    sends everything queued and takes in the results, so statements whose results nobody
    reads share their round trip with the next read, or with the commit. A failed
    statement is then reported at that read or at the commit; it dooms the transaction
    either way.
    """

    __slots__ = ("conn", "failed", "tip", "tip_moved", "ledger_rows", "pipeline", "_store")

    def __init__(self, store: SqlStore, conn: Any, pipeline: Any = None) -> None:
        self._store = store
        self.conn = conn
        self.pipeline = pipeline
        self.failed = False
        self.tip: tuple[int, str] | None = None  # the chain's end as this transaction sees it
        self.tip_moved = False
        self.ledger_rows: list[tuple[Any, ...]] = []  # appended, not inserted yet

    def flush_ledger(self) -> None:
        """Insert the ledger rows appended so far, in as few statements as may be."""
        rows, self.ledger_rows = self.ledger_rows, []
        for start in range(0, len(rows), _LEDGER_ROWS_PER_INSERT):
            batch = rows[start:start + _LEDGER_ROWS_PER_INSERT]
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(batch))
            self.execute(self._store.dialect.sql(f"INSERT INTO sg_ledger ({_LEDGER_COLUMNS}) VALUES {marks}"),
                         [value for row in batch for value in row])

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (in the dialect already); a driver error dooms the transaction."""
        counts = self._store.counts
        counts.statements += 1
        if self.pipeline is None:
            counts.round_trips += 1
        try:
            cursor = self.conn.execute(sql, params)
        except self._store.driver_errors as exc:
            self.failed = True
            raise self._store.error(exc) from exc
        return cursor if self.pipeline is None else _Pending(self, cursor)

    # A store operation inside an open transaction joins it: the transaction is its own
    # scope then (nothing to begin or end), so no ``_Scope`` is made per statement.
    def __enter__(self) -> Tx:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> Literal[False]:
        return False  # the owner's scope ends the transaction; what was raised goes on

    def sync(self) -> None:
        """Send the statements queued in the pipeline and take in their results."""
        self._store.counts.round_trips += 1
        try:
            self.pipeline.sync()
        except self._store.driver_errors as exc:
            self.failed = True
            raise self._store.error(exc) from exc


class _Scope:
    """One store operation or ``atomic`` block: it joins this thread's open transaction,
    or begins one and ends it (committed, or rolled back if anything was raised)."""

    __slots__ = ("_store", "_tx", "_owner")

    def __init__(self, store: SqlStore) -> None:
        self._store = store
        self._tx: Tx | None = None
        self._owner = False

    def __enter__(self) -> Tx:
        joined = self._store._current.tx
        if joined is not None:
            self._tx = joined
            return joined
        self._owner = True
        self._tx = self._store._open()
        return self._tx

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: Any) -> Literal[False]:
        if self._owner and self._tx is not None:
            self._store._close(self._tx, exc)
        return False  # what was raised in the block goes on


class _Pending:
    """A pipelined statement's result, taken in when it is first read."""

    __slots__ = ("_tx", "_cursor")

    def __init__(self, tx: Tx, cursor: Any) -> None:
        self._tx = tx
        self._cursor = cursor

    def _ready(self) -> Any:
        if self._cursor.pgresult is None:
            self._tx.sync()
        return self._cursor

    @property
    def rowcount(self) -> int:
        return int(self._ready().rowcount)

    def fetchone(self) -> Any:
        cursor = self._ready()
        try:
            return cursor.fetchone()
        except self._tx._store.driver_errors as exc:
            self._tx.failed = True
            raise self._tx._store.error(exc) from exc

    def fetchall(self) -> list[Any]:
        cursor = self._ready()
        try:
            return list(cursor.fetchall())
        except self._tx._store.driver_errors as exc:
            self._tx.failed = True
            raise self._tx._store.error(exc) from exc


class _Current(threading.local):
    tx: Tx | None = None


class SqlStore(SecretRecords, WebRecords, ABC):
    """The ``Store`` protocol in SQL; subclasses connect, begin, end and map errors."""

    url: str
    dialect: Dialect
    driver_errors: tuple[type[BaseException], ...]

    def __init__(self) -> None:
        self._current = _Current()
        self.counts = StoreCounts()
        # A statement in this store's dialect (rendered once): the dialect's own method,
        # bound here, so a statement costs no call of ours to look it up.
        self._q: Callable[[str], str] = self.dialect.sql

    # what a backend supplies ---------------------------------------------------------------
    @abstractmethod
    def _begin(self) -> Any:
        """A connection with a write transaction begun on it (held by this thread until ``_end``)."""

    @abstractmethod
    def _end(self, conn: Any, *, commit: bool) -> None:
        """Commit or roll back ``conn``'s transaction, then give the connection back."""

    def _pipeline(self, conn: Any) -> Any:
        """The pipeline ``conn``'s transaction sends its statements through; ``None``: none."""
        return None

    @abstractmethod
    def _read_outside(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """The rows of one read, outside any transaction."""

    def error(self, exc: BaseException, doing: str = "failed") -> StoreError:
        """``exc`` (a driver error) as one line that names the store and no secret."""
        return StoreError(f"store {self.url!r} {doing}: {exc}")

    # transactions ------------------------------------------------------------------------
    def atomic(self) -> AbstractContextManager[None]:
        """Group several store calls into one transaction: all of them land, or none.

        Nested ``atomic`` blocks and the store's own methods, called from the same thread,
        join the outermost one; other threads have transactions of their own.

        Raises:
            StoreError: the database failed, or a statement inside the block failed (the
                whole transaction is then rolled back, even if the failure was caught
                inside the block).
        """
        return self._current.tx or _Scope(self)  # type: ignore[return-value]  # yields the Tx, which callers ignore

    def _tx(self) -> Tx | _Scope:
        """This thread's transaction: joined if one is open, begun (and ended) otherwise."""
        return self._current.tx or _Scope(self)

    def _open(self) -> Tx:
        conn = self._begin()
        tx = Tx(self, conn, self._pipeline(conn))
        self.counts.statements += 1  # BEGIN
        self.counts.round_trips += 1
        self._current.tx = tx
        return tx

    def _close(self, tx: Tx, failure: BaseException | None) -> None:
        """End ``tx``: commit it, or roll it back after ``failure`` (which the caller then
        raises) or a failed statement (raised here as a ``StoreError``)."""
        if failure is None:
            try:
                if tx.ledger_rows and not tx.failed:
                    tx.flush_ledger()
                if tx.failed:
                    raise StoreError(f"store {self.url!r} rolled a transaction back after a failed "
                                     "statement; nothing of it was written")
                if tx.tip_moved and tx.tip is not None:
                    tx.execute(self.dialect.sql("UPDATE sg_ledger_tip SET seq = ?, hash = ? WHERE id = 1"), tx.tip)
            except BaseException:
                self._roll_back(tx)
                raise
            self._current.tx = None
            self.counts.statements += 1  # COMMIT, with what a pipeline still holds
            self.counts.round_trips += 1
            self._end(tx.conn, commit=True)
            self.counts.commits += 1
            return
        self._roll_back(tx)

    def _roll_back(self, tx: Tx) -> None:
        self._current.tx = None
        self.counts.statements += 1  # ROLLBACK
        self.counts.round_trips += 1
        self._end(tx.conn, commit=False)

    def _rows(self, template: str, params: Sequence[Any] = ()) -> list[Any]:
        sql = self.dialect.sql(template)
        joined = self._current.tx
        if joined is not None:
            if joined.ledger_rows:
                joined.flush_ledger()  # the transaction reads what it wrote
            return list(joined.execute(sql, params).fetchall())
        self.counts.statements += 1
        self.counts.round_trips += 1
        return self._read_outside(sql, params)


    # keys ---------------------------------------------------------------------------------
    def load_signing_key(self, name: str) -> bytes | None:
        rows = self._rows("SELECT private_pem FROM sg_keys WHERE name = ?", (name,))
        return bytes(rows[0][0]) if rows else None

    # grants -------------------------------------------------------------------------------
    def add_grant(self, grant: GrantRecord, *, if_absent: bool = False) -> bool:
        conflict = " ON CONFLICT (jti) DO NOTHING" if if_absent else ""
        with self._tx() as tx:
            cur = tx.execute(self._q("INSERT INTO sg_grants (jti, run_id, step_id, tool, subject, issued_at, "
                                     "expires_at, max_uses, uses) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)" + conflict),
                             (grant.jti, grant.run_id, grant.step_id, grant.tool, grant.subject,
                              grant.issued_at, grant.expires_at, grant.max_uses, grant.uses))
            return bool(cur.rowcount == 1)

    def consume_grant_use(self, jti: str) -> GrantState:
        with self._tx() as tx:
            # Concurrent updaters of the row wait for each other (PostgreSQL re-checks the WHERE
            # against the winner's row; SQLite has one writer): exactly ``max_uses`` succeed.
            cur = tx.execute(self._q("UPDATE sg_grants SET uses = uses + 1 "
                                     "WHERE jti = ? AND revoked_at IS NULL AND uses < max_uses"), (jti,))
            if cur.rowcount == 1:
                return "ok"
            return refused_grant_state(tx.execute(
                self._q("SELECT revoked_at, uses, max_uses FROM sg_grants WHERE jti = ?"), (jti,)).fetchone())

    def grant_state(self, jti: str) -> GrantState:
        rows = self._rows("SELECT revoked_at, uses, max_uses FROM sg_grants WHERE jti = ?", (jti,))
        if rows and rows[0][0] is None and rows[0][1] < rows[0][2]:
            return "ok"
        return refused_grant_state(rows[0] if rows else None)

    def revoke_grant(self, jti: str, *, reason: str, at: float) -> bool:
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_grants SET revoked_at = ?, revoke_reason = ? "
                                     "WHERE jti = ? AND revoked_at IS NULL"), (at, reason, jti))
            return bool(cur.rowcount == 1)

    def revoke_run(self, run_id: str, *, reason: str, at: float) -> int:
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_grants SET revoked_at = ?, revoke_reason = ? "
                                     "WHERE run_id = ? AND revoked_at IS NULL"), (at, reason, run_id))
            return int(cur.rowcount)

    def grants_for_run(self, run_id: str) -> list[GrantRecord]:
        rows = self._rows(f"SELECT {GRANT_COLUMNS} FROM sg_grants WHERE run_id = ? ORDER BY issued_at, jti",
                          (run_id,))
        return [grant_from_row(r) for r in rows]

    # uses ---------------------------------------------------------------------------------
    def record_use(self, use: UseRecord) -> None:
        with self._tx() as tx:
            tx.execute(self._q(f"INSERT INTO sg_uses ({_USE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                       (use.jti, use.run_id, use.step_id, use.tool, use.attempt, use.outcome,
                        use.decision, json.dumps(list(use.policy_ids)), use.at,
                        _observed_json(dict(use.observed))))

    def uses_for_run(self, run_id: str) -> list[UseRecord]:
        rows = self._rows(f"SELECT {_USE_COLUMNS} FROM sg_uses WHERE run_id = ? ORDER BY id", (run_id,))
        return [UseRecord(jti=r[0], run_id=r[1], step_id=r[2], tool=r[3], attempt=r[4], outcome=r[5],
                          decision=r[6], policy_ids=tuple(json.loads(r[7])), at=r[8], observed=json.loads(r[9]))
                for r in rows]

    # approvals ----------------------------------------------------------------------------
    def add_approval(self, approval_id: str, run_id: str, payload: str) -> str:
        with self._tx() as tx:
            cur = tx.execute(self._q("INSERT INTO sg_approvals (id, run_id, payload, seq) "
                                     "VALUES (?, ?, ?, ${serial:sg_approvals.seq}) ON CONFLICT (id) DO NOTHING"),
                             (approval_id, run_id, payload))
            if cur.rowcount == 1:
                return payload
            row = tx.execute(self._q("SELECT payload FROM sg_approvals WHERE id = ?"), (approval_id,)).fetchone()
        return str(row[0])

    def get_approval(self, approval_id: str) -> str | None:
        rows = self._rows("SELECT payload FROM sg_approvals WHERE id = ?", (approval_id,))
        return str(rows[0][0]) if rows else None

    def list_approvals(self, *, run_id: str | None = None) -> list[str]:
        if run_id is None:
            rows = self._rows("SELECT payload FROM sg_approvals ORDER BY seq")
        else:
            rows = self._rows("SELECT payload FROM sg_approvals WHERE run_id = ? ORDER BY seq", (run_id,))
        return [str(r[0]) for r in rows]

    def update_approval(self, approval_id: str, mutate: Callable[[str], str]) -> str | None:
        # The row lock (PostgreSQL) or the one writer (SQLite) makes read-check-write atomic
        # across processes: a second consumer waits, then sees the first one's write, which
        # is what makes consumption exactly-once.
        with self._tx() as tx:
            row = tx.execute(self._q("SELECT payload FROM sg_approvals WHERE id = ?${for_update}"),
                             (approval_id,)).fetchone()
            if row is None:
                return None
            updated = mutate(str(row[0]))
            tx.execute(self._q("UPDATE sg_approvals SET payload = ? WHERE id = ?"), (updated, approval_id))
            return updated

    # idempotent tool calls ----------------------------------------------------------------
    def begin_call(self, key: str, *, run_id: str, step_id: str, tool: str, at: float) -> CallRecord | None:
        with self._tx() as tx:
            # Insert first: a concurrent inserter of the same key waits for us and finds our row.
            cur = tx.execute(self._q("INSERT INTO sg_calls (key, run_id, step_id, tool, status, started_at) "
                                     "VALUES (?, ?, ?, ?, 'started', ?) ON CONFLICT (key) DO NOTHING"),
                             (key, run_id, step_id, tool, at))
            if cur.rowcount == 1:
                return None
            row = tx.execute(self._q("SELECT status, result FROM sg_calls WHERE key = ?"), (key,)).fetchone()
        return CallRecord(key=key, status=row[0], result=row[1])

    def finish_call(self, key: str, *, status: str, result: str | None, at: float) -> None:
        with self._tx() as tx:
            tx.execute(self._q("UPDATE sg_calls SET status = ?, result = ?, finished_at = ? WHERE key = ?"),
                       (status, result, at, key))

    # ledger -------------------------------------------------------------------------------
    def append_ledger(self, *, run_id: str, kind: str, at: float, data: str,
                      seal: Callable[[int, str], str]) -> int:
        with self._tx() as tx:
            if tx.tip is None:
                # The tip, not the last row, says where the chain ends: records deleted from the
                # end leave a gap the next append does not paper over. Locking it makes appenders
                # in any number of processes wait for each other and form one chain.
                tip = tx.execute(self._q("SELECT seq, hash FROM sg_ledger_tip WHERE id = 1${for_update}")).fetchone()
                if tip is None:
                    raise StoreError(f"store {self.url!r} has no ledger tip row; its schema was altered")
                tx.tip = (int(tip[0]), str(tip[1]))
            seq, prev = tx.tip[0] + 1, tx.tip[1]
            digest = seal(seq, prev)
            tx.ledger_rows.append((seq, run_id, kind, at, data, prev, digest))
            tx.tip, tx.tip_moved = (seq, digest), True
            return seq

    def ledger_rows(self, *, run_id: str | None = None) -> list[LedgerRow]:
        sql = f"SELECT {_LEDGER_COLUMNS} FROM sg_ledger"
        rows = (self._rows(sql + " WHERE run_id = ? ORDER BY seq", (run_id,)) if run_id is not None
                else self._rows(sql + " ORDER BY seq"))
        return [LedgerRow(seq=r[0], run_id=r[1], kind=r[2], at=r[3], data=r[4], prev_hash=r[5], hash=r[6])
                for r in rows]

    def ledger_rows_after(self, seq: int, *, kinds: Sequence[str]) -> list[LedgerRow]:
        # The ledger's ``seq`` is given out under the tip's lock, so it grows in commit order:
        # a reader that has seen ``seq`` never later finds a smaller one appear.
        if not kinds:
            return []
        marks = ", ".join("?" * len(kinds))
        rows = self._rows(f"SELECT {_LEDGER_COLUMNS} FROM sg_ledger WHERE seq > ? AND kind IN ({marks}) ORDER BY seq",
                          (seq, *kinds))
        return [LedgerRow(seq=r[0], run_id=r[1], kind=r[2], at=r[3], data=r[4], prev_hash=r[5], hash=r[6])
                for r in rows]

    def ledger_last(self) -> tuple[int, str] | None:
        joined = self._current.tx
        if joined is not None and joined.tip is not None:
            tip = joined.tip
        else:
            rows = self._rows("SELECT seq, hash FROM sg_ledger_tip WHERE id = 1")
            tip = (int(rows[0][0]), str(rows[0][1])) if rows else (0, "")
        return tip if tip[0] > 0 else None

    def save_ledger_head(self, head: LedgerHead) -> None:
        with self._tx() as tx:
            # Never move the signed head backwards: a slower signer must not undo a newer one.
            tx.execute(self._q(
                "INSERT INTO sg_ledger_head (id, seq, hash, domain, signature, kid, witness_seq) "
                "VALUES (1, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
                "domain = excluded.domain, signature = excluded.signature, kid = excluded.kid, "
                "witness_seq = excluded.witness_seq "
                "WHERE excluded.seq >= sg_ledger_head.seq"),
                (head.seq, head.hash, head.domain, head.signature, head.kid, head.witness_seq))

    def ledger_head(self) -> LedgerHead | None:
        rows = self._rows("SELECT seq, hash, domain, signature, kid, witness_seq FROM sg_ledger_head WHERE id = 1")
        if not rows:
            return None
        r = rows[0]
        return LedgerHead(seq=r[0], hash=r[1], domain=r[2], signature=r[3], kid=r[4],
                          witness_seq=None if r[5] is None else int(r[5]))

    # trust roots: public keys and approvers -------------------------------------------------
    def trust_keys(self) -> list[TrustKeyRecord]:
        rows = self._rows(f"SELECT {_TRUST_KEY_COLUMNS} FROM sg_trust_keys ORDER BY created_at, purpose, generation")
        return [TrustKeyRecord(purpose=r[0], kid=r[1], generation=int(r[2]), public_jwk=r[3], origin=r[4],
                               created_at=r[5], retired_at=r[6], endorsement=r[7]) for r in rows]

    def add_trust_key(self, key: TrustKeyRecord) -> bool:
        with self._tx() as tx:
            cur = tx.execute(self._q(f"INSERT INTO sg_trust_keys ({_TRUST_KEY_COLUMNS}) "
                                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (purpose, kid) DO NOTHING"),
                             (key.purpose, key.kid, key.generation, key.public_jwk, key.origin, key.created_at,
                              key.retired_at, key.endorsement))
            return bool(cur.rowcount == 1)

    def retire_trust_keys(self, purpose: str, *, keep: str, at: float) -> None:
        with self._tx() as tx:
            tx.execute(self._q("UPDATE sg_trust_keys SET retired_at = ? "
                               "WHERE purpose = ? AND kid <> ? AND retired_at IS NULL"), (at, purpose, keep))

    def legacy_signing_keys(self) -> list[tuple[str, bytes]]:
        rows = self._rows("SELECT name, private_pem FROM sg_keys ORDER BY name")
        return [(str(r[0]), bytes(r[1])) for r in rows if r[1] is not None and len(r[1]) > 0]

    def erase_legacy_signing_keys(self) -> int:
        joined = self._current.tx is not None
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_keys SET private_pem = ? WHERE LENGTH(private_pem) > 0"), (b"",))
            erased = int(cur.rowcount)
        if not joined:
            self._after_erase()
        return erased

    def _after_erase(self) -> None:
        """What a backend does, after a commit, so that erased bytes leave its files."""

    def lock_trust_keys(self) -> None:
        with self._tx() as tx:
            self._lock_trust_keys(tx)

    def _lock_trust_keys(self, tx: Tx) -> None:
        """Hold the lock that serialises making keys until ``tx`` ends (SQLite: its one writer)."""

    def add_approver(self, approver: ApproverRecord) -> bool:
        with self._tx() as tx:
            found = tx.execute(self._q("SELECT 1 FROM sg_approvers WHERE name = ? AND removed_at IS NULL"
                                       "${for_update}"), (approver.name,)).fetchone()
            if found is not None:
                return False
            tx.execute(self._q(f"INSERT INTO sg_approvers ({_APPROVER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                       (approver.name, approver.display, approver.public_pem, approver.kid, approver.enrolled_at,
                        approver.removed_at, approver.endorsement))
            return True

    def remove_approver(self, name: str, *, at: float) -> bool:
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_approvers SET removed_at = ? WHERE name = ? AND removed_at IS NULL"),
                             (at, name))
            return bool(cur.rowcount == 1)

    def list_approvers(self, *, include_removed: bool = False) -> list[ApproverRecord]:
        sql = f"SELECT {_APPROVER_COLUMNS} FROM sg_approvers"
        rows = self._rows(sql + (" ORDER BY id" if include_removed else " WHERE removed_at IS NULL ORDER BY id"))
        return [ApproverRecord(name=r[0], display=r[1], public_pem=r[2], kid=r[3], enrolled_at=r[4],
                               removed_at=r[5], endorsement=r[6]) for r in rows]

    # runs ---------------------------------------------------------------------------------
    def upsert_run(self, run: RunRecord) -> None:
        with self._tx() as tx:
            tx.execute(self._q(f"INSERT INTO sg_runs ({RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                               "ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, "
                               "updated_at = excluded.updated_at"),
                       (run.run_id, run.workflow, run.target, run.initiator, run.status,
                        run.created_at, run.updated_at))

    def acquire_run(self, run_id: str, *, owner: str, until: float, now: float,
                    owner_alive: Callable[[str], bool]) -> str | None:
        with self._tx() as tx:
            row = tx.execute(self._q("SELECT lease_owner, lease_until FROM sg_runs WHERE run_id = ?${for_update}"),
                             (run_id,)).fetchone()
            if row is None:
                return None  # no record: nothing to guard
            holder = lease_holder(row, owner=owner, now=now, owner_alive=owner_alive)
            if holder is not None:
                return holder
            tx.execute(self._q("UPDATE sg_runs SET lease_owner = ?, lease_until = ? WHERE run_id = ?"),
                       (owner, until, run_id))
            return None

    def set_run_status(self, run_id: str, status: str, *, at: float) -> None:
        with self._tx() as tx:
            tx.execute(self._q("UPDATE sg_runs SET status = ?, updated_at = ? WHERE run_id = ?"),
                       (status, at, run_id))

    def release_run(self, run_id: str, *, owner: str) -> None:
        with self._tx() as tx:
            tx.execute(self._q("UPDATE sg_runs SET lease_owner = NULL, lease_until = NULL "
                               "WHERE run_id = ? AND lease_owner = ?"), (run_id, owner))

    def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._rows(f"SELECT {RUN_COLUMNS} FROM sg_runs WHERE run_id = ?", (run_id,))
        return run_from_row(rows[0]) if rows else None

    # operator views (read-only queries for ``trace_view`` and ``usage_report``) --------------
    def list_runs(self, *, workflow: str | None = None) -> list[RunRecord]:
        sql = f"SELECT {RUN_COLUMNS} FROM sg_runs"
        rows = (self._rows(sql + " WHERE workflow = ? ORDER BY created_at, run_id", (workflow,))
                if workflow is not None else self._rows(sql + " ORDER BY created_at, run_id"))
        return [run_from_row(r) for r in rows]
