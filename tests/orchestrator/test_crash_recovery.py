"""Invariant 8, nothing lost: a process killed with SIGKILL around an approved call.

A worker process (``approval_worker.py``) runs a workflow on a SQLite file in
``tmp_path``: an approved write (``file_expense``) followed by a read
(``confirm_claim``). It kills itself at a chosen point; every side effect is a line
appended and fsynced to a log before the kill. A fresh process then resumes the run.
Whatever the crash point: the approved call never runs twice, the approval is not
lost, the run completes or names the interrupted write, a read cut off by the crash
runs again, and every grant ends revoked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.approvals import ApprovalService
from scopegraph.clock import SystemClock
from scopegraph.ledger import Ledger
from scopegraph.store import SqliteStore

WORKER = Path(__file__).with_name("approval_worker.py")
RUN_ID = "crash-run"
FILED = "file_expense e-17 4250"
CONFIRMED = "confirm_claim claim-e-17-4250"
INTERRUPTED = "interrupted by a crash"


@pytest.fixture
def crash_db(tmp_path: Path) -> Path:
    return tmp_path / "crash.db"


@pytest.fixture
def side_effects(tmp_path: Path) -> Path:
    return tmp_path / "side-effects.log"


@pytest.fixture
def inspect_store(crash_db: Path) -> Iterator[Any]:
    """Open the run's store from the test process, as an operator would."""
    opened: list[SqliteStore] = []

    def open_() -> SqliteStore:
        store = SqliteStore(crash_db)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def worker(crash_db: Path, log: Path, *args: str, crash: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGRAPH_")}
    env["OTEL_SDK_DISABLED"] = "true"
    if crash:
        env["SCOPEGRAPH_TEST_CRASH"] = crash
    command, rest = args[0], args[1:]
    return subprocess.run(
        [sys.executable, "-P", "-W", "error", str(WORKER), command, f"sqlite:///{crash_db}", RUN_ID,
         str(log), *rest],
        env=env, capture_output=True, text=True, timeout=180,
    )


def killed(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == -signal.SIGKILL, (
        f"worker was not killed at the crash point (exit {proc.returncode}): {proc.stderr}")


def finished(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def effects(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def step(record: dict[str, Any], step_id: str) -> dict[str, Any]:
    return next(s for s in record["steps"] if s["step_id"] == step_id)


def approve_from_another_process(store: SqliteStore) -> str:
    service = ApprovalService(store, clock=SystemClock())
    [pending] = service.list(run_id=RUN_ID, status="pending")
    service.approve(pending.id, approver="bob", reason="approved while the worker was dead")
    return pending.id


def assert_every_grant_revoked(store: SqliteStore) -> None:
    grants = store.grants_for_run(RUN_ID)
    assert grants, "the run minted no grant"
    assert [g.jti for g in grants if g.revoked_at is None] == []


def live_grants(store: SqliteStore) -> list[str]:
    return [g.jti for g in store.grants_for_run(RUN_ID) if g.revoked_at is None]


def test_a_pending_approval_survives_a_crash_of_the_paused_process(
        crash_db: Path, side_effects: Path, inspect_store: Any) -> None:
    killed(worker(crash_db, side_effects, "run", crash="after_pause"))
    store = inspect_store()
    aid = approve_from_another_process(store)
    assert effects(side_effects) == []

    record = finished(worker(crash_db, side_effects, "resume"))
    assert record["status"] == "completed", record
    assert effects(side_effects) == [FILED, CONFIRMED]
    assert [(a["id"], a["status"], a["approver"]) for a in record["approvals"]] == [(aid, "consumed", "bob")]
    assert_every_grant_revoked(store)


def test_a_crash_after_approval_before_the_tool_call_loses_nothing(
        crash_db: Path, side_effects: Path, inspect_store: Any) -> None:
    killed(worker(crash_db, side_effects, "run", "--approve-as", "bob", crash="after_approve"))
    store = inspect_store()
    assert effects(side_effects) == [], "the tool ran before the resume"
    service = ApprovalService(store, clock=SystemClock())
    [approval] = service.list(run_id=RUN_ID)
    assert approval.status == "approved" and approval.approvers == ["bob"], "the approval was lost"

    record = finished(worker(crash_db, side_effects, "resume"))
    assert record["status"] == "completed", record
    assert effects(side_effects) == [FILED, CONFIRMED]
    assert service.get(approval.id).status == "consumed"
    assert record["approvals"][0]["consumed"] is True
    assert_every_grant_revoked(store)


def test_a_crash_inside_the_approved_tool_after_its_effect_never_runs_it_twice(
        crash_db: Path, side_effects: Path, inspect_store: Any) -> None:
    killed(worker(crash_db, side_effects, "run", "--approve-as", "bob", crash="after_effect"))
    store = inspect_store()
    assert effects(side_effects) == [FILED]
    assert live_grants(store), "the crash should have left the approval's grant unrevoked"

    record = finished(worker(crash_db, side_effects, "resume"))
    assert effects(side_effects) == [FILED], "the approved call ran twice"
    # The tool never returned: the honest outcome is to name the interrupted call.
    filed = step(record, "file")
    assert filed["status"] == "failed"
    assert INTERRUPTED in filed["reason"] and "file_expense" in filed["reason"]
    assert step(record, "confirm")["status"] == "not_started"
    assert record["status"] == "failed"
    [approval] = record["approvals"]
    assert approval["status"] == "consumed" and approval["approver"] == "bob"
    assert_every_grant_revoked(store)

    # Resuming once more changes nothing.
    again = finished(worker(crash_db, side_effects, "resume"))
    assert again["status"] == record["status"]
    assert effects(side_effects) == [FILED]
    assert_every_grant_revoked(store)


def test_a_crash_inside_the_approved_tool_before_its_effect_is_reported_not_repeated(
        crash_db: Path, side_effects: Path, inspect_store: Any) -> None:
    killed(worker(crash_db, side_effects, "run", "--approve-as", "bob", crash="before_effect"))
    store = inspect_store()
    assert effects(side_effects) == []

    record = finished(worker(crash_db, side_effects, "resume"))
    # The call started and nobody knows how far it got: at most once, and said plainly.
    filed = step(record, "file")
    assert effects(side_effects) == []
    assert filed["status"] == "failed"
    assert INTERRUPTED in filed["reason"] and "file_expense" in filed["reason"]
    assert record["status"] == "failed"
    service = ApprovalService(store, clock=SystemClock())
    [approval] = service.list(run_id=RUN_ID)
    assert approval.status == "consumed"
    assert_every_grant_revoked(store)


def test_a_crash_in_the_next_step_does_not_repeat_the_approved_call_and_runs_the_cut_off_read_again(
        crash_db: Path, side_effects: Path, inspect_store: Any) -> None:
    killed(worker(crash_db, side_effects, "run", "--approve-as", "bob", crash="in_next_step"))
    store = inspect_store()
    assert effects(side_effects) == [FILED, CONFIRMED]
    assert live_grants(store)

    record = finished(worker(crash_db, side_effects, "resume"))
    assert effects(side_effects).count(FILED) == 1, "the approved call ran twice"
    assert step(record, "file")["status"] == "completed"
    # The read was cut off before it returned: it changed nothing, so it runs again,
    # decided anew by policy under the step's new grant.
    confirm = step(record, "confirm")
    assert effects(side_effects) == [FILED, CONFIRMED, CONFIRMED]
    assert confirm["status"] == "completed", confirm
    assert record["status"] == "completed"
    ledger = Ledger(store, clock=SystemClock())
    decided = [r for r in ledger.records(RUN_ID) if r["kind"] == "decision" and r["step_id"] == "confirm"]
    assert [r["decision"] for r in decided] == ["allow", "allow"]
    first_grant, second_grant = (r["grant_id"] for r in decided)
    assert first_grant != second_grant
    assert confirm["grant_id"] == second_grant
    ran = [r for r in ledger.records(RUN_ID) if r["kind"] == "tool_call" and r["step_id"] == "confirm"]
    assert [(r["grant_id"], r["status"]) for r in ran] == [(second_grant, "ok")]
    assert record["approvals"][0]["status"] == "consumed"
    assert_every_grant_revoked(store)


# Ctrl-C in the middle of a call (in process) ---------------------------------------------------
LOOKUP_PLAN: dict[str, Any] = {"steps": [
    {"id": "look", "tool": "count_claims", "purpose": "count the claims",
     "constraints": {"employee": {"kind": "exact", "value": "e-17"}}},
]}
PAY_PLAN: dict[str, Any] = {"steps": [
    {"id": "pay", "tool": "pay_claim", "purpose": "pay the claim",
     "constraints": {"claim": {"kind": "exact", "value": "c-1"}}},
]}


def interrupted_once(ran: list[str]) -> Workflow:
    """A read and a write whose first execution is cut off by Ctrl-C (KeyboardInterrupt)."""

    @tool(risk="read")
    def count_claims(employee: str) -> dict[str, Any]:
        """Count an employee's claims."""
        ran.append("count_claims")
        if ran.count("count_claims") == 1:
            raise KeyboardInterrupt
        return {"employee": employee, "claims": 3}

    @tool(risk="write")
    def pay_claim(claim: str) -> dict[str, Any]:
        """Pay a claim."""
        ran.append("pay_claim")
        if ran.count("pay_claim") == 1:
            raise KeyboardInterrupt
        return {"paid": claim}

    plans = {"look": LOOKUP_PLAN, "pay": PAY_PLAN}
    return Workflow(name="interrupted", tools=[count_claims, pay_claim], approvers=["bob"],
                    planner=ScriptedPlanner(lambda task: plans[task]), executor=DirectExecutor())


@pytest.fixture
def ctrl_c_store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ctrl-c.db'}"


def test_a_read_cut_off_by_ctrl_c_runs_again_on_resume_under_a_new_grant(ctrl_c_store: str) -> None:
    ran: list[str] = []
    with Runtime(interrupted_once(ran), store=ctrl_c_store) as rt:
        with pytest.raises(KeyboardInterrupt):
            rt.run("look", initiator="alice", run_id="cut-read")
        assert rt.store.get_run("cut-read").status == "cancelled"

        done = rt.resume("cut-read")
        assert ran == ["count_claims", "count_claims"]
        assert done.status == "completed", done.summary()
        look = next(s for s in done.steps if s.step_id == "look")
        assert [(c.decision, c.status) for c in look.calls] == [("allow", "ok")]
        decided = [r for r in rt.ledger.records("cut-read") if r["kind"] == "decision"]
        assert len(decided) == 2 and decided[0]["grant_id"] != decided[1]["grant_id"] == look.grant_id
        assert [g.jti for g in rt.store.grants_for_run("cut-read") if g.revoked_at is None] == []


def test_a_read_cut_off_by_ctrl_c_is_decided_again_by_the_policy_in_force(
        ctrl_c_store: str, tmp_path: Path) -> None:
    ran: list[str] = []
    with Runtime(interrupted_once(ran), store=ctrl_c_store) as rt:
        with pytest.raises(KeyboardInterrupt):
            rt.run("look", initiator="alice", run_id="cut-read")
    # Meanwhile the policy changed: counting claims is now forbidden (added to the baseline).
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "no-counting.cedar").write_text(
        '@id("no-counting")\n@reason("counting claims is suspended")\n'
        'forbid (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"count_claims");\n')
    workflow = interrupted_once(ran)
    workflow.policies = [tmp_path / "policies"]
    with Runtime(workflow, store=ctrl_c_store) as rt:
        done = rt.resume("cut-read")
    assert ran == ["count_claims"], "the re-run read was not decided again"
    look = next(s for s in done.steps if s.step_id == "look")
    assert look.status == "denied" and look.policy_ids == ["no-counting"]


def test_a_write_cut_off_by_ctrl_c_is_reported_never_repeated(ctrl_c_store: str) -> None:
    ran: list[str] = []
    with Runtime(interrupted_once(ran), store=ctrl_c_store) as rt:
        paused = rt.run("pay", initiator="alice", run_id="cut-write")
        [pending] = rt.approvals.list(run_id="cut-write", status="pending")
        rt.approvals.approve(pending.id, approver="bob")
        with pytest.raises(KeyboardInterrupt):
            rt.resume(paused.run_id)

        done = rt.resume("cut-write")
        assert ran == ["pay_claim"], "the cut-off write ran again"
        pay = next(s for s in done.steps if s.step_id == "pay")
        assert pay.status == "failed"
        assert INTERRUPTED in pay.reason and "pay_claim" in pay.reason
        assert done.status == "failed"
        assert [g.jti for g in rt.store.grants_for_run("cut-write") if g.revoked_at is None] == []
