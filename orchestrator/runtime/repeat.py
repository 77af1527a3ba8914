"""Repeated steps and bound values: what one task of the graph runs.

A plan step with ``for_each`` runs as one task per item, ``send[0]``, ``send[1]`` …:
each its own identity (``…/step/send/item/0/executor``), grant and, where policy wants
one, approval. The items are the plan's own (``items``) or a list an earlier step
returned; more than the plan's ``max`` and the step fails before any iteration runs.
Each iteration's ``item`` constraints are pinned to its item: ``exact`` for an item the
plan gave (the planner fixed it), ``from_step`` at the item's exact path for one a step
returned (the value came from that output, and keeps its labels).

``from_step`` constraints are bound here to the recorded results of the steps they name
(the dependencies' results in the graph's state), so the grant carries them.

The state keeps a record per task; ``plan_view`` reads them back as one record per plan
step (a repeated step's made from its iterations'), which is what routing, the run's
outcome and its report go by.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..constraints import Exact, FromStep, Item
from ..errors import PlanError
from ..plan import ForEach, Plan, Step
from ..valuepath import join, select

_ITERATION = re.compile(r"^(?P<base>[A-Za-z0-9_-]{1,64})\[(?P<index>\d{1,4})\]\Z")


def iteration_id(step_id: str, index: int) -> str:
    return f"{step_id}[{index}]"


def split_id(task_id: str) -> tuple[str, int | None]:
    """``("send", 2)`` for ``send[2]``; ``(task_id, None)`` for a plan step's own id."""
    match = _ITERATION.match(task_id)
    return (match.group("base"), int(match.group("index"))) if match else (task_id, None)


def base_id(task_id: str) -> str:
    return split_id(task_id)[0]


def identity_segments(task_id: str) -> tuple[str, ...]:
    """The SPIFFE path segments naming a task's step: ``step/send`` or ``step/send/item/2``."""
    base, index = split_id(task_id)
    return ("step", base) if index is None else ("step", base, "item", str(index))


def items_of(step: Step, results: Mapping[str, Any]) -> list[tuple[str, Any]] | str:
    """The items a repeated step runs over (each with its path in its step's output), or
    why it has none it may run: no list where the plan points, or more than its bound."""
    repeat = step.for_each
    assert repeat is not None
    found = repeat.select_items(results)
    if found is None:
        return (f"step {step.id!r} repeats over {repeat.path or 'the output'!r} of step {repeat.step!r}, "
                "which is not a list")
    if len(found) > repeat.max:
        return f"step {step.id!r} would repeat {len(found)} times, more than the plan's bound of {repeat.max}"
    return found


def tasks_for(step: Step, results: Mapping[str, Any]) -> list[str]:
    """The tasks that run a ready plan step: itself, or one per item. A repeated step with
    no item to run (an empty list, a list over its bound) is one task that records why."""
    if step.for_each is None:
        return [step.id]
    items = items_of(step, results)
    if isinstance(items, str) or not items:
        return [step.id]
    return [iteration_id(step.id, i) for i in range(len(items))]


def task_step(plan: Plan, task_id: str) -> Step:
    """The plan step a task belongs to, under the task's id (for routing only)."""
    step = plan.step(base_id(task_id))
    return step if step.id == task_id else step.model_copy(update={"id": task_id})


def concrete_step(plan: Plan, task_id: str, dependencies: Mapping[str, Any]) -> Step:
    """The step a task runs, as its grant will carry it: ``from_step`` constraints bound to
    the recorded results in ``dependencies``, an iteration's ``item`` constraints pinned.

    Raises:
        PlanError: the task names no step of the plan, or an iteration its step does not have.
    """
    base, index = split_id(task_id)
    step = plan.step(base)
    constraints = dict(step.constraints)
    if step.for_each is not None and index is not None:
        items = items_of(step, dependencies)
        if isinstance(items, str) or index >= len(items):
            raise PlanError(f"step {base!r} has no iteration {index}")
        where, item = items[index]
        for name, c in step.constraints.items():
            if isinstance(c, Item):
                constraints[name] = _pinned(step.for_each, where, item, c, dependencies)
    for name, c in constraints.items():
        if isinstance(c, FromStep) and c.bound is None:
            # A step it does not depend on has no result here: bound to nothing, it allows nothing.
            constraints[name] = c.bind(dependencies[c.step]) if c.step in dependencies else \
                c.model_copy(update={"bound": ()})
    if index is None and constraints == step.constraints:
        return step
    update: dict[str, Any] = {"id": task_id, "constraints": constraints}
    if index is not None:
        update["for_each"] = None
    return step.model_copy(update=update)


def _pinned(repeat: ForEach, where: str, item: Any, c: Item, dependencies: Mapping[str, Any]) -> Any:
    if repeat.items is not None:  # the plan's own item: the planner fixed it
        found = select(item, c.path)
        return Exact(value=found[0][1]) if len(found) == 1 else FromStep(step="plan", bound=())
    assert repeat.step is not None
    return FromStep(step=repeat.step, path=join(where, c.path)).bind(dependencies.get(repeat.step))


def unrepeated_record(step: Step, dependencies: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a repeated step that ran no iteration: completed over an empty list,
    or failed before anything ran."""
    items = items_of(step, dependencies)
    record: dict[str, Any] = {"step_id": step.id, "tool": step.tool, "decision": None, "policy_ids": [],
                              "revoked": True,
              "calls": [], "iterations": 0}
    if isinstance(items, str):
        return {**record, "status": "failed", "reason": items}
    return {**record, "status": "completed", "reason": "", "result": []}


def plan_view(plan: Plan, steps: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """One record per started plan step: a repeated step's is made from its iterations'.

    Its status is ``running`` while an iteration has no record yet (a re-plan dropped
    it), then ``completed`` when every iteration completed (its result the list of
    theirs, in order), else the most pressing of theirs: awaiting approval, replan,
    failed, denied.
    """
    if not plan.repeats():  # the common case: records as they are
        return {s.id: steps[s.id] for s in plan.steps if s.id in steps}
    view: dict[str, dict[str, Any]] = {}
    for step_id in plan.order():
        step = plan.step(step_id)
        if step.id in steps or step.for_each is None:
            if step.id in steps:
                view[step.id] = steps[step.id]
            continue
        results = {d: view[d].get("result") for d in step.depends_on
                   if d in view and view[d].get("status") == "completed"}
        items = items_of(step, results) if set(step.depends_on) <= set(results) else "not ready"
        if isinstance(items, str):
            continue
        records = [steps.get(iteration_id(step.id, i)) for i in range(len(items))]
        if any(r is not None for r in records):
            view[step.id] = _aggregate(step, records)
    return view


_PRESSING = ("awaiting_approval", "replan", "failed", "denied")


def _aggregate(step: Step, records: list[dict[str, Any] | None]) -> dict[str, Any]:
    present = [r for r in records if r is not None]
    statuses = [r.get("status") for r in present]
    if len(present) < len(records):
        status = "running"
    elif all(s == "completed" for s in statuses):
        status = "completed"
    else:
        status = next((s for s in _PRESSING if s in statuses), "failed")
    unfinished = [r for r in present if r.get("status") != "completed"]
    record: dict[str, Any] = {
        "step_id": step.id, "tool": step.tool, "status": status, "decision": None, "policy_ids": [],
        "reason": (unfinished[0].get("reason") or "") if unfinished else "", "iterations": len(records),
        "children": present, "revoked": all(r.get("revoked") for r in present),
    }
    labels = sorted(set().union(*(r.get("labels") or () for r in present)))
    if labels:
        record["labels"] = labels
    if status == "completed":
        record["result"] = [r.get("result") for r in present]
    return record


def missing_iterations(plan: Plan, view: Mapping[str, dict[str, Any]], steps: Mapping[str, Any],
                       results: Mapping[str, Any]) -> list[str]:
    """Iterations of started repeated steps that have no record (dropped by a re-plan)."""
    missing: list[str] = []
    for step in plan.steps:
        if step.for_each is None or view.get(step.id, {}).get("status") != "running":
            continue
        for task in tasks_for(step, results):
            if task not in steps:
                missing.append(task)
    return missing


def repeats_within(step: Step, original: Step) -> bool:
    """Whether ``step`` repeats no more than ``original`` does, over no other list."""
    mine, theirs = step.for_each, original.for_each
    if mine is None or theirs is None:
        return mine is None and theirs is None
    if mine.max > theirs.max:
        return False
    if mine.items is not None and theirs.items is not None:
        return all(any(Exact(value=o).allows(i) for o in theirs.items) for i in mine.items)
    return (mine.step, mine.path) == (theirs.step, theirs.path)
