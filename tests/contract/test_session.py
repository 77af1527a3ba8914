"""The decision API (``Guard`` and ``Session``) on every store: real Cedar, real
signatures, the approval service the CLI answers through.

A host checks each proposed call, then lets the gateway run it or records what came of
running it itself; approvals are answered and resumed; steps and runs end with their
grants revoked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from scopegraph import Guard, Outcome, Runtime, Session, SessionError, StepEnd, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.clock import FixedClock
from scopegraph.errors import ConfigError
from scopegraph.identity import SpiffeId

from ..otel_capture import Capture, by_name, children, one, otel
from .conftest import Backend

__all__ = ["otel"]  # the fixture, imported so pytest finds it here

EFFECTS: list[tuple[str, dict[str, Any]]] = []


@tool(risk="read", labels=["confidential"])
def read_doc(path: str) -> dict[str, Any]:
    """Read a document (confidential)."""
    EFFECTS.append(("read_doc", {"path": path}))
    return {"path": path, "text": f"contents of {path}"}


@tool(risk="write")
def write_note(title: str, amount: int, pin: str = "") -> dict[str, Any]:
    """Write a note."""
    EFFECTS.append(("write_note", {"title": title, "amount": amount}))
    return {"title": title, "amount": amount}


PLAN: dict[str, Any] = {"steps": [
    {"id": "doc", "tool": "read_doc", "purpose": "read the document",
     "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
    {"id": "note", "tool": "write_note", "purpose": "write the note",
     "constraints": {"title": {"kind": "any"}, "amount": {"kind": "range", "min": 1, "max": 100},
                     "pin": {"kind": "any"}}},
]}


def workflow() -> Workflow:
    return Workflow(name="notes", tools=[read_doc, write_note], planner=ScriptedPlanner(PLAN),
                    executor=DirectExecutor(), approvers=["bob"])


@pytest.fixture
def guard(backend: Backend) -> Iterator[Guard]:
    EFFECTS.clear()
    with Guard(workflow(), store=backend.url, clock=FixedClock(start=1_800_000_000.0)) as g:
        yield g


@pytest.fixture
def session(guard: Guard) -> Session:
    return guard.start_run("write a note about the document", initiator="alice", plan=PLAN, run_id="r1")


def kinds(guard: Guard, run_id: str = "r1") -> list[str]:
    return [r["kind"] for r in guard.ledger.records(run_id)]


def test_an_allowed_call_runs_under_the_steps_own_identity_and_grant(guard: Guard, session: Session) -> None:
    before = guard.store.counts.commits
    decision = session.check("doc", "read_doc", {"path": "/docs/a.txt"})
    assert decision.outcome is Outcome.ALLOW and decision.allowed
    assert decision.policy_ids == ("allow-planned-calls",)
    assert EFFECTS == []  # checked, not run
    result = session.execute(decision)
    assert guard.store.counts.commits - before == 2  # the decision's write, the result's
    assert result.ok and result.value["text"] == "contents of /docs/a.txt"
    assert "confidential" in result.labels
    scope = session.step("doc")
    assert scope.identity == SpiffeId.parse("spiffe://scopegraph.local/wf/notes/run/r1/step/doc/executor")
    [grant] = guard.store.grants_for_run("r1")
    assert (grant.jti, grant.step_id, grant.uses) == (scope.grant_id, "doc", 1)
    session.end_step("doc")
    session.end_run(status="completed")
    assert all(g.revoked_at is not None for g in guard.store.grants_for_run("r1"))
    assert kinds(guard) == ["run_started", "plan", "grant_minted", "decision", "tool_call", "grant_revoked",
                            "step_ended", "run_ended"]
    assert guard.ledger.verify(run_id="r1").ok
    assert guard.store.get_run("r1").status == "completed"  # type: ignore[union-attr]


def test_a_call_the_host_runs_itself_is_recorded_as_the_gateway_records_one(guard: Guard, session: Session) -> None:
    decision = session.check("doc", "read_doc", {"path": "/docs/a.txt"})
    result = session.record(decision, value={"text": "from the host"}, labels=["untrusted"])
    assert result.ok and result.value == {"text": "from the host"}
    assert result.labels == {"confidential", "untrusted"}  # the tool's labels stay; the host adds
    assert EFFECTS == []  # the gateway ran nothing
    tool_call = [r for r in guard.ledger.records("r1") if r["kind"] == "tool_call"]
    assert [(r["status"], r["step_id"], r["grant_id"]) for r in tool_call] == [("ok", "doc", decision.grant_id)]
    assert session.seen("doc").data_labels == {"confidential", "untrusted"}
    with pytest.raises(SessionError, match="executed or recorded already"):
        session.record(decision, value={"text": "again"})
    with pytest.raises(SessionError, match="executed or recorded already"):
        session.execute(decision)
    assert len([r for r in guard.ledger.records("r1") if r["kind"] == "tool_call"]) == 1


def test_a_host_error_is_recorded_scrubbed_of_secret_arguments(guard: Guard, session: Session) -> None:
    decision = session.check("doc", "read_doc", {"path": "/docs/a.txt"})
    result = session.record(decision, error=RuntimeError("disk on fire"))
    assert result.status == "error" and result.error == "tool 'read_doc' failed: RuntimeError: disk on fire"
    [call] = [r for r in guard.ledger.records("r1") if r["kind"] == "tool_call"]
    assert call["status"] == "error" and call["error_type"] == "RuntimeError"


def test_a_refused_call_cannot_be_recorded_or_executed(guard: Guard, session: Session) -> None:
    outside = session.check("doc", "read_doc", {"path": "/etc/passwd"})
    assert outside.outcome is Outcome.DENY and outside.policy_ids == ("scopegraph:scope",)
    assert "outside the grant's scope" in outside.reason and "/etc/passwd" not in outside.reason
    with pytest.raises(SessionError, match="not allowed"):
        session.record(outside, value={"text": "smuggled"})
    assert session.execute(outside).status == "denied"
    assert EFFECTS == []
    other_tool = session.check("doc", "write_note", {"title": "t", "amount": 1})
    assert other_tool.outcome is Outcome.DENY and other_tool.policy_ids == ("scopegraph:grant",)
    off_plan = session.check("exfiltrate", "read_doc", {"path": "/docs/a.txt"})
    assert off_plan.outcome is Outcome.DENY and off_plan.policy_ids == ("scopegraph:plan",)
    assert EFFECTS == []


def test_a_record_for_a_call_checked_by_another_session_is_refused(guard: Guard, session: Session) -> None:
    decision = session.check("doc", "read_doc", {"path": "/docs/a.txt"})
    other = guard.session("r1", plan=session.plan)
    with pytest.raises(SessionError, match="was not checked in this session"):
        other.record(decision, value={})


def test_an_ended_step_refuses_further_calls(guard: Guard, session: Session) -> None:
    session.execute(session.check("doc", "read_doc", {"path": "/docs/a.txt"}))
    ended = session.end_step("doc")
    assert ended == StepEnd(status="completed", decision="allow", policy_ids=("allow-planned-calls",),
                            result={"path": "/docs/a.txt", "text": "contents of /docs/a.txt"})
    late = session.check("doc", "read_doc", {"path": "/docs/b.txt"})
    assert late.outcome is Outcome.DENY and late.policy_ids == ("scopegraph:grant",)
    assert "revoked" in late.reason
    assert EFFECTS == [("read_doc", {"path": "/docs/a.txt"})]


def test_a_last_call_ends_its_step_in_the_write_that_records_it(guard: Guard, session: Session) -> None:
    before = guard.store.counts.commits
    result = session.execute(session.check("doc", "read_doc", {"path": "/docs/a.txt"}, last=True))
    assert result.ok and guard.store.counts.commits - before == 2
    assert session.ended("doc") is not None and session.ended("doc").status == "completed"  # type: ignore[union-attr]
    assert guard.store.grants_for_run("r1")[0].revoked_at is not None
    session.end_step("doc")  # only the step's downstream credentials were left
    assert guard.store.counts.commits - before == 2
    assert kinds(guard)[-4:] == ["decision", "tool_call", "grant_revoked", "step_ended"]


def test_approval_round_trip_exactly_once_for_exactly_that_call(guard: Guard, session: Session) -> None:
    held = session.check("note", "write_note", {"title": "q3", "amount": 40})
    assert held.outcome is Outcome.NEEDS_APPROVAL and held.policy_ids == ("writes-need-approval",)
    assert held.approval_id is not None and held.required_approvals == 1
    request = session.approval(held.approval_id)
    assert (request.tool, request.step_id, request.effective_status(guard.clock.now())) == \
        ("write_note", "note", "pending")
    assert session.execute(held).status == "needs_approval" and EFFECTS == []
    session.end_step("note", StepEnd(status="awaiting_approval", approval_id=held.approval_id))
    # Still pending: resuming changes nothing.
    assert session.resume(held.approval_id).outcome is Outcome.NEEDS_APPROVAL
    with pytest.raises(Exception, match="may not approve"):
        session.approve(held.approval_id, approver="alice")  # the initiator
    session.approve(held.approval_id, approver="bob")
    # Presented with other arguments, the approval authorizes nothing.
    forged = session.check("note", "write_note", {"title": "q3", "amount": 99}, approval_id=held.approval_id)
    assert forged.outcome is Outcome.DENY and forged.policy_ids == ("scopegraph:approval",)
    session.end_step("note")
    resumed = session.resume(held.approval_id)
    assert resumed.outcome is Outcome.ALLOW
    assert session.execute(resumed).ok
    assert EFFECTS == [("write_note", {"title": "q3", "amount": 40})]
    session.end_step("note")
    # Resumed again (a host that crashed after running it): replayed from its record, not run.
    again = session.resume(held.approval_id)
    assert again.result is not None and session.execute(again).ok
    # Presented by any other call, the used approval is refused.
    reused = session.check("note", "write_note", {"title": "q3", "amount": 40}, approval_id=held.approval_id)
    assert reused.outcome is Outcome.DENY and "already used" in reused.reason
    session.end_run(status="completed")
    assert len(EFFECTS) == 1
    assert guard.ledger.verify(run_id="r1").ok


def test_an_approval_expires(guard: Guard, session: Session) -> None:
    held = session.check("note", "write_note", {"title": "q3", "amount": 40})
    assert held.approval_id is not None
    session.approve(held.approval_id, approver="bob")
    session.end_step("note")
    assert isinstance(guard.clock, FixedClock)
    guard.clock.advance(guard.workflow.approval_ttl + 1)
    late = session.resume(held.approval_id)
    assert late.outcome is Outcome.DENY and late.policy_ids == ("scopegraph:approval",)
    assert "expired" in late.reason
    presented = session.check("note", "write_note", {"title": "q3", "amount": 40}, approval_id=held.approval_id)
    assert presented.outcome is Outcome.DENY and "expired" in presented.reason
    assert EFFECTS == []


def test_a_planner_fixes_the_plan_from_the_task(guard: Guard) -> None:
    seen: list[str] = []

    def plan(task: str) -> dict[str, Any]:
        seen.append(task)
        return PLAN

    session = guard.start_run("the task", initiator="alice", planner=ScriptedPlanner(plan), run_id="r2")
    assert seen == ["the task"] and [s.id for s in session.plan.steps] == ["doc", "note"]
    assert kinds(guard, "r2") == ["run_started", "plan"]
    decision = session.check("doc", "read_doc", {"path": "/docs/x"})
    assert "eyJ" not in repr(decision) and "eyJ" not in repr(session.step("doc"))  # no token leaves
    with pytest.raises(Exception, match="exists already"):
        guard.start_run("the task", initiator="alice", plan=PLAN, run_id="r2")


def test_end_run_revokes_every_grant_of_the_run(guard: Guard, session: Session) -> None:
    session.check("doc", "read_doc", {"path": "/docs/a.txt"})
    session.check("note", "write_note", {"title": "t", "amount": 1})
    assert any(g.revoked_at is None for g in guard.store.grants_for_run("r1"))
    session.end_run(status="failed", error="host gave up")
    assert all(g.revoked_at is not None for g in guard.store.grants_for_run("r1"))
    assert kinds(guard)[-1] == "run_ended"


# the host's call ids ------------------------------------------------------------------------
def test_a_hosts_call_id_names_a_call_within_its_run_only(guard: Guard, session: Session) -> None:
    first = session.check("doc", "read_doc", {"path": "/docs/a.txt"}, call_id="call_1")
    assert first.call_id == "call_1"
    session.execute(first)
    session.end_step("doc")
    # A model's ids repeat across conversations: the same id in another run is another
    # call, run and recorded there, never the first run's result replayed.
    other = guard.start_run("write a note about the document", initiator="alice", plan=PLAN, run_id="r2")
    again = other.check("doc", "read_doc", {"path": "/docs/b.txt"}, call_id="call_1")
    assert again.result is None  # not made before in this run: left to run
    assert other.execute(again).value["path"] == "/docs/b.txt"
    assert EFFECTS == [("read_doc", {"path": "/docs/a.txt"}), ("read_doc", {"path": "/docs/b.txt"})]


def test_two_identical_held_calls_get_a_request_each_and_both_run_once_approved(
        guard: Guard, session: Session) -> None:
    call = {"title": "q3", "amount": 40}
    held = [session.check("note", "write_note", call, call_id=cid) for cid in ("call_a", "call_b")]
    assert [h.outcome for h in held] == [Outcome.NEEDS_APPROVAL] * 2
    first, second = (session.approval(h.approval_id) for h in held)  # type: ignore[arg-type]
    assert first.id != second.id and first.digest == second.digest
    assert (first.call_id, second.call_id) == ("call_a", "call_b")
    assert [r.id for r in session.approvals_for("call_b")] == [second.id]
    session.end_step("note", StepEnd(status="awaiting_approval", approval_id=second.id))
    for request in (first, second):
        session.approve(request.id, approver="bob")
        resumed = session.resume(request.id)
        assert resumed.outcome is Outcome.ALLOW
        assert session.execute(resumed).ok
        session.end_step("note")
    assert EFFECTS == [("write_note", call), ("write_note", call)]
    assert [guard.approvals.get(r.id).status for r in (first, second)] == ["consumed", "consumed"]


# spans -------------------------------------------------------------------------------------
def test_a_host_driven_call_is_one_execute_tool_span_from_its_check_to_its_record(
        session: Session, otel: Capture) -> None:
    allowed = session.check("doc", "read_doc", {"path": "/docs/a.txt"}, call_id="call_1")
    held = session.check("note", "write_note", {"title": "q3", "amount": 40})
    denied = session.check("doc", "read_doc", {"path": "/etc/passwd"})
    assert (held.outcome, denied.outcome) == (Outcome.NEEDS_APPROVAL, Outcome.DENY)
    assert by_name(otel.spans(), "execute_tool read_doc") != []  # the denial's ended at its check...
    assert all(s.attributes["scopegraph.call.status"] == "denied"  # type: ignore[index]
               for s in by_name(otel.spans(), "execute_tool read_doc"))  # ...the allowed call's is open
    session.record(allowed, value={"text": "from the host"})
    spans = otel.spans()
    ok, refused = sorted(by_name(spans, "execute_tool read_doc"),
                         key=lambda s: s.attributes["scopegraph.call.status"] != "ok")  # type: ignore[index]
    assert ok.attributes["scopegraph.call.status"] == "ok"  # type: ignore[index]
    assert ok.attributes["gen_ai.tool.name"] == "read_doc"  # type: ignore[index]
    assert sorted(c.name for c in children(spans, ok)) == ["scopegraph.decide", "scopegraph.tool.call"]
    assert refused.attributes["scopegraph.call.status"] == "denied"  # type: ignore[index]
    assert [e.name for e in refused.events] == ["scopegraph.denied"]
    assert [c.name for c in children(spans, refused)] == ["scopegraph.decide"]
    write = one(spans, "execute_tool write_note")
    assert write.attributes["scopegraph.call.status"] == "needs_approval"  # type: ignore[index]
    assert [c.name for c in children(spans, write)] == ["scopegraph.decide"]


def test_an_allowed_call_never_run_ends_its_span_with_its_step(session: Session, otel: Capture) -> None:
    session.check("doc", "read_doc", {"path": "/docs/a.txt"})
    assert by_name(otel.spans(), "execute_tool read_doc") == []
    session.end_step("doc")
    assert "scopegraph.call.status" not in one(otel.spans(), "execute_tool read_doc").attributes  # type: ignore[operator]


def test_a_host_with_its_own_agent_needs_no_executor(backend: Backend) -> None:
    bare = Workflow(name="bare", tools=[read_doc, write_note], planner=ScriptedPlanner(PLAN))
    with Guard(bare, store=backend.url, clock=FixedClock(start=1_800_000_000.0)) as guard:
        session = guard.start_run("read it", initiator="alice", plan=PLAN, run_id="r-bare")
        assert session.check("doc", "read_doc", {"path": "/docs/a.txt"}).outcome is Outcome.ALLOW
    with pytest.raises(ConfigError, match="^workflow 'bare' has no executor: give Workflow\\(executor=...\\)"):
        Runtime(bare, store=backend.url)
