"""The decision API's values: what was decided about one call (``Outcome``,
``CallDecision``), how a step ended (``StepEnd``), a running step as a host sees it
(``StepScope``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from .calls import CallResult
from .identity import SpiffeId, Svid
from .plan import Step

PLAN_POLICY_ID = "scopegraph:plan"  # a check for a step the plan does not have
STEP_ENDED = "step ended"  # why a step's grant is revoked when the step ends


class Outcome(str, enum.Enum):
    """What was decided about one call."""

    ALLOW = "allow"
    DENY = "deny"
    NEEDS_APPROVAL = "needs_approval"


@dataclass(frozen=True, kw_only=True)
class CallDecision:
    """The decision on one proposed call, as ``Session.check`` made and recorded it.

    ``outcome`` says what to do: run it (``ALLOW``), refuse it (``DENY``: ``reason``
    says why, ``policy_ids`` which policies or checks refused), or ask a human
    (``NEEDS_APPROVAL``: ``approval_id`` names the request made for exactly this call).
    ``result`` is set when the call ended at its check: refused, held for approval, or
    an allowed call already made once (replayed from its record, never run again).
    """

    call_id: str
    run_id: str
    step_id: str
    tool: str
    outcome: Outcome
    policy_ids: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    approval_id: str | None = None
    required_approvals: int = 0
    grant_id: str | None = None
    result: CallResult | None = field(default=None, repr=False)

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass(frozen=True, kw_only=True)
class StepEnd:
    """How a step ended, as its ``step_ended`` audit record says."""

    status: str  # completed, denied, failed, awaiting_approval
    decision: str | None = None
    policy_ids: tuple[str, ...] = ()
    reason: str = ""
    approval_id: str | None = None
    result: Any = field(default=None, repr=False, compare=False)  # the step's output, when it completed

    def as_record(self) -> dict[str, Any]:
        """The fields a run's step record keeps (the runtime's checkpoint)."""
        record: dict[str, Any] = {"status": self.status, "decision": self.decision,
                                  "policy_ids": list(self.policy_ids), "reason": self.reason}
        if self.status == "completed":
            record["result"] = self.result
        elif self.status != "awaiting_approval":
            record["result"] = None
        if self.approval_id is not None:
            record["approval_id"] = self.approval_id
        return record


def step_outcome(calls: list[CallResult], planned_tool: str) -> StepEnd:
    """A step completes when its last call was an allowed, successful call of its tool."""
    if not calls:
        return StepEnd(status="failed", reason="executor made no call")
    last = calls[-1]
    if last.ok and last.tool == planned_tool:
        status = "completed"
    else:
        status = "denied" if last.status == "denied" else "failed"
    return StepEnd(status=status, decision=last.decision.outcome, policy_ids=tuple(last.decision.policy_ids),
                   reason="" if last.ok else last.audit_reason, result=last.value if last.ok else None)


@dataclass(frozen=True, kw_only=True)
class StepScope:
    """A step as it runs: its identity, proof of identity and grant. No token is shown."""

    step_id: str
    step: Step
    identity: SpiffeId
    svid: Svid = field(repr=False)
    grant_id: str
