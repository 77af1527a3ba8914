"""The durable store's plug point: keys, grants, revocations, uses and runs.

Checkpoints live beside these tables in the same database, but the store knows
nothing of LangGraph; the runtime asks it only for its URL and location.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

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


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    run_id: str
    workflow: str
    target: str
    initiator: str
    status: str
    created_at: float
    updated_at: float


class Store(Protocol):
    """Everything durable that is not a checkpoint."""

    url: str

    def load_signing_key(self, name: str) -> bytes | None: ...

    def save_signing_key(self, name: str, private_pem: bytes, created_at: float) -> bytes:
        """Store the key unless one exists already; return the key that is stored."""
        ...

    def add_grant(self, grant: GrantRecord) -> None: ...

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

    def upsert_run(self, run: RunRecord) -> None: ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def close(self) -> None: ...
