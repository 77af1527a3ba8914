"""The run record: what a run did, for people (``summary``) and machines (``--json``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..approvals import answer_text
from ..display import printable_lines

RunStatus = Literal["running", "completed", "paused", "denied", "failed", "cancelled"]
StepStatus = Literal["completed", "awaiting_approval", "denied", "failed", "not_started", "skipped"]


class CallReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    tool: str
    status: str
    decision: str
    policy_ids: list[str]
    reason: str = ""
    attempts: int = 1


class StepReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    step_id: str
    tool: str
    status: StepStatus
    spiffe_id: str | None = None
    grant_id: str | None = None
    decision: str | None = None
    policy_ids: list[str] = []
    reason: str = ""
    revoked: bool = False
    approval_id: str | None = None
    calls: list[CallReport] = []
    widened: bool = False  # a re-plan added or loosened it beyond the original plan
    children: list[StepReport] = []  # the steps of a sub-workflow it delegated to


class RunReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    workflow: str
    status: RunStatus
    error: str | None = None
    planner_spiffe_id: str | None = None
    steps: list[StepReport] = []
    grants_minted: int = 0
    grants_revoked: int = 0
    approvals: list[dict[str, Any]] = []
    replans: int = 0

    @property
    def exit_code(self) -> int:
        return {"completed": 0, "paused": 3}.get(self.status, 1)

    def summary(self) -> str:
        lines = [f"run {self.run_id}  workflow={self.workflow}  status={self.status}"]
        if self.planner_spiffe_id:
            lines.append(f"  planner   {self.planner_spiffe_id}  (no tool access)")
        if self.replans:
            lines.append(f"  re-planned {self.replans} time(s)")
        for s in self.steps:
            lines.extend(_step_lines(s, "  "))
        for a in self.approvals:
            lines.extend(_approval_lines(a, "  "))
        if self.error:
            lines.append(f"  error: {self.error}")
        lines.append(f"  grants minted={self.grants_minted} revoked={self.grants_revoked}")
        return printable_lines(lines)  # reasons and errors quote planners, tools and people


def _step_lines(s: StepReport, indent: str) -> list[str]:
    widened = "  (widened by a re-plan)" if s.widened else ""
    lines = [f"{indent}step {s.step_id:<12} {s.tool:<16} {s.status}{widened}"]
    if s.status in ("failed", "denied") and s.reason:
        lines.append(f"{indent}  reason    {s.reason}")
    if s.spiffe_id:
        lines.append(f"{indent}  identity  {s.spiffe_id}")
        lines.append(f"{indent}  grant     {s.grant_id}  revoked={'yes' if s.revoked else 'NO'}")
    for c in s.calls:
        ids = ",".join(c.policy_ids) or "-"
        lines.append(f"{indent}  call {c.tool:<16} {c.decision:<15} [{ids}] {c.reason}")
    for child in s.children:
        lines.extend(_step_lines(child, indent + "  "))
    return lines


def _approval_lines(a: dict[str, Any], indent: str) -> list[str]:
    """One approval: its status and how many approvals it still needs, then every answer
    (who approved, who denied and why, what a denial proposed)."""
    head = f"{indent}approval {a['id']}  {a['tool']}  {a['status']}"
    answers = a.get("answers")
    if answers is None:  # built by a host that keeps no answers
        who = a.get("denied_by") or a.get("approver")
        return [head + (f" by {who}" if who else "")]
    approvers = sorted({g["approver"] for g in answers if g["answer"] == "approve"})
    required = int(a.get("required_approvals") or 1)
    if a["status"] == "pending":
        left = int(a.get("still_needed") or max(0, required - len(approvers)))
        head += f"  {len(approvers)}/{required} approved; {left} more approval{'s' if left != 1 else ''} needed"
    return [head, *(f"{indent}  {answer_text(g)}" for g in answers)]
