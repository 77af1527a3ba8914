"""What happens in a run, as typed events for progress displays.

A ``Session`` reports each event to its listener once the write that made it true has
landed: a plan fixed, a step started, a call decided, an approval requested or answered,
a step ended, the run ended. ``Runtime.run(on_event=…)`` and ``Runtime.astream`` hand
them to a host; ``scopegraph run`` draws them on stderr. Events carry names, outcomes
and policy ids: never a token, an argument value or a tool's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

from .decisions import Outcome


@dataclass(frozen=True, kw_only=True)
class PlanFixed:
    kind: Literal["plan_fixed"] = "plan_fixed"
    run_id: str
    steps: tuple[str, ...]
    revision: int = 0


@dataclass(frozen=True, kw_only=True)
class StepStarted:
    kind: Literal["step_started"] = "step_started"
    run_id: str
    step_id: str
    tool: str
    spiffe_id: str


@dataclass(frozen=True, kw_only=True)
class CallDecided:
    kind: Literal["decision"] = "decision"
    run_id: str
    step_id: str
    tool: str
    outcome: Outcome
    policy_ids: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ApprovalRequested:
    kind: Literal["approval_requested"] = "approval_requested"
    run_id: str
    step_id: str
    tool: str
    approval_id: str


@dataclass(frozen=True, kw_only=True)
class ApprovalAnswered:
    kind: Literal["approval_answered"] = "approval_answered"
    run_id: str
    step_id: str
    approval_id: str
    status: str  # approved, denied, expired, consumed


@dataclass(frozen=True, kw_only=True)
class StepEnded:
    kind: Literal["step_ended"] = "step_ended"
    run_id: str
    step_id: str
    status: str
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class RunEnded:
    kind: Literal["run_ended"] = "run_ended"
    run_id: str
    status: str  # completed, denied, failed, cancelled, paused
    error: str | None = None


RunEvent = Union[PlanFixed, StepStarted, CallDecided, ApprovalRequested, ApprovalAnswered, StepEnded, RunEnded]
Listener = Callable[[RunEvent], None]


def describe(event: RunEvent) -> str:
    """One line for a progress display."""
    if isinstance(event, PlanFixed):
        what = "re-planned" if event.revision else "plan fixed"
        return f"{what}: {len(event.steps)} step(s) ({', '.join(event.steps)})"
    if isinstance(event, StepStarted):
        return f"step {event.step_id!r} started ({event.tool})"
    if isinstance(event, CallDecided):
        policies = f" [{', '.join(event.policy_ids)}]" if event.policy_ids else ""
        return f"  {event.step_id}: {event.tool} {event.outcome.value}{policies}"
    if isinstance(event, ApprovalRequested):
        return f"  {event.step_id}: approval requested: {event.approval_id}"
    if isinstance(event, ApprovalAnswered):
        return f"  {event.step_id}: approval {event.approval_id} {event.status}"
    if isinstance(event, StepEnded):
        return f"step {event.step_id!r} {event.status}" + (f": {event.reason}" if event.reason else "")
    return f"run {event.status}" + (f": {event.error}" if event.error else "")
