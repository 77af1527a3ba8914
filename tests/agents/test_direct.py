"""The direct executor: arguments from the plan, the dependencies and builders (invariant 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, Executor

from ..helpers import assert_all_revoked

CALLS: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


@tool
def source_a(n: int) -> dict[str, Any]:
    CALLS.append(("source_a", {"n": n}))
    return {"amount": 3, "vendor": "old"}


@tool
def source_b(n: int) -> dict[str, Any]:
    CALLS.append(("source_b", {"n": n}))
    return {"vendor": "new"}


@tool
def claim(employee: str, category: str, amount: int, vendor: str) -> str:
    CALLS.append(("claim", {"employee": employee, "category": category, "amount": amount, "vendor": vendor}))
    return "claimed"


@tool
def fetch(path: str, mode: str = "r") -> str:
    CALLS.append(("fetch", {"path": path, "mode": mode}))
    return path


TOOLS = [source_a, source_b, claim, fetch]
SOURCES = [
    {"id": "a", "tool": "source_a", "constraints": {"n": {"kind": "exact", "value": 1}}},
    {"id": "b", "tool": "source_b", "constraints": {"n": {"kind": "one_of", "values": [2, 3]}}},
]


def run(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime],
        steps: list[dict[str, Any]], executor: DirectExecutor, run_id: str) -> Any:
    rt = make_runtime(make_workflow({"steps": steps}, tools=TOOLS, executor=executor))
    report = rt.run("file the claim", run_id=run_id)
    assert_all_revoked(rt, run_id, at_least=1)
    return report


def test_direct_executor_is_an_executor() -> None:
    assert isinstance(DirectExecutor(), Executor)


def test_arguments_come_from_the_plan_and_the_dependencies(make_workflow: Callable[..., Workflow],
                                                           make_runtime: Callable[..., Runtime]) -> None:
    steps = [*SOURCES, {"id": "c", "tool": "claim", "depends_on": ["a", "b"], "constraints": {
        "employee": {"kind": "exact", "value": "e-17"},
        "category": {"kind": "one_of", "values": ["travel", "meals"]},
        "amount": {"kind": "range", "min": 1, "max": 10},
        "vendor": {"kind": "any"}}}]
    report = run(make_workflow, make_runtime, steps, DirectExecutor(), "direct-deps")
    assert report.status == "completed", report.summary()
    assert ("source_a", {"n": 1}) in CALLS and ("source_b", {"n": 2}) in CALLS  # exact; first of one_of
    # exact and one_of from the plan; the rest from the dependencies, the later one winning
    assert CALLS[-1] == ("claim", {"employee": "e-17", "category": "travel", "amount": 3, "vendor": "new"})


def test_builders_supply_arguments_and_take_precedence(make_workflow: Callable[..., Workflow],
                                                       make_runtime: Callable[..., Runtime]) -> None:
    steps = [{"id": "f", "tool": "fetch", "constraints": {
        "path": {"kind": "prefix", "prefix": "/docs/"}, "mode": {"kind": "one_of", "values": ["r", "w"]}}}]
    executor = DirectExecutor(builders={"fetch": lambda ctx: {"path": f"/docs/{ctx.step.id}.txt", "mode": "w"}})
    report = run(make_workflow, make_runtime, steps, executor, "direct-builders")
    assert report.status == "completed"
    assert CALLS == [("fetch", {"path": "/docs/f.txt", "mode": "w"})]


def test_a_missing_value_fails_the_step_with_a_clear_reason(make_workflow: Callable[..., Workflow],
                                                            make_runtime: Callable[..., Runtime]) -> None:
    steps = [{"id": "f", "tool": "fetch", "constraints": {"path": {"kind": "prefix", "prefix": "/"}}}]
    report = run(make_workflow, make_runtime, steps, DirectExecutor(), "direct-missing")
    [step] = report.steps
    assert step.status == "failed" and "no value for argument 'path'" in step.reason
    assert CALLS == [] and report.status == "failed"


def test_a_missing_value_names_the_builder_that_would_supply_it(make_workflow: Callable[..., Workflow],
                                                                make_runtime: Callable[..., Runtime]) -> None:
    steps = [{"id": "f", "tool": "fetch", "constraints": {"path": {"kind": "any"}}}]
    report = run(make_workflow, make_runtime, steps, DirectExecutor(), "direct-missing-builder")
    [step] = report.steps
    assert "DirectExecutor(builders={'fetch': ...})" in step.reason
