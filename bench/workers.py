"""Runs per second with 1, 2 and 4 worker processes sharing one PostgreSQL store.

Each arm gets a fresh schema, starts its worker processes (``scopegraph worker``,
concurrency 1 each), warms them up with one run per worker, then submits the same batch
(default 40 runs of a 3-step read workflow: three grants, three Cedar decisions, three
tool calls, every ledger record) in one go and times until the last run has completed.
Arms are interleaved over ``--rounds`` rounds and the median of each is reported. The last line
printed is ``ratio=<2-worker/1-worker>`` (of the medians).

    python bench/workers.py [--runs 40] [--workers 1,2,4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.store import open_store
from scopegraph.workers import submit_many

SERVER = os.environ.get("SCOPEGRAPH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]
TARGET = f"{Path(__file__).resolve()}:workflow"


@tool(risk="read")
def read_part(part: str) -> dict[str, Any]:
    """Read one part of a document."""
    return {"part": part}


def _step(step_id: str, after: list[str]) -> dict[str, Any]:
    return {"id": step_id, "tool": "read_part", "purpose": f"read {step_id}", "depends_on": after,
            "constraints": {"part": {"kind": "exact", "value": step_id}}}


workflow = Workflow(name="bench_reads", tools=[read_part], executor=DirectExecutor(),
                    planner=ScriptedPlanner({"steps": [_step("a", []), _step("b", ["a"]), _step("c", ["b"])]}))


def _completed(url: str, run_ids: list[str], timeout: float) -> None:
    wanted = set(run_ids)
    deadline = time.monotonic() + timeout
    store = open_store(url)
    try:
        while True:
            done = {r.run_id for r in store.list_runs(workflow="bench_reads") if r.status == "completed"}
            if wanted <= done:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(wanted & done)} of {len(wanted)} runs completed in {timeout}s")
            time.sleep(0.02)  # polling for the workers to finish, not waiting out a timer
    finally:
        store.close()


def arm(workers: int, runs: int) -> float:
    schema = f"sg_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    url = f"{SERVER}?options=-csearch_path%3D{schema}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        submit_many(TARGET, ["warm up"], "bench", url)  # installs the queue before workers start
        procs = [subprocess.Popen([sys.executable, "-m", "scopegraph.cli", "--store", url, "worker",
                                   "--traces", os.devnull], cwd=ROOT, stdout=subprocess.DEVNULL)
                 for _ in range(workers)]
        _completed(url, submit_many(TARGET, ["warm up"] * workers, "bench", url), timeout=120)
        start = time.perf_counter()
        _completed(url, submit_many(TARGET, [f"read part {i}" for i in range(runs)], "bench", url), timeout=600)
        return runs / (time.perf_counter() - start)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    samples: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            samples[n].append(arm(n, args.runs))
    rates = {n: statistics.median(xs) for n, xs in samples.items()}
    for n in counts:
        each = " ".join(f"{x:.1f}" for x in samples[n])
        print(f"workers={n} runs={args.runs} runs_per_second={rates[n]:.1f} (rounds: {each})", flush=True)
    if 1 in rates and 2 in rates:
        print(f"ratio={rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
