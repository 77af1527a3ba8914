"""Invariant 8, nothing lost: a process killed with SIGKILL around an approved call.

A worker process (``approval_worker.py``) runs a workflow on a SQLite file in
``tmp_path``: an approved write (``file_expense``) followed by a read
(``confirm_claim``). It kills itself at a chosen point; every side effect is a line
appended and fsynced to a log before the kill. A fresh process then resumes the run.
Whatever the crash point: the approved call never runs twice, the approval is not
lost, the run completes or names the interrupted call, and every grant ends revoked.
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

from scopegraph.approvals import ApprovalService
from scopegraph.clock import SystemClock
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


def test_a_crash_in_the_next_step_does_not_repeat_the_approved_call(
        crash_db: Path, side_effects: Path, inspect_store: Any) -> None:
    killed(worker(crash_db, side_effects, "run", "--approve-as", "bob", crash="in_next_step"))
    store = inspect_store()
    assert effects(side_effects) == [FILED, CONFIRMED]
    assert live_grants(store)

    record = finished(worker(crash_db, side_effects, "resume"))
    assert effects(side_effects).count(FILED) == 1, "the approved call ran twice"
    assert step(record, "file")["status"] == "completed"
    confirm = step(record, "confirm")
    assert effects(side_effects).count(CONFIRMED) == 1
    assert confirm["status"] == "failed"
    assert INTERRUPTED in confirm["reason"] and "confirm_claim" in confirm["reason"]
    assert record["approvals"][0]["status"] == "consumed"
    assert_every_grant_revoked(store)
