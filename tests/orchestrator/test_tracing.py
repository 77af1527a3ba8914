"""Every hop is a span and a metric (issue 4, points 1 and 3; invariant 7).

Real runs through the real OpenTelemetry SDK (``tests.otel_capture``): one trace per
run, the GenAI span names and attributes, our ``scopegraph.*`` attributes matching the
ledger and the store, error status on what was denied or failed, a run resumed by
another ``Runtime`` kept in its first trace, and the metric instruments.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from scopegraph import Runtime, Workflow, tool
from scopegraph import policies as shipped
from scopegraph.agents import DirectExecutor
from scopegraph.clock import FixedClock
from scopegraph.errors import TransientToolError
from scopegraph.roles import StepContext

from ..helpers import READ_PLAN, STANDARD_TOOLS, assert_all_revoked
from ..otel_capture import Capture, by_name, children, is_error, one, otel, parent_of, run_spans

__all__ = ["otel"]  # the fixture, imported so pytest finds it here

MINT, DECIDE, CALL, REVOKE, WAIT = ("scopegraph.grant.mint", "scopegraph.decide", "scopegraph.tool.call",
                                    "scopegraph.grant.revoke", "scopegraph.approval.wait")

MAIL_AFTER_READ = {"steps": [
    {"id": "doc", "tool": "read_doc", "purpose": "read",
     "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
    {"id": "mail", "tool": "send_mail", "purpose": "mail it", "depends_on": ["doc"],
     "constraints": {"to": {"kind": "exact", "value": "boss@example.org"},
                     "body": {"kind": "exact", "value": "summary"}}},
]}

NOTE_PLAN = {"steps": [
    {"id": "note", "tool": "write_note", "purpose": "write the note",
     "constraints": {"title": {"kind": "exact", "value": "quarterly"},
                     "amount": {"kind": "exact", "value": 42}}},
]}

CALLS = {"explode": 0, "flaky": 0}


@tool
def explode(x: str) -> str:
    """Always fails."""
    CALLS["explode"] += 1
    raise RuntimeError("the tool broke")


@tool
def flaky(x: str) -> str:
    """Fails once, then works."""
    CALLS["flaky"] += 1
    if CALLS["flaky"] == 1:
        raise TransientToolError("try again")
    return "fine"


class CuriousExecutor(DirectExecutor):
    """Before its planned read, tries another tool and a path outside its scope."""

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == "doc":
            ctx.tools.call("send_mail", to="x@evil.example", body="hello")
            ctx.tools.call("read_doc", path="/etc/passwd")
        return super().execute(ctx)


def _curious() -> CuriousExecutor:
    return CuriousExecutor(builders={"read_doc": lambda ctx: {"path": "/docs/readme.txt"}})


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    for k in CALLS:
        CALLS[k] = 0


# helpers ---------------------------------------------------------------------------------
def _trace_of(spans: Sequence[ReadableSpan]) -> int:
    ids = {s.context.trace_id for s in spans}
    assert len(ids) == 1, f"a run must be one trace, found {len(ids)}"
    return ids.pop()


def _root(spans: Sequence[ReadableSpan], workflow: str) -> ReadableSpan:
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    assert roots[0].name == f"invoke_workflow {workflow}"
    return roots[0]


def _step_span(spans: Sequence[ReadableSpan], tool_name: str, step_id: str, index: int = 0) -> ReadableSpan:
    """The executor's agent span of a step (one per step run: a resumed step has two)."""
    found = sorted((s for s in spans if s.name == "invoke_agent executor"
                    and s.attributes.get("scopegraph.step.tool") == tool_name
                    and s.attributes.get("scopegraph.step.id") == step_id), key=lambda s: s.start_time)
    assert len(found) > index, f"no executor span #{index} for step {step_id!r}"
    return found[index]


def _calls(spans: Sequence[ReadableSpan], step: ReadableSpan) -> list[ReadableSpan]:
    """The step's ``execute_tool`` spans, one per tool call, in order."""
    return sorted((k for k in children(spans, step) if k.name.startswith("execute_tool ")),
                  key=lambda k: k.start_time)


def _hops(spans: Sequence[ReadableSpan], step: ReadableSpan) -> list[ReadableSpan]:
    """The step's hops in order: its own children, each tool call's span replaced by the
    call's own children (its decisions and runs)."""
    out: list[ReadableSpan] = []
    for k in sorted(children(spans, step), key=lambda k: k.start_time):
        out += sorted(children(spans, k), key=lambda c: c.start_time) if k.name.startswith("execute_tool ") else [k]
    return out


def _ledger(rt: Runtime, run_id: str, kind: str, **match: Any) -> list[dict[str, Any]]:
    return [r for r in rt.ledger.records(run_id)
            if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


def _names(spans: Sequence[ReadableSpan]) -> list[str]:
    return sorted(s.name for s in spans)


# allowed ---------------------------------------------------------------------------------
def test_allowed_run_is_one_trace_with_every_hop(otel: Capture, make_workflow: Callable[..., Workflow],
                                                 make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(READ_PLAN))
    report = rt.run("read and look up", initiator="alice", run_id="ok1")
    assert report.status == "completed", report.summary()
    other = rt.run("again", initiator="alice", run_id="ok2")
    assert other.status == "completed"

    spans = run_spans(otel.spans(), "ok1")
    trace_id = _trace_of(spans)
    assert trace_id != _trace_of(run_spans(otel.spans(), "ok2")), "two runs share a trace"
    root = _root(spans, "testwf")
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["scopegraph.run.id"] == "ok1"
    assert root.attributes["scopegraph.workflow"] == "testwf"
    assert root.attributes["scopegraph.run.status"] == "completed"
    assert not is_error(root)

    planner = one(spans, "invoke_agent planner")
    assert parent_of(spans, planner) is root
    assert planner.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert planner.attributes["gen_ai.agent.name"] == "planner"
    assert planner.attributes["gen_ai.agent.id"] == report.planner_spiffe_id
    assert planner.attributes["scopegraph.spiffe_id"] == report.planner_spiffe_id

    # Exactly: root, planner, and per step the executor's span, its one tool call's span
    # and the four hops under them.
    assert len(spans) == 2 + 6 * len(report.steps), _names(spans)
    grant_ids = set()
    for step in report.steps:
        s = _step_span(spans, step.tool, step.step_id)
        assert parent_of(spans, s) is root
        attrs = s.attributes
        assert attrs["gen_ai.operation.name"] == "invoke_agent"
        (call_span,) = _calls(spans, s)
        assert call_span.name == f"execute_tool {step.tool}"
        assert call_span.attributes["gen_ai.operation.name"] == "execute_tool"
        assert call_span.attributes["gen_ai.tool.name"] == step.tool
        assert call_span.attributes["gen_ai.tool.type"] == "function"
        assert "gen_ai.tool.call.id" not in call_span.attributes, "no model named this call"
        assert call_span.attributes["scopegraph.decision"] == "allow"
        assert call_span.attributes["scopegraph.call.status"] == "ok"
        assert call_span.attributes["scopegraph.spiffe_id"] == step.spiffe_id
        assert not is_error(call_span) and not call_span.events
        assert attrs["gen_ai.agent.name"] == "executor"
        assert attrs["gen_ai.agent.id"] == step.spiffe_id
        assert attrs["scopegraph.spiffe_id"] == step.spiffe_id
        assert attrs["scopegraph.run.id"] == "ok1"
        assert attrs["scopegraph.tool.risk"] == "read"
        assert attrs["scopegraph.decision"] == "allow"
        assert list(attrs["scopegraph.decision.policy_ids"]) == ["allow-planned-calls"]
        assert not is_error(s)

        kids = _hops(spans, s)
        assert [k.name for k in kids] == [MINT, DECIDE, CALL, REVOKE]
        mint, decide, call, revoke = kids
        (minted,) = _ledger(rt, "ok1", "grant_minted", step_id=step.step_id)
        assert minted["grant_id"] == step.grant_id
        for k in kids:
            assert k.attributes["scopegraph.grant.id"] == step.grant_id, k.name
        assert mint.attributes["scopegraph.spiffe_id"] == step.spiffe_id
        assert mint.attributes["scopegraph.grant.expires_at"] == minted["expires_at"]
        assert decide.attributes["scopegraph.decision"] == "allow"
        assert list(decide.attributes["scopegraph.decision.policy_ids"]) == ["allow-planned-calls"]
        assert decide.attributes["scopegraph.spiffe_id"] == step.spiffe_id
        assert decide.attributes["scopegraph.attempt"] == 1
        assert decide.attributes["gen_ai.tool.name"] == step.tool
        (decided,) = _ledger(rt, "ok1", "decision", step_id=step.step_id)
        assert decided["grant_id"] == step.grant_id and decided["spiffe_id"] == step.spiffe_id
        assert call.attributes["scopegraph.call.status"] == "ok"
        assert call.attributes["scopegraph.attempt"] == 1
        assert not any(is_error(k) for k in kids)
        grant_ids.add(step.grant_id)
    assert len(grant_ids) == len(report.steps), "a grant was shared between steps"


def test_planner_span_and_step_spans_carry_data_labels_read_so_far(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [READ_PLAN["steps"][0],
                      {**READ_PLAN["steps"][1], "depends_on": ["doc"]}]}
    rt = make_runtime(make_workflow(plan))
    assert rt.run("read, then look up", run_id="lab1").status == "completed"
    spans = run_spans(otel.spans(), "lab1")
    doc, look = _step_span(spans, "read_doc", "doc"), _step_span(spans, "lookup", "look")
    assert list(doc.attributes["scopegraph.data_labels"]) == []
    assert list(look.attributes["scopegraph.data_labels"]) == ["confidential"]
    (decide,) = by_name(_hops(spans, look), DECIDE)
    assert list(decide.attributes["scopegraph.data_labels"]) == ["confidential"]


# denied ----------------------------------------------------------------------------------
def _denial_events(span: Any) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == "scopegraph.denied"]


def test_denied_calls_and_steps_are_events_not_errors_with_the_deciding_policies(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(MAIL_AFTER_READ, executor=_curious()))
    report = rt.run("read then mail", initiator="alice", run_id="deny1")
    assert report.status == "denied", report.summary()
    spans = run_spans(otel.spans(), "deny1")
    _trace_of(spans)
    root = _root(spans, "testwf")
    # A denial is an outcome, not an error (issue 10): no ERROR status anywhere.
    assert not is_error(root) and root.attributes["scopegraph.run.status"] == "denied"

    doc_step = next(s for s in report.steps if s.step_id == "doc")
    doc = _step_span(spans, "read_doc", "doc")
    assert not is_error(doc), "the step recovered: its last call was allowed"
    decides = sorted(by_name(_hops(spans, doc), DECIDE), key=lambda s: s.start_time)
    assert [d.attributes["scopegraph.decision"] for d in decides] == ["deny", "deny", "allow"]
    assert [list(d.attributes["scopegraph.decision.policy_ids"]) for d in decides] == [
        ["scopegraph:grant"], ["scopegraph:scope"], ["allow-planned-calls"]]
    assert [is_error(d) for d in decides] == [False, False, False]
    assert [len(_denial_events(d)) for d in decides] == [1, 1, 0]
    (event,) = _denial_events(decides[1])
    assert list(event["scopegraph.decision.policy_ids"]) == ["scopegraph:scope"]
    assert event["scopegraph.decision.reason"] == decides[1].attributes["scopegraph.decision.reason"]
    assert decides[0].attributes["gen_ai.tool.name"] == "send_mail"
    assert "send_mail" in decides[0].attributes["scopegraph.decision.reason"]
    assert "scope" in decides[1].attributes["scopegraph.decision.reason"]
    # The out-of-scope call was verified against the step's grant: it names it.
    assert decides[1].attributes["scopegraph.grant.id"] == doc_step.grant_id
    assert len(by_name(_hops(spans, doc), CALL)) == 1, "a denied call reached the tool"
    # One span per call, refused ones included: a refusal is an event on it, not an error.
    calls = _calls(spans, doc)
    assert [c.name for c in calls] == ["execute_tool send_mail", "execute_tool read_doc", "execute_tool read_doc"]
    assert [c.attributes["scopegraph.decision"] for c in calls] == ["deny", "deny", "allow"]
    assert [c.attributes["scopegraph.call.status"] for c in calls] == ["denied", "denied", "ok"]
    assert [len(_denial_events(c)) for c in calls] == [1, 1, 0]
    assert [is_error(c) for c in calls] == [False, False, False]
    assert [[k.name for k in children(spans, c)] for c in calls] == [[DECIDE], [DECIDE], [DECIDE, CALL]]
    assert list(_denial_events(calls[1])[0]["scopegraph.decision.policy_ids"]) == ["scopegraph:scope"]

    mail_step = next(s for s in report.steps if s.step_id == "mail")
    mail = _step_span(spans, "send_mail", "mail")
    assert not is_error(mail)
    (step_event,) = _denial_events(mail)
    assert step_event["scopegraph.decision.reason"] == mail_step.reason
    assert mail.attributes["scopegraph.decision"] == "deny"
    assert "no-confidential-egress" in mail.attributes["scopegraph.decision.policy_ids"]
    assert list(mail.attributes["scopegraph.data_labels"]) == ["confidential"]
    assert mail.attributes["scopegraph.tool.risk"] == "egress"
    kids = _hops(spans, mail)
    assert [k.name for k in kids] == [MINT, DECIDE, REVOKE], "a denied call has no tool.call span"
    decide = kids[1]
    assert not is_error(decide) and len(_denial_events(decide)) == 1
    (mail_call,) = _calls(spans, mail)
    assert not is_error(mail_call) and len(_denial_events(mail_call)) == 1
    assert list(mail_call.attributes["scopegraph.decision.policy_ids"]) == list(mail_step.policy_ids)
    assert list(decide.attributes["scopegraph.decision.policy_ids"]) == list(mail_step.policy_ids)
    assert decide.attributes["scopegraph.grant.id"] == mail_step.grant_id
    (ledger_decision,) = _ledger(rt, "deny1", "decision", step_id="mail")
    assert ledger_decision["grant_id"] == mail_step.grant_id
    assert ledger_decision["policy_ids"] == list(mail_step.policy_ids)
    assert ledger_decision["decision"] == "deny"


# approvals and resume --------------------------------------------------------------------
def _paused_note_run(rt: Runtime, run_id: str) -> str:
    report = rt.run("write the note", initiator="alice", run_id=run_id)
    assert report.status == "paused", report.summary()
    (approval,) = report.approvals
    return str(approval["id"])


def test_approval_resumed_by_another_runtime_stays_in_the_same_trace(
        otel: Capture, clock: FixedClock, make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime]) -> None:
    workflow = make_workflow(NOTE_PLAN, approvers=["bob"])
    first = make_runtime(workflow)
    approval_id = _paused_note_run(first, "apr1")

    paused = run_spans(otel.spans(), "apr1")
    trace_id = _trace_of(paused)
    root1 = _root(paused, "testwf")
    assert root1.attributes["scopegraph.run.status"] == "paused" and not is_error(root1)
    asked = _step_span(paused, "write_note", "note")
    assert asked.attributes["scopegraph.decision"] == "needs_approval"
    assert asked.attributes["scopegraph.approval.id"] == approval_id
    assert list(asked.attributes["scopegraph.decision.policy_ids"]) == ["writes-need-approval"]
    assert not is_error(asked)
    asked_kids = _hops(paused, asked)
    assert [k.name for k in asked_kids] == [MINT, DECIDE, REVOKE], "nothing runs before the approval"
    assert asked_kids[1].attributes["scopegraph.decision"] == "needs_approval"
    first_grant = asked_kids[0].attributes["scopegraph.grant.id"]

    clock.advance(42.0)
    first.approvals.approve(approval_id, approver="bob", reason="fine")
    first.close()
    second = make_runtime(workflow)  # another Runtime: nothing in memory carries the trace over
    report = second.resume("apr1")
    assert report.status == "completed", report.summary()
    assert_all_revoked(second, "apr1", at_least=2)

    spans = run_spans(otel.spans(), "apr1")
    assert _trace_of(spans) == trace_id, "the resumed run left its trace"
    roots = sorted(by_name(spans, "invoke_workflow testwf"), key=lambda s: s.start_time)
    assert len(roots) == 2
    assert roots[1].parent is not None and roots[1].parent.span_id == root1.context.span_id
    assert roots[1].attributes["scopegraph.resumed"] is True
    assert roots[1].attributes["scopegraph.run.status"] == "completed"
    assert [s for s in spans if s.parent is None] == [root1]

    resumed = _step_span(spans, "write_note", "note", index=1)
    assert parent_of(spans, resumed) is roots[1]
    assert not is_error(resumed)
    kids = _hops(spans, resumed)
    assert sorted(k.name for k in kids) == sorted([WAIT, MINT, DECIDE, CALL, REVOKE])
    wait = one(kids, WAIT)
    assert wait.attributes["scopegraph.approval.id"] == approval_id
    assert wait.attributes["scopegraph.approval.approver"] == "bob"
    assert wait.attributes["scopegraph.approval.status"] == "approved"
    assert wait.attributes["gen_ai.tool.name"] == "write_note"
    assert not is_error(wait)
    assert wait.end_time is not None
    assert abs((wait.end_time - wait.start_time) - 42e9) < 1e6, "the wait is the human's time"

    step = report.steps[0]
    mint = one(kids, MINT)
    assert mint.attributes["scopegraph.grant.id"] == step.grant_id != first_grant
    minted = [r["grant_id"] for r in _ledger(second, "apr1", "grant_minted", step_id="note")]
    assert minted == [first_grant, step.grant_id]
    decide = one(kids, DECIDE)
    assert decide.attributes["scopegraph.decision"] == "allow"
    assert decide.attributes["scopegraph.approval.id"] == approval_id
    assert decide.attributes["scopegraph.grant.id"] == step.grant_id
    call = one(kids, CALL)
    assert call.attributes["scopegraph.call.status"] == "ok"
    assert call.attributes["scopegraph.grant.id"] == step.grant_id
    assert call.attributes["scopegraph.tool.risk"] == "write"
    (consumed,) = _ledger(second, "apr1", "approval_consumed")
    assert consumed["grant_id"] == step.grant_id


def test_denied_approval_marks_the_wait_step_and_run_with_denial_events_not_errors(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    workflow = make_workflow(NOTE_PLAN, approvers=["bob"])
    first = make_runtime(workflow)
    approval_id = _paused_note_run(first, "apr2")
    first.approvals.deny(approval_id, approver="bob", reason="not this quarter")
    report = make_runtime(workflow).resume("apr2")
    assert report.status == "denied", report.summary()

    spans = run_spans(otel.spans(), "apr2")
    _trace_of(spans)
    resumed = _step_span(spans, "write_note", "note", index=1)
    assert not is_error(resumed) and _denial_events(resumed)
    kids = children(spans, resumed)
    assert [k.name for k in kids] == [WAIT], "a denied call mints nothing and calls nothing"
    wait = kids[0]
    assert not is_error(wait)
    (event,) = _denial_events(wait)
    assert event["scopegraph.decision.reason"] == "denied by bob: not this quarter"
    assert wait.attributes["scopegraph.approval.status"] == "denied"
    assert wait.attributes["scopegraph.approval.approver"] == "bob"
    roots = sorted(by_name(spans, "invoke_workflow testwf"), key=lambda s: s.start_time)
    assert not is_error(roots[1]) and roots[1].attributes["scopegraph.run.status"] == "denied"


def test_a_run_cancelled_mid_step_and_resumed_by_another_runtime_stays_in_its_trace(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    class StopOnce(DirectExecutor):
        stopped = False

        def execute(self, ctx: StepContext) -> Any:
            result = super().execute(ctx)
            if not StopOnce.stopped:
                StopOnce.stopped = True
                raise KeyboardInterrupt  # after the call ran: the resume must replay it
            return result

    workflow = make_workflow({"steps": [READ_PLAN["steps"][0]]}, executor=StopOnce(
        builders={"read_doc": lambda ctx: {"path": "/docs/readme.txt"}}))
    with pytest.raises(KeyboardInterrupt):
        make_runtime(workflow).run("read", run_id="cx1")
    first = run_spans(otel.spans(), "cx1")
    trace_id = _trace_of(first)
    root1 = _root(first, "testwf")
    assert is_error(root1) and root1.attributes["scopegraph.run.status"] == "cancelled"
    assert is_error(_step_span(first, "read_doc", "doc")), "the interrupted step ended in error"

    report = make_runtime(workflow).resume("cx1")
    assert report.status == "completed", report.summary()
    spans = run_spans(otel.spans(), "cx1")
    assert _trace_of(spans) == trace_id
    roots = sorted(by_name(spans, "invoke_workflow testwf"), key=lambda s: s.start_time)
    assert len(roots) == 2 and roots[1].parent is not None
    assert roots[1].parent.span_id == root1.context.span_id
    again = _step_span(spans, "read_doc", "doc", index=1)
    assert parent_of(spans, again) is roots[1] and not is_error(again)
    # The call completed before the interruption: it is replayed, not run (and not traced) again.
    assert [k.name for k in _hops(spans, again)] == [MINT, DECIDE, REVOKE]
    assert len(by_name(spans, CALL)) == 1
    grant_ids = [str(s.attributes["scopegraph.grant.id"]) for s in by_name(spans, MINT)]
    assert len(set(grant_ids)) == 2, "the resumed step reused the interrupted step's grant"
    assert sum(otel.totals("scopegraph.grants.minted").values()) == 2
    assert sum(otel.totals("scopegraph.grants.revoked").values()) == 2


def test_a_malformed_plan_marks_the_planner_span_as_an_error(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "x", "tool": "no_such_tool", "constraints": {}}]}
    report = make_runtime(make_workflow(plan)).run("bad plan", run_id="bad1")
    assert report.status == "failed"
    spans = run_spans(otel.spans(), "bad1")
    planner = one(spans, "invoke_agent planner")
    assert is_error(planner)
    assert not by_name(spans, MINT), "a grant was minted for a rejected plan"
    assert is_error(_root(spans, "testwf"))


# failures --------------------------------------------------------------------------------
def test_failing_tool_sets_error_status_up_to_the_root(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "boom", "tool": "explode", "constraints": {"x": {"kind": "exact", "value": "1"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, explode]))
    report = rt.run("explode", run_id="fail1")
    assert report.status == "failed", report.summary()
    spans = run_spans(otel.spans(), "fail1")
    _trace_of(spans)
    root = _root(spans, "testwf")
    assert is_error(root) and root.attributes["scopegraph.run.status"] == "failed"
    step = _step_span(spans, "explode", "boom")
    assert is_error(step) and step.attributes["scopegraph.call.status"] == "failed"
    kids = _hops(spans, step)
    assert [k.name for k in kids] == [MINT, DECIDE, CALL, REVOKE]
    decide, call = kids[1], kids[2]
    (call_span,) = _calls(spans, step)
    assert is_error(call_span) and call_span.attributes["error.type"] == "RuntimeError"
    assert call_span.attributes["scopegraph.call.status"] == "error"
    assert decide.attributes["scopegraph.decision"] == "allow" and not is_error(decide)
    assert is_error(call) and call.attributes["scopegraph.call.status"] == "error"
    assert not is_error(kids[3]), "revocation after a failure is not itself a failure"


def test_each_retry_is_decided_again_and_traced_with_its_attempt(
        otel: Capture, sleeps: list[float], make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "f", "tool": "flaky", "constraints": {"x": {"kind": "exact", "value": "1"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, flaky]))
    report = rt.run("flaky", run_id="retry1")
    assert report.status == "completed", report.summary()
    assert CALLS["flaky"] == 2 and len(sleeps) == 1
    spans = run_spans(otel.spans(), "retry1")
    step = _step_span(spans, "flaky", "f")
    assert not is_error(step)
    kids = _hops(spans, step)
    (call_span,) = _calls(spans, step)  # a retry is the same call: one span, both attempts inside
    assert sorted(k.name for k in children(spans, call_span)) == [DECIDE, DECIDE, CALL, CALL]
    assert not is_error(call_span) and call_span.attributes["scopegraph.call.status"] == "ok"
    decides = sorted(by_name(kids, DECIDE), key=lambda s: s.start_time)
    calls = sorted(by_name(kids, CALL), key=lambda s: s.start_time)
    assert [d.attributes["scopegraph.attempt"] for d in decides] == [1, 2]
    assert [c.attributes["scopegraph.attempt"] for c in calls] == [1, 2]
    assert [is_error(c) for c in calls] == [True, False]
    assert decides[0].end_time <= calls[0].start_time and calls[0].end_time <= decides[1].start_time
    grant = report.steps[0].grant_id
    assert {s.attributes["scopegraph.grant.id"] for s in [*decides, *calls]} == {grant}
    attempts = [r["attempt"] for r in _ledger(rt, "retry1", "decision")]
    assert attempts == [1, 2]


# metrics ---------------------------------------------------------------------------------
def test_decisions_and_denials_are_counted_by_outcome_policy_and_reason(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(MAIL_AFTER_READ, executor=_curious(), name="metricwf"))
    assert rt.run("read then mail", run_id="m1").status == "denied"
    decisions = otel.totals("scopegraph.decisions", "outcome", "policy", "tool")
    as_sets = {(o, frozenset(p.split(",")), t): v for (o, p, t), v in decisions.items()}
    assert as_sets == {
        ("deny", frozenset({"scopegraph:grant"}), "send_mail"): 1,
        ("deny", frozenset({"scopegraph:scope"}), "read_doc"): 1,
        ("allow", frozenset({"allow-planned-calls"}), "read_doc"): 1,
        ("deny", frozenset({"egress-needs-approval", "no-confidential-egress"}), "send_mail"): 1,
    }, decisions
    denials = otel.totals("scopegraph.denials", "reason", "tool")
    assert denials[("scopegraph:grant", "send_mail")] == 1
    assert denials[("scopegraph:scope", "read_doc")] == 1
    policy_denials = {k: v for k, v in denials.items() if k[1] == "send_mail" and k[0] != "scopegraph:grant"}
    assert sum(policy_denials.values()) == 1
    assert set(policy_denials) <= {("egress-needs-approval", "send_mail"), ("no-confidential-egress", "send_mail")}
    assert sum(denials.values()) == 3
    # Every decision the ledger holds was counted, and only those.
    assert sum(decisions.values()) == len(_ledger(rt, "m1", "decision"))


THREE_FORBIDS = """
@id("no-wipe-a")
@reason("a")
forbid (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"wipe");

@id("no-wipe-b")
@reason("b")
forbid (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"wipe");

@id("no-wipe-c")
@reason("c")
forbid (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"wipe");
"""


@tool
def wipe(x: str) -> str:
    """Never allowed."""
    return "wiped"


class Insistent(DirectExecutor):
    """Asks for the same denied call again and again."""

    def execute(self, ctx: StepContext) -> Any:
        for _ in range(11):
            ctx.tools.call(ctx.step.tool, x="1")
        return super().execute(ctx)


def test_the_same_decision_is_always_named_by_the_same_policy_ids(
        otel: Capture, tmp_path: Path, make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime]) -> None:
    # Operators group decisions and denials by policy: one decision made by the same
    # policies must land in one metric series and read the same in spans and the ledger,
    # whatever order the policy engine happens to report its reasons in.
    extra = tmp_path / "wipe.cedar"
    extra.write_text(THREE_FORBIDS)
    plan = {"steps": [{"id": "w", "tool": "wipe", "constraints": {"x": {"kind": "exact", "value": "1"}}}]}
    rt = make_runtime(make_workflow(
        plan, tools=[*STANDARD_TOOLS, wipe], executor=Insistent(), grant_max_uses=20, name="wipewf",
        policies=[Path(shipped.__file__).parent / "baseline.cedar", extra]))
    assert rt.run("wipe it", run_id="w1").status == "denied"
    decisions = otel.totals("scopegraph.decisions", "outcome", "policy")
    denials = otel.totals("scopegraph.denials", "reason")
    assert sum(decisions.values()) == sum(denials.values()) == 12
    spans = run_spans(otel.spans(), "w1")
    orders = {tuple(s.attributes["scopegraph.decision.policy_ids"]) for s in by_name(spans, DECIDE)}
    ledger_orders = {tuple(r["policy_ids"]) for r in _ledger(rt, "w1", "decision")}
    problems = [
        f"{what}: {sorted(seen)}" for what, seen in (
            ("decisions metric series", decisions), ("denials metric reasons", denials),
            ("span policy id orders", orders), ("ledger policy id orders", ledger_orders))
        if len(seen) != 1
    ]
    assert not problems, "twelve identical decisions are named differently: " + "; ".join(problems)


def test_grants_minted_and_revoked_are_counted_per_tool(
        otel: Capture, clock: FixedClock, make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(READ_PLAN, name="grantwf"))
    assert rt.run("read", run_id="g1").status == "completed"
    minted = otel.totals("scopegraph.grants.minted", "workflow", "tool")
    revoked = otel.totals("scopegraph.grants.revoked", "workflow", "tool")
    assert minted == {("grantwf", "read_doc"): 1, ("grantwf", "lookup"): 1}
    assert revoked == minted
    assert sum(minted.values()) == len(rt.store.grants_for_run("g1"))


def test_approval_wait_is_measured_from_request_to_answer(
        otel: Capture, clock: FixedClock, make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime]) -> None:
    workflow = make_workflow(NOTE_PLAN, approvers=["bob"], name="waitwf")
    rt = make_runtime(workflow)
    approval_id = _paused_note_run(rt, "w1")
    assert otel.histogram("scopegraph.approval.wait", "tool") == {}, "nothing answered yet"
    clock.advance(37.5)
    rt.approvals.approve(approval_id, approver="bob")
    clock.advance(100.0)  # the resume comes later: the wait ends at the answer
    assert make_runtime(workflow).resume("w1").status == "completed"
    assert otel.histogram("scopegraph.approval.wait", "tool", "status") == {("write_note", "approved"): (1, 37.5)}
    minted = otel.totals("scopegraph.grants.minted", "tool")
    revoked = otel.totals("scopegraph.grants.revoked", "tool")
    assert minted == {("write_note",): 2}, "one grant to ask, one to run the approved call"
    assert sum(revoked.values()) == 2


def test_tool_duration_is_recorded_per_call_and_outcome(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "f", "tool": "flaky", "constraints": {"x": {"kind": "exact", "value": "1"}}},
                      {"id": "b", "tool": "explode", "constraints": {"x": {"kind": "exact", "value": "1"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[flaky, explode], name="durwf"))
    assert rt.run("both", run_id="d1").status == "failed"
    durations = otel.histogram("scopegraph.tool.duration", "tool", "status")
    assert {k: v[0] for k, v in durations.items()} == {
        ("flaky", "error"): 1, ("flaky", "ok"): 1, ("explode", "error"): 1}
    assert all(total >= 0 for _, total in durations.values())
    # A denied call never ran: it has no duration.
    rt2 = make_runtime(make_workflow(MAIL_AFTER_READ, executor=_curious(), name="durwf2"))
    rt2.run("read then mail", run_id="d2")
    assert {k for k in otel.histogram("scopegraph.tool.duration", "tool")} == {("flaky",), ("explode",), ("read_doc",)}


def test_spans_start_recording_once_an_sdk_is_installed_after_spans_were_skipped() -> None:
    # ``enabled`` is cached once true; until then each span looks again, so an application
    # (or a test) that installs its SDK after the first spans still gets the later ones.
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from scopegraph import tracing\n"
        "with tracing.span('before') as s:\n"
        "    assert not s.is_recording()\n"
        "exporter = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "trace.set_tracer_provider(provider)\n"
        "try:\n"
        "    with tracing.span('after', lambda: {'k': 1}) as s:\n"
        "        assert s.is_recording() and trace.get_current_span() is s\n"
        "        raise ValueError('x')\n"
        "except ValueError:\n"
        "    pass\n"
        "assert trace.get_current_span() is not s\n"
        "[done] = exporter.get_finished_spans()\n"
        "assert (done.name, dict(done.attributes), done.status.status_code.name) == ('after', {'k': 1}, 'ERROR')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
