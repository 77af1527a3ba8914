"""Where a secured step's time goes: each part of scopegraph's work, in µs per step.

``step_overhead.py`` says how much a secured step costs over a plain LangGraph step;
this says what that cost is made of. It runs the same two arms (the same plan, the same
checkpointer settings; ``--store postgresql://…`` for PostgreSQL) and, in the scopegraph
arm, times the functions below with wrappers that keep *exclusive* time (a part's time
without the parts it calls), per thread. What no wrapper claims is LangGraph's own work,
the checkpointer, the step node's bookkeeping and the executor: the line "LangGraph,
checkpointer and the rest".

    python bench/step_profile.py [--steps 20] [--runs 20] [--store postgresql://…]

The wrappers cost about a microsecond each (some 40 per step): the total is a little
above what ``step_overhead.py`` measures for the same arm. Time is wall time: on a busy
machine every part grows; compare parts within one run, not across runs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_overhead as bench  # noqa: E402  (the arms are the benchmark's own)

from scopegraph import credentials, gateway, guard, identity, ledger, policy, session  # noqa: E402
from scopegraph.runtime import graph, runner  # noqa: E402
from scopegraph.store import postgres, queries, sqlite  # noqa: E402

# (label, owner, attribute): each is timed exclusive of the others it calls.
PARTS: list[tuple[str, Any, str]] = [
    ("grant: Ed25519 signature and JWT", identity.TrustDomain, "sign"),
    ("grant: mint (claims, record)", credentials.GrantIssuer, "mint"),
    ("policy: Cedar evaluation", policy.cedarpy, "is_authorized"),
    ("policy: request, context, entities", policy.CedarPolicyEngine, "decide"),
    ("ledger: payload, canonical form, hash", ledger.Ledger, "append"),
    ("store: statements", queries.Tx, "execute"),
    ("store: BEGIN", sqlite.SqliteStore, "_begin"),
    ("store: COMMIT", sqlite.SqliteStore, "_end"),
    ("store: BEGIN", postgres.PostgresStore, "_begin"),
    ("store: COMMIT", postgres.PostgresStore, "_end"),
    ("gateway: validate, scope, record a decision", gateway.Gateway, "decide"),
    ("gateway: run the tool, record its result", gateway.Gateway, "run"),
    ("session: begin, call, end a step", session.Session, "begin_step"),
    ("session: begin, call, end a step", session.Session, "call"),
    ("session: begin, call, end a step", session.Session, "end_step"),
    ("per run: end (revoke all, witness, sign head)", session.Session, "end_run"),
    ("per run: start", guard.Guard, "start_run"),
    ("per run: report", runner.Runtime, "report"),
    ("step node: identity, context, record", graph, "_step"),
    ("step node: executor and tool handle", graph, "_run_step"),
    ("routing: ready steps, sends", graph, "_route"),
    ("routing: ready steps, sends", graph, "_after_task"),
    ("per run: plan node", graph, "_plan"),
]


class Clock:
    """Exclusive time per label, kept per thread (parallel steps run in threads)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self._local = threading.local()
        self._lock = threading.Lock()

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._local.__dict__.setdefault("stack", [])
            frame = [time.perf_counter(), 0.0]  # start, time spent in timed callees
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                elapsed = time.perf_counter() - frame[0]
                if stack:
                    stack[-1][1] += elapsed
                with self._lock:
                    self.spent[label] += elapsed - frame[1]

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def install(self) -> Callable[[], None]:
        undo: list[tuple[Any, str, Any]] = []
        for label, owner, name in PARTS:
            original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
            undo.append((owner, name, original))
            setattr(owner, name, self.wrap(label, original))

        def uninstall() -> None:
            for owner, name, original in reversed(undo):
                setattr(owner, name, original)

        return uninstall


def timed(arm: Any) -> float:
    gc.collect()
    start = time.perf_counter()
    arm.run_once()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="plan steps per run (default 20)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per arm (default 20)")
    parser.add_argument("--store", metavar="postgresql://…", help="run both arms on this PostgreSQL server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        plain = bench.PlainArm(bench.Place(tmp, "plain", args.store), args.steps)
        clock = Clock()
        uninstall = clock.install()  # before the runtime is built: its graph binds the nodes
        try:
            scoped = bench.ScopegraphArm(bench.Place(tmp, "sg", args.store), args.steps)
            try:
                for _ in range(2):
                    plain.run_once()
                    scoped.run_once()
                clock.spent.clear()
                plain_total = scoped_total = 0.0
                for _ in range(args.runs):  # interleaved, so drift in the machine affects both alike
                    plain_total += timed(plain)
                    scoped_total += timed(scoped)
                plain_us = plain_total / (args.runs * args.steps) * 1e6
                scoped_us = scoped_total / (args.runs * args.steps) * 1e6
            finally:
                scoped.close()
        finally:
            uninstall()
            plain.close()
    steps = args.runs * args.steps
    parts = Counter({label: spent / steps * 1e6 for label, spent in clock.spent.items()})
    claimed = sum(parts.values())
    where = "PostgreSQL" if args.store else "SQLite"
    print(f"steps={args.steps} runs={args.runs} store {where}: scopegraph {scoped_us:.0f} µs/step, "
          f"plain LangGraph {plain_us:.0f} µs/step, overhead {scoped_us - plain_us:.0f} µs/step")
    print(f"{'part (exclusive time)':48} {'µs/step':>8}")
    for label, us in parts.most_common():
        print(f"{label:48} {us:8.1f}")
    print(f"{'LangGraph, checkpointer and the rest':48} {scoped_us - claimed:8.1f}")
    print(f"ratio={scoped_us / plain_us:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
