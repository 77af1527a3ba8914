"""A step's checkpoint does not grow with the plan (issue 11), on every store.

LangGraph writes a checkpoint after every superstep. Were the plan and every finished
step's record in each one, step k of a 200-step plan would write far more than step k
of a 10-step plan, and a run of N steps O(N²) bytes. They are kept in delta channels
(``runtime/state.py``): a checkpoint holds what its superstep wrote. Counted in bytes
stored by the checkpointer (its checkpoints, channel blobs and task writes), not timed.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from typing import Any

import psycopg

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.runtime.runner import checkpoints_path
from scopegraph.store import SqliteStore

from .conftest import Backend


@tool(risk="read")
def read_part(part: str) -> dict[str, Any]:
    """Read one part of a document."""
    return {"part": part}


def chain(n: int) -> dict[str, Any]:
    """``n`` steps, one after another, each one allowed call of a read tool."""
    return {"steps": [
        {"id": f"s{i:03d}", "tool": "read_part", "purpose": "read the next part",
         "constraints": {"part": {"kind": "exact", "value": f"p{i:03d}"}},
         "depends_on": [f"s{i - 1:03d}"] if i else []}
        for i in range(n)
    ]}


def workflow() -> Workflow:
    return Workflow(name="parts", tools=[read_part], executor=DirectExecutor(),
                    planner=ScriptedPlanner(lambda task: chain(int(task))))


# LangGraph's savers version a channel as "<32-digit counter>.<random.random()>"; the random
# tail is 16 to 22 characters, so the same checkpoint is a few bytes longer or shorter from
# one run to the next (±300 bytes a step over 10 steps on PostgreSQL). Each version is counted
# as its counter alone: the count then depends on the data stored, never on the dice.
_VERSION_TAIL = re.compile(rb"(\d{32})\.[0-9.e-]+")


def _steady_length(data: bytes | str | None) -> int:
    if data is None:
        return 0
    raw = data.encode() if isinstance(data, str) else bytes(data)
    return len(_VERSION_TAIL.sub(rb"\1", raw))


def checkpointer_bytes(rt: Runtime, run_id: str) -> int:
    """Everything the checkpointer has stored for ``run_id``."""
    if isinstance(rt.store, SqliteStore):
        with closing(sqlite3.connect(str(checkpoints_path(rt.store.path)))) as conn:
            values = [v for row in conn.execute(
                "SELECT checkpoint, metadata FROM checkpoints WHERE thread_id = ?", (run_id,)) for v in row]
            values += [v for (v,) in conn.execute("SELECT value FROM writes WHERE thread_id = ?", (run_id,))]
    else:
        with psycopg.connect(rt.store.url, autocommit=True) as conn:
            values = [v for row in conn.execute(
                "SELECT checkpoint::text, metadata::text FROM checkpoints WHERE thread_id = %s", (run_id,))
                for v in row]
            for table in ("checkpoint_blobs", "checkpoint_writes"):
                values += [v for (v,) in conn.execute(
                    f"SELECT blob FROM {table} WHERE thread_id = %s", (run_id,))]
    return sum(map(_steady_length, values))


def stored_by_a_run(rt: Runtime, steps: int) -> int:
    report = rt.run(str(steps), initiator="alice")
    assert report.status == "completed", report.summary()
    assert [s.status for s in report.steps] == ["completed"] * steps  # every record is read back
    return checkpointer_bytes(rt, report.run_id)


def test_a_step_stores_as_many_checkpoint_bytes_late_in_a_long_plan_as_early_in_a_short_one(
        backend: Backend) -> None:
    with Runtime(workflow(), store=backend.url) as rt:
        stored_by_a_run(rt, 1)  # warm: keys, schema
        short = {n: stored_by_a_run(rt, n) for n in (10, 20)}
        long = {n: stored_by_a_run(rt, n) for n in (190, 200)}
    early = (short[20] - short[10]) / 10  # bytes per step of steps 11-20 (the plan is 10 steps longer too)
    late = (long[200] - long[190]) / 10  # of steps 191-200, with 190 records before them
    # Kept whole, the records alone would add some 190 × 300 bytes to each late step.
    assert late <= early * 1.1 + 64, (early, late)
