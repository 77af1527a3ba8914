"""The graph's state: JSON-friendly so every checkpoint is readable and portable."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict


def merge_steps(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Parallel steps each write their own key; later writes of a key win; ``None`` removes
    a key (a re-plan drops the records of the steps it replaces)."""
    merged = {**(left or {}), **(right or {})}
    return {k: v for k, v in merged.items() if v is not None}


def union_labels(left: list[str] | None, right: list[str] | None) -> list[str]:
    """Labels only accumulate: a run never forgets what data it has touched."""
    return sorted(set(left or ()) | set(right or ()))


def merge_batches(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Batches of tasks still in flight: a batch leaves once all its members have landed.

    A node's own view holds only its own landing, so a batch with siblings looks
    unfinished to it (it joins at ``schedule``); a batch of one is gone at once.
    """
    merged = {k: dict(v) for k, v in (left or {}).items()}
    for batch_id, entry in (right or {}).items():
        current = merged.setdefault(batch_id, {"members": entry["members"], "landed": []})
        current["landed"] = sorted(set(current["landed"]) | set(entry["landed"]))
    return {k: v for k, v in merged.items() if not set(v["members"]) <= set(v["landed"])}


class RunState(TypedDict, total=False):
    run_id: str
    workflow: str
    task: str
    initiator: str
    planner_id: str
    plan: dict[str, Any]
    original_plan: dict[str, Any]  # the first plan: what re-plans are checked against
    replans: int
    widened: list[str]  # steps a re-plan added or loosened beyond the original plan
    steps: Annotated[dict[str, Any], merge_steps]
    data_labels: Annotated[list[str], union_labels]
    batches: Annotated[dict[str, Any], merge_batches]
    on_denial: str
    trace: dict[str, str]  # W3C traceparent of the run's first root span
    status: str
    error: str


class StepInput(TypedDict):
    """What a ``Send`` hands one step: enough to run it without the whole state. Not the
    plan: a task is written into the checkpoint, and a plan of N steps sent with each of
    them would make every step cost O(N) (the node reads it with ``Runtime.current_plan``)."""

    run_id: str
    workflow: str
    initiator: str
    planner_id: str
    step_id: str
    dependencies: dict[str, Any]
    dependency_labels: dict[str, list[str]]
    data_labels: list[str]
    widened: bool
    replans: int
    record: dict[str, Any]  # the step's record so far (for an approval: the pending call)
    dispatch: dict[str, Any]  # the batch this task was sent in: {"id", "members"}
