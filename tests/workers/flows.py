"""Workflows the worker tests and the workers benchmark submit (importable by worker processes).

Every side effect is one line appended (and fsynced) to the file named by
``$SCOPEGRAPH_TEST_LOG``. ``crashing`` kills its worker with SIGKILL inside its second step
the first time that step runs (the marker is ``$SCOPEGRAPH_TEST_LOG`` + ``.crashed``).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner


def _effect(line: str) -> None:
    log = os.environ.get("SCOPEGRAPH_TEST_LOG")
    if not log:
        return
    with open(log, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


@tool(risk="read")
def read_part(part: str) -> dict[str, Any]:
    """Read one part of a document."""
    _effect(f"read_part {part}")
    return {"part": part}


@tool(risk="read")
def crash_once(part: str) -> dict[str, Any]:
    """Read a part; the first time ever, the worker dies by SIGKILL right after the effect."""
    _effect(f"crash_once {part}")
    marker = os.environ.get("SCOPEGRAPH_TEST_LOG", "") + ".crashed"
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return {"part": part}


@tool(risk="write")
def file_expense(employee: str, amount: int) -> dict[str, Any]:
    """File an expense claim (needs approval)."""
    _effect(f"file_expense {employee} {amount}")
    return {"claim": f"claim-{employee}-{amount}"}


def _read_step(step_id: str, tool_name: str = "read_part", after: list[str] | None = None) -> dict[str, Any]:
    return {"id": step_id, "tool": tool_name, "purpose": f"read {step_id}", "depends_on": after or [],
            "constraints": {"part": {"kind": "exact", "value": step_id}}}


READS_PLAN = {"steps": [_read_step("a"), _read_step("b", after=["a"]), _read_step("c", after=["b"])]}
CRASH_PLAN = {"steps": [_read_step("a"), _read_step("b", "crash_once", ["a"]), _read_step("c", after=["b"])]}
APPROVAL_PLAN = {"steps": [
    {"id": "file", "tool": "file_expense", "purpose": "file the claim",
     "constraints": {"employee": {"kind": "exact", "value": "e-17"}, "amount": {"kind": "exact", "value": 4250}}},
    _read_step("confirm", after=["file"]),
]}

reads = Workflow(name="reads", tools=[read_part], planner=ScriptedPlanner(READS_PLAN), executor=DirectExecutor())
crashing = Workflow(name="crashing", tools=[read_part, crash_once], planner=ScriptedPlanner(CRASH_PLAN),
                    executor=DirectExecutor())
approval = Workflow(name="approval", tools=[file_expense, read_part], planner=ScriptedPlanner(APPROVAL_PLAN),
                    executor=DirectExecutor(), approvers=["bob", "carol"])
unplannable = Workflow(name="unplannable", tools=[read_part],
                       planner=ScriptedPlanner({"steps": [{"id": "x", "tool": "no_such_tool", "constraints": {}}]}),
                       executor=DirectExecutor())
