"""How a step ended, read from the calls its executor made, as a run's step record keeps it."""

from __future__ import annotations

from typing import Any

from ..gateway import CallResult
from ..session import step_outcome as step_end


def step_outcome(calls: list[CallResult], planned_tool: str) -> dict[str, Any]:
    """A step completes when its last call was an allowed, successful call of its tool
    (see ``Session``'s ``step_outcome``): its record's fields."""
    end = step_end(calls, planned_tool)
    record: dict[str, Any] = {"status": end.status, "decision": end.decision, "policy_ids": list(end.policy_ids),
                              "reason": end.reason}
    if calls:
        record["result"] = end.result
    return record
