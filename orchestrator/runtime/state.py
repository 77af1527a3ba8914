"""The graph's state: JSON-friendly so every checkpoint is readable and portable."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict


def merge_steps(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Parallel steps each write their own key; later writes of a key win."""
    return {**(left or {}), **(right or {})}


def union_labels(left: list[str] | None, right: list[str] | None) -> list[str]:
    """Labels only accumulate: a run never forgets what data it has touched."""
    return sorted(set(left or ()) | set(right or ()))


class RunState(TypedDict, total=False):
    run_id: str
    workflow: str
    task: str
    initiator: str
    planner_id: str
    plan: dict[str, Any]
    steps: Annotated[dict[str, Any], merge_steps]
    data_labels: Annotated[list[str], union_labels]
    on_denial: str
    trace: dict[str, str]  # W3C traceparent of the run's first root span
    status: str
    error: str


class StepInput(TypedDict):
    """What a ``Send`` hands one step: enough to run it without the whole state."""

    run_id: str
    workflow: str
    initiator: str
    planner_id: str
    plan: dict[str, Any]
    step_id: str
    dependencies: dict[str, Any]
    data_labels: list[str]
    record: dict[str, Any]  # the step's record so far (for an approval: the pending call)
