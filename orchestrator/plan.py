"""Plans: the planner's output, checked before anything runs.

A plan is a list of steps; each names one tool, constrains each argument it will pass,
says why, and lists the steps it depends on. A step may repeat (``for_each``) over a
list the plan gives or an earlier step returns, at most ``max`` times. ``validate_plan``
rejects a plan that names an unknown tool, constrains an argument the tool does not
take, pins a value the tool's schema refuses, leaves a required argument unconstrained,
binds a value to a step it does not depend on, or has a cycle.
"""

from __future__ import annotations

import graphlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .constraints import Constraint, Exact, FromStep, Item, OneOf
from .errors import PlanError, UnknownToolError
from .tools import ToolRegistry
from .valuepath import PathError, join, parse_path, select

_STEP_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_REPEAT = 100  # iterations one repeated step may have, whatever its plan says


class ForEach(BaseModel):
    """Repeat a step once per item of a list, at most ``max`` times.

    The list is either given in the plan (``items``: the planner copies it from the task)
    or returned by an earlier step the step depends on (``step``, and ``path`` to the list
    in its output; with ``[*]`` in the path, the values it selects). Each iteration has its
    own identity and grant; an ``item`` constraint pins an argument to its iteration's item.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    items: tuple[Any, ...] | None = None
    step: str | None = None
    path: str = ""
    max: int = Field(ge=1, le=MAX_REPEAT)

    @model_validator(mode="after")
    def _one_source(self) -> ForEach:
        if (self.items is None) == (self.step is None):
            raise ValueError("for_each needs either items or a step, not both")
        if self.items is not None and self.path:
            raise ValueError("for_each path goes with a step, not with items")
        if self.items is not None and len(self.items) > self.max:
            raise ValueError(f"for_each lists {len(self.items)} items, more than its max of {self.max}")
        if self.step is not None and not _STEP_ID.match(self.step):
            raise ValueError(f"step id {self.step!r} must be 1-64 letters, digits, '_' or '-'")
        try:
            parse_path(self.path)
        except PathError as exc:
            raise ValueError(str(exc)) from None
        return self

    def select_items(self, results: Mapping[str, Any]) -> list[tuple[str, Any]] | None:
        """The items to repeat over, each with the path that names it in its step's output
        (``""`` for items the plan gives); ``None`` when the step's output holds no list there."""
        if self.items is not None:
            return [("", item) for item in self.items]
        if self.step is None or self.step not in results:
            return None
        found = select(results[self.step], self.path)
        if None in parse_path(self.path):  # a wildcard: the values it selects are the items
            return found
        if len(found) != 1 or not isinstance(found[0][1], (list, tuple)):
            return None
        where, values = found[0]
        return [(join(where, f"[{i}]"), v) for i, v in enumerate(values)]


class Step(BaseModel):
    """One unit of work: one tool, constrained arguments, a purpose."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tool: str
    constraints: dict[str, Constraint] = Field(default_factory=dict)
    purpose: str = ""
    depends_on: tuple[str, ...] = ()
    for_each: ForEach | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _STEP_ID.match(value):
            raise ValueError(f"step id {value!r} must be 1-64 letters, digits, '_' or '-'")
        return value


class Plan(BaseModel):
    """Ordered steps; steps whose dependencies are done may run concurrently."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: tuple[Step, ...] = Field(min_length=1)

    def step(self, step_id: str) -> Step:
        found = self.index().get(step_id)
        if found is None:
            raise PlanError(f"plan has no step {step_id!r}")
        return found

    def index(self) -> dict[str, Step]:
        """The steps by id, built once per plan: a step is looked up several times per
        step run, and a scan would make each lookup O(N) (issue 11). Kept beside the
        fields (not one of them), and rebuilt if ``steps`` is not the tuple it was built from."""
        cached = self.__dict__.get("_index")
        if cached is None or cached[0] is not self.steps:
            cached = (self.steps, {s.id: s for s in self.steps})
            self.__dict__["_index"] = cached
        index: dict[str, Step] = cached[1]
        return index

    def repeats(self) -> bool:
        """Whether some step repeats (``for_each``): asked once per route, so kept."""
        cached = self.__dict__.get("_repeats")
        if cached is None or cached[0] is not self.steps:
            cached = (self.steps, any(s.for_each is not None for s in self.steps))
            self.__dict__["_repeats"] = cached
        return bool(cached[1])

    def order(self) -> tuple[str, ...]:
        """The step ids in an order where each comes after the steps it depends on (kept:
        the view of a plan with repeated steps is built in it at every route)."""
        cached = self.__dict__.get("_order")
        if cached is None or cached[0] is not self.steps:
            order = tuple(graphlib.TopologicalSorter({s.id: set(s.depends_on) for s in self.steps}).static_order())
            cached = (self.steps, order)
            self.__dict__["_order"] = cached
        return tuple(cached[1])

    def ready_steps(self, done: Iterable[str], started: Iterable[str] = ()) -> list[Step]:
        """Steps not yet started whose dependencies are all in ``done``."""
        done_set, started_set = set(done), set(started)
        return [
            s
            for s in self.steps
            if s.id not in started_set and s.id not in done_set and set(s.depends_on) <= done_set
        ]


def parse_plan(data: Any) -> Plan:
    """Parse untrusted plan data (a dict or JSON text) into a ``Plan``.

    Raises:
        PlanError: the data is not a well-formed plan.
    """
    try:
        if isinstance(data, (str, bytes)):
            return Plan.model_validate_json(data)
        if isinstance(data, Plan):
            return data
        return Plan.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "plan"
        raise PlanError(f"malformed plan: {where}: {first['msg']}") from None


def validate_plan(plan: Plan, tools: ToolRegistry) -> Plan:
    """Check ``plan`` against the workflow's tools; return it unchanged if sound.

    Raises:
        PlanError: unknown tool, bad constraint, missing dependency, duplicate id or cycle.
    """
    ids = [s.id for s in plan.steps]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)  # not ids.count: O(N²) for N steps
    if duplicates:
        raise PlanError(f"plan repeats step id {duplicates[0]!r}")
    for step in plan.steps:
        _check_step(step, tools, set(ids))
    sorter = graphlib.TopologicalSorter({s.id: set(s.depends_on) for s in plan.steps})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise PlanError(f"plan has a dependency cycle: {cycle}") from None
    return plan


def _check_step(step: Step, tools: ToolRegistry, ids: set[str]) -> None:
    try:
        t = tools.get_tool(step.tool)
    except UnknownToolError:
        raise PlanError(f"step {step.id!r} names unknown tool {step.tool!r}") from None
    for dep in step.depends_on:
        if dep not in ids:
            raise PlanError(f"step {step.id!r} depends on unknown step {dep!r}")
        if dep == step.id:
            raise PlanError(f"step {step.id!r} depends on itself")
    fields = t.args_model.model_fields
    for arg in step.constraints:
        if arg not in fields:
            raise PlanError(f"step {step.id!r} constrains {arg!r}, which tool {t.name!r} does not take")
    for arg, info in fields.items():
        if info.is_required() and arg not in step.constraints:
            raise PlanError(
                f"step {step.id!r} leaves required argument {arg!r} of tool {t.name!r} "
                "unconstrained; use {'kind': 'any'} to let the executor choose"
            )
    _check_bindings(step)
    for arg, constraint in step.constraints.items():
        # A plan lives as JSON (checkpoints, the ledger, grants): NaN or an infinity has no
        # JSON form, and written as null it would pin ``None`` instead.
        if _holds_non_finite(constraint.model_dump()):
            raise PlanError(f"step {step.id!r} constrains {arg!r} with NaN or an infinite number, "
                            "which a plan cannot hold")
    # Pinned values must be values the tool accepts, or the step could never run.
    for arg, constraint in step.constraints.items():
        candidates: Iterable[Any] = ()
        if isinstance(constraint, Exact):
            candidates = (constraint.value,)
        elif isinstance(constraint, OneOf):
            candidates = constraint.values
        elif isinstance(constraint, Item) and step.for_each is not None and step.for_each.items is not None:
            candidates = _item_values(step, arg, constraint)
        for value in candidates:
            try:
                t.args_model.__pydantic_validator__.validate_assignment(
                    t.args_model.model_construct(), arg, value
                )
            except ValidationError as exc:
                raise PlanError(
                    f"step {step.id!r} pins {arg!r} to {value!r}, which tool {t.name!r} refuses: "
                    f"{exc.errors()[0]['msg']}"
                ) from None


def _check_bindings(step: Step) -> None:
    """``from_step`` and ``for_each`` name steps this one depends on; ``item`` needs a ``for_each``."""
    for arg, constraint in step.constraints.items():
        if isinstance(constraint, FromStep):
            if constraint.step not in step.depends_on:
                raise PlanError(f"step {step.id!r} binds {arg!r} to step {constraint.step!r}, "
                                "which it does not depend on")
            if constraint.bound is not None:
                raise PlanError(f"step {step.id!r}: the from_step constraint on {arg!r} is bound by the runtime, "
                                "not by the plan")
        if isinstance(constraint, Item) and step.for_each is None:
            raise PlanError(f"step {step.id!r} pins {arg!r} to an item, but the step does not repeat (for_each)")
    repeat = step.for_each
    if repeat is not None and repeat.step is not None and repeat.step not in step.depends_on:
        raise PlanError(f"step {step.id!r} repeats over step {repeat.step!r}, which it does not depend on")


def _item_values(step: Step, arg: str, constraint: Item) -> list[Any]:
    """The value ``arg`` takes in each iteration over the plan's own items."""
    assert step.for_each is not None and step.for_each.items is not None
    values = []
    for i, item in enumerate(step.for_each.items):
        found = select(item, constraint.path)
        if len(found) != 1:
            raise PlanError(f"step {step.id!r}: item {i} has no single value at {constraint.path!r} for {arg!r}")
        values.append(found[0][1])
    return values


def _holds_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_holds_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_non_finite(v) for v in value)
    return False
