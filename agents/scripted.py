"""A planner that returns a fixed plan, or a plan computed from the task."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from scopegraph.plan import Plan
from scopegraph.roles import PlanningContext

PlanSource = Plan | Mapping[str, Any] | str | Callable[[str], Plan | Mapping[str, Any] | str]


class ScriptedPlanner:
    """Plans without a model: ``ScriptedPlanner(plan)`` or ``ScriptedPlanner(lambda task: plan)``.

    Like every planner it sees only the task and the catalogue; it holds no tool handle.
    """

    def __init__(self, plan: PlanSource) -> None:
        self._plan = plan

    def plan(self, ctx: PlanningContext) -> Plan | Mapping[str, Any] | str:
        return self._plan(ctx.task) if callable(self._plan) else self._plan
