"""Plans: the planner's output, checked before anything runs.

A plan is a list of steps; each names one tool, constrains each argument it will pass,
says why, and lists the steps it depends on. ``validate_plan`` rejects a plan that
names an unknown tool, constrains an argument the tool does not take, pins a value the
tool's schema refuses, leaves a required argument unconstrained, or has a cycle.
"""

from __future__ import annotations

import graphlib
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .constraints import Constraint, Exact, OneOf
from .errors import PlanError, UnknownToolError
from .tools import ToolRegistry

_STEP_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


class Step(BaseModel):
    """One unit of work: one tool, constrained arguments, a purpose."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tool: str
    constraints: dict[str, Constraint] = Field(default_factory=dict)
    purpose: str = ""
    depends_on: tuple[str, ...] = ()

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
        for s in self.steps:
            if s.id == step_id:
                return s
        raise PlanError(f"plan has no step {step_id!r}")

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
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
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
    # Pinned values must be values the tool accepts, or the step could never run.
    for arg, constraint in step.constraints.items():
        candidates: Iterable[Any] = ()
        if isinstance(constraint, Exact):
            candidates = (constraint.value,)
        elif isinstance(constraint, OneOf):
            candidates = constraint.values
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
