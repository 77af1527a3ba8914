"""A ledger whose runs were cut off is unsigned, not tampered (issue 10, point 8).

The chain head is signed when a run pauses or ends. A store whose first run was cut off
(the process killed, the store gone) holds chained records but no signed head:
``audit verify`` reports them as an unsigned tail (exit 0, with a note), while an edit,
deletion or reordering of those records is still caught, and a head that should exist
(a run paused or ended, which signs it) is still missed loudly.

The cut-off run is real: a separate process runs a workflow whose first tool kills it
with SIGKILL, so nothing of the run's end is written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.ledger import Ledger, VerifyResult, record_hash_v2
from scopegraph.store import RunRecord, SqliteStore

RUN_ID = "cut1"
PLAN: dict[str, Any] = {"steps": [
    {"id": "read", "tool": "read_and_die", "purpose": "read",
     "constraints": {"path": {"kind": "exact", "value": "/docs/a"}}},
]}


@tool(risk="read")
def read_and_die(path: str) -> str:
    """Reads a file, unless told to die first (in the child process)."""
    if os.environ.get("SCOPEGRAPH_TEST_DIE") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return f"contents of {path}"


def workflow() -> Workflow:
    return Workflow(name="cutwf", tools=[read_and_die], planner=ScriptedPlanner(PLAN), executor=DirectExecutor())


CHILD = """
import sys
from tests.orchestrator.test_ledger_unsigned import RUN_ID, workflow
from scopegraph import Runtime
with Runtime(workflow(), store=sys.argv[1]) as rt:
    rt.run("read it", initiator="alice", run_id=RUN_ID)
"""


def _cut_off_run(store_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGRAPH_")}
    env.update(OTEL_SDK_DISABLED="true", SCOPEGRAPH_TEST_DIE="1")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", CHILD, store_url], env=env, cwd=root,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, f"the run was not cut off (exit {proc.returncode}): {proc.stderr}"


@pytest.fixture(scope="module")
def cut_off_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cut") / "scopegraph.db"
    _cut_off_run(f"sqlite:///{path}")
    return path


@pytest.fixture
def cut_off(cut_off_template: Path, store_path: Path) -> Path:
    """A store whose first and only run was killed mid-step: records, no signed head.
    (A copy of one killed run's files, write-ahead log included, for each test.)"""
    store_path.parent.mkdir(parents=True, exist_ok=True)
    for f in cut_off_template.parent.iterdir():
        if f.is_dir():  # the keystore beside the store
            shutil.copytree(f, store_path.parent / f.name)
        else:
            shutil.copy(f, store_path.parent / f.name.replace(cut_off_template.name, store_path.name))
    return store_path


@pytest.fixture
def db(cut_off: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(str(cut_off), isolation_level=None)) as conn:
        yield conn


def verify(path: Path) -> VerifyResult:
    store = SqliteStore(path)
    try:
        return Ledger(store, clock=FixedClock()).verify()
    finally:
        store.close()


def audit(capsys: pytest.CaptureFixture[str], store_url: str, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--store", store_url, "audit", "verify", *extra])
    return code, capsys.readouterr().out


def _kinds(conn: sqlite3.Connection) -> list[str]:
    return [r[0] for r in conn.execute("SELECT kind FROM sg_ledger ORDER BY seq")]


# an unsigned tail from the first record -----------------------------------------------------
def test_a_store_whose_first_run_was_cut_off_verifies_as_an_unsigned_tail(
        cut_off: Path, db: sqlite3.Connection, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    kinds = _kinds(db)
    assert kinds[0] == "run_started" and "decision" in kinds
    assert "run_ended" not in kinds and "run_paused" not in kinds
    assert db.execute("SELECT COUNT(*) FROM sg_ledger_head").fetchone()[0] == 0
    result = verify(cut_off)
    assert result.ok, result
    assert (result.records, result.signed_seq, result.unsigned) == (len(kinds), None, len(kinds))
    code, out = audit(capsys, store_url)
    assert code == 0
    assert out.strip() == (f"ok: {len(kinds)} records, hash chain intact, no signed head yet: {len(kinds)} "
                           "record(s) after the last signed head (runs that have not paused or ended, "
                           "e.g. cut off by an outage)")
    code, out = audit(capsys, store_url, "--json")
    assert code == 0 and json.loads(out) == result.to_dict()
    code, out = audit(capsys, store_url, "--run", RUN_ID)
    assert code == 0 and out.startswith("ok:")


def _edit(conn: sqlite3.Connection) -> tuple[int, str]:
    (seq, data), = conn.execute("SELECT seq, data FROM sg_ledger WHERE kind = 'decision'").fetchall()
    conn.execute("UPDATE sg_ledger SET data = ? WHERE seq = ?", (data.replace('"allow"', '"deny"'), seq))
    return seq, f"record {seq} (decision) was altered"


def _rehash_edit(conn: sqlite3.Connection) -> tuple[int, str]:
    # Re-sealing one record breaks the link to the next. (Re-sealing every record to the
    # end cannot be told from the truth until a signature covers it: that is what
    # "unsigned" means, and why a run's pause or end signs its records.)
    (seq, run_id, kind, at, data, prev), = conn.execute(
        "SELECT seq, run_id, kind, at, data, prev_hash FROM sg_ledger WHERE kind = 'plan'").fetchall()
    forged = data.replace('"read_and_die"', '"something_else"')
    assert forged != data
    new = record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=json.loads(forged), prev_hash=prev)
    conn.execute("UPDATE sg_ledger SET data = ?, hash = ? WHERE seq = ?", (forged, new, seq))
    return seq + 1, f"record {seq + 1} does not follow record {seq}"


def _delete(conn: sqlite3.Connection) -> tuple[int, str]:
    conn.execute("DELETE FROM sg_ledger WHERE seq = 2")
    return 2, "record 2 is missing"


def _swap(conn: sqlite3.Connection) -> tuple[int, str]:
    conn.execute("UPDATE sg_ledger SET seq = -1 WHERE seq = 2")
    conn.execute("UPDATE sg_ledger SET seq = 2 WHERE seq = 3")
    conn.execute("UPDATE sg_ledger SET seq = 3 WHERE seq = -1")
    return 2, "record 2 does not follow record 1"


EDITS: dict[str, Callable[[sqlite3.Connection], tuple[int, str]]] = {
    "edited": _edit, "edited and rehashed": _rehash_edit, "deleted": _delete, "swapped": _swap,
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_edits_within_an_unsigned_chain_are_still_caught(
        edit: str, cut_off: Path, db: sqlite3.Connection, store_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad_seq, problem = EDITS[edit](db)
    result = verify(cut_off)
    assert not result.ok and result.bad_seq == bad_seq and result.problem == problem, result
    code, out = audit(capsys, store_url)
    assert code == 1 and out.strip() == f"TAMPERED: {problem}"


def test_the_cut_off_run_resumed_signs_the_whole_chain(
        cut_off: Path, store_url: str, clock: FixedClock) -> None:
    with Runtime(workflow(), store=store_url, clock=clock) as rt:
        report = rt.resume(RUN_ID)
    # The cut-off call was a read: it runs again, decided anew, and the run completes.
    assert report.status == "completed", report.summary()
    result = verify(cut_off)
    assert result.ok and result.unsigned == 0 and result.signed_seq == result.records


# a head that should exist is still missed ------------------------------------------------------
@pytest.fixture
def ended(store_url: str, store_path: Path, clock: FixedClock) -> Path:
    with Runtime(workflow(), store=store_url, clock=clock) as rt:
        assert rt.run("read it", initiator="alice", run_id="done1").status == "completed"
    return store_path


def test_a_removed_head_is_caught_even_with_the_signed_records_cut_away(
        ended: Path, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The forger drops the head and the run_ended record it was written with: the chain
    # alone now looks like a run in progress. The store still says the run completed.
    with closing(sqlite3.connect(str(ended), isolation_level=None)) as conn:
        conn.execute("DELETE FROM sg_ledger_head")
        conn.execute("DELETE FROM sg_ledger WHERE kind = 'run_ended'")
    result = verify(ended)
    assert not result.ok
    assert result.problem == "the ledger has records but no signed head, though run 'done1' is completed, " \
                             "which signs it"
    code, out = audit(capsys, store_url)
    assert code == 1 and out.startswith("TAMPERED: the ledger has records but no signed head")


def test_a_removed_head_is_named_by_the_record_signed_with_it(ended: Path) -> None:
    with closing(sqlite3.connect(str(ended), isolation_level=None)) as conn:
        conn.execute("DELETE FROM sg_ledger_head")
        (seq,), = conn.execute("SELECT seq FROM sg_ledger WHERE kind = 'run_ended'").fetchall()
    result = verify(ended)
    assert not result.ok
    assert result.problem == f"the ledger has records but no signed head, though record {seq} (run_ended) " \
                             "was signed when it was written"


def test_a_store_with_only_a_queued_run_and_no_records_is_not_wiped(store_path: Path, store_url: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # ``submit`` records a run as queued before any worker writes a ledger record for it.
    store = SqliteStore(store_path)
    try:
        store.upsert_run(RunRecord(run_id="q1", workflow="cutwf", target="m:wf", initiator="alice",
                                   status="queued", created_at=1.0, updated_at=1.0))
    finally:
        store.close()
    result = verify(store_path)
    assert result.ok and result.records == 0, result
    code, out = audit(capsys, store_url)
    assert code == 0 and out.strip() == "ok: the ledger is empty"
