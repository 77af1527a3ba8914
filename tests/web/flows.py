"""The workflows the browser tests pause and resume (importable by name, as ``resume`` loads them).

``file_expense`` is a write: policy asks a person, from ``bob``, ``carol`` or the
initiator ``alice`` (listed on purpose: she must still never answer her own run). Each
execution is appended to ``EFFECTS`` (one process: the test, its server and its worker).
``payroll`` asks ``mallory`` only; ``reviewed`` needs two of ``bob``, ``carol`` and ``dave``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner

TARGET = "tests.web.flows:expenses"
PAYROLL = "tests.web.flows:payroll"
REVIEWED = "tests.web.flows:reviewed"
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

payroll = Workflow(
    name="payroll", tools=[file_expense], planner=ScriptedPlanner(PLAN),
    executor=DirectExecutor(builders={"file_expense": lambda ctx: dict(ARGS)}),
    approvers=("mallory",),
)

reviewed = Workflow(
    name="reviewed", tools=[file_expense], planner=ScriptedPlanner(PLAN),
    executor=DirectExecutor(builders={"file_expense": lambda ctx: dict(ARGS)}),
    approvers=("bob", "carol", "dave"), policies=[Path(__file__).with_name("two-person.cedar")],
)
