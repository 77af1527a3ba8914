"""What a worker says while it works (issue 10, point 6): one line on stdout per run started
(or resumed), paused and finished, each stamped with an ISO 8601 time; ``--quiet`` silences them."""

from __future__ import annotations

import re

from scopegraph.approvals import ApprovalRequest

from .conftest import Cluster

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def events(stdout: str) -> list[str]:
    """The lines without their time stamps (each line must carry one)."""
    out = []
    for line in stdout.splitlines():
        stamp, _, rest = line.partition(" ")
        assert re.fullmatch(STAMP, stamp), line
        out.append(rest)
    return out


def test_a_worker_prints_a_line_per_run_started_and_finished(cluster: Cluster) -> None:
    first, second = cluster.submit("reads"), cluster.submit("reads")
    done = cluster.work()
    lines = events(done.stdout)
    assert sorted(lines) == sorted([f"run {first} started (reads)", f"run {first} completed",
                                    f"run {second} started (reads)", f"run {second} completed"])
    assert lines.index(f"run {first} started (reads)") < lines.index(f"run {first} completed")
    assert done.stderr == ""


def test_a_worker_says_when_a_run_pauses_and_resumes(cluster: Cluster) -> None:
    run_id = cluster.submit("approval")
    paused = cluster.work()
    store = cluster.store()
    try:
        [pending] = [ApprovalRequest.model_validate_json(p) for p in store.list_approvals(run_id=run_id)]
    finally:
        store.close()
    assert events(paused.stdout) == [f"run {run_id} started (approval)",
                                     f"run {run_id} paused, waiting for approval {pending.id}"]
    assert cluster.cli("approve", pending.id, "--as", "bob").returncode == 0
    resumed = cluster.work()
    assert events(resumed.stdout) == [f"run {run_id} resumed (approval)", f"run {run_id} completed"]


def test_a_failed_run_is_reported_with_its_reason(cluster: Cluster) -> None:
    run_id = cluster.submit("unplannable")
    lines = events(cluster.work().stdout)
    assert lines[0] == f"run {run_id} started (unplannable)"
    assert lines[1].startswith(f"run {run_id} failed: ") and "no_such_tool" in lines[1]


def test_quiet_silences_the_worker(cluster: Cluster) -> None:
    run_id = cluster.submit("reads")
    done = cluster.work("--quiet")
    assert cluster.status(run_id) == "completed"
    assert done.stdout == "" and done.stderr == ""
