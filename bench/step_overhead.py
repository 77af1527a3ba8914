"""Per-step overhead of scopegraph over a plain LangGraph graph of the same shape.

Both arms run the same planner → executor loop: a plan of N steps chained one after
another (each depends on the previous, so steps run one at a time), each step calling
one trivial read tool. Both use the same LangGraph checkpointer with the same connection
settings (``SqliteSaver`` on a file in a temporary directory, or with ``--store
postgresql://…`` ``PostgresSaver`` in a schema of its own), ``durability="sync"`` and a
fresh thread per run::

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
the quartiles printed show how noisy the machine was. Besides the times it prints,
counted over the timed runs of the scopegraph arm:

- ``commits_per_step=`` and ``statements_per_step=``: transactions committed and SQL
  statements sent by scopegraph's store (``BEGIN`` and ``COMMIT`` included), over all
  steps, per-run writes included; on PostgreSQL ``round_trips_per_step=`` (a transaction's
  statements are pipelined: those whose results nobody reads share a round trip), on
  SQLite the checkpointer's own commits per step;
- ``floor_us=``: one Ed25519 signature of a grant, one Cedar decision and two commits,
  timed in this process with the runtime's own signer, policy engine and store (samples
  taken between the runs): the least a secured step must cost on top of a plain one.
  ``floor_ratio=`` is (plain + floor) / plain.

The last line printed is ``ratio=<x>``: the scopegraph median over the plain median.
With ``--scale 10,1000`` it runs each size instead and the last line is
``scale_ratio=<x>``: scopegraph's per-step time at the largest size over the smallest.

    python bench/step_overhead.py [--steps 20] [--runs 15] [--tracing] [--store postgresql://…]
    python bench/step_overhead.py --scale 10,1000 [--runs 3]
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import psycopg
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from psycopg import sql

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.policy import CallRequest
from scopegraph.runtime.state import merge_batches, merge_steps, union_labels
from scopegraph.store import UseRecord
from scopegraph.store.postgres import checkpointer_for_postgres
from scopegraph.store.sqlite import WAL_AUTOCHECKPOINT_PAGES
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
                planner_id=state["planner_id"], step_id=s["id"],
                dependencies={d: results[d] for d in s["depends_on"] if d in results},
                data_labels=state.get("data_labels") or [], record=steps.get(s["id"], {}),
                dispatch=batch,
            ))
            for s in ready
        ]

    def after_step(state: PlainState) -> list[Send] | str:
        return "schedule" if state.get("batches") else route(state)

    by_id = {s["id"]: s for s in plan["steps"]}

    def step_node(payload: PlainStepInput) -> dict[str, Any]:
        # The plan is not sent with each step, as the runtime does not send it: a task is
        # written into the checkpoint, and a plan sent with each would cost O(N) per step.
        step = by_id[payload["step_id"]]
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


# --- where the arms keep their data ------------------------------------------------------

class Place:
    """A fresh place for one arm's data: a SQLite file, or a PostgreSQL schema of its own."""

    def __init__(self, tmp: Path, name: str, server: str | None) -> None:
        self.server = server
        if server is None:
            self.path: Path | None = tmp / f"{name}.db"
            self.url = f"sqlite:///{self.path}"
            self.schema = None
            return
        self.path = None
        self.schema = f"sg_bench_{name}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
        self.url = f"{server}{'&' if '?' in server else '?'}options=-csearch_path%3D{self.schema}"

    def drop(self) -> None:
        if self.server is not None and self.schema is not None:
            with psycopg.connect(self.server, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))


def open_checkpointer(path: Path) -> tuple[sqlite3.Connection, SqliteSaver]:
    # The same settings as the runtime's checkpoint connection: WAL (set by setup),
    # synchronous=NORMAL and the WAL auto-checkpoint threshold, so neither arm pays a disk
    # sync the other skips.
    conn = sqlite3.connect(str(path), check_same_thread=False, timeout=10.0)
    saver = SqliteSaver(conn)
    saver.setup()
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    return conn, saver


# --- the two arms ---------------------------------------------------------------------

class PlainArm:
    name = "plain langgraph"

    def __init__(self, place: Place, steps: int) -> None:
        self.steps = steps
        self.place = place
        saver: Any
        if place.path is not None:
            self.conn: Any = None
            self.conn, saver = open_checkpointer(place.path)
        else:  # the runtime's own PostgresSaver set-up, on this arm's schema
            self.conn, saver = checkpointer_for_postgres(place.url)
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
        self.place.drop()


class ScopegraphArm:
    name = "scopegraph"

    def __init__(self, place: Place, steps: int) -> None:
        self.steps = steps
        self.place = place
        workflow = Workflow(
            name=WORKFLOW,
            tools=[tool(risk="read")(read_value)],
            planner=ScriptedPlanner(make_plan(steps)),
            executor=DirectExecutor(),
        )
        self.runtime = Runtime(workflow, store=place.url)

    def checkpointer_commits(self) -> int | None:
        """What the checkpointer commits in one run (SQLite only), counted in an untimed run:
        a trace callback writes out every statement, the checkpoints' blobs too."""
        conn = self.runtime._saver_conn
        if not isinstance(conn, sqlite3.Connection):
            return None
        seen: list[str] = []
        conn.set_trace_callback(lambda statement: seen.append(statement.lstrip()[:6].upper()))
        try:
            self.run_once()
        finally:
            conn.set_trace_callback(None)
        return seen.count("COMMIT")

    def run_once(self) -> None:
        report = self.runtime.run(TASK, initiator="bench")
        if report.status != "completed" or len(report.steps) != self.steps:
            raise SystemExit(f"scopegraph run ended {report.status!r}: {report.error or ''}")
        if report.grants_revoked != self.steps:
            raise SystemExit(f"scopegraph revoked {report.grants_revoked} of {self.steps} grants")

    def close(self) -> None:
        self.runtime.close()
        self.place.drop()


class Floor:
    """One signature, one decision, two commits: the runtime's own signer, policy engine
    and store, as a secured step must use them at least once each."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.identity = runtime.domain.id("wf", WORKFLOW, "run", "floor", "step", "s0", "executor")
        self.request = CallRequest(principal=self.identity, role="executor", workflow=WORKFLOW, run_id="floor",
                                   step_id="s0", tool=runtime.workflow.registry.get_tool("read_value"),
                                   arguments={"key": "k0"})
        self.samples: list[float] = []

    def sample(self, n: int) -> None:
        rt = self.rt
        for _ in range(n):
            start = time.perf_counter()
            now = rt.clock.now()
            rt.domain.sign({"iss": rt.domain.issuer, "sub": str(self.identity), "aud": "tool:read_value",
                            "iat": now, "nbf": now, "exp": now + 60, "jti": uuid.uuid4().hex,
                            "act": {"sub": "planner"}, "run": "floor", "step": "s0", "wf": WORKFLOW,
                            "scope": {"tool": "read_value", "max_uses": 3,
                                      "constraints": {"key": {"kind": "exact", "value": "k0"}}}})
            # A Cedar evaluation, as the floor is defined: not the answer the engine keeps for
            # a request made again (which a step may well get, for less).
            rt.policy._answers.clear()
            if rt.policy.decide(self.request).outcome != "allow":
                raise SystemExit("the floor's decision was not an allow")
            for outcome in ("ok", "ok"):  # before the call, after it
                with rt.store.atomic():
                    rt.store.record_use(UseRecord(jti="floor", run_id="floor", step_id="s0", tool="read_value",
                                                  attempt=1, outcome=outcome, decision="allow", policy_ids=(),
                                                  at=now))
            self.samples.append(time.perf_counter() - start)


def timed(run: Callable[[], None]) -> float:
    gc.collect()  # start each run from the same heap state; collections during it still count
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def quartiles(samples: list[float]) -> list[float]:
    return statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [samples[0]] * 3


def line(name: str, samples: list[float]) -> str:
    q = quartiles(samples)
    return (f"{name:16} median {statistics.median(samples) * 1e6:9.1f} µs/step   "
            f"min {min(samples) * 1e6:9.1f}   q1 {q[0] * 1e6:9.1f}   q3 {q[2] * 1e6:9.1f}")


@contextmanager
def tracing(on: bool, tmp: Path) -> Iterator[None]:
    shutdown = configure(jsonl_path=tmp / "traces.jsonl") if on else (lambda: None)
    try:
        yield
    finally:
        shutdown()


def overhead(args: argparse.Namespace, tmp: Path) -> int:
    steps = args.steps
    plain = PlainArm(Place(tmp, "plain", args.store), steps)
    scoped = ScopegraphArm(Place(tmp, "sg", args.store), steps)
    arms: list[PlainArm | ScopegraphArm] = [plain, scoped]
    floor = Floor(scoped.runtime)
    try:
        for _ in range(args.warmup):
            for arm in arms:
                arm.run_once()
        floor.sample(20)
        floor.samples.clear()
        store = scoped.runtime.store
        commits, statements, trips = store.counts.commits, store.counts.statements, store.counts.round_trips
        floor_statements = floor_trips = 0
        per_step: dict[str, list[float]] = {arm.name: [] for arm in arms}
        for _ in range(args.runs):
            for arm in arms:
                per_step[arm.name].append(timed(arm.run_once) / steps)
            before = store.counts.statements, store.counts.commits, store.counts.round_trips
            floor.sample(10)
            floor_statements += store.counts.statements - before[0]
            commits += store.counts.commits - before[1]
            floor_trips += store.counts.round_trips - before[2]
        total_steps = args.runs * steps
        commits = (store.counts.commits - commits) / total_steps
        statements = (store.counts.statements - statements - floor_statements) / total_steps
        trips = (store.counts.round_trips - trips - floor_trips) / total_steps
        checkpointer = scoped.checkpointer_commits()
    finally:
        for arm in arms:
            arm.close()

    where = "PostgreSQL (PostgresSaver)" if args.store else "SQLite (SqliteSaver)"
    traced = "on (SDK, batch export to JSONL)" if args.tracing else "off (no SDK installed)"
    print(f"steps={steps} runs={args.runs} warmup={args.warmup} store {where} tracing {traced} "
          "(per-step time = run time / steps)")
    for name, samples in per_step.items():
        print(line(name, samples))
    plain_median, scoped_median = (statistics.median(per_step[arm.name]) for arm in arms)
    floor_median = statistics.median(floor.samples)
    print(f"overhead {(scoped_median - plain_median) * 1e6:.1f} µs/step")
    print(f"commits_per_step={commits:.2f} statements_per_step={statements:.2f}"
          + (f" round_trips_per_step={trips:.2f}" if checkpointer is None else
             f" checkpointer_commits_per_step={checkpointer / steps:.2f}"))
    print(f"floor_us={floor_median * 1e6:.1f} (one signature, one decision, two commits) "
          f"floor_ratio={(plain_median + floor_median) / plain_median:.3f}")
    print(f"ratio={scoped_median / plain_median:.3f}")
    return 0


def scale(args: argparse.Namespace, tmp: Path) -> int:
    sizes = sorted({int(n) for n in args.scale.split(",")})
    arms = {n: [PlainArm(Place(tmp, f"plain{n}", args.store), n), ScopegraphArm(Place(tmp, f"sg{n}", args.store), n)]
            for n in sizes}
    per_step: dict[tuple[int, str], list[float]] = {(n, a.name): [] for n in sizes for a in arms[n]}
    try:
        for n in sizes:
            for arm in arms[n]:
                arm.run_once()  # warm-up
        for _ in range(args.runs):
            for n in sizes:
                for arm in arms[n]:
                    per_step[(n, arm.name)].append(timed(arm.run_once) / n)
    finally:
        for n in sizes:
            for arm in arms[n]:
                arm.close()
    print(f"sizes={','.join(map(str, sizes))} runs={args.runs} (per-step time = run time / steps)")
    for (n, name), samples in per_step.items():
        print(line(f"{name} {n}", samples))
    small, large = sizes[0], sizes[-1]
    for name in ("plain langgraph", "scopegraph"):
        grow = statistics.median(per_step[(large, name)]) / statistics.median(per_step[(small, name)])
        print(f"{name}: per-step time at {large} steps / at {small} steps = {grow:.3f}")
    sg = statistics.median(per_step[(large, "scopegraph")]) / statistics.median(per_step[(small, "scopegraph")])
    print(f"scale_ratio={sg:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="plan steps per run (default 20)")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per arm (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per arm first (default 2)")
    parser.add_argument("--tracing", action="store_true",
                        help="install the OpenTelemetry SDK as the CLI does (batch export of every span "
                             "to a JSONL file), so the scopegraph arm pays for recording its spans")
    parser.add_argument("--store", metavar="postgresql://…",
                        help="run both arms on this PostgreSQL server (each in a schema of its own)")
    parser.add_argument("--scale", metavar="N,M",
                        help="compare per-step times at these plan sizes instead (e.g. 10,1000)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--steps and --runs must be at least 1, --warmup at least 0")
    if args.store and not args.store.startswith(("postgresql://", "postgres://")):
        parser.error("--store takes a postgresql:// URL (SQLite is the default)")
    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp_name, tracing(args.tracing, Path(tmp_name)):
        return scale(args, Path(tmp_name)) if args.scale else overhead(args, Path(tmp_name))


if __name__ == "__main__":
    sys.exit(main())
