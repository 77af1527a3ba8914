"""Invariant 5, single-action approval, attacked at the approval service and the gateway.

An approval authorizes exactly one action digest, once, before it expires, by an
approver allowed to approve it who did not start the run. Each test tries one way
around that and checks that the tool never ran, or ran exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from scopegraph import RunReport, Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.approvals import ApprovalRequest, ApprovalService, ApproverRule
from scopegraph.canonical import action_digest_v2 as action_digest  # new requests use layout v2
from scopegraph.clock import FixedClock
from scopegraph.errors import ApprovalError
from scopegraph.gateway import APPROVAL_POLICY_ID, CallContext, CallResult
from scopegraph.plan import parse_plan
from scopegraph.store import SqliteStore

INITIATOR = "alice"
ARGS_A: dict[str, Any] = {"employee": "e-17", "amount": 4250, "vendor": "Rail Europe"}
WRITE_CONSTRAINTS: dict[str, Any] = {
    "employee": {"kind": "exact", "value": "e-17"},
    "amount": {"kind": "range", "min": 1, "max": 10_000},
    "vendor": {"kind": "any"},
}
PLAN: dict[str, Any] = {"steps": [
    {"id": "file", "tool": "file_expense", "purpose": "file the claim", "constraints": WRITE_CONSTRAINTS},
]}
# Two steps that make the very same call: only the step tells their actions apart.
TWIN_PLAN: dict[str, Any] = {"steps": [
    {"id": "file", "tool": "file_expense", "purpose": "file the claim", "constraints": WRITE_CONSTRAINTS},
    {"id": "file_again", "tool": "file_expense", "purpose": "file it again", "constraints": WRITE_CONSTRAINTS},
]}
WORKER = Path(__file__).with_name("approval_worker.py")


# fixtures and helpers -------------------------------------------------------------------
@pytest.fixture
def approval_store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'approvals.db'}"


@pytest.fixture
def approval_clock() -> FixedClock:
    return FixedClock(start=1_800_000_000.0)


@pytest.fixture
def effects() -> list[dict[str, Any]]:
    """Every execution of the write tool, in order: the side effect an approval guards."""
    return []


def make_workflow(effects: list[dict[str, Any]], *, plan: dict[str, Any] = PLAN,
                  approvers: Any = ("bob", "carol", INITIATOR), **kwargs: Any) -> Workflow:
    # The initiator is on the approver list on purpose: refusing self-approval must not
    # rely on the initiator happening to be unlisted.
    @tool(risk="write")
    def file_expense(employee: str, amount: int, vendor: str) -> dict[str, Any]:
        """File an expense claim for payment."""
        effects.append({"employee": employee, "amount": amount, "vendor": vendor})
        return {"claim": f"claim-{employee}-{amount}"}

    return Workflow(
        name=kwargs.pop("name", "expenses"), tools=[file_expense], planner=ScriptedPlanner(plan),
        executor=DirectExecutor(builders={"file_expense": lambda ctx: dict(ARGS_A)}),
        approvers=approvers, **kwargs,
    )


@pytest.fixture
def open_runtime(approval_store_url: str, approval_clock: FixedClock) -> Iterator[Any]:
    opened: list[Runtime] = []

    def make(workflow: Workflow, **kwargs: Any) -> Runtime:
        kwargs.setdefault("store", approval_store_url)
        kwargs.setdefault("clock", approval_clock)
        rt = Runtime(workflow, **kwargs)
        opened.append(rt)
        return rt

    yield make
    for rt in reversed(opened):
        rt.close()


@pytest.fixture
def rt(open_runtime: Any, effects: list[dict[str, Any]]) -> Runtime:
    return open_runtime(make_workflow(effects))


def pause(rt: Runtime, *, run_id: str | None = None, initiator: str = INITIATOR) -> tuple[RunReport, str]:
    """Start a run; it must pause on the write. Return the report and the step's approval id."""
    report = rt.run("Reimburse receipt r-1042", initiator=initiator, run_id=run_id)
    assert report.status == "paused", report.summary()
    step = next(s for s in report.steps if s.step_id == "file")
    assert step.status == "awaiting_approval"
    assert step.approval_id is not None
    return report, step.approval_id


def call_step(rt: Runtime, run_id: str, step_id: str, arguments: dict[str, Any], *,
              plan: dict[str, Any] = PLAN, approval_id: str | None = None,
              call_key: str | None = None) -> CallResult:
    """Call the gateway as the step's own executor would: its identity, a fresh grant of its scope."""
    step = parse_plan(plan).step(step_id)
    identity = rt.domain.id("wf", rt.workflow.name, "run", run_id, "step", step_id, "executor")
    grant = rt.issuer.mint(
        subject=identity, tool=step.tool, run_id=run_id, step_id=step_id, workflow=rt.workflow.name,
        constraints=step.constraints, act={"sub": "user:tester"},
    )
    ctx = CallContext(workflow=rt.workflow.name, run_id=run_id, step_id=step_id, principal=identity)
    try:
        return rt.gateway.call(grant.danger_token(), step.tool, arguments, ctx,
                               call_key=call_key, approval_id=approval_id)
    finally:
        rt.issuer.revoke(grant.jti, reason="test call ended")


def assert_refused_by_approval(result: CallResult, fragment: str) -> None:
    assert result.status == "denied", result
    assert result.decision.policy_ids == (APPROVAL_POLICY_ID,)
    assert fragment in result.reason, result.reason


def two_person_policy(tmp_path: Path) -> Path:
    """The baseline, except that a write needs two distinct approvers."""
    text = resources.files("scopegraph.policies").joinpath("baseline.cedar").read_text()
    head = '@id("writes-need-approval")\n@escalate\n'
    clause = 'when { context.risk == "write" }\nunless { context.approved };'
    assert head in text and clause in text, "the baseline changed; update this copy"
    text = text.replace(head, head + '@approvals("2")\n').replace(
        clause, 'when { context.risk == "write" }\nunless { context.approved && context.approval_count >= 2 };')
    path = tmp_path / "two-person.cedar"
    path.write_text(text)
    return path


# replay -----------------------------------------------------------------------------------
def test_an_approval_executes_its_call_once_and_every_replay_is_refused(
        rt: Runtime, effects: list[dict[str, Any]]) -> None:
    report, aid = pause(rt)
    digest = rt.approvals.get(aid).digest
    rt.approvals.approve(aid, approver="bob", reason="receipt checked")

    done = rt.resume(report.run_id)
    assert done.status == "completed", done.summary()
    assert effects == [ARGS_A]
    assert rt.approvals.get(aid).status == "consumed"

    with pytest.raises(ApprovalError, match="already used"):
        rt.approvals.consume(aid, digest=digest, consumer="another-call")
    replay = call_step(rt, report.run_id, "file", ARGS_A, approval_id=aid, call_key="replay")
    assert_refused_by_approval(replay, "already used")
    keyless = call_step(rt, report.run_id, "file", ARGS_A, approval_id=aid)
    assert_refused_by_approval(keyless, "already used")
    # Even the runtime's own idempotency key for this call only replays the recorded result.
    call_step(rt, report.run_id, "file", ARGS_A, approval_id=aid, call_key=f"approval:{aid}")
    assert effects == [ARGS_A]
    assert rt.resume(report.run_id).status == "completed"
    assert effects == [ARGS_A]


def test_an_approval_cannot_be_approved_twice(rt: Runtime) -> None:
    _, aid = pause(rt)
    rt.approvals.approve(aid, approver="bob")
    with pytest.raises(ApprovalError, match="only a pending request"):
        rt.approvals.approve(aid, approver="carol")
    assert rt.approvals.get(aid).approvers == ["bob"]


# approve A, execute B -----------------------------------------------------------------------
@pytest.mark.parametrize("args_b", [
    {**ARGS_A, "amount": 4251},
    {**ARGS_A, "amount": 9999},
    {**ARGS_A, "vendor": "Evil Corp"},
], ids=["amount+1", "amount-inflated", "vendor"])
def test_approving_arguments_a_does_not_authorize_arguments_b(
        rt: Runtime, effects: list[dict[str, Any]], args_b: dict[str, Any]) -> None:
    report, aid = pause(rt)
    rt.approvals.approve(aid, approver="bob")

    # B lies inside the step's constraints, so only the digest can tell it from A.
    result = call_step(rt, report.run_id, "file", args_b, approval_id=aid, call_key="b")
    assert_refused_by_approval(result, "different action")
    assert effects == []
    unused = rt.approvals.get(aid)
    assert unused.status == "approved" and unused.consumed_at is None, "a refused call must not burn the approval"

    # The same arguments in another key order are the same action.
    reordered = dict(reversed(list(ARGS_A.items())))
    ok = call_step(rt, report.run_id, "file", reordered, approval_id=aid, call_key="a")
    assert ok.status == "ok", ok.reason
    assert effects == [ARGS_A]


def test_arguments_changed_in_the_store_after_approval_are_refused_at_use(
        rt: Runtime, effects: list[dict[str, Any]]) -> None:
    """The gateway recomputes the digest from the call it runs, not from what the request says."""
    report, aid = pause(rt)
    rt.approvals.approve(aid, approver="bob")

    def inflate(payload: str) -> str:
        data = json.loads(payload)
        data["arguments"]["amount"] = 9_999
        return json.dumps(data)

    rt.store.update_approval(aid, inflate)
    assert rt.approvals.get(aid).arguments["amount"] == 9_999
    resumed = rt.resume(report.run_id)
    assert effects == [], "arguments edited after the approval were executed"
    step = next(s for s in resumed.steps if s.step_id == "file")
    assert step.status != "completed"
    assert APPROVAL_POLICY_ID in step.calls[-1].policy_ids


def test_a_call_without_its_approval_is_not_executed(rt: Runtime, effects: list[dict[str, Any]]) -> None:
    report, aid = pause(rt)
    rt.approvals.approve(aid, approver="bob")
    result = call_step(rt, report.run_id, "file", ARGS_A, call_key="no-approval")
    assert result.status == "needs_approval"
    assert effects == []
    assert rt.approvals.get(aid).status == "approved"


# another run, another step, another policy ---------------------------------------------------
def test_an_approval_from_one_run_is_refused_in_another(rt: Runtime, effects: list[dict[str, Any]]) -> None:
    run1, aid1 = pause(rt, run_id="run-one")
    run2, aid2 = pause(rt, run_id="run-two")
    first, second = rt.approvals.get(aid1), rt.approvals.get(aid2)
    assert first.arguments == second.arguments == ARGS_A
    assert first.digest != second.digest and aid1 != aid2
    rt.approvals.approve(aid1, approver="bob")

    stolen = call_step(rt, run2.run_id, "file", ARGS_A, approval_id=aid1, call_key="steal")
    assert_refused_by_approval(stolen, "different action")
    assert effects == []
    assert rt.resume(run2.run_id).status == "paused"
    assert effects == []
    assert rt.approvals.get(aid2).status == "pending"

    assert rt.resume(run1.run_id).status == "completed"
    assert effects == [ARGS_A]


def test_an_approval_for_one_step_is_refused_in_another_step_of_the_same_run(
        open_runtime: Any, effects: list[dict[str, Any]]) -> None:
    rt = open_runtime(make_workflow(effects, plan=TWIN_PLAN))
    report = rt.run("Reimburse receipt r-1042", initiator=INITIATOR)
    assert report.status == "paused"
    ids = {s.step_id: s.approval_id for s in report.steps}
    assert ids["file"] and ids["file_again"] and ids["file"] != ids["file_again"]
    rt.approvals.approve(ids["file"], approver="bob")

    result = call_step(rt, report.run_id, "file_again", ARGS_A, plan=TWIN_PLAN,
                       approval_id=ids["file"], call_key="other-step")
    assert_refused_by_approval(result, "different action")
    assert effects == []


def test_an_approval_does_not_survive_a_policy_change(
        open_runtime: Any, effects: list[dict[str, Any]], tmp_path: Path) -> None:
    first = open_runtime(make_workflow(effects))
    report, aid = pause(first)
    first.approvals.approve(aid, approver="bob")
    approved_under = first.approvals.get(aid).policy_version
    first.close()

    changed = tmp_path / "baseline-edited.cedar"
    changed.write_text(resources.files("scopegraph.policies").joinpath("baseline.cedar").read_text()
                       + "\n// edited after the approval was given\n")
    second = open_runtime(make_workflow(effects, policies=[changed], baseline=False))
    assert second.policy.version != approved_under

    resumed = second.resume(report.run_id)
    assert effects == [], "an approval given under one policy version was used under another"
    step = next(s for s in resumed.steps if s.step_id == "file")
    assert step.status != "completed"
    # Not presented under the new policies (issue 13): the call is decided afresh and waits
    # for an approval of its own, bound to the new version; the old one is never consumed.
    assert step.status == "awaiting_approval" and step.approval_id != aid, step
    assert second.approvals.get(step.approval_id).policy_version == second.policy.version
    assert second.approvals.get(aid).status == "approved"


# expiry ---------------------------------------------------------------------------------------
def test_an_unanswered_approval_expires_and_its_step_ends_denied(
        open_runtime: Any, effects: list[dict[str, Any]], approval_clock: FixedClock) -> None:
    rt = open_runtime(make_workflow(effects, approval_ttl=120.0))
    report, aid = pause(rt)
    request = rt.approvals.get(aid)
    assert request.expires_at - request.created_at == 120.0

    approval_clock.advance(120.0)
    with pytest.raises(ApprovalError, match="expired"):
        rt.approvals.approve(aid, approver="bob")
    with pytest.raises(ApprovalError, match="expired"):
        rt.approvals.deny(aid, approver="bob", reason="too late")
    with pytest.raises(ApprovalError, match="expired"):
        rt.approvals.consume(aid, digest=request.digest, consumer="late")
    assert [a.id for a in rt.approvals.list(status="expired")] == [aid]
    assert rt.approvals.list(status="pending") == []

    resumed = rt.resume(report.run_id)
    step = next(s for s in resumed.steps if s.step_id == "file")
    assert step.status == "denied"
    assert "expired" in step.reason
    assert resumed.status == "denied"
    assert effects == []
    grants = rt.store.grants_for_run(report.run_id)
    assert grants and all(g.revoked_at is not None for g in grants)


def test_an_approved_approval_unused_until_expiry_is_refused(
        open_runtime: Any, effects: list[dict[str, Any]], approval_clock: FixedClock) -> None:
    rt = open_runtime(make_workflow(effects, approval_ttl=120.0))
    report, aid = pause(rt)
    approval_clock.advance(119.0)
    assert rt.approvals.approve(aid, approver="bob").status == "approved"
    approval_clock.advance(1.0)

    with pytest.raises(ApprovalError, match="expired"):
        rt.approvals.consume(aid, digest=rt.approvals.get(aid).digest, consumer="late")
    result = call_step(rt, report.run_id, "file", ARGS_A, approval_id=aid, call_key="late")
    assert_refused_by_approval(result, "expired")
    resumed = rt.resume(report.run_id)
    step = next(s for s in resumed.steps if s.step_id == "file")
    assert step.status == "denied" and "expired" in step.reason
    assert effects == []


# who may approve -------------------------------------------------------------------------------
def test_the_initiator_may_not_approve_their_own_run(rt: Runtime, effects: list[dict[str, Any]]) -> None:
    report, aid = pause(rt)
    assert INITIATOR in rt.approvals.get(aid).allowed_approvers
    with pytest.raises(ApprovalError, match="may not approve"):
        rt.approvals.approve(aid, approver=INITIATOR, reason="trust me")
    request = rt.approvals.get(aid)
    assert request.status == "pending" and request.approvals == []
    assert rt.resume(report.run_id).status == "paused"
    assert effects == []


def test_the_initiator_of_one_run_may_approve_another_persons_run(rt: Runtime) -> None:
    _, aid = pause(rt, initiator="bob")
    assert rt.approvals.approve(aid, approver=INITIATOR).status == "approved"


@pytest.mark.parametrize("spelling", ["ALICE", "Alice", "\uff41\uff4c\uff49\uff43\uff45", "ａｌｉｃｅ",
                                      "\u0041lice", "alice\u200b", " alice", "alice\t"])
def test_the_initiator_may_not_approve_under_any_spelling(rt: Runtime, spelling: str) -> None:
    """Issue 12: names are compared after NFKC and case folding; whitespace and format
    characters are refused outright, never read as someone else."""
    _, aid = pause(rt)
    with pytest.raises(ApprovalError, match="may not approve|invalid approver name"):
        rt.approvals.approve(aid, approver=spelling)
    with pytest.raises(ApprovalError, match="may not approve|invalid approver name"):
        rt.approvals.deny(aid, approver=spelling, reason="mine")
    assert rt.approvals.get(aid).status == "pending"


def test_an_allowed_approver_is_the_same_person_under_another_case_or_width(rt: Runtime) -> None:
    """Issue 12 changes the exact comparison: ``Bob`` and full-width ``ｂｏｂ`` are bob."""
    _, aid = pause(rt)
    approved = rt.approvals.approve(aid, approver="\uff22\uff4f\uff42")
    assert approved.status == "approved" and approved.approvers == ["bob"]


# "Bob" was refused here before issue 12 (exact comparison); it is now bob, see above.
@pytest.mark.parametrize("name", ["mallory", " bob", "bob ", "", "   ", "b\u200bob"])
def test_an_unlisted_approver_is_refused(rt: Runtime, name: str) -> None:
    _, aid = pause(rt)
    with pytest.raises(ApprovalError):
        rt.approvals.approve(aid, approver=name)
    with pytest.raises(ApprovalError):
        rt.approvals.deny(aid, approver=name, reason="not yours to answer")
    request = rt.approvals.get(aid)
    assert request.status == "pending" and request.approvals == []


def test_the_requesting_identity_may_not_approve(rt: Runtime) -> None:
    _, aid = pause(rt)
    request = rt.approvals.get(aid)
    with pytest.raises(ApprovalError, match="not an allowed approver"):
        rt.approvals.approve(aid, approver=request.requester)


@pytest.mark.parametrize("rule", [
    ApproverRule(approvers=frozenset({"bob", "carol"}), by_tool={"file_expense": frozenset({"carol"})}),
    ApproverRule(approvers=frozenset({"bob", "carol"}), by_risk={"write": frozenset({"carol"})}),
], ids=["by-tool", "by-risk"])
def test_a_narrower_approver_list_for_the_tool_wins(
        open_runtime: Any, effects: list[dict[str, Any]], rule: ApproverRule) -> None:
    rt = open_runtime(make_workflow(effects, approvers=rule))
    _, aid = pause(rt)
    assert rt.approvals.get(aid).allowed_approvers == ["carol"]
    with pytest.raises(ApprovalError, match="not an allowed approver"):
        rt.approvals.approve(aid, approver="bob")
    assert rt.approvals.approve(aid, approver="carol").status == "approved"


# two-person rule -----------------------------------------------------------------------------------
def test_the_two_person_rule_needs_two_distinct_approvers(
        open_runtime: Any, effects: list[dict[str, Any]], tmp_path: Path) -> None:
    rt = open_runtime(make_workflow(effects, policies=[two_person_policy(tmp_path)], baseline=False))
    report, aid = pause(rt)
    request = rt.approvals.get(aid)
    assert request.required_approvals == 2

    after_bob = rt.approvals.approve(aid, approver="bob")
    assert after_bob.status == "pending" and after_bob.approvers == ["bob"]
    with pytest.raises(ApprovalError, match="already approved"):
        rt.approvals.approve(aid, approver="bob")
    with pytest.raises(ApprovalError, match="may not approve"):
        rt.approvals.approve(aid, approver=INITIATOR)
    assert rt.approvals.get(aid).approvers == ["bob"]

    with pytest.raises(ApprovalError, match="not approved"):
        rt.approvals.consume(aid, digest=request.digest, consumer="half")
    half = call_step(rt, report.run_id, "file", ARGS_A, approval_id=aid, call_key="half")
    assert_refused_by_approval(half, "not approved")
    assert rt.resume(report.run_id).status == "paused"
    assert effects == []

    assert rt.approvals.approve(aid, approver="carol").status == "approved"
    done = rt.resume(report.run_id)
    assert done.status == "completed", done.summary()
    assert effects == [ARGS_A]
    assert done.approvals[0]["approvers"] == ["bob", "carol"]


def test_the_gateway_rechecks_the_approval_count_at_use_time(
        open_runtime: Any, effects: list[dict[str, Any]], tmp_path: Path) -> None:
    """A request that claims one approver is enough cannot beat a policy that wants two."""
    rt = open_runtime(make_workflow(effects, policies=[two_person_policy(tmp_path)], baseline=False))
    report, aid = pause(rt)
    real = rt.approvals.get(aid)
    forged = rt.approvals.request(real.model_copy(update={"id": "apr_one_person", "required_approvals": 1}))
    assert forged.digest == real.digest
    assert rt.approvals.approve(forged.id, approver="bob").status == "approved"

    result = call_step(rt, report.run_id, "file", ARGS_A, approval_id=forged.id, call_key="forged")
    assert result.status == "denied"
    assert "writes-need-approval" in result.decision.policy_ids
    assert effects == []


# approvals that are not approved ----------------------------------------------------------------
def test_pending_denied_and_unknown_approvals_authorize_nothing(
        open_runtime: Any, effects: list[dict[str, Any]]) -> None:
    rt = open_runtime(make_workflow(effects, plan=TWIN_PLAN))
    report = rt.run("Reimburse receipt r-1042", initiator=INITIATOR)
    ids = {s.step_id: s.approval_id for s in report.steps}
    assert ids["file"] and ids["file_again"]
    rt.approvals.deny(ids["file_again"], approver="bob", reason="duplicate claim")

    pending = call_step(rt, report.run_id, "file", ARGS_A, plan=TWIN_PLAN,
                        approval_id=ids["file"], call_key="pending")
    assert_refused_by_approval(pending, "pending")
    denied = call_step(rt, report.run_id, "file_again", ARGS_A, plan=TWIN_PLAN,
                       approval_id=ids["file_again"], call_key="denied")
    assert_refused_by_approval(denied, "denied")
    unknown = call_step(rt, report.run_id, "file", ARGS_A, plan=TWIN_PLAN,
                        approval_id="apr_000000000000000000000000", call_key="unknown")
    assert_refused_by_approval(unknown, "unknown approval")
    assert effects == []
    with pytest.raises(ApprovalError, match="unknown approval"):
        rt.approvals.approve("apr_000000000000000000000000", approver="bob")


# concurrent consumers --------------------------------------------------------------------------------
ROUNDS = 25


def _approved_copies(rt: Runtime, count: int) -> list[tuple[str, str]]:
    """``count`` approved requests for the same paused call, each raced for in its own round."""
    _, aid = pause(rt)
    real = rt.approvals.get(aid)
    out = []
    for i in range(count):
        copy = rt.approvals.request(real.model_copy(update={"id": f"apr_race_{i:03d}"}))
        rt.approvals.approve(copy.id, approver="bob")
        out.append((copy.id, copy.digest))
    return out


@pytest.fixture
def fine_grained_switching() -> Iterator[None]:
    """Switch threads as often as possible, so the read-check-write of consume can interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def test_concurrent_consumers_in_threads_exactly_one_wins(
        rt: Runtime, approval_store_url: str, approval_clock: FixedClock, fine_grained_switching: None) -> None:
    approvals = _approved_copies(rt, ROUNDS)
    path = approval_store_url.removeprefix("sqlite:///")
    threads_n = 6
    barrier = threading.Barrier(threads_n)
    outcomes: dict[tuple[str, int], str] = {}

    def consume(i: int) -> None:
        store = SqliteStore(path)  # its own connection: contention happens in SQLite, not in one lock
        try:
            service = ApprovalService(store, clock=approval_clock)
            for aid, digest in approvals:
                barrier.wait(timeout=60)
                try:
                    service.consume(aid, digest=digest, consumer=f"consumer-{i}")
                    outcomes[(aid, i)] = "won"
                except ApprovalError as exc:
                    outcomes[(aid, i)] = str(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(outcomes) == threads_n * ROUNDS, "a consumer failed with something else than ApprovalError"
    for aid, _ in approvals:
        winners = [i for i in range(threads_n) if outcomes[(aid, i)] == "won"]
        assert len(winners) == 1, {i: outcomes[(aid, i)] for i in range(threads_n)}
        assert all("already used" in outcomes[(aid, i)] for i in range(threads_n) if i not in winners)
        assert rt.approvals.get(aid).consumed_by == f"consumer-{winners[0]}"


def test_concurrent_gateway_calls_with_one_approval_execute_the_tool_once(
        rt: Runtime, effects: list[dict[str, Any]], fine_grained_switching: None) -> None:
    report, aid = pause(rt)
    rt.approvals.approve(aid, approver="bob")
    calls_n = 6
    barrier = threading.Barrier(calls_n)
    results: list[CallResult] = []

    def call(i: int) -> None:
        barrier.wait(timeout=60)
        results.append(call_step(rt, report.run_id, "file", ARGS_A, approval_id=aid, call_key=f"k{i}"))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(calls_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == calls_n
    assert sorted(r.status for r in results) == ["denied"] * (calls_n - 1) + ["ok"]
    assert effects == [ARGS_A]


def test_concurrent_consumers_in_processes_exactly_one_wins(
        rt: Runtime, approval_store_url: str, approval_clock: FixedClock, tmp_path: Path) -> None:
    approvals = _approved_copies(rt, ROUNDS)
    listing = tmp_path / "race.json"
    listing.write_text(json.dumps(approvals))
    workers, logs = [], []
    try:
        for i in range(4):
            logs.append((tmp_path / f"worker-{i}.err").open("w"))
            workers.append(subprocess.Popen(
                [sys.executable, "-P", "-W", "error", str(WORKER), "consume", approval_store_url,
                 f"process-{i}", repr(approval_clock.now()), str(listing)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1], text=True,
            ))
        for w in workers:  # every process has opened the store and waits for the start time
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        start_at = time.time() + 0.5
        for w in workers:  # all get the start time before any result is read
            assert w.stdin is not None
            w.stdin.write(f"{start_at!r}\n")
            w.stdin.close()
        outputs = []
        for w in workers:
            assert w.stdout is not None
            outputs.append(w.stdout.read())
            w.stdout.close()
            w.wait(timeout=120)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
            for pipe in (w.stdin, w.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        for log in logs:
            log.close()
    errors = [(tmp_path / f"worker-{i}.err").read_text() for i in range(len(workers))]
    assert all(w.returncode == 0 for w in workers), errors
    results = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    for n, (aid, _) in enumerate(approvals):
        answers = [r[n] for r in results]
        winners = [i for i, a in enumerate(answers) if a["won"]]
        assert len(winners) == 1, (aid, answers)
        assert all("already used" in a["error"] for a in answers if not a["won"]), answers
        assert rt.approvals.get(aid).consumed_by == f"process-{winners[0]}"


def test_the_recorded_digest_is_the_digest_of_the_exact_call(rt: Runtime) -> None:
    report, aid = pause(rt)
    request: ApprovalRequest = rt.approvals.get(aid)
    assert request.arguments == ARGS_A
    assert request.digest == action_digest(run_id=report.run_id, step_id="file", tool="file_expense",
                                           arguments=ARGS_A, policy_version=rt.policy.version)
    assert request.policy_version == rt.policy.version
