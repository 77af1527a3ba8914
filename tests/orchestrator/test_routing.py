"""Routing kept up to date a write at a time (issue 11) decides as a full scan would.

``Routing`` learns each step's records from the writes since it last looked; these
properties drive it through the shapes LangGraph hands it (a node's own view made from
a copy of the channel, the channel's next value made from the original, several
tasks' writes at once, a value read back from a checkpoint) and compare every answer
with one computed afresh from all the records.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from scopegraph.plan import Plan
from scopegraph.runtime.routing import Routing
from scopegraph.runtime.state import StepRecords, merge_step_writes

STATUSES = ["completed", "failed", "denied", "awaiting_approval", "replan"]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(min_value=1, max_value=7))
    steps = []
    for i in range(n):
        deps = draw(st.lists(st.integers(min_value=0, max_value=i - 1), max_size=3, unique=True)) if i else []
        steps.append({"id": f"s{i}", "tool": "t", "depends_on": [f"s{d}" for d in deps]})
    return Plan.model_validate({"steps": steps})


def record(status: str, denied: bool) -> dict[str, Any]:
    return {"status": status, "result": {"v": status}, **({"denied_by": "bob"} if denied else {})}


writes = st.lists(st.tuples(st.sampled_from([f"s{i}" for i in range(8)] + ["other"]),
                            st.one_of(st.none(), st.tuples(st.sampled_from(STATUSES), st.booleans()))),
                  min_size=1, max_size=3)
operations = st.lists(st.tuples(st.sampled_from(["step", "batch", "reload"]), writes), max_size=25)


def expected(plan: Plan, steps: dict[str, Any]) -> tuple[list[str], set[str], set[str], set[str], set[str]]:
    ids = {s.id for s in plan.steps}
    done = {k for k, v in steps.items() if v["status"] == "completed" and k in ids}
    ready = [s.id for s in plan.ready_steps(done, started=steps.keys())]
    return (ready, done, {k for k, v in steps.items() if v["status"] == "awaiting_approval"},
            {k for k, v in steps.items() if v["status"] == "replan"},
            {k for k, v in steps.items() if v.get("denied_by")})


def lineage(value: Any) -> int:
    """How many earlier values ``value`` still holds on to (each holds every record)."""
    n = 0
    while isinstance(value, StepRecords) and value.parent is not None:
        n, value = n + 1, value.parent
    return n


def seen_by(routing: Routing, steps: dict[str, Any]) -> tuple[list[str], set[str], set[str], set[str], set[str]]:
    routing.see(steps)
    assert lineage(steps) <= 2  # itself, the copy it was made from, the value that was copied: no more
    results = routing.results()
    assert {d: results[d] for d in results} == {d: steps[d]["result"] for d in routing.done}
    return ([s.id for s in routing.ready()], set(routing.done), set(routing.waiting), set(routing.replan),
            set(routing.denied))


@settings(max_examples=300, deadline=None)
@given(plan=plans(), ops=operations)
def test_routing_a_write_at_a_time_decides_as_a_full_scan(plan: Plan, ops: list[Any]) -> None:
    routing = Routing(plan)
    value: dict[str, Any] = StepRecords()
    assert seen_by(routing, value) == expected(plan, value)
    for kind, batch in ops:
        updates = [{sid: None if r is None else record(*r)} for sid, r in batch]
        if kind == "step":  # a node's edge sees a copy with its own write; the channel moves on from the original
            view = merge_step_writes(copy.copy(value), updates)
            assert seen_by(routing, view) == expected(plan, view)
            value = merge_step_writes(value, updates)
        elif kind == "batch":  # several tasks' writes land at once; the join routes on the channel itself
            value = merge_step_writes(value, updates)
            assert seen_by(routing, value) == expected(plan, value)
        else:  # read back from a checkpoint: a plain dict, no lineage
            value = dict(merge_step_writes(value, updates))
            assert seen_by(routing, value) == expected(plan, value)


@given(start=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers()),
       first=st.lists(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.none() | st.integers())),
       second=st.lists(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.none() | st.integers())))
def test_the_steps_reducer_gives_the_same_records_however_writes_are_batched(
        start: dict[str, Any], first: list[Any], second: list[Any]) -> None:
    # A delta channel replays a checkpoint's writes in batches other than the ones they came in.
    assert merge_step_writes(merge_step_writes(start, first), second) == merge_step_writes(start, first + second)


def test_step_records_read_back_or_copied_deeply_are_plain_records() -> None:
    value = merge_step_writes({}, [{"a": {"status": "completed"}}])
    assert type(copy.deepcopy(value)) is dict and copy.deepcopy(value) == {"a": {"status": "completed"}}
    shallow = copy.copy(value)
    assert shallow == value and shallow.parent is value
