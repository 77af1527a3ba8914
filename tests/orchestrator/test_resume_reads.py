"""What a resume reads and writes once an approval is answered.

``Runtime.resume`` reads each interrupted approval request once, under the run's lease,
and hands the answered ones to the approval node, which passes them on to the session:
none of them is read again to decide which way the step goes. What authorizes the call
(the gateway's check of the approval against the call actually made, and the
consumption in the transaction of the call's use) still reads the request afresh, so an
answer that changes after resume read it never authorizes anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.approvals import ApprovalService
from scopegraph.clock import FixedClock
from scopegraph.run_events import ApprovalAnswered, RunEvent
from scopegraph.store import open_store

PLAN: dict[str, Any] = {"steps": [{"id": "pay", "tool": "pay", "purpose": "pay the claim",
                                   "constraints": {"amount": {"kind": "exact", "value": 42}}}]}


@pytest.fixture
def paid() -> list[int]:
    return []


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(start=1_800_000_000.0)


@pytest.fixture
def runtime(tmp_path: Path, paid: list[int], clock: FixedClock) -> Iterator[Runtime]:
    @tool(risk="write")
    def pay(amount: int) -> dict[str, Any]:
        """Pay a claim."""
        paid.append(amount)
        return {"paid": amount}

    workflow = Workflow(name="payments", tools=[pay], approvers=["bob"], planner=ScriptedPlanner(PLAN),
                        executor=DirectExecutor())
    with Runtime(workflow, store=f"sqlite:///{tmp_path / 'runs.db'}", clock=clock) as rt:
        yield rt


class CountedReads:
    """Counts the reads of approval requests a real store serves (outside a transaction
    or in one), and the updates of them."""

    def __init__(self, rt: Runtime) -> None:
        self.reads = 0
        self.updates = 0
        store: Any = rt.store
        get, update = store.get_approval, store.update_approval

        def counted_get(approval_id: str) -> str | None:
            self.reads += 1
            return get(approval_id)  # type: ignore[no-any-return]

        def counted_update(approval_id: str, mutate: Any) -> str | None:
            self.updates += 1
            return update(approval_id, mutate)  # type: ignore[no-any-return]

        store.get_approval, store.update_approval = counted_get, counted_update


def paused_and_approved(rt: Runtime) -> tuple[str, str]:
    report = rt.run("pay the claim", initiator="alice")
    assert report.status == "paused", report.summary()
    approval_id = report.approvals[0]["id"]
    rt.approvals.approve(approval_id, approver="bob")
    return report.run_id, approval_id


def test_a_resume_reads_the_answered_request_once_before_the_gateway_checks_it(
        runtime: Runtime, paid: list[int]) -> None:
    run_id, _ = paused_and_approved(runtime)
    counted = CountedReads(runtime)
    commits = runtime.store.counts.commits
    report = runtime.resume(run_id)
    assert report.status == "completed" and paid == [42]
    # resume's read under the lease, and the gateway's own check; the consumption reads
    # it again in the transaction of the call's use.
    assert counted.reads == 2
    assert counted.updates == 1
    # The lease, the revocations and ``run_resumed`` in one write; the decision; the
    # result; the end of the run.
    assert runtime.store.counts.commits - commits <= 4


def test_an_approval_used_elsewhere_after_resume_read_it_is_refused(
        runtime: Runtime, paid: list[int], clock: FixedClock, tmp_path: Path) -> None:
    """The approval node goes on from resume's read (approved), but by the time the call is
    checked another consumer has used the approval: the gateway's fresh read refuses it."""
    run_id, approval_id = paused_and_approved(runtime)
    other = open_store(f"sqlite:///{tmp_path / 'runs.db'}")
    elsewhere = ApprovalService(other, clock=clock)
    digest = runtime.approvals.get(approval_id).digest

    def use_it_elsewhere(event: RunEvent) -> None:
        if isinstance(event, ApprovalAnswered):  # told as the step begins again: before its check
            assert event.status == "approved"
            elsewhere.consume(approval_id, digest=digest, consumer="another call")

    try:
        report = runtime.resume(run_id, on_event=use_it_elsewhere)
    finally:
        other.close()
    assert paid == []
    assert report.status != "completed"
    [pay] = report.steps
    assert pay.status == "denied" and "already used" in pay.reason, pay


def test_an_approval_that_expires_after_resume_read_it_is_not_used(
        runtime: Runtime, paid: list[int], clock: FixedClock) -> None:
    run_id, approval_id = paused_and_approved(runtime)
    expires_at = runtime.approvals.get(approval_id).expires_at

    def let_it_expire(event: RunEvent) -> None:
        if isinstance(event, ApprovalAnswered):
            clock.set(expires_at + 1)

    report = runtime.resume(run_id, on_event=let_it_expire)
    assert paid == []
    [pay] = report.steps
    assert pay.status == "denied" and "expired" in pay.reason, pay
    assert runtime.approvals.get(approval_id).consumed_at is None


def test_a_resume_with_nothing_answered_writes_once_and_leaves_the_run_free(
        runtime: Runtime, paid: list[int], tmp_path: Path) -> None:
    report = runtime.run("pay the claim", initiator="alice")
    records = len(runtime.ledger.records(report.run_id))
    commits = runtime.store.counts.commits
    again = runtime.resume(report.run_id)
    assert again.status == "paused" and again.approvals == report.approvals
    assert runtime.store.counts.commits - commits <= 1  # the lease taken and given back together
    assert len(runtime.ledger.records(report.run_id)) == records
    lease = runtime.store.acquire_run(report.run_id, owner="someone else", until=2e9,
                                      now=runtime.clock.now(), owner_alive=lambda owner: True)
    assert lease is None, f"the run is still held by {lease!r}"
    assert paid == []
