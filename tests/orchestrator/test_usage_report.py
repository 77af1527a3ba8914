"""``scopegraph report``: granted versus used over real runs, and the narrowing it proposes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from scopegraph import Runtime, Workflow, policies, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.clock import FixedClock
from scopegraph.errors import TransientToolError
from scopegraph.gateway import RetrySettings
from scopegraph.roles import StepContext
from scopegraph.usage_report import build_report, render_report

START = 1_800_000_000.0
BASELINE = Path(policies.__file__).parent / "baseline.cedar"
NO_AP = """
@id("no-ap-region")
@reason("the ap region is off limits")
forbid (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"fetch")
when { context.arguments has region && context.arguments.region == "ap" };
"""

PLAN: dict[str, Any] = {"steps": [
    {"id": "fetch", "tool": "fetch",
     "constraints": {"key": {"kind": "exact", "value": "k1"},
                     "region": {"kind": "one_of", "values": ["eu", "us", "ap"]}}},
    {"id": "pay", "tool": "pay", "constraints": {"amount": {"kind": "range", "min": 1, "max": 10000}}},
    {"id": "tip", "tool": "tip", "constraints": {"amount": {"kind": "range", "min": 0, "max": 1000}}},
    {"id": "sync", "tool": "flaky_sync", "constraints": {"n": {"kind": "exact", "value": 1}}},
    {"id": "spare", "tool": "notify", "depends_on": ["fetch"],
     "constraints": {"to": {"kind": "exact", "value": "ops@example.com"}}},
]}


@tool(risk="read")
def fetch(key: str, region: str) -> str:
    """Fetch a record."""
    return f"{key}@{region}"


@tool(risk="read")
def pay(amount: int) -> int:
    """Pay an amount (a read here, so no approval is needed)."""
    return amount


@tool(risk="read")
def tip(amount: int) -> int:
    """Tip an amount."""
    return amount


@tool(risk="read")
def notify(to: str) -> str:
    """Notify someone."""
    return to


@tool(risk="write")
def write_note(title: str) -> str:
    """Write a note."""
    return title


def _flaky_sync() -> Any:
    failures = [TransientToolError("busy")]

    @tool(risk="read")
    def flaky_sync(n: int) -> int:
        """Fails once in the workflow's life, then works."""
        if failures:
            raise failures.pop()
        return n

    return flaky_sync


class _Executor(DirectExecutor):
    """Per step: probes the ap region first, pays and tips the next amounts, never notifies."""

    def __init__(self, pays: list[int], tips: list[int]) -> None:
        super().__init__()
        self.pays, self.tips = iter(pays), iter(tips)

    def execute(self, ctx: StepContext) -> Any:
        step = ctx.step.id
        if step == "fetch":
            ctx.tools.call("fetch", key="k1", region="ap")  # denied by no-ap-region
            return ctx.tools.call("fetch", key="k1", region="eu")
        if step == "pay":
            return ctx.tools.call("pay", amount=next(self.pays))
        if step == "tip":
            return ctx.tools.call("tip", amount=next(self.tips))
        if step == "spare":
            ctx.tools.call("pay", amount=1)  # another step's tool: scopegraph:grant
            return ctx.tools.call("notify", to="attacker@example.com")  # outside scope: scopegraph:scope
        return super().execute(ctx)


def _usage_workflow(tmp_path: Path) -> Workflow:
    extra = tmp_path / "no_ap.cedar"
    extra.write_text(NO_AP)
    return Workflow(name="usagewf", tools=[fetch, pay, tip, notify, _flaky_sync()],
                    planner=ScriptedPlanner(PLAN), executor=_Executor([120, 480], [400, 600]),
                    policies=[BASELINE, extra], retry=RetrySettings(attempts=3, sleep=lambda _: None))


def _approval_workflow() -> Workflow:
    plan = {"steps": [{"id": "note", "tool": "write_note",
                       "constraints": {"title": {"kind": "exact", "value": "t"}}}]}
    return Workflow(name="approvewf", tools=[write_note], planner=ScriptedPlanner(plan),
                    executor=DirectExecutor(), approvers=["bob"], approval_ttl=600)


@pytest.fixture
def report_clock() -> FixedClock:
    return FixedClock(start=START)


@pytest.fixture
def usage_store(tmp_path: Path, report_clock: FixedClock) -> Iterator[tuple[Runtime, Workflow]]:
    """Two runs of ``usagewf`` in one store; the runtime stays open for its store."""
    wf = _usage_workflow(tmp_path)
    rt = Runtime(wf, store=f"sqlite:///{tmp_path / 'sg.db'}", clock=report_clock)
    for run_id in ("run-a", "run-b"):
        assert rt.run("do the things", initiator="alice", run_id=run_id).status == "denied"
        report_clock.advance(10)
    yield rt, wf
    rt.close()


def _step(report: dict[str, Any], workflow: str, step_id: str) -> dict[str, Any]:
    wf = next(w for w in report["workflows"] if w["workflow"] == workflow)
    return next(s for s in wf["steps"] if s["step_id"] == step_id)


def _proposal(report: dict[str, Any], pid: str) -> dict[str, Any]:
    return next(p for w in report["workflows"] for p in w["proposals"] if p["id"] == pid)


def test_grants_minted_versus_used_per_step(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    report = build_report(rt.store, now=START + 60, workflows=[wf])
    assert report["runs"] == 2
    (usage,) = report["workflows"]
    assert usage["runs_by_status"] == {"denied": 2}
    assert [s["step_id"] for s in usage["steps"]] == ["fetch", "pay", "tip", "sync", "spare"]
    for step_id in ("fetch", "pay", "tip", "sync"):
        grants = _step(report, "usagewf", step_id)["grants"]
        assert (grants["minted"], grants["used"], grants["never_used"]) == (2, 2, 0)


def test_a_grant_minted_but_never_used_is_listed_with_why(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    report = build_report(rt.store, now=START + 60, workflows=[wf])
    spare = _step(report, "usagewf", "spare")
    assert spare["grants"]["minted"] == 2
    assert spare["grants"]["used"] == 0
    assert spare["grants"]["never_used"] == 2
    assert spare["grants"]["never_used_why"] == {"denied": 2}
    stored = {g.jti for r in ("run-a", "run-b") for g in rt.store.grants_for_run(r) if g.step_id == "spare"}
    assert {g["grant_id"] for g in spare["grants"]["never_used_ids"]} == stored
    assert spare["calls"] == {"ok": 0, "error": 0}


def test_a_retried_call_shows_as_repeated_use(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    sync = _step(build_report(rt.store, now=START + 60, workflows=[wf]), "usagewf", "sync")
    # Run a retried once (two executions under its grant); run b ran once.
    assert sync["grants"]["executions_per_grant"] == {"1": 1, "2": 1}
    assert (sync["grants"]["used_once"], sync["grants"]["used_repeatedly"]) == (1, 1)
    assert sync["grants"]["max_uses_consumed"] == 2
    assert sync["grants"]["max_uses_granted"] == 3
    assert sync["calls"] == {"ok": 2, "error": 1}


def test_denials_are_counted_by_deciding_policy(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    report = build_report(rt.store, now=START + 60, workflows=[wf])
    fetch_row, spare = _step(report, "usagewf", "fetch"), _step(report, "usagewf", "spare")
    assert fetch_row["denials"] == {"total": 2, "by_policy": {"no-ap-region": 2}, "by_tool": {"fetch": 2}}
    assert spare["denials"] == {"total": 4, "by_policy": {"scopegraph:grant": 2, "scopegraph:scope": 2},
                                "by_tool": {"notify": 2, "pay": 2}}
    assert _step(report, "usagewf", "pay")["denials"]["total"] == 0


def test_the_range_proposal_bounds_at_the_observed_max(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    report = build_report(rt.store, now=START + 60, workflows=[wf])
    p = _proposal(report, "proposed-usagewf-pay-amount-range")
    assert p["evidence"]["observed_min"] == 120 and p["evidence"]["observed_max"] == 480
    # 120 is not well above 1 (under 10 % of the range): the lower bound stays.
    assert p["plan_change"]["from"] == {"kind": "range", "min": 1, "max": 10000}
    assert p["plan_change"]["to"] == {"kind": "range", "min": 1, "max": 480}
    assert "context.arguments.amount > 480" in p["cedar"]
    assert "context.arguments.amount < 1" in p["cedar"]
    assert p["validation"]["status"] == "valid", p["validation"]


def test_both_bounds_narrow_when_two_values_sit_well_inside(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    p = _proposal(build_report(rt.store, now=START + 60, workflows=[wf]), "proposed-usagewf-tip-amount-range")
    assert p["plan_change"]["to"] == {"kind": "range", "min": 400, "max": 600}
    assert p["validation"]["status"] == "valid", p["validation"]


def test_unused_one_of_values_are_proposed_away(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    p = _proposal(build_report(rt.store, now=START + 60, workflows=[wf]), "proposed-usagewf-fetch-region-one-of")
    assert p["plan_change"]["to"] == {"kind": "one_of", "values": ["eu"]}
    assert p["evidence"]["never_used"] == ["us", "ap"]
    assert p["evidence"]["matched_by"] == "argument digests"  # strings are not in the use records
    assert '!(["eu"].contains(context.arguments.region))' in p["cedar"]
    assert p["validation"]["status"] == "valid", p["validation"]


def test_a_never_used_step_is_proposed_for_removal(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    p = _proposal(build_report(rt.store, now=START + 60, workflows=[wf]), "proposed-usagewf-spare-notify-unused")
    assert p["kind"] == "remove_step"
    assert p["plan_change"] == {"op": "remove_step", "step_id": "spare", "tool": "notify", "dependents": []}
    assert 'resource == Scopegraph::Tool::"notify"' in p["cedar"]
    assert 'context.step_id == "spare"' in p["cedar"]
    assert p["evidence"]["grants_minted"] == 2 and p["evidence"]["successful_calls"] == 0
    assert p["validation"]["status"] == "valid", p["validation"]


def test_every_proposal_is_cedar_that_parses_and_is_annotated(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    report = build_report(rt.store, now=START + 60, workflows=[wf])
    proposals = report["workflows"][0]["proposals"]
    assert {p["kind"] for p in proposals} == {"remove_step", "argument_range", "one_of"}
    for p in proposals:
        parsed = cedarpy.PolicySet.from_str(p["cedar"])
        (policy,) = parsed.to_pst().static_policies.values()
        assert policy.annotations["id"] == p["id"]
        assert p["id"].startswith("proposed-")
    # Together with the workflow's own policies they form one valid set.
    combined = BASELINE.read_text() + NO_AP + "".join(p["cedar"] for p in proposals)
    cedarpy.PolicySet.from_str(combined)


def test_without_the_workflow_argument_proposals_are_only_parsed(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, _ = usage_store
    report = build_report(rt.store, now=START + 60)  # the runs' target "usagewf" cannot be imported
    (usage,) = report["workflows"]
    assert usage["validation"]["status"] == "unavailable"
    by_kind = {p["id"]: p["validation"]["status"] for p in usage["proposals"]}
    assert by_kind["proposed-usagewf-spare-notify-unused"] == "valid"
    assert by_kind["proposed-usagewf-pay-amount-range"] == "skipped"
    assert "not type-checked" in _proposal(report, "proposed-usagewf-pay-amount-range")["validation"]["detail"]
    assert "could not be loaded" in render_report(report)


def test_approvals_asked_approved_denied_expired_consumed(tmp_path: Path, report_clock: FixedClock) -> None:
    rt = Runtime(_approval_workflow(), store=f"sqlite:///{tmp_path / 'ap.db'}", clock=report_clock)
    try:
        ids = {r: rt.run("note it", initiator="alice", run_id=r).approvals[0]["id"]
               for r in ("ok", "no", "wait")}
        rt.approvals.approve(ids["ok"], approver="bob")
        assert rt.resume("ok").status == "completed"
        rt.approvals.deny(ids["no"], approver="bob", reason="not now")
        assert rt.resume("no").status == "denied"
        live = _step(build_report(rt.store, now=START + 60), "approvewf", "note")["approvals"]
        late = _step(build_report(rt.store, now=START + 3600), "approvewf", "note")["approvals"]
    finally:
        rt.close()
    assert live == {"asked": 3, "approved": 1, "denied": 1, "expired": 0, "consumed": 1, "pending": 1}
    assert late == {"asked": 3, "approved": 1, "denied": 1, "expired": 1, "consumed": 1, "pending": 0}


def test_the_workflow_filter_and_the_rendering(usage_store: tuple[Runtime, Workflow]) -> None:
    rt, wf = usage_store
    assert build_report(rt.store, workflow="elsewhere", now=START)["workflows"] == []
    report = build_report(rt.store, workflow="usagewf", now=START + 60, workflows=[wf])
    assert json.loads(json.dumps(report)) == report
    text = render_report(report)
    assert "workflow usagewf  2 run(s): 2 denied" in text
    assert "├─ step fetch  fetch" in text and "└─ step spare  notify" in text
    assert "denials    4  by policy: scopegraph:grant 2, scopegraph:scope 2" in text
    assert "never used 2 (denied 2)" in text
    assert "once 1  repeated 1" in text
    assert '{"kind": "range", "min": 1, "max": 10000} → {"kind": "range", "min": 1, "max": 480}' in text
    assert '@id("proposed-usagewf-pay-amount-range")' in text
