"""A customer report read through a per-step PostgreSQL role: PostgreSQL itself keeps the rows apart.

Run it from the repository root (PostgreSQL on 127.0.0.1:5432, or set
``SCOPEGRAPH_EXAMPLE_POSTGRES`` to a URL of a role that may create schemas and roles):

    .venv/bin/python examples/customer_report.py [STORE_URL]

The report's step is pinned to customer c-1. For that step a broker creates a login role
that may read three columns of ``orders``, and a row-level-security policy shows it only
c-1's rows; the tool connects as that role, and the role is dropped when the step ends.
Then a compromised executor tries three ways to read customer c-2's orders:

1. ask for c-2 outright: the gateway denies the call (the plan pinned c-1);
2. smuggle SQL through the free-text ``note`` argument the plan left open: the gateway
   allows the call, the tool pastes the text into its query, and PostgreSQL still
   returns c-1's rows only;
3. smuggle a query of the ``cards`` table: PostgreSQL refuses it, permission denied.

The example makes its tables in a schema of its own and drops it (and any role) at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.brokers.postgres import PostgresCredential, PostgresRoleBroker, postgres_role

POSTGRES = os.environ.get("SCOPEGRAPH_EXAMPLE_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

# The step's role may read these columns of `orders`, and only rows of the customer its plan pinned.
ORDERS = postgres_role("db", select={"orders": ["id", "customer_id", "amount", "note"]},
                       rows={"orders": {"customer_id": "customer"}})


@tool(risk="read", labels=["confidential"], secrets=[ORDERS])
def customer_orders(customer: str, note: str, db: PostgresCredential) -> list[dict[str, Any]]:
    """A customer's orders whose note matches a pattern.

    Written carelessly on purpose: it pastes its arguments into the SQL text.
    """
    query = (f"SELECT id, customer_id, amount FROM orders "
             f"WHERE customer_id = '{customer}' AND note LIKE '{note}' ORDER BY id")
    with db.connect() as conn:
        rows = conn.execute(query).fetchall()  # type: ignore[call-overload]
    return [{"id": r[0], "customer": r[1], "amount": r[2]} for r in rows]


PLAN = {"steps": [
    {"id": "orders", "tool": "customer_orders", "purpose": "list customer c-1's orders for the report",
     "constraints": {"customer": {"kind": "exact", "value": "c-1"}, "note": {"kind": "any"}}},
]}


def workflow(name: str, broker: PostgresRoleBroker, **arguments: str) -> Workflow:
    """The report; ``arguments`` are what the (honest or compromised) executor passes."""
    executor = DirectExecutor(builders={"customer_orders": lambda ctx: {"note": "%", **arguments}})
    return Workflow(name=name, tools=[customer_orders], planner=ScriptedPlanner(PLAN), executor=executor,
                    brokers={"postgres": broker})


def make_tables(conn: psycopg.Connection[Any], schema: str) -> None:
    s = sql.Identifier(schema)
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
    conn.execute(sql.SQL("CREATE TABLE {}.orders (id int PRIMARY KEY, customer_id text NOT NULL, "
                         "amount int NOT NULL, note text NOT NULL)").format(s))
    conn.execute(sql.SQL("ALTER TABLE {}.orders ENABLE ROW LEVEL SECURITY").format(s))  # policies decide rows
    conn.execute(sql.SQL("CREATE TABLE {}.cards (customer_id text, number text)").format(s))
    conn.execute(sql.SQL("INSERT INTO {}.orders VALUES (1, 'c-1', 120, 'rail'), (2, 'c-1', 80, 'hotel'), "
                         "(3, 'c-2', 990, 'rail'), (4, 'c-2', 15, 'taxi')").format(s))
    conn.execute(sql.SQL("INSERT INTO {}.cards VALUES ('c-1', '4111 1111'), ('c-2', '5500 0000')").format(s))


def run(store: str, broker: PostgresRoleBroker, name: str, **arguments: str) -> Any:
    with Runtime(workflow(name, broker, **arguments), store=store) as rt:
        report = rt.run("Report on customer c-1's orders", initiator="alice")
        state = rt.graph.get_state({"configurable": {"thread_id": report.run_id}}).values
        issued = [r["principal"] for r in rt.ledger.records(report.run_id) if r["kind"] == "secret_issued"]
        print(f"{name}: {report.status}; roles issued {issued or 'none'}; "
              f"{report.steps[0].reason or 'rows: ' + str(state['steps']['orders'].get('result'))}")
        return report, state["steps"]["orders"].get("result")


def main(store: str) -> int:
    run_tag = uuid.uuid4().hex[:8]  # roles are global to the server: this run's carry a prefix of its own
    schema = f"sg_example_{run_tag}"
    broker = PostgresRoleBroker(POSTGRES, schema=schema, prefix=f"sgx{run_tag}_")
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        make_tables(admin, schema)
        try:
            report, rows = run(store, broker, "customer-report")
            assert report.status == "completed" and {r["customer"] for r in rows} == {"c-1"}, rows

            # 1. Another customer outright: the gateway refuses before any role exists.
            report, _ = run(store, broker, "compromised-ask", customer="c-2")
            assert report.status == "denied" and report.steps[0].policy_ids == ["scopegraph:scope"]

            # 2. SQL smuggled through the open argument: allowed by the gateway, confined by PostgreSQL.
            report, rows = run(store, broker, "compromised-inject", note="%' OR customer_id <> 'c-1' OR '' = '")
            assert report.status == "completed" and {r["customer"] for r in rows} == {"c-1"}, rows

            # 3. Another table: PostgreSQL refuses the query itself.
            report, _ = run(store, broker, "compromised-cards",
                            note="%' UNION SELECT 0, number, 0 FROM cards --")
            assert report.status == "failed" and "permission denied for table cards" in report.steps[0].reason

            assert broker.leftovers() == []  # every step's role was dropped when the step ended
            print("every role was dropped when its step ended; PostgreSQL kept c-2's rows out of every step")
        finally:
            for handle, role in broker.leftovers():  # only if something above failed half-way
                broker.revoke(handle, role)
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
    return 0


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else f"sqlite:///{Path(tempfile.mkdtemp()) / 'customer_report.db'}"
    sys.exit(main(url))
