"""Workers on PostgreSQL: real worker processes sharing runs, approvals and revocations."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psycopg
import pytest

from scopegraph import Runtime
from scopegraph.approvals import ApprovalRequest
from scopegraph.loader import load_workflow
from tests.contract.conftest import closed_port
from tests.helpers import mint_grant

from .conftest import ROOT, Cluster

TERMINAL = ("completed", "failed", "denied", "cancelled")


def approvals_of(cluster: Cluster, run_id: str) -> list[ApprovalRequest]:
    store = cluster.store()
    try:
        return [ApprovalRequest.model_validate_json(p) for p in store.list_approvals(run_id=run_id)]
    finally:
        store.close()


def assert_revoked_and_audited(cluster: Cluster, run_id: str) -> None:
    store = cluster.store()
    try:
        grants = store.grants_for_run(run_id)
    finally:
        store.close()
    assert grants and all(g.revoked_at is not None for g in grants)
    verify = cluster.cli("audit", "verify", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout


def test_submitted_run_is_completed_by_a_worker(cluster: Cluster) -> None:
    done = cluster.cli("submit", "tests.workers.flows:reads", "--task", "read a, b, c", "--json")
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    cluster.work("--concurrency", "2")
    assert cluster.status(run_id) == "completed"
    assert cluster.lines() == ["read_part a", "read_part b", "read_part c"]
    assert_revoked_and_audited(cluster, run_id)


@pytest.mark.parametrize("command", [["submit", "tests.workers.flows:reads", "--task", "t"], ["worker", "--once"]])
def test_workers_refuse_a_sqlite_store(cluster: Cluster, tmp_path: object, command: list[str]) -> None:
    done = cluster.cli(*command, store=f"sqlite:///{tmp_path}/s.db")
    assert done.returncode == 2
    assert done.stderr.strip() == "scopegraph: error: workers need a postgresql:// store"


def test_submit_refuses_a_bad_target(cluster: Cluster) -> None:
    done = cluster.cli("submit", "tests.workers.flows:nothing", "--task", "t")
    assert done.returncode == 2 and "no attribute 'nothing'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_run_approved_from_another_process_is_resumed_by_a_worker(cluster: Cluster) -> None:
    run_id = cluster.submit("approval")
    cluster.work()
    assert cluster.status(run_id) == "paused" and cluster.lines() == []
    [pending] = approvals_of(cluster, run_id)
    answer = cluster.cli("approve", pending.id, "--as", "bob", "--reason", "checked")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip().endswith("approved. A worker will resume the run.")
    cluster.work()
    assert cluster.status(run_id) == "completed"
    assert cluster.lines() == ["file_expense e-17 4250", "read_part confirm"]
    assert_revoked_and_audited(cluster, run_id)


def test_workers_racing_for_one_approval_execute_the_call_once(cluster: Cluster) -> None:
    run_id = cluster.submit("approval")
    cluster.work()
    [pending] = approvals_of(cluster, run_id)
    assert cluster.cli("approve", pending.id, "--as", "carol").returncode == 0
    # Four workers, and two operators resuming by hand, all after the same approved call.
    workers = [cluster.start("worker", "--once", "--concurrency", "2") for _ in range(4)]
    by_hand = [cluster.start("resume", run_id, "--json") for _ in range(2)]
    for racer in workers:
        _, err = racer.communicate(timeout=90)
        assert racer.returncode == 0, err
    for racer in by_hand:
        _, err = racer.communicate(timeout=90)
        assert racer.returncode == 0 or "is being driven by another runtime" in err, err
    assert cluster.status(run_id) == "completed"
    assert cluster.lines().count("file_expense e-17 4250") == 1
    [used] = approvals_of(cluster, run_id)
    assert used.consumed_at is not None
    assert_revoked_and_audited(cluster, run_id)


def test_a_revoked_grant_is_refused_by_every_worker_before_its_next_use(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEGRAPH_TEST_LOG", str(cluster.log))
    workflow = load_workflow("tests.workers.flows:reads")
    with Runtime(workflow, store=cluster.url) as first, Runtime(workflow, store=cluster.url) as second:
        grant, ctx = mint_grant(first, "read_part")
        token = grant.danger_token()
        assert first.gateway.call(token, "read_part", {"part": "a"}, ctx).status == "ok"
        # A third process (an operator, another worker) revokes it in the shared store.
        revoke = subprocess.run(
            [sys.executable, "-c",
             "import sys; from scopegraph.store import open_store; s = open_store(sys.argv[1]); "
             "print(s.revoke_grant(sys.argv[2], reason='operator', at=__import__('time').time())); s.close()",
             cluster.url, grant.jti],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert revoke.stdout.strip() == "True", revoke.stderr
        for rt in (first, second):
            result = rt.gateway.call(token, "read_part", {"part": "a"}, ctx)
            assert result.status == "denied" and "revoked" in result.reason
    assert cluster.lines() == ["read_part a"]


def test_a_killed_worker_run_is_resumed_by_another(cluster: Cluster) -> None:
    run_id = cluster.submit("crashing")
    killed = cluster.cli("worker", "--once")
    assert killed.returncode == -9, killed.stderr
    assert cluster.status(run_id) == "running"
    deadline = time.monotonic() + 60
    while cluster.status(run_id) not in TERMINAL:  # until the dead worker's job counts as stalled
        assert time.monotonic() < deadline, "no worker picked the stalled run up"
        cluster.work("--stalled-after", "0.2")
    # The call cut off by the kill is a read: it changed nothing, so it runs again.
    assert cluster.status(run_id) == "completed"
    lines = cluster.lines()
    assert lines.count("read_part a") == 1  # a completed call is not run again
    assert lines.count("crash_once b") == 2
    assert lines.count("read_part c") == 1
    assert_revoked_and_audited(cluster, run_id)


def test_worker_fails_closed_while_the_store_is_down_and_work_resumes_after(cluster: Cluster) -> None:
    run_id = cluster.submit("reads")
    assert cluster.status(run_id) == "queued"  # recorded from the moment it is submitted
    down = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    outage = cluster.cli("worker", "--once", store=down)
    assert outage.returncode == 1
    [line] = outage.stderr.strip().splitlines()
    assert line.startswith("scopegraph: error: cannot reach the queue's database")
    assert cluster.lines() == [] and cluster.status(run_id) == "queued"
    cluster.work()
    assert cluster.status(run_id) == "completed"


def test_a_call_during_a_store_outage_is_refused_and_calls_work_again_after(
        cluster: Cluster, postgres_url: str, postgres_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEGRAPH_TEST_LOG", str(cluster.log))
    with Runtime(load_workflow("tests.workers.flows:reads"), store=cluster.url) as rt:
        grant, ctx = mint_grant(rt, "read_part")
        token = grant.danger_token()
        pool = rt.store._pool  # type: ignore[attr-defined]
        # An outage for this worker: its connections die and new ones find nobody listening.
        monkeypatch.setattr(pool, "conninfo", f"postgresql://postgres@127.0.0.1:{closed_port()}/test")
        monkeypatch.setattr(pool, "timeout", 0.5)
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = %s AND pid <> pg_backend_pid()", (postgres_schema,))
        refused = rt.gateway.call(token, "read_part", {"part": "a"}, ctx)  # fail closed: a denial
        assert refused.status == "denied"
        assert refused.decision.policy_ids == ("scopegraph:store",)
        assert "\n" not in refused.reason and "couldn't get a connection" in refused.reason
        assert cluster.lines() == []  # no store, no call
        monkeypatch.setattr(pool, "conninfo", cluster.url)
        monkeypatch.setattr(pool, "timeout", 30.0)
        assert rt.gateway.call(token, "read_part", {"part": "b"}, ctx).status == "ok"
    assert cluster.lines() == ["read_part b"]


def test_a_long_running_worker_waits_out_an_outage_instead_of_exiting(cluster: Cluster) -> None:
    """No store, no work: but a worker meant to run forever keeps trying, saying so on stderr."""
    down = f"postgresql://postgres@127.0.0.1:{closed_port()}/test"
    with subprocess.Popen(cluster.argv("worker", store=down), cwd=ROOT, env=cluster.env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()  # blocks until the first failed attempt is reported
            second = proc.stderr.readline()
            assert "cannot reach the queue's database" in first and "retrying in" in first
            assert "retrying in" in second  # it tried again rather than exiting
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=30)
