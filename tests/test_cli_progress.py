"""``scopegraph run`` and ``resume`` draw a run's progress on stderr from its events;
with ``--json`` stdout still holds only the run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scopegraph.approvals import ApprovalService
from scopegraph.clock import SystemClock
from scopegraph.store import open_store

from .helpers import demo_signature
from .test_cli import GOOD_PLAN, run_cli, write_workflow


@pytest.fixture(autouse=True)
def _no_global_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # ``run``/``resume`` install global OpenTelemetry providers unless told not to.
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")


def test_run_shows_progress_on_stderr_and_keeps_stdout_json(
        capsys: pytest.CaptureFixture[str], store_url: str, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, "wf_progress", GOOD_PLAN)
    code, out, err = run_cli(capsys, "--store", store_url, "run", f"{path}:workflow", "--task", "look",
                             "--json", "--progress", "--as", "alice")
    assert code == 0, err
    record = json.loads(out)  # nothing but the record on stdout
    assert record["status"] == "completed"
    assert err.splitlines() == [
        "scopegraph: plan fixed: 1 step(s) (look)",
        "scopegraph: step 'look' started (lookup)",
        "scopegraph:   look: lookup allow [allow-planned-calls]",
        "scopegraph: step 'look' completed",
        "scopegraph: run completed",
    ]


def test_progress_is_off_when_stderr_is_not_a_terminal(
        capsys: pytest.CaptureFixture[str], store_url: str, tmp_path: Path) -> None:
    path = write_workflow(tmp_path, "wf_quiet", GOOD_PLAN)
    code, out, err = run_cli(capsys, "--store", store_url, "run", f"{path}:workflow", "--task", "look",
                             "--as", "alice")
    assert code == 0, err
    assert err == ""


def test_resume_shows_the_progress_of_an_approved_call(capsys: pytest.CaptureFixture[str], store_url: str) -> None:
    code, out, err = run_cli(capsys, "--store", store_url, "demo", "--json", "--as", "carol")
    assert code == 3, err
    record = json.loads(out)
    [pending] = [a["id"] for a in record["approvals"] if a["status"] == "pending"]
    store = open_store(store_url)
    try:
        service = ApprovalService(store, clock=SystemClock())
        service.approve(pending, approver="bob", reason="ok",
                        signature=demo_signature(service, pending, "bob", "approve", "ok"))
    finally:
        store.close()
    code, out, err = run_cli(capsys, "--store", store_url, "resume", record["run_id"], "--json", "--progress")
    assert json.loads(out)["run_id"] == record["run_id"], err
    assert err.splitlines() == [
        f"scopegraph:   file: approval {pending} approved",
        "scopegraph: step 'file' started (file_expense)",
        "scopegraph:   file: file_expense allow [allow-planned-calls]",
        "scopegraph: step 'file' completed",
        "scopegraph: run completed",
    ]
