"""What a step writes, and when (issue 11), on every store.

An allowed step costs at most two commits of scopegraph's store: everything written
before the tool runs in one transaction, everything after it in another. Counted, not
timed. Nothing that checks or decides a call runs inside an open write transaction, so
a slow check never holds the store's write lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.policy import CallRequest, CedarPolicyEngine, Decision
from scopegraph.store.sqlite import WAL_AUTOCHECKPOINT_PAGES

from .conftest import Backend

PER_RUN_COMMITS = 3  # the run started (with its lease), its plan, its end


@tool(risk="read")
def read_part(part: str) -> dict[str, Any]:
    """Read one part of a document."""
    return {"part": part}


def chain(n: int) -> dict[str, Any]:
    """``n`` steps, one after another, each one allowed call of a read tool."""
    return {"steps": [
        {"id": f"s{i}", "tool": "read_part", "purpose": "read the next part",
         "constraints": {"part": {"kind": "exact", "value": f"p{i}"}},
         "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(n)
    ]}


def workflow() -> Workflow:
    return Workflow(name="parts", tools=[read_part], executor=DirectExecutor(),
                    planner=ScriptedPlanner(lambda task: chain(int(task))))


def commits_of_a_run(rt: Runtime, steps: int) -> int:
    before = rt.store.counts.commits
    report = rt.run(str(steps), initiator="alice")
    assert report.status == "completed", report.summary()
    assert report.grants_minted == report.grants_revoked == steps
    return rt.store.counts.commits - before


def test_an_allowed_step_costs_at_most_two_commits(backend: Backend) -> None:
    with Runtime(workflow(), store=backend.url) as rt:
        commits_of_a_run(rt, 1)  # warm: keys, schema
        two, six = commits_of_a_run(rt, 2), commits_of_a_run(rt, 6)
    per_step = (six - two) / 4
    assert per_step <= 2, f"{per_step} commits per step"
    assert two - 2 * per_step <= PER_RUN_COMMITS


def test_a_transaction_on_postgresql_pipelines_what_it_does_not_read(backend: Backend) -> None:
    with Runtime(workflow(), store=backend.url) as rt:
        commits_of_a_run(rt, 1)
        counts = rt.store.counts
        before = counts.statements, counts.round_trips
        commits_of_a_run(rt, 2)
        middle = counts.statements, counts.round_trips
        commits_of_a_run(rt, 6)
        statements = (counts.statements - middle[0] - (middle[0] - before[0])) / 4
        trips = (counts.round_trips - middle[1] - (middle[1] - before[1])) / 4
    if backend.name == "sqlite":
        assert trips == statements  # no pipeline: one statement, one call into SQLite
    else:
        assert trips <= 9 < statements, (trips, statements)


def test_the_steps_records_land_in_order_in_its_two_writes(backend: Backend) -> None:
    with Runtime(workflow(), store=backend.url) as rt:
        report = rt.run("1", initiator="alice")
        assert report.status == "completed", report.summary()
        kinds = [r["kind"] for r in rt.ledger.records(report.run_id)]
        assert kinds == ["run_started", "plan", "grant_minted", "decision", "tool_call", "grant_revoked",
                         "step_ended", "run_ended"]
        [grant] = rt.store.grants_for_run(report.run_id)
        assert grant.uses == 1 and grant.revoked_at is not None
        assert rt.ledger.verify(run_id=report.run_id).ok


# a slow check holds no lock ------------------------------------------------------------------
class SlowPolicy:
    """The workflow's Cedar policies, after a check that waits on another writer: as a
    policy (or a constraint's pattern) that takes seconds would."""

    def __init__(self, cedar: CedarPolicyEngine, meanwhile: Callable[[CallRequest], None]) -> None:
        self.version = cedar.version
        self._cedar = cedar
        self._meanwhile = meanwhile

    def decide(self, request: CallRequest) -> Decision:
        self._meanwhile(request)
        return self._cedar.decide(request)


def another_writer(backend: Backend) -> Callable[[CallRequest], None]:
    """A write to the store from another connection that refuses to wait for a lock."""
    if backend.name == "sqlite":
        path = backend.url[len("sqlite:///"):]

        def write_sqlite(request: CallRequest) -> None:
            conn = sqlite3.connect(path, timeout=0, isolation_level=None)  # "database is locked" at once
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("CREATE TABLE IF NOT EXISTS other_writer (step TEXT)")
                conn.execute("INSERT INTO other_writer (step) VALUES (?)", (request.step_id,))
                conn.execute("COMMIT")
            finally:
                conn.close()

        return write_sqlite

    def write_postgres(request: CallRequest) -> None:
        with psycopg.connect(backend.url, autocommit=True) as conn, conn.transaction():
            # NOWAIT: a row another transaction holds is an error at once, not a wait.
            conn.execute("SELECT seq FROM sg_ledger_tip WHERE id = 1 FOR UPDATE NOWAIT")
            conn.execute("SELECT jti FROM sg_grants WHERE run_id = %s FOR UPDATE NOWAIT", (request.run_id,))
            conn.execute("UPDATE sg_ledger_tip SET seq = seq WHERE id = 1")

    return write_postgres


def test_a_slow_check_holds_no_write_lock_while_another_connection_writes(backend: Backend) -> None:
    wf = workflow()
    cedar = CedarPolicyEngine.from_paths(wf.policies, wf.registry, schema=wf.schema, baseline=wf.baseline)
    written: list[str] = []
    write = another_writer(backend)

    def meanwhile(request: CallRequest) -> None:
        write(request)
        written.append(request.step_id)

    with Runtime(wf, store=backend.url, policy=SlowPolicy(cedar, meanwhile)) as rt:
        rt.run("1", initiator="alice")  # the first run makes the tables; its step wrote already
        report = rt.run("3", initiator="alice")
    assert report.status == "completed", report.summary()
    assert written == ["s0", "s0", "s1", "s2"]


def test_the_runtimes_sqlite_connections_checkpoint_the_log_in_large_batches(tmp_path: Any) -> None:
    with Runtime(workflow(), store=f"sqlite:///{tmp_path / 'wal.db'}") as rt:
        store_conn, saver_conn = rt.store._conn, rt._saver_conn  # type: ignore[attr-defined]
        pages = [c.execute("PRAGMA wal_autocheckpoint").fetchone()[0] for c in (store_conn, saver_conn)]
        modes = [c.execute("PRAGMA journal_mode").fetchone()[0] for c in (store_conn, saver_conn)]
    assert pages == [WAL_AUTOCHECKPOINT_PAGES] * 2 and WAL_AUTOCHECKPOINT_PAGES > 1000  # SQLite's default
    assert modes == ["wal", "wal"]


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_the_counts_see_every_statement(store_kind: str, tmp_path: Any) -> None:
    seen: list[str] = []
    with Runtime(workflow(), store=f"sqlite:///{tmp_path / 'counted.db'}") as rt:
        conn = rt.store._conn  # type: ignore[attr-defined]
        conn.set_trace_callback(seen.append)
        before = (rt.store.counts.statements, rt.store.counts.commits)
        rt.run("2", initiator="alice")
        conn.set_trace_callback(None)
        statements = rt.store.counts.statements - before[0]
        commits = rt.store.counts.commits - before[1]
    assert statements == len(seen)
    assert commits == sum(1 for s in seen if s.split()[0].upper() == "COMMIT")
