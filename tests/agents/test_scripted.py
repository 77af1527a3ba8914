"""The scripted planner: a fixed plan or a function of the task; no tool access (invariant 4)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from scopegraph import Plan, Runtime, Workflow, parse_plan
from scopegraph.agents import Planner, ScriptedPlanner
from scopegraph.identity import SpiffeId
from scopegraph.roles import PlanningContext

from ..helpers import READ_PLAN


def planning_context(task: str = "read the doc") -> PlanningContext:
    return PlanningContext(task=task, workflow="testwf", run_id="r1",
                           identity=SpiffeId.parse("spiffe://scopegraph.local/wf/testwf/run/r1/planner"),
                           catalogue=[])


@pytest.mark.parametrize("source", [READ_PLAN, json.dumps(READ_PLAN), parse_plan(READ_PLAN)],
                         ids=["dict", "json", "Plan"])
def test_a_fixed_plan_is_returned_as_given(source: object) -> None:
    planner = ScriptedPlanner(source)  # type: ignore[arg-type]
    assert isinstance(planner, Planner)
    assert planner.plan(planning_context()) is source
    assert parse_plan(planner.plan(planning_context())) == parse_plan(READ_PLAN)


def test_a_plan_can_be_a_function_of_the_task() -> None:
    def plan_for(task: str) -> dict[str, object]:
        key = "alpha" if "alpha" in task else "beta"
        return {"steps": [{"id": "look", "tool": "lookup",
                           "constraints": {"key": {"kind": "exact", "value": key}}}]}

    planner = ScriptedPlanner(plan_for)
    alpha = parse_plan(planner.plan(planning_context("find alpha")))
    beta = parse_plan(planner.plan(planning_context("find something")))
    assert alpha.steps[0].constraints["key"].value == "alpha"
    assert beta.steps[0].constraints["key"].value == "beta"


def test_a_scripted_plan_drives_a_run(make_workflow: Callable[..., Workflow],
                                      make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(lambda task: json.dumps(READ_PLAN)))  # a function returning JSON
    report = rt.run("read", run_id="scripted1")
    assert report.status == "completed"
    assert [s.step_id for s in report.steps] == [s.id for s in Plan.model_validate(READ_PLAN).steps]
