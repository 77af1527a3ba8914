"""Values bound to earlier results (``from_step``) and repeated steps (``for_each``), issue 13
points 2 and 3, through whole runs on the real runtime.

A repeated step runs once per item, each iteration with its own identity, grant and, where
policy wants one, approval; the plan's bound on the count holds. A ``from_step`` argument
must be a value the named step returned: an injected one is refused by the grant's scope.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor
from scopegraph.constraints import Exact, FromStep
from scopegraph.errors import PlanError
from scopegraph.gateway import SCOPE_POLICY_ID
from scopegraph.plan import parse_plan, validate_plan
from scopegraph.roles import ReplanRequested, StepContext
from scopegraph.tools import ToolRegistry

from ..helpers import assert_all_revoked

PEOPLE = [{"name": "Ann", "email": "ann@team.example"}, {"name": "Bo", "email": "bo@team.example"},
          {"name": "Cy", "email": "cy@team.example"}]
FILES = [{"id": "f-101", "size": 10}, {"id": "f-207", "size": 900}, {"id": "f-300", "size": 5}]
SENT: list[tuple[str, str]] = []
DELETED: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    SENT.clear()
    DELETED.clear()


@tool(risk="read")
def list_people(team: str) -> dict[str, Any]:
    """The members of a team."""
    return {"team": team, "people": PEOPLE[: {"all": 3, "none": 0}.get(team, 2)]}


@tool(risk="read")
def list_files(folder: str) -> dict[str, Any]:
    """The files in a folder."""
    return {"folder": folder, "files": FILES}


@tool(risk="write")
def delete_file(file_id: str) -> str:
    """Delete a file."""
    DELETED.append(file_id)
    return f"deleted {file_id}"


@tool(risk="read", roles={"to": "destination", "text": "content"})
def notify(to: str, text: str) -> str:
    """Post a note to a colleague's inbox (inside the organisation)."""
    SENT.append((to, text))
    return "posted"


@tool(risk="read")
def tally(count: int) -> int:
    """Count what was done."""
    return count


TOOLS = [list_people, list_files, delete_file, notify, tally]


def exact(value: Any) -> dict[str, Any]:
    return {"kind": "exact", "value": value}


TEAM = {"id": "team", "tool": "list_people", "constraints": {"team": exact("core")}}
FILES_STEP = {"id": "files", "tool": "list_files", "constraints": {"folder": exact("/tmp")}}


def each_member(max_count: int = 5, **more: Any) -> dict[str, Any]:
    return {"id": "tell", "tool": "notify", "depends_on": ["team"],
            "for_each": {"step": "team", "path": "people", "max": max_count},
            "constraints": {"to": {"kind": "item", "path": "email"}, "text": exact("stand-up moved to 10")},
            **more}


@pytest.fixture
def start(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Callable[..., Runtime]:
    def make(plan: dict[str, Any], executor: Any = None, **kwargs: Any) -> Runtime:
        kwargs.setdefault("approvers", ["bob"])
        return make_runtime(make_workflow(plan, tools=TOOLS, executor=executor or DirectExecutor(), name="rep",
                                          **kwargs))
    return make


def minted(rt: Runtime, run_id: str) -> dict[str, dict[str, Any]]:
    return {r["step_id"]: r for r in rt.ledger.records(run_id) if r["kind"] == "grant_minted"}


# for_each -------------------------------------------------------------------------------------
def test_a_step_repeats_over_an_earlier_step_s_list_each_iteration_under_its_own_identity_and_grant(
        start: Callable[..., Runtime]) -> None:
    rt = start({"steps": [TEAM, each_member()]})
    report = rt.run("Tell each member of the core team the stand-up moved to 10", initiator="alice", run_id="r1")
    assert report.status == "completed", report.summary()
    assert sorted(SENT) == [("ann@team.example", "stand-up moved to 10"), ("bo@team.example", "stand-up moved to 10")]

    grants = minted(rt, "r1")
    assert {"tell[0]", "tell[1]"} <= set(grants) and "tell" not in grants
    ids = [grants[f"tell[{i}]"]["spiffe_id"] for i in range(2)]
    assert ids == [str(rt.domain.id("wf", "rep", "run", "r1", "step", "tell", "item", str(i), "executor"))
                   for i in range(2)]
    assert grants["tell[0]"]["grant_id"] != grants["tell[1]"]["grant_id"]
    # Each grant pins its own item, at the exact path of that item in the team's output.
    assert grants["tell[1]"]["constraints"]["to"]["path"] == "people[1].email"
    [tell] = [s for s in report.steps if s.step_id == "tell"]
    assert tell.status == "completed" and [c.step_id for c in tell.children] == ["tell[0]", "tell[1]"]
    assert all(c.revoked and c.spiffe_id for c in tell.children)
    assert_all_revoked(rt, "r1", at_least=3)
    assert "tell[1]" in report.summary()
    # ``scopegraph trace`` shows the iterations in the step's place; ``report`` counts them for it.
    from scopegraph.trace_view import build_trace
    from scopegraph.usage_report import build_report

    trace = build_trace(rt.store, "r1", now=rt.clock.now())
    assert [s["step_id"] for s in trace["steps"]] == ["team", "tell[0]", "tell[1]"]
    [row] = [r for r in build_report(rt.store, "rep", now=rt.clock.now())["workflows"][0]["steps"]
             if r["step_id"] == "tell"]
    assert row["runs_executed"] == 1 and row["grants"]["minted"] == 2 and row["calls"]["ok"] == 2


class Swapping(DirectExecutor):
    """Iteration 1 tries to write to the first member instead of its own item, then gives up."""

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == "tell[1]":
            return ctx.tools.call("notify", to=PEOPLE[0]["email"], text="stand-up moved to 10")
        return super().execute(ctx)


def test_an_iteration_may_only_use_its_own_item(start: Callable[..., Runtime]) -> None:
    rt = start({"steps": [TEAM, each_member()]}, executor=Swapping())
    report = rt.run("tell each member", initiator="alice", run_id="r2")
    assert report.status == "denied", report.summary()
    [tell] = [s for s in report.steps if s.step_id == "tell"]
    second = tell.children[1]
    assert second.status == "denied" and second.calls[0].policy_ids == [SCOPE_POLICY_ID]
    assert "people[1].email" in second.calls[0].reason
    assert SENT == [("ann@team.example", "stand-up moved to 10")]


def test_a_list_longer_than_the_plan_s_bound_fails_the_step_before_any_iteration_runs(
        start: Callable[..., Runtime]) -> None:
    rt = start({"steps": [{**TEAM, "constraints": {"team": exact("all")}}, each_member(max_count=2)]})
    report = rt.run("tell everyone", initiator="alice", run_id="r3")
    assert report.status == "failed"
    [tell] = [s for s in report.steps if s.step_id == "tell"]
    assert tell.status == "failed"
    assert tell.reason == "step 'tell' would repeat 3 times, more than the plan's bound of 2"
    assert SENT == [] and not any(sid.startswith("tell") for sid in minted(rt, "r3"))


def test_an_empty_list_completes_the_step_with_no_iteration_and_dependents_run(start: Callable[..., Runtime]) -> None:
    count = {"id": "count", "tool": "tally", "depends_on": ["tell"],
             "constraints": {"count": {"kind": "range", "min": 0, "max": 10}}}
    executor = DirectExecutor(builders={"tally": lambda ctx: {"count": len(ctx.dependencies["tell"])}})
    rt = start({"steps": [{**TEAM, "constraints": {"team": exact("none")}}, each_member(), count]}, executor=executor)
    report = rt.run("tell nobody", initiator="alice", run_id="r4")
    assert report.status == "completed", report.summary()
    assert [s.status for s in report.steps] == ["completed", "completed", "completed"]
    assert SENT == []


def test_a_dependent_step_sees_the_list_of_the_iterations_results(start: Callable[..., Runtime]) -> None:
    count = {"id": "count", "tool": "tally", "depends_on": ["tell"],
             "constraints": {"count": {"kind": "range", "min": 0, "max": 10}}}
    seen: list[Any] = []

    def build(ctx: StepContext) -> dict[str, Any]:
        seen.append(ctx.dependencies["tell"])
        return {"count": len(ctx.dependencies["tell"])}

    rt = start({"steps": [TEAM, each_member(), count]}, executor=DirectExecutor(builders={"tally": build}))
    assert rt.run("tell and count", initiator="alice", run_id="r5").status == "completed"
    assert seen == [["posted", "posted"]]


def test_a_step_repeats_over_the_plan_s_own_items_each_its_own_approval(start: Callable[..., Runtime]) -> None:
    step = {"id": "rm", "tool": "delete_file", "for_each": {"items": ["f-101", "f-300"], "max": 2},
            "constraints": {"file_id": {"kind": "item"}}}
    rt = start({"steps": [step]})
    paused = rt.run("Delete f-101 and f-300", initiator="alice", run_id="r6")
    assert paused.status == "paused"
    pending = sorted(rt.approvals.list(run_id="r6", status="pending"), key=lambda a: a.step_id)
    assert [(a.step_id, a.arguments) for a in pending] == [("rm[0]", {"file_id": "f-101"}),
                                                            ("rm[1]", {"file_id": "f-300"})]
    assert len({a.digest for a in pending}) == 2
    # The planner fixed the items: the grants pin them exactly.
    assert minted(rt, "r6")["rm[1]"]["constraints"]["file_id"] == {"kind": "exact", "value": "f-300"}
    rt.approvals.approve(pending[0].id, approver="bob")
    rt.approvals.deny(pending[1].id, approver="bob", reason="keep that one")
    report = rt.resume("r6")
    assert DELETED == ["f-101"]
    assert report.status == "denied"
    [rm] = report.steps
    assert [c.status for c in rm.children] == ["completed", "denied"]
    assert_all_revoked(rt, "r6")


# from_step ------------------------------------------------------------------------------------
DELETE_FROM_LIST = {"id": "rm", "tool": "delete_file", "depends_on": ["files"],
                    "constraints": {"file_id": {"kind": "from_step", "step": "files", "path": "files[*].id"}}}


class Injected(DirectExecutor):
    """Tries a file id the list never held (as a planted instruction would), then one it did."""

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.tool != "delete_file":
            return super().execute(ctx)
        ctx.tools.call("delete_file", file_id="f-payroll")
        return ctx.tools.call("delete_file", file_id="f-207")


def test_a_value_bound_to_an_earlier_step_must_be_one_that_step_returned(start: Callable[..., Runtime]) -> None:
    rt = start({"steps": [FILES_STEP, DELETE_FROM_LIST]}, executor=Injected())
    paused = rt.run("Delete the largest file in /tmp", initiator="alice", run_id="b1")
    [rm] = [s for s in paused.steps if s.step_id == "rm"]
    assert [(c.decision, c.policy_ids) for c in rm.calls] == [("deny", [SCOPE_POLICY_ID]),
                                                              ("needs_approval", ["writes-need-approval"])]
    assert rm.calls[0].reason == ("argument 'file_id' is outside the grant's scope: it must be a value step "
                                  "'files' returned at 'files[*].id'")
    [request] = rt.approvals.list(run_id="b1", status="pending")
    rt.approvals.approve(request.id, approver="bob")
    assert rt.resume("b1").status == "completed"
    assert DELETED == ["f-207"]
    # The grant carries digests of the bound values, not the values.
    grant = minted(rt, "b1")["rm"]["constraints"]["file_id"]
    assert grant["kind"] == "from_step" and len(grant["bound"]) == 3 and "f-207" not in str(grant)


def test_direct_executor_fills_a_bound_argument_with_the_first_value_it_may_take(
        start: Callable[..., Runtime]) -> None:
    rt = start({"steps": [FILES_STEP, DELETE_FROM_LIST]})
    assert rt.run("Delete a file from /tmp", initiator="alice", run_id="b2").status == "paused"
    [request] = rt.approvals.list(run_id="b2", status="pending")
    assert request.arguments == {"file_id": "f-101"}


@pytest.mark.parametrize(("step", "message"), [
    ({"id": "rm", "tool": "delete_file", "constraints": {"file_id": {"kind": "from_step", "step": "files"}}},
     "step 'rm' binds 'file_id' to step 'files', which it does not depend on"),
    ({"id": "rm", "tool": "delete_file", "constraints": {"file_id": {"kind": "item"}}},
     "step 'rm' pins 'file_id' to an item, but the step does not repeat (for_each)"),
    ({"id": "rm", "tool": "delete_file", "for_each": {"step": "files", "path": "files", "max": 3},
      "constraints": {"file_id": {"kind": "item", "path": "id"}}},
     "step 'rm' repeats over step 'files', which it does not depend on"),
    ({"id": "rm", "tool": "delete_file", "depends_on": ["files"],
      "constraints": {"file_id": {"kind": "from_step", "step": "files", "bound": ["00"]}}},
     "step 'rm': the from_step constraint on 'file_id' is bound by the runtime, not by the plan"),
    ({"id": "rm", "tool": "delete_file", "for_each": {"items": [{"x": 1}], "max": 3},
      "constraints": {"file_id": {"kind": "item", "path": "id"}}},
     "step 'rm': item 0 has no single value at 'id' for 'file_id'"),
    ({"id": "rm", "tool": "tally", "for_each": {"items": ["many"], "max": 3},
      "constraints": {"count": {"kind": "item"}}},
     "step 'rm' pins 'count' to 'many', which tool 'tally' refuses"),
])
def test_plans_that_bind_or_repeat_wrongly_are_rejected(step: dict[str, Any], message: str) -> None:
    plan = parse_plan({"steps": [FILES_STEP, step]})
    with pytest.raises(PlanError) as refused:
        validate_plan(plan, ToolRegistry(TOOLS))
    assert str(refused.value).startswith(message), str(refused.value)


@pytest.mark.parametrize(("for_each", "fragment"), [
    ({"items": [1, 2, 3], "max": 2}, "for_each lists 3 items, more than its max of 2"),
    ({"items": [1], "step": "files", "max": 2}, "either items or a step"),
    ({"max": 2}, "either items or a step"),
    ({"step": "files", "path": "files", "max": 101}, "less than or equal to 100"),
    ({"step": "files", "path": "files[", "max": 2}, "not a path"),
])
def test_a_malformed_for_each_is_rejected_when_the_plan_is_read(for_each: dict[str, Any], fragment: str) -> None:
    with pytest.raises(PlanError, match=fragment):
        parse_plan({"steps": [{"id": "rm", "tool": "delete_file", "for_each": for_each,
                               "constraints": {"file_id": {"kind": "item"}}}]})


# re-plans ---------------------------------------------------------------------------------------
class AsksOnce(DirectExecutor):
    """The second iteration asks for a new plan the first time it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = False

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == "tell[1]" and not self.asked:
            self.asked = True
            raise ReplanRequested("out_of_scope", argument="text")
        return super().execute(ctx)


def test_a_re_plan_keeps_the_iterations_that_ran_and_runs_the_one_that_asked_again(
        start: Callable[..., Runtime]) -> None:
    plan = {"steps": [TEAM, each_member()]}
    rt = start(plan, executor=AsksOnce(), planner=_Planner([plan, plan]))
    report = rt.run("tell each member", initiator="alice", run_id="p1")
    assert report.status == "completed", report.summary()
    assert sorted(SENT) == [("ann@team.example", "stand-up moved to 10"), ("bo@team.example", "stand-up moved to 10")]
    assert report.replans == 1


class GateAsks(DirectExecutor):
    """The gate step asks for a new plan the first time it runs."""

    def __init__(self) -> None:
        super().__init__(builders={"tally": lambda ctx: {"count": 1}})
        self.asked = False

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == "gate" and not self.asked:
            self.asked = True
            raise ReplanRequested("out_of_scope", argument="count")
        return super().execute(ctx)


def test_a_revision_that_repeats_more_often_is_widened(start: Callable[..., Runtime]) -> None:
    gate = {"id": "gate", "tool": "tally", "constraints": {"count": {"kind": "range", "min": 0, "max": 5}}}
    first = {"steps": [TEAM, gate, each_member(max_count=2, depends_on=["team", "gate"])]}
    same = {"steps": [TEAM, gate, each_member(max_count=2, depends_on=["team", "gate"])]}
    more = {"steps": [TEAM, gate, each_member(max_count=5, depends_on=["team", "gate"])]}
    rt = start(first, executor=GateAsks(), planner=_Planner([first, same]))
    assert rt.run("tell each member", initiator="alice", run_id="p2").status == "completed"
    rt = start(first, executor=GateAsks(), planner=_Planner([first, more]))
    report = rt.run("tell each member", initiator="alice", run_id="p3")
    assert report.status == "paused", report.summary()
    pending = rt.approvals.list(run_id="p3", status="pending")
    assert len(pending) == 2 and all(a.policy_ids == ["widened-scope-needs-approval"] for a in pending)


class _Planner:
    def __init__(self, plans: list[dict[str, Any]]) -> None:
        self.plans = plans
        self.calls = 0

    def plan(self, ctx: Any) -> dict[str, Any]:
        self.calls += 1
        return self.plans[min(self.calls, len(self.plans)) - 1]


def test_bound_constraints_are_not_plan_values_for_provenance() -> None:
    # A value an earlier step returned keeps that output's labels: from_step is not "plan".
    from scopegraph.provenance import Observation, trace_arguments

    bound = FromStep(step="files", path="files[*].id").bind({"files": FILES})
    seen = Observation(step_id="files", tool="list_files", labels=frozenset({"untrusted"}), value={"files": FILES})
    origin = trace_arguments({"file_id": "f-207"}, {"file_id": bound}, [seen])["file_id"]
    assert origin.source == "tool_output" and origin.steps == ("files",) and "untrusted" in origin.labels
    assert trace_arguments({"file_id": "f-207"}, {"file_id": Exact(value="f-207")}, [seen])["file_id"].source == "plan"
