"""Runs on the LangGraph runtime: scheduling, results, revocation however a run ends.

Invariants 1 (no standing access: every grant of a run ends revoked), 2 (one identity
and one grant per step) and 4 (the planner cannot call tools).
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor
from scopegraph.clock import FixedClock
from scopegraph.credentials import Grant, GrantIssuer
from scopegraph.errors import ConfigError
from scopegraph.gateway import Gateway
from scopegraph.roles import PlanningContext, StepContext, ToolHandle

from ..helpers import READ_PLAN, STANDARD_TOOLS, assert_all_revoked, mint_grant

RAN: list[str] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    RAN.clear()


# concurrency and dependencies --------------------------------------------------------------
def test_independent_steps_run_concurrently(make_workflow: Callable[..., Workflow],
                                            make_runtime: Callable[..., Runtime]) -> None:
    # Each tool waits for the other: if the steps ran one after the other, the barrier breaks.
    barrier = threading.Barrier(2, timeout=10)

    @tool
    def left(x: str) -> dict[str, Any]:
        barrier.wait()
        return {"side": "left"}

    @tool
    def right(x: str) -> dict[str, Any]:
        barrier.wait()
        return {"side": "right"}

    plan = {"steps": [{"id": "l", "tool": "left", "constraints": {"x": {"kind": "exact", "value": "1"}}},
                      {"id": "r", "tool": "right", "constraints": {"x": {"kind": "exact", "value": "2"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[left, right]))
    report = rt.run("both at once", run_id="par1")
    assert report.status == "completed", report.summary()
    assert not barrier.broken


def test_dependent_steps_receive_dependency_results(make_workflow: Callable[..., Workflow],
                                                    make_runtime: Callable[..., Runtime]) -> None:
    seen: dict[str, Any] = {}

    @tool
    def fetch(item: str) -> dict[str, Any]:
        return {"amount": 4250, "vendor": "Rail Europe", "item": item}

    @tool
    def check(amount: int, vendor: str) -> dict[str, Any]:
        RAN.append(f"check {amount} {vendor}")
        return {"ok": amount < 10_000}

    class Recording(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            seen[ctx.step.id] = dict(ctx.dependencies)
            return super().execute(ctx)

    plan = {"steps": [
        {"id": "fetch", "tool": "fetch", "constraints": {"item": {"kind": "exact", "value": "r-1"}}},
        {"id": "check", "tool": "check", "depends_on": ["fetch"],
         "constraints": {"amount": {"kind": "range", "min": 1, "max": 10_000}, "vendor": {"kind": "any"}}},
    ]}
    rt = make_runtime(make_workflow(plan, tools=[fetch, check], executor=Recording()))
    report = rt.run("check the receipt", run_id="dep1")
    assert report.status == "completed", report.summary()
    assert seen["fetch"] == {}
    assert seen["check"] == {"fetch": {"amount": 4250, "vendor": "Rail Europe", "item": "r-1"}}
    assert RAN == ["check 4250 Rail Europe"]


def test_a_step_grant_is_revoked_as_soon_as_its_step_ends(make_workflow: Callable[..., Workflow],
                                                          make_runtime: Callable[..., Runtime]) -> None:
    live_during_second: dict[str, Any] = {}
    holder: dict[str, Runtime] = {}

    @tool
    def first(x: str) -> str:
        return "one"

    @tool
    def second(x: str) -> str:
        grants = holder["rt"].store.grants_for_run("rev1")
        live_during_second.update({g.step_id: g.revoked_at is None for g in grants})
        return "two"

    plan = {"steps": [{"id": "a", "tool": "first", "constraints": {"x": {"kind": "any"}}},
                      {"id": "b", "tool": "second", "depends_on": ["a"], "constraints": {"x": {"kind": "any"}}}]}
    executor = DirectExecutor(builders={"first": lambda c: {"x": "1"}, "second": lambda c: {"x": "2"}})
    rt = holder["rt"] = make_runtime(make_workflow(plan, tools=[first, second], executor=executor))
    assert rt.run("go", run_id="rev1").status == "completed"
    assert live_during_second == {"a": False, "b": True}
    grants = rt.store.grants_for_run("rev1")
    assert [g.revoke_reason for g in grants] == ["step ended", "step ended"]


def test_grants_are_minted_per_step_with_the_workflow_ttl(make_workflow: Callable[..., Workflow],
                                                          make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(grant_ttl=30, grant_max_uses=2))
    report = rt.run("read", run_id="ttl1")
    grants = rt.store.grants_for_run("ttl1")
    assert len(grants) == len(report.steps) == 2
    assert {g.step_id: g.tool for g in grants} == {"doc": "read_doc", "look": "lookup"}
    assert all(g.expires_at - g.issued_at == 30 and g.max_uses == 2 for g in grants)
    assert all(g.uses == 1 for g in grants)
    assert {g.jti for g in grants} == {s.grant_id for s in report.steps}


# how runs end --------------------------------------------------------------------------------
def test_run_record_has_the_documented_fields(make_workflow: Callable[..., Workflow],
                                              make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(trust_domain="rec.example"))
    report = rt.run("read the doc", initiator="alice", run_id="rec1")
    record = json.loads(report.model_dump_json())
    assert record["run_id"] == "rec1" and record["workflow"] == "testwf"
    assert record["status"] == "completed" and report.exit_code == 0
    assert record["grants_minted"] == record["grants_revoked"] == 2
    assert [s["step_id"] for s in record["steps"]] == ["doc", "look"]
    for s in record["steps"]:
        assert {"step_id", "tool", "spiffe_id", "grant_id", "decision", "policy_ids", "revoked"} <= set(s)
        assert s["spiffe_id"] == f"spiffe://rec.example/wf/testwf/run/rec1/step/{s['step_id']}/executor"
        assert re.fullmatch(r"[0-9a-f]{32}", s["grant_id"])
        assert s["decision"] == "allow" and s["policy_ids"] == ["allow-planned-calls"]
        assert s["revoked"] is True and s["status"] == "completed"
    assert record["steps"][0]["tool"] == "read_doc"


def test_a_write_pauses_for_approval_and_its_grant_is_still_revoked(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    plan = {"steps": [{"id": "note", "tool": "write_note",
                       "constraints": {"title": {"kind": "exact", "value": "t"},
                                       "amount": {"kind": "exact", "value": 5}}}]}
    rt = make_runtime(make_workflow(plan, approvers=["bob"]))
    report = rt.run("write a note", initiator="alice", run_id="pause1")
    assert report.status == "paused" and report.exit_code == 3
    [step] = report.steps
    assert step.status == "awaiting_approval" and step.decision == "needs_approval"
    assert step.policy_ids == ["writes-need-approval"]
    assert report.grants_minted == report.grants_revoked >= 1
    assert_all_revoked(rt, "pause1", at_least=1)


def test_an_off_plan_last_call_ends_the_step_and_run_denied(make_workflow: Callable[..., Workflow],
                                                            make_runtime: Callable[..., Runtime]) -> None:
    class OffPlan:
        def execute(self, ctx: StepContext) -> Any:
            return ctx.tools.call("read_doc", path="/secrets/keys")

    plan = {"steps": [{"id": "doc", "tool": "read_doc",
                       "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}}]}
    rt = make_runtime(make_workflow(plan, executor=OffPlan()))
    report = rt.run("read", run_id="deny1")
    assert report.status == "denied" and report.exit_code == 1
    [step] = report.steps
    assert step.status == "denied" and step.policy_ids == ["scopegraph:scope"]
    assert "outside the grant's scope" in step.reason
    assert_all_revoked(rt, "deny1", at_least=1)


def test_an_executor_that_makes_no_call_fails_its_step(make_workflow: Callable[..., Workflow],
                                                       make_runtime: Callable[..., Runtime]) -> None:
    class Idle:
        def execute(self, ctx: StepContext) -> Any:
            return None

    rt = make_runtime(make_workflow(executor=Idle()))
    report = rt.run("read", run_id="idle1")
    assert report.status == "failed"
    assert all(s.status == "failed" and "no call" in s.reason for s in report.steps)
    assert_all_revoked(rt, "idle1", at_least=2)


def test_an_executor_that_raises_fails_its_step_and_the_run(make_workflow: Callable[..., Workflow],
                                                            make_runtime: Callable[..., Runtime]) -> None:
    class Buggy(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            if ctx.step.id == "doc":
                raise RuntimeError("model returned nonsense")
            return super().execute(ctx)

    plan = {"steps": [*READ_PLAN["steps"],
                      {"id": "after", "tool": "lookup", "depends_on": ["doc"],
                       "constraints": {"key": {"kind": "exact", "value": "alpha"}, "limit": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(plan, executor=Buggy(builders={"lookup": lambda c: {"limit": 5}})))
    report = rt.run("read", run_id="boom1")
    steps = {s.step_id: s for s in report.steps}
    assert report.status == "failed" and report.exit_code == 1
    assert steps["doc"].status == "failed"
    assert steps["doc"].reason == "executor raised RuntimeError"
    assert "nonsense" not in steps["doc"].reason  # messages may quote secrets: the type only
    assert steps["look"].status == "completed"          # independent work still finishes
    assert steps["after"].status == "not_started"       # dependents never start
    assert report.grants_minted == report.grants_revoked == 2
    assert_all_revoked(rt, "boom1", at_least=2)


class Crash(BaseException):
    """Something no executor should survive: not an ``Exception``, so nothing swallows it."""


def test_a_run_that_raises_mid_graph_still_revokes_everything(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    holder: dict[str, Runtime] = {}
    leaked: list[str] = []

    class Crashing(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            result = super().execute(ctx)
            if ctx.step.id == "second":
                # a grant of this run that no step will revoke (as if minted just before a crash)
                grant, _ = mint_grant(holder["rt"], "lookup", run_id="crash1", step_id="orphan")
                leaked.append(grant.jti)
                raise Crash("the process is going down")
            return result

    plan = {"steps": [{"id": "first", "tool": "lookup", "constraints": {"key": {"kind": "exact", "value": "a"}}},
                      {"id": "second", "tool": "lookup", "depends_on": ["first"],
                       "constraints": {"key": {"kind": "exact", "value": "b"}}},
                      {"id": "third", "tool": "lookup", "depends_on": ["second"],
                       "constraints": {"key": {"kind": "exact", "value": "c"}}}]}
    rt = holder["rt"] = make_runtime(make_workflow(plan, executor=Crashing()))
    with pytest.raises(Crash):
        rt.run("go", run_id="crash1")
    grants = {g.jti: g for g in rt.store.grants_for_run("crash1")}
    assert len(grants) == 3 and leaked[0] in grants
    assert_all_revoked(rt, "crash1", at_least=3)
    assert grants[leaked[0]].revoke_reason.startswith("run")
    assert rt.store.get_run("crash1").status in ("failed", "cancelled")
    report = rt.report("crash1")
    assert report.grants_minted == report.grants_revoked == 3
    assert {s.step_id: s.status for s in report.steps}["third"] == "not_started"


def test_a_cancelled_run_revokes_everything(make_workflow: Callable[..., Workflow],
                                            make_runtime: Callable[..., Runtime]) -> None:
    class Interrupted(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            if ctx.step.id == "look":
                raise KeyboardInterrupt
            return super().execute(ctx)

    plan = {"steps": [READ_PLAN["steps"][0], {**READ_PLAN["steps"][1], "depends_on": ["doc"]}]}
    rt = make_runtime(make_workflow(plan, executor=Interrupted(builders={
        "read_doc": lambda c: {"path": "/docs/a"}, "lookup": lambda c: {"limit": 5}})))
    with pytest.raises(KeyboardInterrupt):
        rt.run("go", run_id="cancel1")
    assert rt.store.get_run("cancel1").status == "cancelled"
    assert_all_revoked(rt, "cancel1", at_least=2)


def test_a_planner_that_raises_fails_the_run_cleanly(make_workflow: Callable[..., Workflow],
                                                     make_runtime: Callable[..., Runtime]) -> None:
    class Down:
        def plan(self, ctx: PlanningContext) -> Any:
            raise ValueError("model endpoint down")

    rt = make_runtime(make_workflow(planner=Down()))
    report = rt.run("go", run_id="pdown")
    assert report.status == "failed" and "model endpoint down" in (report.error or "")
    assert report.grants_minted == 0 and report.steps == []


# the planner ----------------------------------------------------------------------------------
def test_the_planner_sees_the_task_and_catalogue_but_holds_no_tool_access(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    seen: list[PlanningContext] = []

    class Watching:
        def plan(self, ctx: PlanningContext) -> Any:
            seen.append(ctx)
            return READ_PLAN

    rt = make_runtime(make_workflow(planner=Watching()))
    report = rt.run("read the doc", run_id="plan1")
    [ctx] = seen
    for field in dataclasses.fields(ctx):  # nothing that could reach a tool
        value = getattr(ctx, field.name)
        assert not isinstance(value, (ToolHandle, Gateway, GrantIssuer, Grant, Runtime)), field.name
    assert ctx.task == "read the doc" and ctx.run_id == "plan1"
    assert str(ctx.identity) == report.planner_spiffe_id
    assert str(ctx.identity).endswith("/run/plan1/planner")
    assert str(ctx.identity) not in {s.spiffe_id for s in report.steps}
    json.dumps(list(ctx.catalogue))  # plain data: no handles, no tokens
    assert {t["name"] for t in ctx.catalogue} == {t.name for t in STANDARD_TOOLS}
    assert not any(g.subject == str(ctx.identity) for g in rt.store.grants_for_run("plan1"))


# bad input ---------------------------------------------------------------------------------
def test_a_run_id_is_never_reused(make_workflow: Callable[..., Workflow],
                                  make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow())
    assert rt.run("read", run_id="once").status == "completed"
    with pytest.raises(ConfigError, match="'once'"):
        rt.run("read again", run_id="once")
    assert len(rt.store.grants_for_run("once")) == 2


@pytest.mark.parametrize("task", ["", "   ", "\n"])
def test_an_empty_task_is_refused(make_workflow: Callable[..., Workflow],
                                  make_runtime: Callable[..., Runtime], task: str) -> None:
    rt = make_runtime(make_workflow())
    with pytest.raises(ConfigError, match="empty"):
        rt.run(task)


@pytest.mark.parametrize("run_id", ["a/b", "../x", "a b", "rün", "x\n"])
def test_a_bad_run_id_is_refused_and_leaves_no_run_behind(make_workflow: Callable[..., Workflow],
                                                          make_runtime: Callable[..., Runtime],
                                                          run_id: str) -> None:
    rt = make_runtime(make_workflow())
    with pytest.raises(ConfigError, match="run id"):
        rt.run("read", run_id=run_id)
    assert rt.store.get_run(run_id) is None


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"name": "bad name"}, "workflow name"),
    ({"name": "expenses\n"}, "workflow name"),
    ({"grant_ttl": 0}, "grant_ttl"),
    ({"grant_ttl": 901}, "grant_ttl"),
    ({"grant_max_uses": 0}, "grant_max_uses"),
    ({"planner": object()}, "plan(ctx)"),
    ({"executor": object()}, "execute(ctx)"),
])
def test_bad_workflow_definitions_are_refused(make_workflow: Callable[..., Workflow],
                                              kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        make_workflow(**kwargs)


# secrets never land on disk -------------------------------------------------------------------
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{20,}")


def test_no_credential_is_written_to_the_store(make_workflow: Callable[..., Workflow],
                                               make_runtime: Callable[..., Runtime], store_path: Path) -> None:
    """Grants and SVIDs are bearer credentials: the store keeps their facts, never the tokens."""
    rt = make_runtime(make_workflow())
    report = rt.run("read", run_id="disk1")
    assert report.status == "completed"
    files = [p for p in store_path.parent.iterdir() if p.name.startswith(store_path.name)]
    assert files
    for path in files:
        for match in JWT.finditer(path.read_bytes()):
            try:
                claims = jwt.decode(match.group().decode(), options={"verify_signature": False})
            except jwt.PyJWTError:
                continue
            # a signed ledger head is fine; anything naming a subject or audience is a credential
            assert not {"sub", "aud", "scope"} & set(claims), f"a credential was written to {path.name}"


# labels flow between steps -----------------------------------------------------------------
def test_egress_after_a_confidential_read_is_denied(make_workflow: Callable[..., Workflow],
                                                    make_runtime: Callable[..., Runtime],
                                                    clock: FixedClock) -> None:
    plan = {"steps": [
        {"id": "doc", "tool": "read_doc", "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
        {"id": "mail", "tool": "send_mail", "depends_on": ["doc"],
         "constraints": {"to": {"kind": "exact", "value": "a@example.com"}, "body": {"kind": "any"}}},
    ]}
    executor = DirectExecutor(builders={"read_doc": lambda c: {"path": "/docs/x"},
                                        "send_mail": lambda c: {"body": c.dependencies["doc"]["text"]}})
    rt = make_runtime(make_workflow(plan, executor=executor))
    report = rt.run("mail the doc", run_id="label1")
    mail = {s.step_id: s for s in report.steps}["mail"]
    assert mail.status == "denied" and "no-confidential-egress" in mail.policy_ids
    assert report.status == "denied"
    assert_all_revoked(rt, "label1", at_least=2)
