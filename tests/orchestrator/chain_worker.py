"""A separate process for the long-run crash test: it runs a chain of steps and dies by
SIGKILL inside one of them.

Run as a script (``python -P chain_worker.py STORE_URL RUN_ID LOG STEPS KILL_AT``): each
step's tool appends its step's line to LOG (fsynced), except that step KILL_AT kills the
process before its line. The test resumes the run in its own process with
``build_workflow``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner


def chain(n: int) -> dict[str, Any]:
    return {"steps": [
        {"id": f"s{i}", "tool": "note", "purpose": "note the next part",
         "constraints": {"part": {"kind": "exact", "value": i}},
         "depends_on": [f"s{i - 1}"] if i else []}
        for i in range(n)
    ]}


def build_workflow(log: str, steps: int, kill_at: int = -1) -> Workflow:
    @tool(risk="read")
    def note(part: int) -> dict[str, Any]:
        """Note one part (the side effect: a line in the log)."""
        if part == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"part {part}\n")
            f.flush()
            os.fsync(f.fileno())
        return {"part": part}

    return Workflow(name="chainwf", tools=[note], planner=ScriptedPlanner(chain(steps)), executor=DirectExecutor())


if __name__ == "__main__":
    store_url, run_id, log, steps, kill_at = sys.argv[1:6]
    with Runtime(build_workflow(log, int(steps), int(kill_at)), store=store_url) as rt:
        rt.run("Note every part.", initiator="alice", run_id=run_id)
    sys.exit("the run ended without reaching the step that kills it")
