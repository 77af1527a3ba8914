"""Per-step overhead of scopegraph over a plain LangGraph graph of the same shape.

Both arms run the same planner → executor loop: a plan of N steps chained one after
another (each depends on the previous, so steps run one at a time), each step calling
one trivial read tool. Both use LangGraph's ``SqliteSaver`` on a file in a temporary
directory with the same connection settings, ``durability="sync"`` and a fresh thread
per run::

    START → plan ─▶ route ─┬─▶ step (one Send per ready step) ─▶ route
                           └─▶ END

(a step that ran alone routes straight on; ``schedule`` joins steps that ran together).

The plain arm is what a developer would write without scopegraph: a TypedDict state
with the same reducers, and a step node that calls the tool function directly. The
scopegraph arm is ``Runtime.run`` over a ``Workflow`` with a ``ScriptedPlanner`` and a
``DirectExecutor``: everything scopegraph does per step is inside the timing (the step's
identity, its signed grant, the gateway's checks, the Cedar decision, use accounting,
audit records and revocation), and so is the per-run work (run record, report).

The arms alternate (plain, scopegraph, plain, scopegraph, …) after a warm-up, so
drift in the machine affects both alike. Per-step time is a run's wall time over N;
the quartiles printed show how noisy the machine was.
The last line printed is ``ratio=<x>``: the scopegraph median over the plain median.

    python bench/step_overhead.py [--steps 20] [--runs 15]
"""

from __future__ import annotations

import argparse
import gc
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.runtime.state import merge_batches, merge_steps, union_labels
from scopegraph.telemetry import configure

WORKFLOW = "bench"
TASK = "Read every key in order."
RECURSION_LIMIT = 10_000  # as the runtime sets it, so long plans stay under the limit


def read_value(key: str) -> dict[str, Any]:
    """Read one value by key (the trivial tool both arms call)."""
    return {"key": key, "value": len(key)}


def make_plan(n: int) -> dict[str, Any]:
    """N steps, each pinned to one key and depending on the one before."""
    return {"steps": [
        {"id": f"s{i}", "tool": "read_value", "purpose": "read the next key",
         "constraints": {"key": {"kind": "exact", "value": f"k{i}"}},
         "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(n)
    ]}


# --- plain LangGraph ------------------------------------------------------------------
# The same graph as orchestrator/runtime/graph.py (as of 3b18520), minus scopegraph: the
# same nodes, edges, reducers and Send payloads, so LangGraph does the same work in both
# arms. A step routes straight on when it ran alone; ``schedule`` joins sibling batches.

# The reducers are the runtime's own: both arms merge state with the very same functions.


class PlainState(TypedDict, total=False):
    run_id: str
    workflow: str
    task: str
    initiator: str
    planner_id: str
    plan: dict[str, Any]
    steps: Annotated[dict[str, Any], merge_steps]
    data_labels: Annotated[list[str], union_labels]
    batches: Annotated[dict[str, Any], merge_batches]
    status: str
    error: str


class PlainStepInput(TypedDict):
    run_id: str
    workflow: str
    initiator: str
    planner_id: str
    plan: dict[str, Any]
    step_id: str
    dependencies: dict[str, Any]
    data_labels: list[str]
    record: dict[str, Any]
    dispatch: dict[str, Any]


def build_plain_graph(plan: dict[str, Any]) -> StateGraph:
    def plan_node(state: PlainState) -> dict[str, Any]:
        return {"plan": plan, "steps": {}}

    def route(state: PlainState) -> list[Send] | str:
        steps = state.get("steps") or {}
        done = {sid for sid, s in steps.items() if s["status"] == "completed"}
        ready = [s for s in state["plan"]["steps"]
                 if s["id"] not in steps and set(s["depends_on"]) <= done]
        if not ready:
            return END
        results = {sid: steps[sid].get("result") for sid in done}
        batch = {"id": uuid.uuid4().hex, "members": sorted(s["id"] for s in ready)}
        return [
            Send("step", PlainStepInput(
                run_id=state["run_id"], workflow=state["workflow"], initiator=state["initiator"],
                planner_id=state["planner_id"], plan=state["plan"], step_id=s["id"],
                dependencies={d: results[d] for d in s["depends_on"] if d in results},
                data_labels=state.get("data_labels") or [], record=steps.get(s["id"], {}),
                dispatch=batch,
            ))
            for s in ready
        ]

    def after_step(state: PlainState) -> list[Send] | str:
        return "schedule" if state.get("batches") else route(state)

    def step_node(payload: PlainStepInput) -> dict[str, Any]:
        step = next(s for s in payload["plan"]["steps"] if s["id"] == payload["step_id"])
        args = {name: c["value"] for name, c in step["constraints"].items()}
        value = read_value(**args)
        record = {"step_id": step["id"], "tool": step["tool"], "status": "completed", "result": value}
        batch = payload["dispatch"]
        return {"steps": {step["id"]: record}, "data_labels": [],
                "batches": {batch["id"]: {"members": batch["members"], "landed": [step["id"]]}}}

    graph = StateGraph(PlainState)
    graph.add_node("plan", plan_node)
    graph.add_node("schedule", lambda state: {})
    graph.add_node("step", lambda payload: step_node(payload))  # as the runtime adds its nodes
    targets = ["step", "schedule", END]
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", route, targets)
    graph.add_conditional_edges("schedule", route, targets)
    graph.add_conditional_edges("step", after_step, targets)
    return graph


def open_checkpointer(path: Path) -> tuple[sqlite3.Connection, SqliteSaver]:
    # The same settings as the runtime's checkpoint connection: WAL (set by setup) and
    # synchronous=NORMAL, so neither arm pays an fsync per commit that the other skips.
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0)
    saver = SqliteSaver(conn)
    saver.setup()
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn, saver


# --- the two arms ---------------------------------------------------------------------

class PlainArm:
    name = "plain langgraph"

    def __init__(self, tmp: Path, steps: int) -> None:
        self.steps = steps
        self.conn, saver = open_checkpointer(tmp / "plain.db")
        self.graph = build_plain_graph(make_plan(steps)).compile(checkpointer=saver)

    def run_once(self) -> None:
        run_id = uuid.uuid4().hex
        initial: dict[str, Any] = {
            "run_id": run_id, "workflow": WORKFLOW, "task": TASK, "initiator": "bench",
            "planner_id": f"planner:{run_id}", "steps": {}, "data_labels": [],
        }
        config: RunnableConfig = {"configurable": {"thread_id": run_id}, "recursion_limit": RECURSION_LIMIT}
        final = self.graph.invoke(initial, config, durability="sync")
        statuses = [s["status"] for s in final["steps"].values()]
        if statuses.count("completed") != self.steps:
            raise SystemExit(f"plain run completed {statuses.count('completed')} of {self.steps} steps")

    def close(self) -> None:
        self.conn.close()


class ScopegraphArm:
    name = "scopegraph"

    def __init__(self, tmp: Path, steps: int) -> None:
        self.steps = steps
        workflow = Workflow(
            name=WORKFLOW,
            tools=[tool(risk="read")(read_value)],
            planner=ScriptedPlanner(make_plan(steps)),
            executor=DirectExecutor(),
        )
        self.runtime = Runtime(workflow, store=f"sqlite:///{tmp / 'sg.db'}")

    def run_once(self) -> None:
        report = self.runtime.run(TASK, initiator="bench")
        if report.status != "completed" or len(report.steps) != self.steps:
            raise SystemExit(f"scopegraph run ended {report.status!r}: {report.error or ''}")
        if report.grants_revoked != self.steps:
            raise SystemExit(f"scopegraph revoked {report.grants_revoked} of {self.steps} grants")

    def close(self) -> None:
        self.runtime.close()


def timed(run: Callable[[], None]) -> float:
    gc.collect()  # start each run from the same heap state; collections during it still count
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="plan steps per run (default 20)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per arm (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per arm first (default 2)")
    parser.add_argument("--tracing", action="store_true",
                        help="install the OpenTelemetry SDK as the CLI does (batch export of every span "
                             "to a JSONL file), so the scopegraph arm pays for recording its spans")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--steps and --runs must be at least 1, --warmup at least 0")

    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        shutdown = configure(jsonl_path=Path(tmp) / "traces.jsonl") if args.tracing else (lambda: None)
        arms: list[PlainArm | ScopegraphArm] = [PlainArm(Path(tmp), args.steps),
                                                ScopegraphArm(Path(tmp), args.steps)]
        try:
            for _ in range(args.warmup):
                for arm in arms:
                    arm.run_once()
            per_step: dict[str, list[float]] = {arm.name: [] for arm in arms}
            for _ in range(args.runs):
                for arm in arms:
                    per_step[arm.name].append(timed(arm.run_once) / args.steps)
        finally:
            for arm in arms:
                arm.close()
            shutdown()

    tracing = "on (SDK, batch export to JSONL)" if args.tracing else "off (no SDK installed)"
    print(f"steps={args.steps} runs={args.runs} warmup={args.warmup} tracing {tracing} "
          "(per-step time = run time / steps)")
    medians = {}
    for name, samples in per_step.items():
        medians[name] = statistics.median(samples)
        q = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3
        print(f"{name:16} median {medians[name] * 1e6:9.1f} µs/step   "
              f"min {min(samples) * 1e6:9.1f}   q1 {q[0] * 1e6:9.1f}   q3 {q[2] * 1e6:9.1f}")
    plain, scoped = medians[arms[0].name], medians[arms[1].name]
    print(f"overhead {(scoped - plain) * 1e6:.1f} µs/step (target ratio <= 1.15)")
    print(f"ratio={scoped / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
