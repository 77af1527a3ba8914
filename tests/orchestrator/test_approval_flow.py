"""Approvals through whole runs: parallel approvals, denials, counter-proposals, the run record.

Invariant 5 (an approval authorizes one action) and 8 (nothing lost) at the level of
``Runtime.run`` / ``Runtime.resume``: answers resume only their own step, never another
step's or another run's; a denial or a counter-proposal never executes the original
call; a counter-proposal is a new action that policy decides again.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph import RunReport, Runtime, ScopegraphError, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.canonical import action_digest_v2 as action_digest  # new requests use layout v2
from scopegraph.clock import FixedClock
from scopegraph.errors import ApprovalError, RunBusyError, TransientToolError
from scopegraph.gateway import RetrySettings

from .test_approvals import two_person_policy

INITIATOR = "alice"
ARGS_A: dict[str, Any] = {"employee": "e-17", "amount": 4250, "vendor": "Rail Europe"}
SINGLE_PLAN: dict[str, Any] = {"steps": [
    {"id": "file", "tool": "file_expense", "purpose": "file the claim",
     "constraints": {"employee": {"kind": "exact", "value": "e-17"},
                     "amount": {"kind": "range", "min": 1, "max": 10_000},
                     "vendor": {"kind": "any"}}},
]}
ARGS_W1: dict[str, Any] = {"employee": "e-1", "amount": 100, "vendor": "Acme"}
ARGS_W2: dict[str, Any] = {"employee": "e-2", "amount": 200, "vendor": "Bolt"}


def _exact(args: dict[str, Any]) -> dict[str, Any]:
    return {k: {"kind": "exact", "value": v} for k, v in args.items()}


# Two independent writes, and a read that depends on the second one.
PARALLEL_PLAN: dict[str, Any] = {"steps": [
    {"id": "w1", "tool": "file_expense", "purpose": "file claim one", "constraints": _exact(ARGS_W1)},
    {"id": "w2", "tool": "file_expense", "purpose": "file claim two", "constraints": _exact(ARGS_W2)},
    {"id": "after_w2", "tool": "count_claims", "purpose": "count claims once w2 is filed",
     "depends_on": ["w2"], "constraints": {"employee": {"kind": "exact", "value": "e-2"}}},
]}


# fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture
def flow_clock() -> FixedClock:
    return FixedClock(start=1_800_000_000.0)


@pytest.fixture
def effects() -> list[tuple[str, dict[str, Any]]]:
    """Every tool execution, in order."""
    return []


def make_workflow(effects: list[tuple[str, dict[str, Any]]], plan: dict[str, Any], **kwargs: Any) -> Workflow:
    @tool(risk="write")
    def file_expense(employee: str, amount: int, vendor: str) -> dict[str, Any]:
        """File an expense claim for payment."""
        effects.append(("file_expense", {"employee": employee, "amount": amount, "vendor": vendor}))
        return {"claim": f"claim-{employee}-{amount}"}

    @tool(risk="read")
    def count_claims(employee: str) -> dict[str, Any]:
        """Count an employee's claims."""
        effects.append(("count_claims", {"employee": employee}))
        return {"employee": employee, "claims": 1}

    return Workflow(
        name=kwargs.pop("name", "claims"), tools=[file_expense, count_claims],
        planner=ScriptedPlanner(plan),
        executor=DirectExecutor(builders={"file_expense": lambda ctx: (
            dict(ARGS_A) if ctx.step.id == "file" else {})}),
        approvers=kwargs.pop("approvers", ["bob", "carol"]), **kwargs,
    )


@pytest.fixture
def open_runtime(tmp_path: Path, flow_clock: FixedClock) -> Iterator[Any]:
    opened: list[Runtime] = []

    def make(workflow: Workflow) -> Runtime:
        rt = Runtime(workflow, store=f"sqlite:///{tmp_path / 'flow.db'}", clock=flow_clock)
        opened.append(rt)
        return rt

    yield make
    for rt in reversed(opened):
        rt.close()


def step(report: RunReport, step_id: str) -> Any:
    return next(s for s in report.steps if s.step_id == step_id)


def writes(effects: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [args for name, args in effects if name == "file_expense"]


def assert_waiting_steps_are_answerable(rt: Runtime, report: RunReport) -> None:
    """A paused run waits on approvals a human can still answer; nothing is lost or stranded."""
    now = rt.clock.now()
    waiting = [s for s in report.steps if s.status == "awaiting_approval"]
    assert (report.status == "paused") == bool(waiting), report.summary()
    for s in waiting:
        assert s.approval_id is not None
        state = rt.approvals.get(s.approval_id).effective_status(now)
        assert state == "pending", f"step {s.step_id!r} waits on approval {s.approval_id!r}, which is {state}"


def assert_all_revoked(rt: Runtime, run_id: str) -> None:
    grants = rt.store.grants_for_run(run_id)
    assert grants, "the run minted no grant"
    assert [g.jti for g in grants if g.revoked_at is None] == []


# parallel approvals ------------------------------------------------------------------------
def test_parallel_approvals_are_answered_and_resumed_each_by_its_own_id(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, PARALLEL_PLAN))
    report = rt.run("file both claims", initiator=INITIATOR)
    assert report.status == "paused"
    assert step(report, "w1").status == step(report, "w2").status == "awaiting_approval"
    assert step(report, "after_w2").status == "not_started"
    a1, a2 = rt.approvals.get(step(report, "w1").approval_id), rt.approvals.get(step(report, "w2").approval_id)
    assert (a1.step_id, a1.arguments) == ("w1", ARGS_W1)
    assert (a2.step_id, a2.arguments) == ("w2", ARGS_W2)
    assert a1.id != a2.id and a1.digest != a2.digest
    assert {a["id"] for a in report.approvals} == {a1.id, a2.id}
    assert_waiting_steps_are_answerable(rt, report)

    # Approve the second one only: only the second one runs.
    rt.approvals.approve(a2.id, approver="bob")
    report = rt.resume(report.run_id)
    assert report.status == "paused"
    assert step(report, "w2").status == "completed"
    assert step(report, "after_w2").status == "completed"
    assert step(report, "w1").status == "awaiting_approval"
    assert step(report, "w1").approval_id == a1.id
    assert writes(effects) == [ARGS_W2]
    assert rt.approvals.get(a1.id).status == "pending"
    assert_waiting_steps_are_answerable(rt, report)

    # Resuming with nothing answered changes nothing.
    report = rt.resume(report.run_id)
    assert report.status == "paused" and writes(effects) == [ARGS_W2]

    rt.approvals.approve(a1.id, approver="carol")
    report = rt.resume(report.run_id)
    assert report.status == "completed", report.summary()
    assert writes(effects) == [ARGS_W2, ARGS_W1]
    assert [name for name, _ in effects].count("count_claims") == 1
    assert {a["id"]: a["approver"] for a in report.approvals} == {a1.id: "carol", a2.id: "bob"}
    assert_all_revoked(rt, report.run_id)


def test_approving_both_parallel_steps_resumes_both_once(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, PARALLEL_PLAN))
    report = rt.run("file both claims", initiator=INITIATOR)
    for s in ("w1", "w2"):
        rt.approvals.approve(step(report, s).approval_id, approver="bob")
    report = rt.resume(report.run_id)
    assert report.status == "completed", report.summary()
    assert sorted(writes(effects), key=lambda a: a["employee"]) == [ARGS_W1, ARGS_W2]


def test_answers_never_cross_between_two_runs(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, PARALLEL_PLAN))
    run1 = rt.run("file both claims", initiator=INITIATOR, run_id="run-one")
    run2 = rt.run("file both claims", initiator=INITIATOR, run_id="run-two")
    ids1 = {s.step_id: s.approval_id for s in run1.steps if s.approval_id}
    ids2 = {s.step_id: s.approval_id for s in run2.steps if s.approval_id}
    assert set(ids1) == set(ids2) == {"w1", "w2"}
    assert not set(ids1.values()) & set(ids2.values())

    rt.approvals.approve(ids2["w1"], approver="bob")
    again1 = rt.resume("run-one")
    assert again1.status == "paused"
    assert all(step(again1, s).status == "awaiting_approval" for s in ("w1", "w2"))
    assert effects == []
    assert [a.status for a in rt.approvals.list(run_id="run-one")] == ["pending", "pending"]

    again2 = rt.resume("run-two")
    assert step(again2, "w1").status == "completed"
    assert step(again2, "w2").status == "awaiting_approval"
    assert writes(effects) == [ARGS_W1]
    assert_waiting_steps_are_answerable(rt, again2)
    assert rt.resume("run-one").status == "paused"
    assert writes(effects) == [ARGS_W1]


# deny ----------------------------------------------------------------------------------------
def test_a_denial_ends_the_step_denied_with_the_approvers_reason(open_runtime: Any, effects: Any,
                                                               flow_clock: FixedClock) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN, on_denial="fail"))
    report = rt.run("file the claim", initiator=INITIATOR)
    aid = step(report, "file").approval_id
    flow_clock.advance(30)
    rt.approvals.deny(aid, approver="bob", reason="receipt is a duplicate of r-1041")

    done = rt.resume(report.run_id)
    assert done.status == "denied" and done.exit_code == 1
    s = step(done, "file")
    assert s.status == "denied"
    assert "bob" in s.reason and "receipt is a duplicate of r-1041" in s.reason
    record = json.loads(done.model_dump_json())
    [entry] = record["approvals"]
    assert entry["status"] == "denied"
    assert entry["denied_by"] == "bob"
    assert entry["reason"] == "receipt is a duplicate of r-1041"
    assert entry["decided_at"] == flow_clock.now()
    assert entry["consumed"] is False
    assert effects == []
    assert_all_revoked(rt, report.run_id)
    with pytest.raises(ApprovalError, match="denied"):
        rt.approvals.consume(aid, digest=rt.approvals.get(aid).digest, consumer="after-denial")


def test_a_denial_needs_a_reason(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN))
    report = rt.run("file the claim", initiator=INITIATOR)
    aid = step(report, "file").approval_id
    for reason in ("", "   "):
        with pytest.raises(ApprovalError, match="reason"):
            rt.approvals.deny(aid, approver="bob", reason=reason)
    assert rt.approvals.get(aid).status == "pending"


def test_with_on_denial_fail_a_denial_ends_the_run_and_nothing_else_runs_later(
        open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, PARALLEL_PLAN, on_denial="fail"))
    report = rt.run("file both claims", initiator=INITIATOR)
    a1, a2 = step(report, "w1").approval_id, step(report, "w2").approval_id
    rt.approvals.deny(a1, approver="bob", reason="not this one")

    done = rt.resume(report.run_id)
    assert done.status == "denied"
    assert step(done, "w1").status == "denied"
    assert effects == []
    assert_all_revoked(rt, report.run_id)

    # The run is over: a late approval of the other step executes nothing.
    rt.approvals.approve(a2, approver="carol")
    assert rt.resume(report.run_id).status == "denied"
    assert effects == []


def test_with_on_denial_continue_independent_steps_still_run(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, PARALLEL_PLAN, on_denial="continue"))
    report = rt.run("file both claims", initiator=INITIATOR)
    rt.approvals.deny(step(report, "w1").approval_id, approver="bob", reason="not this one")
    middle = rt.resume(report.run_id)
    assert step(middle, "w1").status == "denied"
    assert middle.status == "paused"
    assert_waiting_steps_are_answerable(rt, middle)

    rt.approvals.approve(step(report, "w2").approval_id, approver="carol")
    done = rt.resume(report.run_id)
    assert done.status == "denied"
    assert step(done, "w2").status == "completed" and step(done, "after_w2").status == "completed"
    assert writes(effects) == [ARGS_W2]


# counter-proposals ----------------------------------------------------------------------------
PROPOSED: dict[str, Any] = {"employee": "e-17", "amount": 1000, "vendor": "Rail Europe"}


def test_a_counter_proposal_is_a_new_action_that_needs_its_own_approval(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN))
    report = rt.run("file the claim", initiator=INITIATOR)
    original = rt.approvals.get(step(report, "file").approval_id)
    denied = rt.approvals.deny(original.id, approver="bob", reason="only the ticket, not the seat",
                               propose=PROPOSED)
    assert denied.status == "denied" and denied.proposed_arguments == PROPOSED

    after = rt.resume(report.run_id)
    assert effects == [], "a counter-proposal was executed without its own approval"
    s = step(after, "file")
    assert s.status == "awaiting_approval" and after.status == "paused"
    assert s.approval_id != original.id
    proposal = rt.approvals.get(s.approval_id)
    assert proposal.arguments == PROPOSED
    assert proposal.status == "pending"
    assert proposal.digest != original.digest
    assert proposal.digest == action_digest(run_id=report.run_id, step_id="file", tool="file_expense",
                                            arguments=PROPOSED, policy_version=rt.policy.version)
    assert "writes-need-approval" in proposal.policy_ids
    assert_waiting_steps_are_answerable(rt, after)
    with pytest.raises(ApprovalError, match="denied"):
        rt.approvals.consume(original.id, digest=original.digest, consumer="sneak")
    with pytest.raises(ApprovalError, match="may not approve"):
        rt.approvals.approve(proposal.id, approver=INITIATOR)

    rt.approvals.approve(proposal.id, approver="carol")
    done = rt.resume(report.run_id)
    assert done.status == "completed", done.summary()
    assert writes(effects) == [PROPOSED]
    statuses = {a["id"]: a["status"] for a in done.approvals}
    assert statuses == {original.id: "denied", proposal.id: "consumed"}


@pytest.mark.parametrize("proposal", [
    {**ARGS_A, "amount": 99_999},              # above the step's range
    {**ARGS_A, "employee": "e-99"},            # another employee than the plan pinned
    {**ARGS_A, "iban": "XX00 0000"},           # an argument the tool does not take
], ids=["amount-out-of-range", "other-employee", "extra-argument"])
def test_a_counter_proposal_outside_the_steps_constraints_is_denied_by_the_gateway(
        open_runtime: Any, effects: Any, proposal: dict[str, Any]) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN))
    report = rt.run("file the claim", initiator=INITIATOR)
    aid = step(report, "file").approval_id
    rt.approvals.deny(aid, approver="bob", reason="try this instead", propose=proposal)

    done = rt.resume(report.run_id)
    s = step(done, "file")
    assert s.status == "denied"
    assert s.calls[-1].status == "denied"
    assert s.calls[-1].policy_ids == ["scopegraph:scope"]
    assert done.status == "denied"
    assert effects == []
    assert [a.id for a in rt.approvals.list(run_id=report.run_id)] == [aid], "no new request for a scope violation"
    assert_all_revoked(rt, report.run_id)


# the run record ---------------------------------------------------------------------------------
def test_the_json_run_record_carries_each_approvals_fields(open_runtime: Any, effects: Any,
                                                           flow_clock: FixedClock) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN))
    paused = rt.run("file the claim", initiator=INITIATOR)
    [pending] = json.loads(paused.model_dump_json())["approvals"]
    digest = action_digest(run_id=paused.run_id, step_id="file", tool="file_expense",
                           arguments=ARGS_A, policy_version=rt.policy.version)
    assert pending["id"] == step(paused, "file").approval_id
    assert pending["digest"] == digest
    assert pending["tool"] == "file_expense"
    assert (pending["status"], pending["approver"], pending["decided_at"], pending["consumed"]) == (
        "pending", None, None, False)

    flow_clock.advance(42)
    rt.approvals.approve(pending["id"], approver="bob", reason="fine")
    approved = json.loads(rt.report(paused.run_id).model_dump_json())["approvals"][0]
    assert (approved["status"], approved["approver"], approved["decided_at"], approved["consumed"]) == (
        "approved", "bob", flow_clock.now(), False)

    flow_clock.advance(1)
    done = json.loads(rt.resume(paused.run_id).model_dump_json())
    [used] = done["approvals"]
    assert done["status"] == "completed"
    assert used["id"] == pending["id"] and used["digest"] == digest
    assert (used["status"], used["approver"], used["decided_at"], used["consumed"]) == (
        "consumed", "bob", flow_clock.now() - 1, True)


def test_resuming_again_never_runs_an_approved_call_twice(open_runtime: Any, effects: Any) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN))
    report = rt.run("file the claim", initiator=INITIATOR)
    rt.approvals.approve(step(report, "file").approval_id, approver="bob")
    assert rt.resume(report.run_id).status == "completed"
    assert rt.resume(report.run_id).status == "completed"
    rt.close()
    fresh = open_runtime(make_workflow(effects, SINGLE_PLAN))
    assert fresh.resume(report.run_id).status == "completed"
    assert writes(effects) == [ARGS_A]


def test_a_pending_approval_survives_closing_the_runtime(open_runtime: Any, effects: Any) -> None:
    first = open_runtime(make_workflow(effects, SINGLE_PLAN))
    report = first.run("file the claim", initiator=INITIATOR)
    aid = step(report, "file").approval_id
    first.close()

    second = open_runtime(make_workflow(effects, SINGLE_PLAN))
    assert [a.id for a in second.approvals.list(status="pending")] == [aid]
    second.approvals.approve(aid, approver="bob")
    assert second.resume(report.run_id).status == "completed"
    assert writes(effects) == [ARGS_A]


def test_an_approval_given_under_policies_changed_since_is_asked_again_not_used(
        open_runtime: Any, effects: Any, tmp_path: Path) -> None:
    first = open_runtime(make_workflow(effects, SINGLE_PLAN))
    report = first.run("file the claim", initiator=INITIATOR)
    aid = step(report, "file").approval_id
    first.approvals.approve(aid, approver="bob")
    first.close()
    extra = tmp_path / "extra.cedar"  # an upgrade while the run was paused: the policy set changed
    extra.write_text('@id("nothing-new")\nforbid (principal, action, resource) when { context.attempt > 99 };\n')
    second = open_runtime(make_workflow(effects, SINGLE_PLAN, policies=[extra]))
    paused = second.resume(report.run_id)
    assert paused.status == "paused" and writes(effects) == []
    [again] = second.approvals.list(run_id=report.run_id, status="pending")
    assert again.id != aid and again.policy_version == second.policy.version
    assert second.approvals.get(aid).status == "approved"  # never consumed: it names the old policies
    second.approvals.approve(again.id, approver="carol")
    assert second.resume(report.run_id).status == "completed"
    assert writes(effects) == [ARGS_A]


# two approvers in the run record ---------------------------------------------------------------------
def test_the_summary_names_who_approved_and_who_denied_under_a_two_person_rule(
        open_runtime: Any, effects: Any, tmp_path: Path) -> None:
    rt = open_runtime(make_workflow(effects, SINGLE_PLAN, policies=[two_person_policy(tmp_path)], baseline=False))
    report = rt.run("file the claim", initiator=INITIATOR)
    aid = step(report, "file").approval_id
    rt.approvals.approve(aid, approver="carol", reason="amount matches")

    half = rt.resume(report.run_id)
    assert half.status == "paused"
    assert f"approval {aid}  file_expense  pending  1/2 approved; 1 more approval needed" in half.summary()
    assert half.approvals[0]["still_needed"] == 1

    rt.approvals.deny(aid, approver="bob", reason="vendor is not on the list")
    done = rt.resume(report.run_id)
    assert done.status == "denied"
    summary = done.summary()
    assert 'approved by carol: "amount matches"' in summary
    assert 'denied by bob: "vendor is not on the list"' in summary
    assert "denied by carol" not in summary
    [entry] = json.loads(done.model_dump_json())["approvals"]
    assert [(g["approver"], g["answer"], g["reason"]) for g in entry["answers"]] == [
        ("carol", "approve", "amount matches"), ("bob", "deny", "vendor is not on the list")]
    assert entry["denied_by"] == "bob"
    assert effects == []


# retries of an approved call ------------------------------------------------------------------------
def test_a_transient_failure_of_an_approved_call_does_not_strand_the_run(
        open_runtime: Any, tmp_path: Path) -> None:
    """The approval is spent on the first attempt; the retry must not wait on it forever."""
    attempts: list[int] = []

    @tool(risk="write")
    def flaky_transfer(amount: int) -> dict[str, Any]:
        """Move money; the first attempt hits a transient error."""
        attempts.append(amount)
        if len(attempts) == 1:
            raise TransientToolError("upstream timed out")
        return {"moved": amount}

    wf = Workflow(name="flaky", tools=[flaky_transfer], approvers=["bob"],
                  planner=ScriptedPlanner({"steps": [{"id": "pay", "tool": "flaky_transfer",
                                                      "constraints": {"amount": {"kind": "exact", "value": 7}}}]}),
                  executor=DirectExecutor(), retry=RetrySettings(attempts=3, sleep=lambda s: None))
    rt = open_runtime(wf)
    report = rt.run("pay", initiator=INITIATOR)
    first = step(report, "pay").approval_id
    rt.approvals.approve(first, approver="bob")

    after = rt.resume(report.run_id)
    assert len(attempts) <= 2
    assert_waiting_steps_are_answerable(rt, after)
    assert rt.approvals.get(first).status == "consumed"
    if after.status == "paused":
        # The retry is a new call: it asks again, under a new request, and runs once approved.
        again = step(after, "pay").approval_id
        assert again != first
        rt.approvals.approve(again, approver="bob")
        done = rt.resume(report.run_id)
        assert done.status == "completed", done.summary()
        assert attempts == [7, 7]
    else:
        assert step(after, "pay").status == "failed"
        assert "upstream timed out" in step(after, "pay").reason


# two resumes of one run at once ------------------------------------------------------------------
def blocking_wire_workflow(started: threading.Event, release: threading.Event,
                           runs: list[int] | None = None) -> Workflow:
    """One approved write whose tool signals ``started`` and blocks until ``release``."""

    @tool(risk="write")
    def wire_transfer(amount: int) -> dict[str, Any]:
        """Send money; blocks until the test lets it finish."""
        if runs is not None:
            runs.append(amount)
        started.set()
        assert release.wait(timeout=60), "the test never released the call"
        return {"sent": amount}

    return Workflow(name="wire", tools=[wire_transfer], approvers=["bob"],
                    planner=ScriptedPlanner({"steps": [{
                        "id": "pay", "tool": "wire_transfer",
                        "constraints": {"amount": {"kind": "exact", "value": 5}}}]}),
                    executor=DirectExecutor())


def test_a_second_resume_while_the_approved_call_is_in_flight_does_not_report_a_crash(
        open_runtime: Any) -> None:
    """Two operators resume the same run at the same moment: the call runs once, and the
    second resume must not tell its operator that a crash interrupted a call still running."""
    started, release = threading.Event(), threading.Event()
    runs: list[int] = []

    def workflow() -> Workflow:
        return blocking_wire_workflow(started, release, runs)

    first = open_runtime(workflow())
    report = first.run("pay", initiator=INITIATOR)
    first.approvals.approve(step(report, "pay").approval_id, approver="bob")
    second = open_runtime(workflow())

    outcome: list[RunReport] = []
    in_flight = threading.Thread(target=lambda: outcome.append(first.resume(report.run_id)))
    in_flight.start()
    try:
        assert started.wait(timeout=60), "the approved call never started"
        try:
            concurrent = second.resume(report.run_id)
        except ScopegraphError:  # refusing to drive a run that is being driven is fine
            concurrent = None
    finally:
        release.set()
        in_flight.join(timeout=60)
    assert runs == [5], "the approved call ran more than once"
    assert outcome and outcome[0].status == "completed", outcome
    assert second.report(report.run_id).status == "completed"
    if concurrent is not None:
        pay = step(concurrent, "pay")
        assert "interrupted by a crash" not in pay.reason, (
            "a resume racing a live call reported a crash that did not happen: " + pay.reason)
        assert concurrent.status != "failed"


def test_a_resume_refused_for_a_busy_run_touches_nothing_of_the_driver(open_runtime: Any) -> None:
    """A second resume must take the run's lease before it reads the checkpoint or revokes
    anything: refused, it leaves the driver's live grant and the ledger as they were."""
    started, release = threading.Event(), threading.Event()

    def workflow() -> Workflow:
        return blocking_wire_workflow(started, release)

    first = open_runtime(workflow())
    report = first.run("pay", initiator=INITIATOR)
    first.approvals.approve(step(report, "pay").approval_id, approver="bob")
    second = open_runtime(workflow())
    outcome: list[RunReport] = []
    in_flight = threading.Thread(target=lambda: outcome.append(first.resume(report.run_id)))
    in_flight.start()
    try:
        assert started.wait(timeout=60), "the approved call never started"
        live = [g.jti for g in first.store.grants_for_run(report.run_id) if g.revoked_at is None]
        records = len(first.ledger.records(report.run_id))
        with pytest.raises(RunBusyError):
            second.resume(report.run_id)
        assert [g.jti for g in first.store.grants_for_run(report.run_id) if g.revoked_at is None] == live != []
        assert len(first.ledger.records(report.run_id)) == records
    finally:
        release.set()
        in_flight.join(timeout=60)
    assert outcome and outcome[0].status == "completed", outcome
