"""Approval round trip: pause → persisted → approved from another process → resumed.

Two arms, interleaved after a warm-up, on SQLite checkpoints with the same settings:

* plain LangGraph: ``plan → step`` where the step calls ``interrupt()`` before a write
  tool; the approver process records the answer in a table of the same database; the
  worker reads it and resumes with ``Command(resume=answer)``. That is the least a
  developer would build for a human-in-the-loop write with LangGraph alone.
* scopegraph: ``Runtime.run`` plans one write step, the gateway's policy says
  ``needs_approval``, the approval node pauses; the approver process calls
  ``ApprovalService.approve`` on the store; the worker calls ``Runtime.resume``, which
  mints a fresh grant, consumes the approval against the action digest, decides again,
  runs the tool and revokes everything, with spans and ledger records on every hop.

The approver is one long-lived subprocess (so interpreter start-up is not measured),
driven over a pipe. Per round trip it also prints, for each arm, the LangGraph supersteps
run and checkpoints written (read back from the thread's history), the commits of the
arm's own store (scopegraph's store, in the worker and in the approver process; the
plain arm's answers table) and the commits of its checkpointer. The last line printed
is ``ratio=<x>``: scopegraph over plain.

    python bench/approval_roundtrip.py [--runs 15]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.approvals import ApprovalService
from scopegraph.clock import SystemClock
from scopegraph.ledger import Ledger
from scopegraph.store import open_store
from scopegraph.store.sqlite import WAL_AUTOCHECKPOINT_PAGES

PAYMENTS: list[int] = []


def pay(amount: int) -> dict[str, Any]:
    """The write both arms perform once approved."""
    PAYMENTS.append(amount)
    return {"paid": amount}


PLAN = {"steps": [{"id": "pay", "tool": "pay", "purpose": "pay the claim",
                   "constraints": {"amount": {"kind": "exact", "value": 42}}}]}


# --- plain LangGraph ------------------------------------------------------------------

class PlainState(TypedDict, total=False):
    plan: dict[str, Any]
    result: dict[str, Any]
    status: str


def build_plain_graph() -> StateGraph:
    def plan_node(state: PlainState) -> dict[str, Any]:
        return {"plan": PLAN}

    def step_node(state: PlainState) -> dict[str, Any]:
        step = state["plan"]["steps"][0]
        args = {k: c["value"] for k, c in step["constraints"].items()}
        answer = interrupt({"tool": step["tool"], "arguments": args})
        if answer != "approved":
            return {"status": "denied"}
        return {"result": pay(**args), "status": "completed"}

    graph = StateGraph(PlainState)
    graph.add_node("plan", plan_node)
    graph.add_node("step", step_node)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "step")
    graph.add_edge("step", END)
    return graph


def open_plain(path: Path) -> tuple[sqlite3.Connection, Any]:
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0)
    saver = SqliteSaver(conn)
    saver.setup()
    conn.execute("PRAGMA synchronous=NORMAL")  # as the runtime's checkpoint connection
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    conn.execute("CREATE TABLE IF NOT EXISTS answers (thread_id TEXT PRIMARY KEY, answer TEXT NOT NULL)")
    conn.commit()
    return conn, build_plain_graph().compile(checkpointer=saver)


# --- the approver process ---------------------------------------------------------------

def serve_approver(sg_url: str, plain_path: str) -> None:
    """Answer requests from stdin: ``sg APPROVAL_ID`` or ``lg THREAD_ID``."""
    store = open_store(sg_url)
    clock = SystemClock()
    approvals = ApprovalService(store, clock=clock, ledger=Ledger(store, clock=clock))
    conn = sqlite3.connect(plain_path, timeout=10.0)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    for line in sys.stdin:
        kind, _, ident = line.strip().partition(" ")
        if kind == "sg":
            before = store.counts.commits
            approvals.approve(ident, approver="bob", reason="bench")
            commits = store.counts.commits - before
        elif kind == "lg":
            with conn:
                conn.execute("INSERT INTO answers (thread_id, answer) VALUES (?, 'approved')", (ident,))
            commits = 1
        else:
            break
        sys.stdout.write(f"ok {commits}\n")
        sys.stdout.flush()


class Approver:
    def __init__(self, sg_url: str, plain_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-approver", sg_url, str(plain_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def ask(self, line: str) -> int:
        """Have the approver answer; return the commits its answer took."""
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply, _, commits = self.proc.stdout.readline().strip().partition(" ")
        if reply != "ok":
            raise SystemExit(f"approver failed on {line!r}")
        return int(commits)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)


# --- the two arms -----------------------------------------------------------------------

class Counted:
    """Per round trip: supersteps, checkpoints, the arm's store commits, checkpointer commits."""

    def __init__(self) -> None:
        self.samples: dict[str, list[int]] = {"supersteps": [], "checkpoints": [], "store commits": [],
                                              "checkpointer commits": []}

    def add(self, history: list[Any], store_commits: int, checkpointer_commits: int | None = None) -> None:
        self.samples["supersteps"].append(sum(1 for c in history if c.metadata.get("source") == "loop"))
        self.samples["checkpoints"].append(len(history))
        self.samples["store commits"].append(store_commits)
        if checkpointer_commits is not None:
            self.samples["checkpointer commits"].append(checkpointer_commits)

    def describe(self) -> str:
        return "  ".join(f"{k} {statistics.median(v):g}" for k, v in self.samples.items() if v)


def checkpointer_commits(conn: sqlite3.Connection, round_trip: Callable[[], None]) -> int:
    """The commits ``conn`` makes in one (untimed) round trip: a trace callback writes out
    every statement, the checkpoints' blobs too, so it stays off while timing."""
    seen: list[str] = []
    conn.set_trace_callback(lambda statement: seen.append(statement.lstrip()[:6].upper()))
    try:
        round_trip()
    finally:
        conn.set_trace_callback(None)
    return seen.count("COMMIT")

class PlainArm:
    name = "plain langgraph"

    def __init__(self, tmp: Path, approver: Approver) -> None:
        self.conn, self.graph = open_plain(tmp / "plain.db")
        self.approver = approver
        self.counted = Counted()
        self._last: tuple[dict[str, Any], int] | None = None

    def checkpointer_commits(self) -> int:
        return checkpointer_commits(self.conn, self.round_trip)

    def round_trip(self) -> None:
        thread = uuid.uuid4().hex
        config: Any = {"configurable": {"thread_id": thread}}
        self.graph.invoke({}, config, durability="sync")
        if not self.graph.get_state(config).interrupts:
            raise SystemExit("plain arm did not pause")
        answered = self.approver.ask(f"lg {thread}")
        (answer,) = self.conn.execute("SELECT answer FROM answers WHERE thread_id = ?", (thread,)).fetchone()
        final = self.graph.invoke(Command(resume=answer), config, durability="sync")
        if final.get("status") != "completed":
            raise SystemExit(f"plain arm ended {final.get('status')!r}")
        self._last = (config, answered)

    def count(self) -> None:
        """Count the last round trip (outside its timing)."""
        assert self._last is not None
        config, answered = self._last
        self.counted.add(list(self.graph.get_state_history(config)), answered)


class ScopegraphArm:
    name = "scopegraph"

    def __init__(self, url: str, approver: Approver) -> None:
        workflow = Workflow(name="approvals", tools=[tool(risk="write")(pay)], approvers=["bob"],
                            planner=ScriptedPlanner(PLAN), executor=DirectExecutor())
        self.runtime = Runtime(workflow, store=url)
        self.approver = approver
        self.counted = Counted()
        self._last: tuple[str, int, int] | None = None

    def checkpointer_commits(self) -> int:
        return checkpointer_commits(self.runtime._saver_conn, self.round_trip)

    def round_trip(self) -> None:
        before = self.runtime.store.counts.commits
        report = self.runtime.run("pay the claim", initiator="alice")
        if report.status != "paused":
            raise SystemExit(f"scopegraph arm did not pause: {report.status}")
        answered = self.approver.ask(f"sg {report.approvals[0]['id']}")
        final = self.runtime.resume(report.run_id)
        if final.status != "completed":
            raise SystemExit(f"scopegraph arm ended {final.status!r}")
        self._last = (report.run_id, self.runtime.store.counts.commits - before, answered)

    def count(self) -> None:
        """Count the last round trip (outside its timing)."""
        assert self._last is not None
        run_id, worker, answered = self._last
        history = list(self.runtime.graph.get_state_history({"configurable": {"thread_id": run_id}}))
        self.counted.add(history, worker + answered)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-approver":
        serve_approver(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sg_url = f"sqlite:///{tmp / 'sg.db'}"
        open_store(sg_url).close()  # create the store before the approver opens it
        open_plain(tmp / "plain.db")[0].close()
        approver = Approver(sg_url, tmp / "plain.db")
        arms = [PlainArm(tmp, approver), ScopegraphArm(sg_url, approver)]
        times: dict[str, list[float]] = {arm.name: [] for arm in arms}
        try:
            for i in range(args.warmup + args.runs):
                for arm in arms if i % 2 == 0 else reversed(arms):
                    start = time.perf_counter()
                    arm.round_trip()
                    if i >= args.warmup:
                        times[arm.name].append(time.perf_counter() - start)
                        arm.count()
            for arm in arms:
                arm.counted.samples["checkpointer commits"].append(arm.checkpointer_commits())
        finally:
            approver.close()
        print(f"runs={args.runs} warmup={args.warmup} (one round trip = run, pause, approve elsewhere, resume)")
        medians = {}
        for name, values in times.items():
            medians[name] = statistics.median(values)
            print(f"{name:<16} median {medians[name] * 1000:8.2f} ms  "
                  f"min {min(values) * 1000:8.2f}  max {max(values) * 1000:8.2f}")
        for arm in arms:
            print(f"{arm.name:<16} per round trip (medians): {arm.counted.describe()}")
        print(f"ratio={medians['scopegraph'] / medians['plain langgraph']:.3f}")


if __name__ == "__main__":
    main()
