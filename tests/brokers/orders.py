"""A reporting workflow whose tools read a customer's orders through a per-step PostgreSQL role.

Shared by the runtime tests and ``broker_worker`` (a process that dies holding a role).
The tables come from the ``admin`` fixture: ``orders`` under row-level security, ``cards``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.brokers.postgres import PostgresCredential, PostgresRoleBroker, postgres_role

ORDERS_ROLE = postgres_role("db", select={"orders": ["id", "customer_id", "amount", "note"]},
                            rows={"orders": {"customer_id": "customer"}})
HELD: list[PostgresCredential] = []  # every credential a tool received, to try after the step
ON_CONNECT: list[Callable[[PostgresCredential], None]] = []  # hooks run while the tool holds a session


@tool(risk="read", labels=["confidential"], secrets=[ORDERS_ROLE])
def customer_orders(customer: str, db: PostgresCredential) -> list[dict[str, Any]]:
    """The orders of one customer (row-level security picks the rows)."""
    HELD.append(db)
    with db.connect() as conn:
        rows = conn.execute("SELECT id, customer_id, amount FROM orders ORDER BY id").fetchall()
        for hook in ON_CONNECT:
            hook(db)
    return [{"id": r[0], "customer": r[1], "amount": r[2]} for r in rows]


@tool(risk="read", labels=["confidential"], secrets=[ORDERS_ROLE])
def search_orders(customer: str, note: str, db: PostgresCredential) -> list[list[Any]]:
    """Search one customer's orders by note. Builds its SQL by pasting text: injectable on purpose."""
    HELD.append(db)
    query = f"SELECT id, customer_id, amount FROM orders WHERE customer_id = '{customer}' AND note LIKE '{note}'"
    with db.connect() as conn:
        return [list(r) for r in conn.execute(query).fetchall()]  # type: ignore[call-overload]


@tool(risk="read", secrets=[ORDERS_ROLE])
def leaky_orders(customer: str, db: PostgresCredential) -> None:
    """Fails, quoting its own connection string."""
    HELD.append(db)
    raise RuntimeError(f"cannot use {db.danger_conninfo()}")


TOOLS = [customer_orders, search_orders, leaky_orders]


def orders_plan(*customers: str, tool_name: str = "customer_orders", **extra: Any) -> dict[str, Any]:
    """One independent step per customer, the customer pinned by ``exact``."""
    return {"steps": [{"id": f"orders{i}", "tool": tool_name, "purpose": "read the customer's orders",
                       "constraints": {"customer": {"kind": "exact", "value": c}, **extra}}
                      for i, c in enumerate(customers)]}


def orders_workflow(broker: PostgresRoleBroker, plan: dict[str, Any], *, executor: Any = None,
                    name: str = "orders") -> Workflow:
    return Workflow(name=name, tools=TOOLS, planner=ScriptedPlanner(plan), executor=executor or DirectExecutor(),
                    brokers={"postgres": broker})
