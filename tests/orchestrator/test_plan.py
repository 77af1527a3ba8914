"""Plans: malformed or unsound plans are refused before anything runs (invariants 4, 6)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from scopegraph import Plan, ToolRegistry, parse_plan, tool, validate_plan
from scopegraph.constraints import Prefix
from scopegraph.errors import PlanError

from ..helpers import STANDARD_TOOLS


@tool(risk="write")
def file_expense(employee: str, amount: int, vendor: str = "unknown") -> dict[str, Any]:
    return {}


@pytest.fixture
def tools() -> ToolRegistry:
    return ToolRegistry([*STANDARD_TOOLS, file_expense])


def step(id: str = "s1", tool: str = "lookup", **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("constraints", {"key": {"kind": "any"}} if tool == "lookup" else {})
    return {"id": id, "tool": tool, **kwargs}


def check(steps: list[dict[str, Any]], tools: ToolRegistry) -> Plan:
    return validate_plan(parse_plan({"steps": steps}), tools)


# well-formed plans -------------------------------------------------------------------------
def test_a_sound_plan_is_returned_unchanged(tools: ToolRegistry) -> None:
    data = {"steps": [
        step("a", "read_doc", constraints={"path": {"kind": "prefix", "prefix": "/docs/"}}),
        step("b", "lookup", depends_on=["a"]),
        step("c", "file_expense", depends_on=["a", "b"], constraints={
            "employee": {"kind": "exact", "value": "e-17"},
            "amount": {"kind": "range", "min": 1, "max": 10000},
        }),
    ]}
    plan = validate_plan(parse_plan(json.dumps(data)), tools)
    assert [s.id for s in plan.steps] == ["a", "b", "c"]
    assert plan.step("c").depends_on == ("a", "b")
    assert isinstance(plan.step("a").constraints["path"], Prefix)
    assert parse_plan(plan) is plan


def test_ready_steps_follow_dependencies(tools: ToolRegistry) -> None:
    plan = check([step("a"), step("b"), step("c", depends_on=["a", "b"]), step("d", depends_on=["c"])], tools)
    assert [s.id for s in plan.ready_steps(done=[])] == ["a", "b"]
    assert [s.id for s in plan.ready_steps(done=["a"], started=["a", "b"])] == []
    assert [s.id for s in plan.ready_steps(done=["a", "b"], started=["a", "b"])] == ["c"]
    assert [s.id for s in plan.ready_steps(done=["a", "b", "c"], started=["a", "b", "c"])] == ["d"]


def test_plan_step_lookup_of_an_unknown_id_is_an_error(tools: ToolRegistry) -> None:
    with pytest.raises(PlanError, match="'nope'"):
        check([step("a")], tools).step("nope")


# malformed plans (untrusted data) ----------------------------------------------------------
@pytest.mark.parametrize(("data", "where"), [
    ({}, "steps"),
    ({"steps": []}, "steps"),
    ({"steps": "all of them"}, "steps"),
    ({"steps": [{"tool": "lookup"}]}, "id"),
    ({"steps": [{"id": "a"}]}, "tool"),
    ({"steps": [step("a")], "extra": 1}, "extra"),
    ({"steps": [step("a", shell="rm -rf /")]}, "shell"),
    ({"steps": [step("a b")]}, "id"),
    ({"steps": [step("a/../b")]}, "id"),
    ({"steps": [step("x" * 65)]}, "id"),
    ({"steps": [step(constraints={"key": {"kind": "glob", "glob": "*"}})]}, "key"),
    ({"steps": [step(constraints={"key": {"kind": "pattern", "regex": "("}})]}, "regex"),
    ({"steps": [step(constraints={"key": {"kind": "range", "min": 5, "max": 1}})]}, "key"),
    ({"steps": [step(constraints={"key": {"kind": "range"}})]}, "key"),
    ({"steps": [step(constraints={"key": {"kind": "one_of", "values": []}})]}, "values"),
    ({"steps": [step(constraints={"key": {"kind": "exact"}})]}, "value"),
    ({"steps": [step(constraints={"key": {"kind": "any", "but": "x"}})]}, "but"),
    ("not json at all", "plan"),
    ('{"steps": [', "plan"),
    (None, "plan"),
    (42, "plan"),
])
def test_malformed_plan_is_refused_with_a_clear_error(data: Any, where: str) -> None:
    with pytest.raises(PlanError, match="malformed plan") as err:
        parse_plan(data)
    message = str(err.value)
    assert "\n" not in message
    if where != "plan":
        assert where in message


def test_step_id_with_a_trailing_newline_is_refused() -> None:
    """Step ids end up in SPIFFE IDs; a trailing newline must not slip past the id check."""
    with pytest.raises(PlanError):
        parse_plan({"steps": [step("step-1\n")]})


# unsound plans -----------------------------------------------------------------------------
@pytest.mark.parametrize(("steps", "message"), [
    ([step("a", "delete_everything", constraints={})], "unknown tool 'delete_everything'"),
    ([step("a", constraints={"key": {"kind": "any"}, "shell": {"kind": "any"}})],
     "constrains 'shell', which tool 'lookup' does not take"),
    ([step("a", "file_expense", constraints={"employee": {"kind": "any"}})],
     "leaves required argument 'amount' of tool 'file_expense' unconstrained"),
    ([step("a", "lookup", constraints={})], "leaves required argument 'key'"),
    ([step("a", "file_expense", constraints={"employee": {"kind": "any"},
                                             "amount": {"kind": "exact", "value": "lots"}})],
     "pins 'amount' to 'lots', which tool 'file_expense' refuses"),
    ([step("a", "file_expense", constraints={"employee": {"kind": "any"},
                                             "amount": {"kind": "one_of", "values": [5, [1]]}})],
     "pins 'amount' to [1]"),
    ([step("a"), step("a")], "repeats step id 'a'"),
    ([step("a", depends_on=["ghost"])], "depends on unknown step 'ghost'"),
    ([step("a", depends_on=["a"])], "depends on itself"),
    ([step("a", depends_on=["b"]), step("b", depends_on=["a"])], "dependency cycle"),
    ([step("a", depends_on=["c"]), step("b", depends_on=["a"]), step("c", depends_on=["b"])],
     "dependency cycle"),
])
def test_unsound_plan_is_refused(tools: ToolRegistry, steps: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(PlanError) as err:
        check(steps, tools)
    assert message in str(err.value)


def test_optional_arguments_may_stay_unconstrained(tools: ToolRegistry) -> None:
    plan = check([step("a", "file_expense", constraints={
        "employee": {"kind": "exact", "value": "e-17"}, "amount": {"kind": "any"}})], tools)
    assert set(plan.steps[0].constraints) == {"employee", "amount"}


def test_cycle_error_names_the_steps(tools: ToolRegistry) -> None:
    with pytest.raises(PlanError) as err:
        check([step("first", depends_on=["second"]), step("second", depends_on=["first"])], tools)
    assert "first" in str(err.value) and "second" in str(err.value)
