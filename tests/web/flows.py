"""The workflow the browser tests pause and resume (importable by name, as ``resume`` loads it).

``file_expense`` is a write: policy asks a person, from ``bob``, ``carol`` or the
initiator ``alice`` (listed on purpose: she must still never answer her own run). Each
execution is appended to ``EFFECTS`` (one process: the test, its server and its worker).
"""

from __future__ import annotations

from typing import Any

from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner

TARGET = "tests.web.flows:expenses"
EFFECTS: list[dict[str, Any]] = []
ARGS: dict[str, Any] = {"employee": "e-17", "amount": 4250, "vendor": "Rail Europe", "card_pin": "8841"}


@tool(risk="write", roles={"card_pin": "secret"})
def file_expense(employee: str, amount: int, vendor: str, card_pin: str) -> dict[str, Any]:
    """File an expense claim for payment."""
    EFFECTS.append({"employee": employee, "amount": amount, "vendor": vendor})
    return {"claim": f"claim-{employee}-{amount}"}


PLAN: dict[str, Any] = {"steps": [
    {"id": "file", "tool": "file_expense", "purpose": "file the travel claim of e-17",
     "constraints": {"employee": {"kind": "exact", "value": "e-17"},
                     "amount": {"kind": "range", "min": 1, "max": 10_000},
                     "vendor": {"kind": "any"}, "card_pin": {"kind": "any"}}},
]}

expenses = Workflow(
    name="expenses", tools=[file_expense], planner=ScriptedPlanner(PLAN),
    executor=DirectExecutor(builders={"file_expense": lambda ctx: dict(ARGS)}),
    approvers=("bob", "carol", "alice"),
)
