"""The graph's state: JSON-friendly so every checkpoint is readable and portable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypedDict

from langgraph.channels.delta import DeltaChannel

# How many updates of a delta channel (below) between two full copies of it in a
# checkpoint. A checkpoint between them holds nothing of the channel; reading one (a
# resume, a report) replays the writes since the last copy, which costs O(N) for N
# steps whether they come as one copy or as N writes. A copy costs O(N) to write, so
# they are rare: a step's share of them stays O(N / SNAPSHOT_EVERY), and a read walks
# back at most SNAPSHOT_EVERY checkpoints.
SNAPSHOT_EVERY = 1000


def merge_steps(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Parallel steps each write their own key; later writes of a key win; ``None`` removes
    a key (a re-plan drops the records of the steps it replaces)."""
    merged = dict(left or {})
    _apply(merged, right)
    return merged


def _apply(records: dict[str, Any], write: dict[str, Any] | None) -> None:
    """One write into ``records``: a record replaces its step's, ``None`` removes it."""
    for k, v in (write or {}).items():
        if v is None:
            records.pop(k, None)
        else:
            records[k] = v


class StepRecords(dict[str, Any]):
    """The ``steps`` channel's value: the records by step id, and what they were made from
    (``parent``, then ``changes``, the writes applied to it), so routing can bring what it
    knows up to date from the writes since it last looked rather than re-read every record
    (see ``routing``). A copy's parent is the original. Pickled or serialised, a plain dict."""

    __slots__ = ("parent", "changes", "copied")

    def __init__(self, records: Any = (), parent: dict[str, Any] | None = None,
                 changes: tuple[dict[str, Any] | None, ...] = (), copied: bool = False) -> None:
        super().__init__(records)
        self.parent = parent
        self.changes = changes
        self.copied = copied

    def __copy__(self) -> StepRecords:
        return StepRecords(self, parent=self, copied=True)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def merge_step_writes(left: dict[str, Any] | None, writes: Sequence[dict[str, Any] | None]) -> StepRecords:
    """``merge_steps`` over a superstep's writes, in order: the reducer of the ``steps``
    delta channel (applying two batches one after the other equals applying both at once,
    as a delta channel's replay needs). One copy of the records per superstep, not per write."""
    merged = StepRecords(left or {}, parent=left, changes=tuple(writes))
    for right in writes:
        _apply(merged, right)
    return merged


def last_write(left: Any, writes: Sequence[Any]) -> Any:
    """The reducer of a value written whole (the plan): the last write wins."""
    return writes[-1] if writes else left


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
    # The plan and the steps' records grow with the plan; kept in delta channels, a
    # checkpoint holds only what a superstep wrote (LangGraph replays the writes to read
    # them back), so writing one costs the same at step 1000 as at step 10 (issue 11).
    plan: Annotated[dict[str, Any], DeltaChannel(last_write, dict, snapshot_frequency=SNAPSHOT_EVERY)]
    original_plan: Annotated[dict[str, Any], DeltaChannel(last_write, dict, snapshot_frequency=SNAPSHOT_EVERY)]
    replans: int
    widened: list[str]  # steps a re-plan added or loosened beyond the original plan
    steps: Annotated[dict[str, Any], DeltaChannel(merge_step_writes, dict, snapshot_frequency=SNAPSHOT_EVERY)]
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
