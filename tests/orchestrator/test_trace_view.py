"""``scopegraph trace``: one real run, drawn from its ledger, grants and approvals."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.approvals import ApprovalService
from scopegraph.clock import FixedClock
from scopegraph.errors import ConfigError, TransientToolError
from scopegraph.gateway import RetrySettings
from scopegraph.roles import StepContext
from scopegraph.trace_view import build_trace, render_trace

START = 1_800_000_000.0
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+")

PLAN: dict[str, Any] = {"steps": [
    {"id": "read", "tool": "read_doc", "purpose": "read the doc",
     "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
    {"id": "sync", "tool": "flaky_sync", "depends_on": ["read"],
     "constraints": {"n": {"kind": "exact", "value": 1}}},
    {"id": "note", "tool": "write_note", "depends_on": ["sync"],
     "constraints": {"title": {"kind": "exact", "value": "done"}}},
]}


class _ProbingExecutor(DirectExecutor):
    """Tries a path outside its prefix before its planned read."""

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == "read":
            ctx.tools.call("read_doc", path="/docs/../etc/passwd")
            return ctx.tools.call("read_doc", path="/docs/a.txt")
        return super().execute(ctx)


def _workflow(clock: FixedClock) -> Workflow:
    failures = [TransientToolError("sync backend busy")]

    @tool(risk="read")
    def read_doc(path: str) -> dict[str, Any]:
        """Read a document."""
        clock.advance(0.25)
        return {"path": path}

    @tool(risk="read")
    def flaky_sync(n: int) -> int:
        """Fails once, then works."""
        clock.advance(0.1)
        if failures:
            raise failures.pop()
        return n

    @tool(risk="write")
    def write_note(title: str) -> str:
        """Write a note."""
        return title

    return Workflow(name="tracewf", tools=[read_doc, flaky_sync, write_note], planner=ScriptedPlanner(PLAN),
                    executor=_ProbingExecutor(), approvers=["bob"],
                    retry=RetrySettings(attempts=3, sleep=lambda _: None))


@pytest.fixture
def trace_clock() -> FixedClock:
    return FixedClock(start=START)


@pytest.fixture
def trace_runtime(tmp_path: Path, trace_clock: FixedClock) -> Iterator[Runtime]:
    rt = Runtime(_workflow(trace_clock), store=f"sqlite:///{tmp_path / 'sg.db'}", clock=trace_clock)
    yield rt
    rt.close()


@pytest.fixture
def finished_run(trace_runtime: Runtime, trace_clock: FixedClock) -> str:
    """A run that denies a probe, retries a call, pauses for bob, and completes after 30 s."""
    report = trace_runtime.run("write the note", initiator="alice", run_id="run-1")
    assert report.status == "paused"
    trace_clock.advance(30)
    trace_runtime.approvals.approve(report.approvals[0]["id"], approver="bob", reason="fine")
    trace_clock.advance(2)
    assert trace_runtime.resume("run-1").status == "completed"
    return "run-1"


def _step(trace: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in trace["steps"] if s["step_id"] == step_id)


def _grants(step: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in step["items"] if i["type"] == "grant"]


def test_the_run_header_has_workflow_initiator_status_and_timings(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    run = trace["run"]
    assert (run["workflow"], run["initiator"], run["status"]) == ("tracewf", "alice", "completed")
    assert run["started_at"] == START
    assert run["started_at_iso"] == "2027-01-15T08:00:00.000Z"
    # read 0.25 s, two sync attempts 0.2 s, then 30 s + 2 s waiting for bob and the resume.
    assert run["duration_ms"] == pytest.approx(32_450.0)
    assert run["paused_ms"] == pytest.approx(32_000.0)
    assert trace["planner"]["spiffe_id"] == str(trace_runtime.domain.id("wf", "tracewf", "run", "run-1", "planner"))
    assert [s["id"] for s in trace["planner"]["plan"]["steps"]] == ["read", "sync", "note"]
    assert trace["planner"]["plan"]["valid"] is True


def test_each_step_has_its_own_identity_and_grants(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    assert [s["step_id"] for s in trace["steps"]] == ["read", "sync", "note"]
    stored = {g.jti: g for g in trace_runtime.store.grants_for_run(finished_run)}
    for step in trace["steps"]:
        expected = str(trace_runtime.domain.id("wf", "tracewf", "run", "run-1", "step", step["step_id"], "executor"))
        assert step["spiffe_id"] == expected
        assert step["status"] == "completed"
        for g in _grants(step):
            assert g["grant_id"] in stored
            assert g["spiffe_id"] == expected
            assert g["max_uses"] == stored[g["grant_id"]].max_uses
            assert g["revoked_ms"] is not None and g["revoke_reason"] == "step ended"
            assert g["delegation"] == ["user:alice", trace["planner"]["spiffe_id"]]
    assert len(_grants(_step(trace, "note"))) == 2  # one asked for approval, one ran the approved call


def test_decisions_carry_outcome_policy_reasons_and_attempt(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    (grant,) = _grants(_step(trace, "read"))
    events = [(e["type"], e.get("outcome") or e.get("status"), e["policy_ids"] if e["type"] == "decision" else None)
              for e in grant["events"]]
    assert events == [("decision", "deny", ["scopegraph:scope"]),
                      ("decision", "allow", ["allow-planned-calls"]),
                      ("tool_call", "ok", None)]
    assert "outside the grant's scope" in grant["events"][0]["reasons"][0]
    assert grant["uses"] == 2
    # The read ran 250 ms; everything after it is offset from the run's start.
    assert grant["events"][2]["at_ms"] == pytest.approx(250.0)
    assert _grants(_step(trace, "sync"))[0]["at_ms"] == pytest.approx(250.0)


def test_a_retried_call_shows_both_attempts_under_one_grant(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    (grant,) = _grants(_step(trace, "sync"))
    calls = [(e["type"], e["attempt"], e.get("outcome") or e.get("status")) for e in grant["events"]]
    assert calls == [("decision", 1, "allow"), ("tool_call", 1, "error"),
                     ("decision", 2, "allow"), ("tool_call", 2, "ok")]
    assert grant["uses"] == 2
    assert all(isinstance(e["duration_ms"], float) for e in grant["events"] if e["type"] == "tool_call")


def test_the_approval_shows_who_decided_and_which_grant_consumed_it(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    note = _step(trace, "note")
    (approval,) = [i for i in note["items"] if i["type"] == "approval"]
    first, second = _grants(note)
    assert approval["status"] == "consumed"
    assert approval["policy_ids"] == ["writes-need-approval"]
    assert approval["answers"] == [{"approver": "bob", "answer": "approve", "reason": "fine",
                                    "at_ms": pytest.approx(30_450.0)}]
    assert approval["answers_source"] == "ledger"
    assert approval["consumed_grant_id"] == second["grant_id"]
    assert [e["outcome"] for e in first["events"] if e["type"] == "decision"] == ["needs_approval"]
    assert [e["type"] for e in second["events"]] == ["approval_consumed", "decision", "tool_call"]
    assert [e["type"] for e in trace["run_events"] if e["type"].startswith("run_")] == \
        ["run_paused", "run_resumed", "run_ended"]


def test_an_approval_answered_outside_the_runtime_is_read_from_the_store(
        trace_runtime: Runtime, trace_clock: FixedClock) -> None:
    report = trace_runtime.run("write the note", initiator="alice", run_id="run-2")
    # The CLI answers with a service that has no ledger: the answer is only in the store.
    ApprovalService(trace_runtime.store, clock=trace_clock).approve(report.approvals[0]["id"], approver="bob")
    trace = build_trace(trace_runtime.store, "run-2", now=START + 60)
    (approval,) = [i for i in _step(trace, "note")["items"] if i["type"] == "approval"]
    assert approval["answers_source"] == "store"
    assert [a["approver"] for a in approval["answers"]] == ["bob"]
    assert _step(trace, "note")["status"] == "approved_not_resumed"
    assert trace["run"]["status"] == "paused"
    assert "the ledger has no approval_decided record" in render_trace(trace)


def test_a_pending_approval_that_outlived_its_ttl_reads_as_denied(trace_runtime: Runtime) -> None:
    trace_runtime.run("write the note", initiator="alice", run_id="run-3")
    pending = build_trace(trace_runtime.store, "run-3", now=START + 60)
    expired = build_trace(trace_runtime.store, "run-3", now=START + 3600)
    assert _step(pending, "note")["status"] == "awaiting_approval"
    assert _step(expired, "note")["status"] == "denied"
    (approval,) = [i for i in _step(expired, "note")["items"] if i["type"] == "approval"]
    assert approval["status"] == "expired"


def test_the_rendered_tree_has_identities_decisions_and_box_drawing(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    text = render_trace(trace)
    lines = text.splitlines()
    assert lines[0].startswith("run run-1  workflow tracewf  completed  initiator alice")
    assert any(line.startswith("├─ ") for line in lines) and lines[-1].startswith("└─ ")
    assert any(line.startswith("│  ") for line in lines)
    for step in trace["steps"]:
        assert f"identity  {step['spiffe_id']}" in text
        for g in _grants(step):
            assert g["grant_id"] in text
    assert "decision deny  read_doc  attempt 1  [scopegraph:scope]" in text
    assert "decision allow  flaky_sync  attempt 2  [allow-planned-calls]" in text
    assert "tool call error  flaky_sync  attempt 1" in text
    assert "approved by bob: fine" in text
    assert "decision needs_approval  write_note  attempt 1  [writes-need-approval]" in text
    assert "revoked: step ended" in text
    assert "ended completed" in text


def test_the_json_form_round_trips_and_holds_no_token_or_key(trace_runtime: Runtime, finished_run: str) -> None:
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    text = json.dumps(trace)
    assert json.loads(text) == trace
    rendered = render_trace(trace)
    for out in (text, rendered):
        assert not JWT.search(out)
        assert "PRIVATE KEY" not in out
    keys = list(Path(trace_runtime.trust.keystore.location).glob("*.key"))  # the keystore, not the store
    assert len(keys) == 3
    for key_file in keys:
        body = b"".join(key_file.read_bytes().splitlines()[1:-1]).decode()
        assert body[:40] not in text and body[:40] not in rendered


def test_a_rejected_plan_shows_its_error_and_no_steps(tmp_path: Path, trace_clock: FixedClock) -> None:
    bad = {"steps": [{"id": "x", "tool": "no_such_tool", "constraints": {}}]}
    wf = Workflow(name="badplan", tools=[], planner=ScriptedPlanner(bad), executor=DirectExecutor())
    with Runtime(wf, store=f"sqlite:///{tmp_path / 'bad.db'}", clock=trace_clock) as rt:
        assert rt.run("anything", initiator="alice", run_id="bad-1").status == "failed"
        trace = build_trace(rt.store, "bad-1")
    assert trace["planner"]["plan"]["valid"] is False
    assert "unknown tool 'no_such_tool'" in trace["planner"]["plan"]["error"]
    assert trace["steps"] == []
    assert trace["run"]["status"] == "failed"
    assert "plan rejected: step 'x' names unknown tool 'no_such_tool'" in render_trace(trace)


def test_an_unknown_run_is_a_config_error(trace_runtime: Runtime) -> None:
    with pytest.raises(ConfigError, match=r"^unknown run 'nope'$"):
        build_trace(trace_runtime.store, "nope")


def test_a_trace_holds_only_its_own_run(trace_runtime: Runtime, finished_run: str) -> None:
    trace_runtime.run("write the note", initiator="alice", run_id="run-4")
    trace = build_trace(trace_runtime.store, finished_run, now=START + 60)
    mine = {g.jti for g in trace_runtime.store.grants_for_run(finished_run)}
    shown = {g["grant_id"] for s in trace["steps"] for g in _grants(s)}
    assert shown == mine
    assert "run-4" not in json.dumps(trace)
