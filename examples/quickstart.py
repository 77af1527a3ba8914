"""Quickstart: two tools, a scripted plan, one approval, every grant revoked.

Run it from the repository root:

    .venv/bin/python examples/quickstart.py [STORE_URL]

It uses only the public API: ``orchestrator`` for tools, workflows and the runtime,
``scopegraph.agents`` for a planner and an executor.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner

INVOICES = {"INV-7": {"vendor": "acme", "amount": 1200}}
PAID: list[tuple[str, int]] = []


@tool(risk="read", labels=["confidential"])
def read_invoice(invoice_id: str) -> dict:
    """Read an invoice from the accounting system."""
    return {"invoice_id": invoice_id, **INVOICES[invoice_id]}


@tool(risk="write")
def pay_vendor(vendor: str, amount: int) -> dict:
    """Pay a vendor (a write: policy makes it wait for a human)."""
    PAID.append((vendor, amount))
    return {"paid": amount, "to": vendor}


PLAN = {"steps": [
    {"id": "read", "tool": "read_invoice", "purpose": "look up the invoice",
     "constraints": {"invoice_id": {"kind": "pattern", "regex": "INV-[0-9]+"}}},
    {"id": "pay", "tool": "pay_vendor", "purpose": "pay what the invoice says",
     "depends_on": ["read"],
     "constraints": {"vendor": {"kind": "any"}, "amount": {"kind": "range", "min": 1, "max": 5000}}},
]}

workflow = Workflow(
    name="payables",
    tools=[read_invoice, pay_vendor],
    planner=ScriptedPlanner(PLAN),
    executor=DirectExecutor(builders={"read_invoice": lambda ctx: {"invoice_id": "INV-7"}}),
    approvers=["bob"],
)


def main(store: str) -> int:
    with Runtime(workflow, store=store) as rt:
        report = rt.run("Pay invoice INV-7", initiator="alice")
        print(report.summary())
        assert report.status == "paused", report.status  # the payment waits for a human
        (pending,) = rt.approvals.list(run_id=report.run_id, status="pending")
        rt.approvals.approve(pending.id, approver="bob", reason="matches the invoice")
        report = rt.resume(report.run_id)
        print(report.summary())
        assert report.status == "completed" and PAID == [("acme", 1200)]
        assert report.grants_minted == report.grants_revoked  # no standing access
        assert rt.ledger.verify().ok
    return 0


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(tempfile.mkdtemp()) / 'quickstart.db'}"
    sys.exit(main(url))
