"""Async hosts: ``Runtime.arun``/``aresume``/``astream`` and the session's async calls.

An async tool runs on the caller's own event loop: no thread and no loop per call.
``astream`` yields the run's typed events, in the order they happen.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from scopegraph import Outcome, Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.run_events import (
    ApprovalAnswered,
    ApprovalRequested,
    CallDecided,
    PlanFixed,
    RunEnded,
    RunEvent,
    StepEnded,
    StepStarted,
    describe,
)

SEEN: list[tuple[asyncio.AbstractEventLoop, int]] = []  # the loop and thread each async call ran on


@tool(risk="read")
async def fetch_rate(currency: str) -> dict[str, Any]:
    """Fetch an exchange rate."""
    SEEN.append((asyncio.get_running_loop(), threading.get_ident()))
    await asyncio.sleep(0)
    return {"currency": currency, "rate": 2}


@tool(risk="write")
async def book(currency: str, amount: int) -> dict[str, Any]:
    """Book an amount."""
    SEEN.append((asyncio.get_running_loop(), threading.get_ident()))
    return {"booked": amount}


PLAN: dict[str, Any] = {"steps": [
    {"id": "rate", "tool": "fetch_rate", "purpose": "get the rate",
     "constraints": {"currency": {"kind": "exact", "value": "EUR"}}},
    {"id": "book", "tool": "book", "purpose": "book it", "depends_on": ["rate"],
     "constraints": {"currency": {"kind": "exact", "value": "EUR"}, "amount": {"kind": "exact", "value": 7}}},
]}


def workflow(plan: dict[str, Any] = PLAN) -> Workflow:
    SEEN.clear()
    return Workflow(name="fx", tools=[fetch_rate, book], planner=ScriptedPlanner(plan), executor=DirectExecutor(),
                    approvers=["bob"])


def kinds(events: list[RunEvent]) -> list[str]:
    return [e.kind for e in events]


def test_arun_awaits_async_tools_on_the_callers_loop(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(workflow({"steps": PLAN["steps"][:1]}))

    async def main() -> tuple[Any, asyncio.AbstractEventLoop, int]:
        report = await rt.arun("rate", initiator="alice", run_id="a1")
        return report, asyncio.get_running_loop(), threading.get_ident()

    report, loop, thread = asyncio.run(main())
    assert report.status == "completed", report.summary()
    assert SEEN == [(loop, thread)]  # the caller's loop, on the caller's thread: no loop or thread of its own
    assert all(g.revoked_at is not None for g in rt.store.grants_for_run("a1"))


def test_astream_yields_the_runs_events_in_order(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(workflow())

    async def collect(stream: Any) -> list[RunEvent]:
        return [event async for event in stream]

    first = asyncio.run(collect(rt.astream("book 7 EUR", initiator="alice", run_id="a2")))
    assert kinds(first) == ["plan_fixed", "step_started", "decision", "step_ended", "step_started", "decision",
                            "approval_requested", "step_ended", "run_ended"]
    plan, rate_started, rate_decided, rate_ended = first[:4]
    assert isinstance(plan, PlanFixed) and plan.steps == ("rate", "book")
    assert isinstance(rate_started, StepStarted) and rate_started.spiffe_id.endswith("/run/a2/step/rate/executor")
    assert isinstance(rate_decided, CallDecided) and rate_decided.outcome is Outcome.ALLOW
    assert isinstance(rate_ended, StepEnded) and rate_ended.status == "completed"
    held = first[5]
    assert isinstance(held, CallDecided) and held.outcome is Outcome.NEEDS_APPROVAL
    assert held.policy_ids == ("writes-need-approval",)
    requested = first[6]
    assert isinstance(requested, ApprovalRequested) and requested.step_id == "book"
    assert isinstance(first[-1], RunEnded) and first[-1].status == "paused"
    assert rt.report("a2").status == "paused"

    rt.approvals.approve(requested.approval_id, approver="bob")
    second = asyncio.run(collect(rt.astream_resume("a2")))
    assert kinds(second) == ["approval_answered", "step_started", "decision", "step_ended", "run_ended"]
    answered = second[0]
    assert isinstance(answered, ApprovalAnswered) and answered.status == "approved"
    assert isinstance(second[2], CallDecided) and second[2].outcome is Outcome.ALLOW
    assert isinstance(second[-1], RunEnded) and second[-1].status == "completed"
    assert len(SEEN) == 2  # the rate, then the approved booking: each once


def test_a_sync_run_tells_its_listener_the_same_events(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(workflow({"steps": PLAN["steps"][:1]}))
    events: list[RunEvent] = []
    report = rt.run("rate", initiator="alice", run_id="a3", on_event=events.append)
    assert report.status == "completed"
    assert kinds(events) == ["plan_fixed", "step_started", "decision", "step_ended", "run_ended"]
    assert [describe(e) for e in events] == [
        "plan fixed: 1 step(s) (rate)", "step 'rate' started (fetch_rate)",
        "  rate: fetch_rate allow [allow-planned-calls]", "step 'rate' completed", "run completed"]


def test_session_acall_and_aexecute_await_on_the_callers_loop(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(workflow())

    async def main() -> None:
        session = rt.guard.start_run("rate", initiator="alice", plan=PLAN, run_id="a4")
        decision = await session.acheck("rate", "fetch_rate", {"currency": "EUR"})
        assert decision.outcome is Outcome.ALLOW
        result = await session.aexecute(decision)
        assert result.ok and result.value == {"currency": "EUR", "rate": 2}
        await session.aend_step("rate")
        held = await session.acall("book", "book", {"currency": "EUR", "amount": 7}, last=True)
        assert held.status == "needs_approval"
        approval = session.pending_approval("book")
        assert approval is not None
        session.approve(approval, approver="bob")
        booked = await session.aresume_call(approval, last=True)
        assert booked.ok and booked.value == {"booked": 7}
        await session.aend_step("book")
        await session.aend_run(status="completed")
        loop, thread = asyncio.get_running_loop(), threading.get_ident()
        assert SEEN == [(loop, thread), (loop, thread)]

    asyncio.run(main())
    assert all(g.revoked_at is not None for g in rt.store.grants_for_run("a4"))
    assert rt.ledger.verify(run_id="a4").ok


def test_parallel_steps_await_their_async_tools_on_the_callers_loop(make_runtime: Callable[..., Runtime]) -> None:
    both = {"steps": [
        {"id": "eur", "tool": "fetch_rate", "constraints": {"currency": {"kind": "exact", "value": "EUR"}}},
        {"id": "usd", "tool": "fetch_rate", "constraints": {"currency": {"kind": "exact", "value": "USD"}}},
    ]}
    rt = make_runtime(workflow(both))

    async def main() -> tuple[Any, asyncio.AbstractEventLoop]:
        return await rt.arun("rates", initiator="alice", run_id="a5"), asyncio.get_running_loop()

    report, loop = asyncio.run(main())
    assert report.status == "completed", report.summary()
    assert [seen_loop is loop for seen_loop, _ in SEEN] == [True, True]
