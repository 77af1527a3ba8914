"""How a step ended, read from the calls its executor made."""

from __future__ import annotations

from typing import Any

from ..gateway import CallResult


def step_outcome(calls: list[CallResult], planned_tool: str) -> dict[str, Any]:
    """A step completes when its last call was an allowed, successful call of its tool."""
    if not calls:
        return {"status": "failed", "decision": None, "policy_ids": [], "reason": "executor made no call"}
    last = calls[-1]
    if last.ok and last.tool == planned_tool:
        status = "completed"
    else:
        status = "denied" if last.status == "denied" else "failed"
    return {"status": status, "decision": last.decision.outcome,
            "policy_ids": list(last.decision.policy_ids), "reason": "" if last.ok else last.audit_reason,
            "result": last.value if last.ok else None}
