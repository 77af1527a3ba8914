"""Resuming a held call once its approval request is answered: what to check again,
and the answers that leave nothing to check (still pending, denied, expired)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .approvals import ApprovalRequest
from .calls import APPROVAL_POLICY_ID, CallResult, Decided
from .decisions import CallDecision, Outcome
from .policy import Decision
from .tools import ToolRegistry


def failed_attempt(decided: Decided, exc: BaseException) -> CallResult:
    """The result of an attempt whose tool raised past the gateway (a transient failure)."""
    return CallResult(tool=decided.tool_name, arguments=dict(decided.normalized or {}), status="error",
                      decision=decided.decision, error=f"tool {decided.tool_name!r} failed: {type(exc).__name__}",
                      error_type=type(exc).__name__, attempts=decided.attempt, grant_id=decided.grant_id,
                      labels=decided.tool.labels if decided.tool is not None else frozenset())


def unanswerable(run_id: str, request: ApprovalRequest, state: str) -> CallDecision | None:
    """The decision on a held call whose request cannot be used: still pending, denied
    outright, or expired. Nothing is checked or written for it."""
    if state == "pending":
        decision = Decision(outcome="needs_approval", reasons=tuple(request.reasons),
                            policy_ids=tuple(request.policy_ids), required_approvals=request.required_approvals)
        approval: str | None = request.id
    elif state == "expired":
        decision = Decision.deny(f"approval {request.id!r} expired before it was answered", APPROVAL_POLICY_ID)
        approval = None
    elif state == "denied" and request.proposed_arguments is None:
        assert request.denial is not None
        decision = Decision.deny(f"denied by {request.denial.approver}: {request.denial.reason}",
                                 APPROVAL_POLICY_ID)
        approval = None
    else:
        return None
    status = "needs_approval" if decision.outcome == "needs_approval" else "denied"
    result = CallResult(tool=request.tool, arguments=dict(request.arguments), status=status,  # type: ignore[arg-type]
                        decision=decision)
    return CallDecision(call_id=f"approval:{request.id}", run_id=run_id, step_id=request.step_id, tool=request.tool,
                        outcome=Outcome(decision.outcome), policy_ids=decision.policy_ids, reasons=decision.reasons,
                        approval_id=approval, required_approvals=decision.required_approvals, result=result)


def resumption(tools: ToolRegistry, policy_version: str, request: ApprovalRequest,
               state: str) -> tuple[dict[str, Any], str | None, str]:
    """The call to check for an answered request: its arguments, the approval to present
    (if any) and the call's idempotency id."""
    # Counter-proposal: the new arguments are a new action. A proposal names only what it
    # changes; the rest of the call stays as requested.
    arguments = request.arguments if state in ("approved", "consumed") \
        else {**request.arguments, **(request.proposed_arguments or {})}
    # Approved under policies that have changed since (an upgrade while the run was
    # paused): the approval names the old version and cannot be used; the call is decided
    # afresh, and asked about again if it still needs a human.
    stale = state == "approved" and request.policy_version != policy_version
    if state in ("approved", "consumed") and not stale:
        return as_called(tools, request.tool, arguments), request.id, f"approval:{request.id}"
    return as_called(tools, request.tool, arguments), None, f"{'reasked' if stale else 'proposal'}:{request.id}"


def as_called(tools: ToolRegistry, tool: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The approved call's arguments as its executor passed them: the request holds them
    normalised, defaults filled in; those still at their default are left out, so the
    call is decided (and its digest computed) exactly as it was when it was held."""
    fields = tools.get_tool(tool).args_model.model_fields

    def is_default(name: str, value: Any) -> bool:
        default = fields[name].get_default(call_default_factory=True)
        return type(value) is type(default) and bool(value == default)

    return {k: v for k, v in arguments.items()
            if k not in fields or fields[k].is_required() or not is_default(k, v)}
