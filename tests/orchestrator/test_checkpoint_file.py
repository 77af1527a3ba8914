"""LangGraph's checkpoints live in a SQLite file of their own beside the store (their
commits then leave the store connection's page cache alone); a store made when they
lived in the store's own file keeps them there, so its paused runs still resume."""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

from scopegraph import Runtime
from scopegraph.agents.demo import TASK, build_workflow
from scopegraph.runtime.runner import checkpoints_path

OLD_STORE = Path(__file__).parent.parent / "contract" / "fixtures" / "store-v0.1.0.db"
OLD_PAUSED = "9dc69a89bc49466384d69210186fb065"  # paused for approval under 0.1.0 (see that test)


def tables(path: Path) -> set[str]:
    with closing(sqlite3.connect(str(path))) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def checkpoints_of(path: Path, run_id: str) -> int:
    with closing(sqlite3.connect(str(path))) as conn:
        return int(conn.execute("SELECT count(*) FROM checkpoints WHERE thread_id = ?", (run_id,)).fetchone()[0])


def test_a_new_store_keeps_run_checkpoints_beside_it_and_a_paused_run_resumes_from_there(tmp_path: Path) -> None:
    path = tmp_path / "s" / "runs.db"
    url = f"sqlite:///{path}"
    with Runtime(build_workflow(), store=url) as rt:
        paused = rt.run(TASK, initiator="alice")
    assert paused.status == "paused", paused.summary()
    beside = path.with_name("runs.checkpoints.db")
    assert checkpoints_path(path) == beside
    assert not tables(path) & {"checkpoints", "writes"}
    assert checkpoints_of(beside, paused.run_id) > 0

    with Runtime(build_workflow(), store=url) as rt:  # another runtime, as after a restart
        [pending] = rt.approvals.list(run_id=paused.run_id, status="pending")
        rt.approvals.approve(pending.id, approver="bob")
        done = rt.resume(paused.run_id)
    assert done.status == "completed", done.summary()


def test_a_store_whose_checkpoints_live_in_its_own_file_keeps_them_there(tmp_path: Path) -> None:
    path = tmp_path / "old" / "scopegraph.db"
    path.parent.mkdir()
    shutil.copyfile(OLD_STORE, path)
    before = checkpoints_of(path, OLD_PAUSED)
    assert before > 0 and checkpoints_path(path) == path
    with Runtime(build_workflow(), store=f"sqlite:///{path}") as rt:
        assert rt.report(OLD_PAUSED).status == "paused"  # read from the old place
        paused = rt.run(TASK, initiator="alice")
    assert paused.status == "paused", paused.summary()
    assert checkpoints_of(path, paused.run_id) > 0  # new runs too: one place per store
    assert sorted(p.name for p in path.parent.iterdir() if "checkpoints" in p.name) == []
