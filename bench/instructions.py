"""The same ratios as ``step_overhead.py`` and ``approval_roundtrip.py``, counted in instructions.

Wall time on a shared machine moves by a third between two runs of the same code (another
tenant's load, the hypervisor taking the CPU away); instructions do not. This runs each
arm under valgrind's callgrind, which counts the instructions every thread of the process
executes, twice: once with ``--runs`` A and once with B runs after the same warm-up. The
difference, over (B - A) runs, is the cost of one run with the interpreter's start-up, the
imports and the warm-up taken out; over the plan's steps, of one step::

    step:      plain LangGraph vs Runtime.run, the arms of step_overhead.py (SQLite)
    approval:  run → approve → resume, the arms of approval_roundtrip.py, the approver
               in the same process (callgrind follows one process): ApprovalService.approve
               for scopegraph, a row in an answers table for plain LangGraph

With ``--tracing`` the OpenTelemetry SDK is installed in each arm's process, as
``step_overhead.py --tracing`` does (spans exported in batches to a JSON-lines file, flushed
before the process ends), so the export's work is counted too.

Instructions are not time: a commit's wait for the disk, a lock's wait for another thread,
costs none, and a cache miss costs one. Read the count for what code does, the timed
benchmarks for what it costs on a given machine. The last line printed is ``ratio=<x>``,
scopegraph's instructions over plain LangGraph's. Each arm takes a minute or two
(callgrind runs code some fifty times slower).

    python bench/instructions.py [step|approval] [--steps 20] [--runs 2,7] [--tracing]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langgraph.types import Command

sys.path.insert(0, str(Path(__file__).resolve().parent))

import approval_roundtrip as approval  # noqa: E402  (the arms are those benchmarks' own)
import step_overhead as step  # noqa: E402

from scopegraph.approvals import ApprovalService  # noqa: E402
from scopegraph.clock import SystemClock  # noqa: E402
from scopegraph.ledger import Ledger  # noqa: E402
from scopegraph.store import open_store  # noqa: E402
from scopegraph.telemetry import configure  # noqa: E402

WARMUP = 2


def step_arm(arm: str, tmp: Path, steps: int) -> Callable[[], None]:
    place = step.Place(tmp, arm, None)
    made = step.ScopegraphArm(place, steps) if arm == "scopegraph" else step.PlainArm(place, steps)
    return made.run_once


def approval_arm(arm: str, tmp: Path, steps: int) -> Callable[[], None]:
    if arm == "scopegraph":
        url = f"sqlite:///{tmp / 'sg.db'}"
        runtime = approval.ScopegraphArm(url, None)  # type: ignore[arg-type]  # no approver process: asked here
        store = open_store(url)
        clock = SystemClock()
        approvals = ApprovalService(store, clock=clock, ledger=Ledger(store, clock=clock))

        def sg_round_trip() -> None:
            report = runtime.runtime.run("pay the claim", initiator="alice")
            if report.status != "paused":
                raise SystemExit(f"scopegraph arm did not pause: {report.status}")
            approvals.approve(report.approvals[0]["id"], approver="bob", reason="bench")
            if runtime.runtime.resume(report.run_id).status != "completed":
                raise SystemExit("scopegraph arm did not complete")

        return sg_round_trip
    conn, graph = approval.open_plain(tmp / "plain.db")

    def plain_round_trip() -> None:
        thread = uuid.uuid4().hex
        config: Any = {"configurable": {"thread_id": thread}}
        graph.invoke({}, config, durability="sync")
        if not graph.get_state(config).interrupts:
            raise SystemExit("plain arm did not pause")
        with conn:  # the approver's answer, then the worker's read of it
            conn.execute("INSERT INTO answers (thread_id, answer) VALUES (?, 'approved')", (thread,))
        (answer,) = conn.execute("SELECT answer FROM answers WHERE thread_id = ?", (thread,)).fetchone()
        if graph.invoke(Command(resume=answer), config, durability="sync").get("status") != "completed":
            raise SystemExit("plain arm did not complete")

    return plain_round_trip


ARMS = {"step": step_arm, "approval": approval_arm}


def run_arm(bench: str, arm: str, runs: int, steps: int, tracing: bool) -> None:
    """Inside callgrind: warm the arm up, then run it ``runs`` times. With ``tracing``, the
    spans exported are counted on the last line printed (``spans=N``)."""
    with tempfile.TemporaryDirectory(prefix="sg-instr-") as tmp:
        traces = Path(tmp) / "traces.jsonl"
        shutdown = configure(jsonl_path=traces) if tracing else None
        once = ARMS[bench](arm, Path(tmp), steps)
        for _ in range(WARMUP + runs):
            once()
        if shutdown is not None:
            shutdown()  # the spans still queued are exported here, inside the count
            spans = len(traces.read_text().splitlines()) if traces.exists() else 0
            print(f"spans={spans}")


def counted(bench: str, arm: str, runs: int, steps: int, tracing: bool = False) -> int:
    """The instructions of a process that runs ``arm`` ``runs`` times after the warm-up."""
    with tempfile.TemporaryDirectory(prefix="sg-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
             bench, "--arm", arm, "--runs", f"0,{runs}", "--steps", str(steps)]
            + (["--tracing"] if tracing else []),
            capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"the {arm} arm failed under callgrind: {tail}")
        match = re.search(r"^totals:\s+(\d+)", out.read_text(), re.MULTILINE)
        if match is None:
            raise SystemExit(f"callgrind wrote no totals for the {arm} arm")
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", nargs="?", choices=sorted(ARMS), default="step")
    parser.add_argument("--steps", type=int, default=20, help="steps per plan (step bench)")
    parser.add_argument("--runs", default="2,7", help="the two run counts A,B whose difference is counted")
    parser.add_argument("--tracing", action="store_true", help="install the OpenTelemetry SDK (batch export)")
    parser.add_argument("--arm", choices=["plain", "scopegraph"], help=argparse.SUPPRESS)  # inside callgrind
    args = parser.parse_args()
    try:
        low, high = (int(n) for n in args.runs.split(","))
    except ValueError:
        low = high = -1
    if not 0 <= low < high:
        parser.error(f"--runs takes two numbers A,B with 0 <= A < B, not {args.runs!r}")
    if args.arm is not None:
        run_arm(args.bench, args.arm, high, args.steps, args.tracing)  # inside callgrind: ``--runs 0,N``
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    per = args.steps if args.bench == "step" else 1
    unit = "step" if args.bench == "step" else "round trip"
    print(f"bench={args.bench} runs {low} and {high} after {WARMUP} warm-up runs"
          + (f", {args.steps} steps a run" if args.bench == "step" else ", approver in the same process")
          + (", tracing on (SDK, batch export to JSONL)" if args.tracing else ""))
    per_unit = {}
    for arm in ("plain", "scopegraph"):
        a = counted(args.bench, arm, low, args.steps, args.tracing)
        b = counted(args.bench, arm, high, args.steps, args.tracing)
        per_unit[arm] = (b - a) / ((high - low) * per)
        print(f"{arm:11} {per_unit[arm] / 1e6:8.3f} M instructions per {unit}", flush=True)
    print(f"ratio={per_unit['scopegraph'] / per_unit['plain']:.3f}")


if __name__ == "__main__":
    main()
