"""What one tool call is, as the gateway and its hosts pass it around: who calls from
where (``CallContext``), what came of it (``CallResult``), one attempt once decided
(``Decided``), how a step ends with its last call (``StepClosing``), retry settings, the
ids of the gateway's own checks, and the call's idempotency key."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .canonical import canonical_json, sha256_hex
from .credentials import Grant
from .identity import SpiffeId
from .policy import Decision
from .provenance import Observation
from .redaction import recorded_constraints
from .tools import Tool

CallStatus = Literal["ok", "denied", "needs_approval", "error"]
GRANT_POLICY_ID = "scopegraph:grant"
SCOPE_POLICY_ID = "scopegraph:scope"
TOOL_POLICY_ID = "scopegraph:tool"
STORE_POLICY_ID = "scopegraph:store"
APPROVAL_POLICY_ID = "scopegraph:approval"
CHECK_POLICY_ID = "scopegraph:check"  # checking the call raised: denied to fail closed
TOKEN_PATTERN = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")  # a grant, an SVID: any JWS
MAX_ERROR_CHARS = 1000  # a tool's error message, as kept in records and spans


@dataclass(frozen=True, kw_only=True)
class CallContext:
    """Who is calling, from where: supplied by the runtime, never by the executor."""

    workflow: str
    run_id: str
    step_id: str
    principal: SpiffeId
    role: str = "executor"
    data_labels: frozenset[str] = frozenset()
    # Tool output the executor has been shown (its dependencies' results, its own earlier
    # calls): what argument provenance is traced against.
    observations: tuple[Observation, ...] = ()
    widened: bool = False  # a re-plan added or loosened this step beyond the original plan
    # What the run's own plan fixed, when it differs from the grant's constraints: a
    # delegated child's grant was shaped by a sub-planner working for an executor, so
    # only what the parent step's plan pinned counts as coming from the plan.
    planned: Mapping[str, Any] | None = None

    def child(self, *, step_id: str, principal: SpiffeId, observations: tuple[Observation, ...],
              planned: Mapping[str, Any]) -> CallContext:
        """The context of a delegated child step: it inherits all its parent has seen."""
        labels = self.data_labels.union(*(o.labels for o in observations))
        return replace(self, step_id=step_id, principal=principal, data_labels=labels,
                       observations=(*self.observations, *observations),
                       planned=self.planned if self.planned is not None else planned)

    def after(self, result: CallResult) -> CallContext:
        """The context for the next call of the same step, once the executor has seen ``result``."""
        if not result.returned:
            return self
        # A failed tool's error message is tool output too: it may quote what it read.
        value = result.value if result.ok else result.error
        seen = Observation(step_id=self.step_id, tool=result.tool, labels=result.labels, value=value)
        return replace(self, data_labels=self.data_labels | result.labels,
                       observations=(*self.observations, seen))


@dataclass(frozen=True, kw_only=True)
class CallResult:
    """What came of one call: the value, or why there is none."""

    tool: str
    arguments: Mapping[str, Any]
    status: CallStatus
    decision: Decision
    value: Any = None
    error: str | None = None
    labels: frozenset[str] = frozenset()
    attempts: int = 1
    grant_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def returned(self) -> bool:
        """Whether the tool sent something back to the executor: a value, or an error
        message (which may quote what the tool read). A refused call returned nothing."""
        return self.status in ("ok", "error")

    error_type: str | None = None  # the exception class of a failed tool

    @property
    def reason(self) -> str:
        """Why the call did not succeed: for the executor, in process."""
        return self.error or "; ".join(self.decision.reasons)

    @property
    def audit_reason(self) -> str:
        """Why, as run records, spans and the ledger keep it: the tool's error message
        with its secret arguments scrubbed (the gateway scrubs ``error`` as it makes it)."""
        if self.status == "error":
            return self.error or f"tool {self.tool!r} failed: {self.error_type or 'error'}"
        return "; ".join(self.decision.reasons)


@dataclass
class RetrySettings:
    """Retries for transient tool failures; each retry is a new, re-authorized call."""

    attempts: int = 3
    wait_initial: float = 0.05
    wait_max: float = 1.0
    sleep: Callable[[float], None] | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class Decided:
    """One attempt of a call once its decision is recorded (stages 1 to 3 done).

    ``result`` is set when the call ended there: refused, held for approval, replayed
    from its idempotency record, or denied because the store failed. Otherwise the call
    is allowed, its use taken, and it waits for ``Gateway.run`` (the gateway runs the
    tool) or ``Gateway.record`` (the host ran it). Holds the verified grant: never
    shown to an executor.
    """

    tool_name: str
    arguments: Mapping[str, Any] = field(repr=False)
    attempt: int
    key: str | None
    decision: Decision
    result: CallResult | None = None
    grant_id: str | None = None
    tool: Tool | None = field(default=None, repr=False)
    grant: Grant | None = field(default=None, repr=False)
    normalized: dict[str, Any] | None = field(default=None, repr=False)
    digest: str | None = None
    started: float = field(default_factory=time.perf_counter, repr=False)  # for a host-run call's duration


@dataclass(kw_only=True)
class StepClosing:
    """Ends a step with its last call, in the transaction that records the call's final result.

    A host that knows a call is its step's last (``ToolHandle.last_call``) passes one to
    ``Gateway.call``. The gateway then revokes the step's grant (for ``reason``) and calls
    ``end(result, revoked)`` with the call's final result inside the transaction that
    records that result (the decision's, for a call refused, paused for approval or
    replayed; the result's, for a call that ran), so the result, the revocation and the
    step's outcome are one commit. ``end`` writes the host's records of the step's end
    (the revocation's audit record among them, if ``revoked``: this call revoked the
    grant); it runs inside an open write transaction, so it must do no policy, constraint
    or tool work.

    ``result`` is set once that transaction is written. It stays ``None`` when the call
    did not end the step (a transient failure that was retried and given up on, a store
    failure): the host then ends the step itself.
    """

    reason: str
    end: Callable[[CallResult, bool], None]
    result: CallResult | None = None


def call_key(ctx: CallContext, index: int, tool: str, arguments: Mapping[str, Any]) -> str:
    """Names the ``index``-th call of a step, so a step re-run after a crash replays, not
    repeats, it (the gateway's idempotency key)."""
    try:
        args = canonical_json(arguments)
    except Exception:  # not JSON (a set, an object), or too big or deep to write down
        try:
            args = repr(sorted(arguments.items()))
        except Exception:  # the gateway decides what to do with such arguments
            args = "unwritable"
    return sha256_hex(f"{ctx.run_id}\0{ctx.step_id}\0{index}\0{tool}\0{args}")


def grant_minted_fields(grant: Grant, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The ``grant_minted`` ledger record of a step's grant (no token: its facts; a value
    the plan pinned for a ``secret`` argument is masked)."""
    return {"step_id": grant.step_id, "grant_id": grant.jti, "spiffe_id": str(grant.subject), "tool": grant.tool,
            "issued_at": grant.issued_at, "expires_at": grant.expires_at, "max_uses": grant.max_uses,
            "constraints": recorded_constraints(grant.constraints, secrets), "act": dict(grant.act)}


