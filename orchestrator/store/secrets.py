"""Records of downstream credentials: handles, never secrets.

A broker's credential is recorded *before* it exists downstream (state ``issuing``),
then marked ``issued``, and ``revoked`` once destroyed, so a crash at any point leaves a
record the sweep can act on. An exchanged token is recorded the same way, with the uses
its audience has made of it (``max_uses`` bounds them).

``SecretRecords`` is mixed into the SQL store: its statements are written once, in the
words of the store's ``Dialect``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

SecretState = Literal["issuing", "issued", "revoked"]
LIVE_STATES = ("issuing", "issued")
UseState = Literal["ok", "unknown", "revoked", "exhausted"]

SECRET_COLUMNS = ("handle, run_id, step_id, tool, workflow, name, broker, kind, principal, grant_id, "
                  "issued_at, expires_at, max_uses, uses, state, revoked_at, revoke_reason")


@dataclass(frozen=True, kw_only=True)
class SecretRecord:
    """What the store keeps of one downstream credential."""

    handle: str
    run_id: str
    step_id: str
    tool: str
    workflow: str
    name: str  # the tool parameter (or, for an exchanged token, its audience)
    broker: str
    kind: str  # "ephemeral" | "static"
    principal: str  # the downstream name: a role, an audience, a secret's name
    grant_id: str | None
    issued_at: float
    expires_at: float | None = None
    max_uses: int | None = None
    uses: int = 0
    state: SecretState = "issuing"
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(frozen=True, kw_only=True)
class SweepCandidate:
    """A live credential, with what says whether its step still runs."""

    record: SecretRecord
    lease_owner: str | None
    lease_until: float | None
    live_grants: int  # unrevoked, unexpired grants of its step


def secret_from_row(r: Sequence[Any]) -> SecretRecord:
    return SecretRecord(handle=r[0], run_id=r[1], step_id=r[2], tool=r[3], workflow=r[4], name=r[5],
                        broker=r[6], kind=r[7], principal=r[8], grant_id=r[9], issued_at=r[10],
                        expires_at=r[11], max_uses=r[12], uses=r[13], state=r[14], revoked_at=r[15],
                        revoke_reason=r[16])


class _Tx(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...


class _Sql(Protocol):
    def _tx(self) -> AbstractContextManager[Any]: ...

    def _rows(self, template: str, params: Sequence[Any] = ()) -> list[Any]: ...

    def _q(self, template: str) -> str: ...


class SecretRecords:
    """The store's statements for downstream credentials (mixed into ``SqlStore``)."""

    def add_secret(self: _Sql, record: SecretRecord) -> None:
        """Record a credential about to be made (or, for a static one, handed out)."""
        with self._tx() as tx:
            tx.execute(self._q(f"INSERT INTO sg_secrets ({SECRET_COLUMNS}) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                       (record.handle, record.run_id, record.step_id, record.tool, record.workflow, record.name,
                        record.broker, record.kind, record.principal, record.grant_id, record.issued_at,
                        record.expires_at, record.max_uses, record.uses, record.state, record.revoked_at,
                        record.revoke_reason))

    def mark_secret_issued(self: _Sql, handle: str, *, principal: str, expires_at: float | None) -> bool:
        """The credential exists downstream now, as ``principal``; ``False`` if it was revoked meanwhile."""
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_secrets SET state = 'issued', principal = ?, expires_at = ? "
                                     "WHERE handle = ? AND state = 'issuing'"), (principal, expires_at, handle))
            return bool(cur.rowcount == 1)

    def use_secret(self: _Sql, handle: str) -> UseState:
        """Count one use of a live credential, atomically with its state and ``max_uses``."""
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_secrets SET uses = uses + 1 WHERE handle = ? AND state = 'issued' "
                                     "AND (max_uses IS NULL OR uses < max_uses)"), (handle,))
            if cur.rowcount == 1:
                return "ok"
            row = tx.execute(self._q("SELECT state FROM sg_secrets WHERE handle = ?"), (handle,)).fetchone()
        if row is None:
            return "unknown"
        return "exhausted" if row[0] == "issued" else "revoked"

    def revoke_secret(self: _Sql, handle: str, *, reason: str, at: float) -> bool:
        """Mark a credential destroyed; ``False`` if it already was."""
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_secrets SET state = 'revoked', revoked_at = ?, revoke_reason = ? "
                                     "WHERE handle = ? AND state <> 'revoked'"), (at, reason, handle))
            return bool(cur.rowcount == 1)

    def get_secret(self: _Sql, handle: str) -> SecretRecord | None:
        rows = self._rows(f"SELECT {SECRET_COLUMNS} FROM sg_secrets WHERE handle = ?", (handle,))
        return secret_from_row(rows[0]) if rows else None

    def secrets_for_run(self: _Sql, run_id: str) -> list[SecretRecord]:
        rows = self._rows(f"SELECT {SECRET_COLUMNS} FROM sg_secrets WHERE run_id = ? ORDER BY issued_at, handle",
                          (run_id,))
        return [secret_from_row(r) for r in rows]

    def live_secrets(self: _Sql, run_id: str, step_id: str | None = None) -> list[SecretRecord]:
        """The live credentials of a run (of one step and its delegated children, with ``step_id``)."""
        sql = f"SELECT {SECRET_COLUMNS} FROM sg_secrets WHERE run_id = ? AND state <> 'revoked'"
        if step_id is None:
            rows = self._rows(sql + " ORDER BY issued_at, handle", (run_id,))
        else:
            rows = self._rows(sql + " AND (step_id = ? OR step_id LIKE ? ESCAPE '\\') ORDER BY issued_at, handle",
                              (run_id, step_id, _like_prefix(step_id + ".")))
        return [secret_from_row(r) for r in rows]

    def secret_sweep_candidates(self: _Sql, *, now: float) -> list[SweepCandidate]:
        """Every live credential, with its run's lease and its step's live grants."""
        cols = ", ".join(f"s.{c.strip()}" for c in SECRET_COLUMNS.split(","))
        rows = self._rows(
            f"SELECT {cols}, r.lease_owner, r.lease_until, "
            "(SELECT COUNT(*) FROM sg_grants g WHERE g.run_id = s.run_id AND g.step_id = s.step_id "
            " AND g.revoked_at IS NULL AND g.expires_at > ?) "
            "FROM sg_secrets s LEFT JOIN sg_runs r ON r.run_id = s.run_id "
            "WHERE s.state <> 'revoked' ORDER BY s.issued_at, s.handle", (now,))
        n = len(SECRET_COLUMNS.split(","))
        return [SweepCandidate(record=secret_from_row(r[:n]), lease_owner=r[n], lease_until=r[n + 1],
                               live_grants=int(r[n + 2])) for r in rows]


def _like_prefix(text: str) -> str:
    r"""A LIKE pattern matching strings that start with ``text`` (``%``, ``_`` and ``\`` escaped)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
