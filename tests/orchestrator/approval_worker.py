"""A separate process for the approval tests: it consumes an approval, or runs a workflow
and dies by SIGKILL at a chosen point.

Run as a script (``python -P approval_worker.py COMMAND ...``); the tests start it with
``subprocess`` so that crashes and concurrency cross a real process boundary.

Commands::

    consume STORE_URL CONSUMER NOW APPROVALS_JSON
        APPROVALS_JSON is a file holding [[approval_id, digest], ...]. Print "ready", read
        a wall-clock start time from stdin, spin until it comes (so that every worker
        starts within microseconds of the others), then try ApprovalService.consume as
        CONSUMER on each approval in order and print one JSON list of
        {"won": bool, "error": str | null}.
    run STORE_URL RUN_ID LOG [--approve-as NAME]
        start the crash workflow as initiator "alice"; with --approve-as, approve the
        pending call and resume in the same process. Prints the run record as JSON.
    resume STORE_URL RUN_ID LOG
        resume the run and print the run record as JSON.

``$SCOPEGRAPH_TEST_CRASH`` picks where the process kills itself with SIGKILL:
``after_pause`` (the run paused; nobody answered yet), ``after_approve`` (approved and
persisted, before the resume), ``before_effect`` (inside the approved tool, before its
side effect), ``after_effect`` (inside the approved tool, right after its side effect),
``in_next_step`` (inside the read step that follows the approved write, after its
side effect). Every side effect is one line appended (and fsynced) to LOG.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.approvals import ApprovalService
from scopegraph.clock import FixedClock
from scopegraph.errors import ApprovalError
from scopegraph.store import open_store

CRASH = os.environ.get("SCOPEGRAPH_TEST_CRASH", "")
INITIATOR = "alice"
APPROVER = "bob"

CRASH_PLAN: dict[str, Any] = {"steps": [
    {"id": "file", "tool": "file_expense", "purpose": "file the claim",
     "constraints": {"employee": {"kind": "exact", "value": "e-17"},
                     "amount": {"kind": "exact", "value": 4250}}},
    {"id": "confirm", "tool": "confirm_claim", "purpose": "confirm the claim was filed",
     "depends_on": ["file"], "constraints": {"claim": {"kind": "any"}}},
]}


def _die_if(point: str) -> None:
    if CRASH == point:
        os.kill(os.getpid(), signal.SIGKILL)


def build_workflow(log: str) -> Workflow:
    def effect(line: str) -> None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    @tool(risk="write")
    def file_expense(employee: str, amount: int) -> dict[str, Any]:
        """File an expense claim (the approved side effect)."""
        _die_if("before_effect")
        effect(f"file_expense {employee} {amount}")
        _die_if("after_effect")
        return {"claim": f"claim-{employee}-{amount}"}

    @tool(risk="read")
    def confirm_claim(claim: str) -> dict[str, Any]:
        """Confirm a claim exists."""
        effect(f"confirm_claim {claim}")
        _die_if("in_next_step")
        return {"claim": claim, "confirmed": True}

    return Workflow(name="crashwf", tools=[file_expense, confirm_claim],
                    planner=ScriptedPlanner(CRASH_PLAN), executor=DirectExecutor(),
                    approvers=[APPROVER, "carol"])


def consume(store_url: str, consumer: str, now: str, approvals_json: str) -> None:
    with open(approvals_json, encoding="utf-8") as f:
        approvals = json.load(f)
    store = open_store(store_url)
    try:
        service = ApprovalService(store, clock=FixedClock(float(now)))
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        while time.time() < start_at:
            pass  # spin: a sleep would wake the workers at scattered times
        results = []
        for approval_id, digest in approvals:
            try:
                service.consume(approval_id, digest=digest, consumer=consumer)
            except ApprovalError as exc:
                results.append({"won": False, "error": str(exc)})
            else:
                results.append({"won": True, "error": None})
        print(json.dumps(results), flush=True)
    finally:
        store.close()


def run(store_url: str, run_id: str, log: str, approve_as: str | None) -> None:
    with Runtime(build_workflow(log), store=store_url) as rt:
        report = rt.run("Reimburse receipt r-1042", initiator=INITIATOR, run_id=run_id)
        _die_if("after_pause")
        if approve_as is not None and report.status == "paused":
            pending = rt.approvals.list(run_id=run_id, status="pending")
            for a in pending:
                rt.approvals.approve(a.id, approver=approve_as, reason="looks right")
            _die_if("after_approve")
            report = rt.resume(run_id)
        print(report.model_dump_json(), flush=True)


def resume(store_url: str, run_id: str, log: str) -> None:
    with Runtime(build_workflow(log), store=store_url) as rt:
        print(rt.resume(run_id).model_dump_json(), flush=True)


def main(argv: list[str]) -> None:
    command, rest = argv[0], argv[1:]
    if command == "consume":
        consume(*rest)
    elif command == "run":
        approve_as = None
        if "--approve-as" in rest:
            i = rest.index("--approve-as")
            approve_as = rest[i + 1]
            rest = rest[:i] + rest[i + 2:]
        run(*rest, approve_as=approve_as)
    elif command == "resume":
        resume(*rest)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
