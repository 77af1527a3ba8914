"""The durable store's plug point: keys, grants, revocations, uses and runs.

Checkpoints live beside these tables in the same database, but the store knows
nothing of LangGraph; the runtime asks it only for its URL and location.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

UseOutcome = Literal["ok", "denied", "error"]
GrantState = Literal["ok", "unknown", "revoked", "exhausted"]


@dataclass(frozen=True, kw_only=True)
class GrantRecord:
    """What the store keeps of a grant: its claims' facts, never the token."""

    jti: str
    run_id: str
    step_id: str
    tool: str
    subject: str
    issued_at: float
    expires_at: float
    max_uses: int
    uses: int = 0
    revoked_at: float | None = None
    revoke_reason: str | None = None


@dataclass(frozen=True, kw_only=True)
class UseRecord:
    """One attempt to use a grant, allowed or not."""

    jti: str
    run_id: str
    step_id: str
    tool: str
    attempt: int
    outcome: UseOutcome
    decision: str
    policy_ids: tuple[str, ...]
    at: float
    observed: Mapping[str, Any] = field(default_factory=dict)  # numeric arguments, for narrowing


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    run_id: str
    workflow: str
    target: str
    initiator: str
    status: str
    created_at: float
    updated_at: float


@dataclass(frozen=True, kw_only=True)
class CallRecord:
    """An idempotency record: a tool call that was started, and how it ended."""

    key: str
    status: str  # "started" | "ok" | "error"
    result: str | None  # canonical JSON of the value, when ok


@dataclass(frozen=True, kw_only=True)
class LedgerRow:
    seq: int
    run_id: str
    kind: str
    at: float
    data: str  # canonical JSON
    prev_hash: str
    hash: str


@dataclass(frozen=True, kw_only=True)
class LedgerHead:
    """The signed chain head: record ``seq`` had hash ``hash`` when ``domain`` signed it."""

    seq: int
    hash: str
    domain: str
    signature: str
    kid: str | None = None  # the ledger key that signed it (None: a head signed before keystores)
    witness_seq: int | None = None  # the witness entry written with it (None: before the witness)


@dataclass(frozen=True, kw_only=True)
class TrustKeyRecord:
    """A public key the store knows, never a private one.

    ``origin`` is ``keystore`` (the keystore holds the private key, or held it before a
    rotation) or ``migrated`` (the public half of a key an old release kept in the store,
    vouched for by ``endorsement``, a signature of the keystore's ledger key).
    """

    purpose: str
    kid: str
    generation: int
    public_jwk: str  # JSON
    origin: str
    created_at: float
    retired_at: float | None = None
    endorsement: str | None = None


@dataclass(frozen=True, kw_only=True)
class ApproverRecord:
    """An enrolled approver: normalised name, public key, and the keystore's endorsement of both."""

    name: str
    display: str
    public_pem: str
    kid: str
    enrolled_at: float
    endorsement: str
    removed_at: float | None = None


@dataclass
class StoreCounts:
    """What a store has asked of its database, counted as it goes (for benchmarks and
    structural tests): every statement sent, ``BEGIN`` and ``COMMIT`` included, the
    round trips they took (statements a PostgreSQL transaction pipelines share one), and
    the transactions committed."""

    statements: int = 0
    round_trips: int = 0
    commits: int = 0


class Store(Protocol):
    """Everything durable that is not a checkpoint."""

    url: str
    counts: StoreCounts

    def atomic(self) -> AbstractContextManager[None]:
        """A transaction that nested store calls (from this thread) join."""
        ...

    def load_signing_key(self, name: str) -> bytes | None: ...

    def add_grant(self, grant: GrantRecord, *, if_absent: bool = False) -> bool:
        """Insert ``grant``; return whether it was inserted. A grant already stored is an
        error, or with ``if_absent`` a no-op (a deferred grant written by whoever comes first)."""
        ...

    def consume_grant_use(self, jti: str) -> GrantState:
        """Atomically take one use of ``jti`` if it is known, unrevoked and has uses left."""
        ...

    def grant_state(self, jti: str) -> GrantState: ...

    def revoke_grant(self, jti: str, *, reason: str, at: float) -> bool: ...

    def revoke_run(self, run_id: str, *, reason: str, at: float) -> int:
        """Revoke every unrevoked grant of ``run_id``; return how many were revoked now."""
        ...

    def grants_for_run(self, run_id: str) -> list[GrantRecord]: ...

    def record_use(self, use: UseRecord) -> None: ...

    def uses_for_run(self, run_id: str) -> list[UseRecord]: ...

    def add_approval(self, approval_id: str, run_id: str, payload: str) -> str:
        """Insert unless present; return the stored payload (JSON)."""
        ...

    def get_approval(self, approval_id: str) -> str | None: ...

    def list_approvals(self, *, run_id: str | None = None) -> list[str]: ...

    def update_approval(self, approval_id: str, mutate: Callable[[str], str]) -> str | None:
        """Atomically replace the payload with ``mutate(payload)``; ``mutate`` may raise to abort."""
        ...

    def begin_call(self, key: str, *, run_id: str, step_id: str, tool: str, at: float) -> CallRecord | None:
        """Record that a call starts; return the earlier record if the key was seen before."""
        ...

    def finish_call(self, key: str, *, status: str, result: str | None, at: float) -> None: ...

    def append_ledger(self, *, run_id: str, kind: str, at: float, data: str,
                      seal: Callable[[int, str], str]) -> int:
        """Append atomically: ``seal(seq, prev_hash)`` computes the new record's hash."""
        ...

    def ledger_rows(self, *, run_id: str | None = None) -> list[LedgerRow]: ...

    def ledger_rows_after(self, seq: int, *, kinds: Sequence[str]) -> list[LedgerRow]:
        """The ledger records after ``seq`` whose kind is one of ``kinds``, oldest first.

        Records become visible in ``seq`` order (a record committed later never has a smaller
        ``seq``), so ``seq`` is a cursor that misses nothing."""
        ...

    def ledger_last(self) -> tuple[int, str] | None: ...

    def save_ledger_head(self, head: LedgerHead) -> None: ...

    def ledger_head(self) -> LedgerHead | None: ...

    # trust roots: public keys and approvers (private keys live in a keystore) -----------
    def trust_keys(self) -> list[TrustKeyRecord]:
        """Every public key the store records, oldest first."""
        ...

    def add_trust_key(self, key: TrustKeyRecord) -> bool:
        """Record ``key`` unless its ``(purpose, kid)`` is recorded; return whether it was added."""
        ...

    def retire_trust_keys(self, purpose: str, *, keep: str, at: float) -> None:
        """Mark every unretired key of ``purpose`` except ``keep`` retired at ``at``."""
        ...

    def legacy_signing_keys(self) -> list[tuple[str, bytes]]:
        """The private keys an old release kept in ``sg_keys`` (name, PEM), not yet erased."""
        ...

    def erase_legacy_signing_keys(self) -> int:
        """Empty ``sg_keys.private_pem`` everywhere; return how many keys were erased.

        Called outside a transaction, the backend also drops the old bytes from its files
        where it can (SQLite: zeroed pages, WAL checkpointed).
        """
        ...

    def lock_trust_keys(self) -> None:
        """Inside ``atomic()``: hold, until it ends, the lock that serialises making keys."""
        ...

    def add_approver(self, approver: ApproverRecord) -> bool:
        """Enrol unless someone of that name is enrolled; return whether it was added."""
        ...

    def remove_approver(self, name: str, *, at: float) -> bool: ...

    def list_approvers(self, *, include_removed: bool = False) -> list[ApproverRecord]: ...

    def upsert_run(self, run: RunRecord) -> None: ...

    def acquire_run(self, run_id: str, *, owner: str, until: float, now: float,
                    owner_alive: Callable[[str], bool]) -> str | None:
        """Take the right to drive ``run_id`` until ``until``; return the holder if refused.

        A lease held by an owner that ``owner_alive`` says is gone (a crashed process)
        is taken over.
        """
        ...

    def set_run_status(self, run_id: str, status: str, *, at: float) -> None: ...

    def release_run(self, run_id: str, *, owner: str) -> None: ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def close(self) -> None: ...

    # operator views (read-only queries for ``trace_view`` and ``usage_report``) ----------
    def list_runs(self, *, workflow: str | None = None) -> list[RunRecord]:
        """Every run, oldest first; only ``workflow``'s runs when it is given."""
        ...


# --- shared by the SQL stores: one meaning for a row, whatever the driver ---------------

GRANT_COLUMNS = ("jti, run_id, step_id, tool, subject, issued_at, expires_at, max_uses, uses, "
                 "revoked_at, revoke_reason")
RUN_COLUMNS = "run_id, workflow, target, initiator, status, created_at, updated_at"


def grant_from_row(r: Sequence[Any]) -> GrantRecord:
    """A row of ``GRANT_COLUMNS``."""
    return GrantRecord(jti=r[0], run_id=r[1], step_id=r[2], tool=r[3], subject=r[4], issued_at=r[5],
                       expires_at=r[6], max_uses=r[7], uses=r[8], revoked_at=r[9], revoke_reason=r[10])


def run_from_row(r: Sequence[Any]) -> RunRecord:
    """A row of ``RUN_COLUMNS``."""
    return RunRecord(run_id=r[0], workflow=r[1], target=r[2], initiator=r[3], status=r[4],
                     created_at=r[5], updated_at=r[6])


def refused_grant_state(row: Sequence[Any] | None) -> GrantState:
    """Why a use was refused, from ``(revoked_at, uses, max_uses)`` (``None``: no such grant)."""
    if row is None:
        return "unknown"
    return "revoked" if row[0] is not None else "exhausted"


def lease_holder(row: Sequence[Any], *, owner: str, now: float,
                 owner_alive: Callable[[str], bool]) -> str | None:
    """Who holds a run's lease against ``owner``, from ``(lease_owner, lease_until)``; ``None`` if free."""
    holder, held_until = row
    if holder and holder != owner and held_until is not None and held_until > now and owner_alive(holder):
        return str(holder)
    return None
