"""PostgreSQL dynamic roles, against the real server: one role per step, its rows and nothing else.

Every test makes its tables in its own schema and its roles under a prefix of its own
(roles are global to the server, and other tests run beside these).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from scopegraph.brokers.base import StepScope
from scopegraph.brokers.postgres import PostgresCredential, PostgresRoleBroker, postgres_role
from scopegraph.constraints import AnyValue, Exact, OneOf, Prefix
from scopegraph.errors import SecretError, SecretRefusedError, ToolError
from tests.contract.test_store_contract import race

EXPIRES = 1_800_000_060.0
ORDERS = postgres_role("db", select={"orders": ["id", "customer_id", "amount"]},
                       rows={"orders": {"customer_id": "customer"}})


def scope(step: str = "s1", *, run: str = "run-1", risk: str = "read", **constraints: Any) -> StepScope:
    return StepScope(run_id=run, step_id=step, workflow="wf", tool="report", risk=risk,
                     subject=f"spiffe://t.local/wf/wf/run/{run}/step/{step}/executor", grant_id=f"g-{step}",
                     expires_at=EXPIRES, constraints=constraints or {"customer": Exact(value="c-1")})


def rows(cred: PostgresCredential, query: str = "SELECT id, customer_id, amount FROM orders ORDER BY id") -> list[Any]:
    with cred.connect() as conn:
        return conn.execute(query).fetchall()


def roles(admin: psycopg.Connection[Any], prefix: str) -> list[str]:
    return [r[0] for r in admin.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)",
                                        (prefix,)).fetchall()]


def test_the_role_reads_the_rows_its_step_is_scoped_to_and_nothing_else(
        broker: PostgresRoleBroker, admin: psycopg.Connection[Any]) -> None:
    issued = broker.issue(ORDERS, scope(), handle="h-1")
    cred = issued.credential
    assert isinstance(cred, PostgresCredential) and issued.principal == cred.user
    assert cred.user.startswith(broker.prefix + "run1_s1_")
    assert rows(cred) == [(1, "c-1", 100), (2, "c-1", 250)]
    # Asking for another customer's rows outright is answered by PostgreSQL: there are none to see.
    assert rows(cred, "SELECT id FROM orders WHERE customer_id = 'c-2' OR true") == [(1,), (2,)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        rows(cred, "SELECT card FROM orders")  # a column not granted
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        rows(cred, "SELECT * FROM cards")  # a table not granted
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        rows(cred, "UPDATE orders SET amount = 0")
    valid, login, inherit, super_, bypass = admin.execute(
        "SELECT extract(epoch FROM rolvaliduntil), rolcanlogin, rolinherit, rolsuper, rolbypassrls FROM pg_roles "
        "WHERE rolname = %s", (cred.user,)).fetchone()
    assert (float(valid), login, inherit, super_, bypass) == (EXPIRES, True, False, False, False)
    # The server holds a SCRAM verifier, never the password itself.
    stored = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (cred.user,)).fetchone()[0]
    assert stored.startswith("SCRAM-SHA-256$") and cred.scrub_values()[0] not in stored
    assert cred.scrub_values()[0] not in repr(cred) and "redacted" in str(cred)


def test_one_of_lets_the_role_see_each_pinned_value(broker: PostgresRoleBroker) -> None:
    cred = broker.issue(ORDERS, scope(customer=OneOf(values=("c-1", "c-3"))), handle="h-1").credential
    assert isinstance(cred, PostgresCredential)
    assert [r[1] for r in rows(cred)] == ["c-1", "c-1", "c-3"]


def test_after_revocation_the_credential_no_longer_connects_and_its_sessions_are_ended(
        broker: PostgresRoleBroker, admin: psycopg.Connection[Any], postgres_schema: str) -> None:
    cred = broker.issue(ORDERS, scope(), handle="h-1").credential
    assert isinstance(cred, PostgresCredential)
    session = cred.connect(autocommit=True)
    assert session.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    broker.revoke("h-1", cred.user)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT count(*) FROM orders")  # terminated by the broker
    session.close()
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        cred.connect()
    assert roles(admin, broker.prefix) == []
    policies = admin.execute("SELECT count(*) FROM pg_policies WHERE schemaname = %s", (postgres_schema,))
    assert policies.fetchone() == (0,)
    broker.revoke("h-1", cred.user)  # idempotent


def test_concurrent_steps_get_distinct_roles_each_with_its_own_rows(
        broker: PostgresRoleBroker, admin: psycopg.Connection[Any]) -> None:
    customers = ["c-1", "c-2", "c-3", "c-1"]
    issued = race(4, lambda i: broker.issue(ORDERS, scope(f"s{i}", customer=Exact(value=customers[i])),
                                            handle=f"h-{i}"))
    names = [i.principal for i in issued]
    assert len(set(names)) == 4 and sorted(roles(admin, broker.prefix)) == sorted(names)
    for i, got in enumerate(issued):
        assert isinstance(got.credential, PostgresCredential)
        assert {r[1] for r in rows(got.credential)} == {customers[i]}
    race(4, lambda i: broker.revoke(f"h-{i}", names[i]))
    assert roles(admin, broker.prefix) == []


@pytest.mark.parametrize("constraint", [AnyValue(), Prefix(prefix="c-")], ids=["any", "prefix"])
def test_rows_bound_to_an_argument_the_step_leaves_open_are_refused(
        broker: PostgresRoleBroker, admin: psycopg.Connection[Any], constraint: Any) -> None:
    with pytest.raises(SecretRefusedError, match="argument 'customer', which the step leaves open"):
        broker.issue(ORDERS, scope(customer=constraint), handle="h-1")
    with pytest.raises(SecretRefusedError, match="leaves open"):  # not constrained at all
        broker.issue(ORDERS, scope(other=Exact(value="x")), handle="h-2")
    assert roles(admin, broker.prefix) == []  # nothing was made


def test_write_privileges_for_a_read_step_and_rows_without_row_security_are_refused(
        broker: PostgresRoleBroker, admin: psycopg.Connection[Any]) -> None:
    writes = postgres_role("db", update={"orders": ["amount"]}, rows={"orders": {"customer_id": "customer"}})
    with pytest.raises(SecretRefusedError, match="read tool"):
        broker.issue(writes, scope(risk="read"), handle="h-1")
    loose = postgres_role("db", select={"notes": ["id", "body"]}, rows={"notes": {"id": "customer"}})
    with pytest.raises(SecretRefusedError, match="no row-level security"):
        broker.issue(loose, scope(), handle="h-2")
    with pytest.raises(SecretError, match="no column 'nope'"):
        broker.issue(postgres_role("db", select={"orders": ["nope"]}), scope(), handle="h-3")
    assert roles(admin, broker.prefix) == []
    # A write step may update its own rows, and only those.
    cred = broker.issue(postgres_role("db", select={"orders": ["id", "customer_id", "amount"]},
                                      update={"orders": ["amount"]}, rows={"orders": {"customer_id": "customer"}}),
                        scope(risk="write"), handle="h-4").credential
    assert isinstance(cred, PostgresCredential)
    with cred.connect(autocommit=True) as conn:
        assert conn.execute("UPDATE orders SET amount = 1").rowcount == 2
    assert admin.execute("SELECT sum(amount) FROM orders WHERE customer_id <> 'c-1'").fetchone() == (1006,)


def test_a_table_without_row_security_and_no_binding_is_granted_by_column(broker: PostgresRoleBroker) -> None:
    cred = broker.issue(postgres_role("db", select={"notes": ["body"]}), scope(), handle="h-1").credential
    assert isinstance(cred, PostgresCredential)
    assert rows(cred, "SELECT body FROM notes") == [("hello",)]


def test_another_broker_object_finds_the_roles_by_prefix_and_drops_only_its_own(
        broker: PostgresRoleBroker, postgres_url: str, postgres_schema: str, admin: psycopg.Connection[Any]) -> None:
    role = broker.issue(ORDERS, scope(), handle="h-1").principal
    later = PostgresRoleBroker(postgres_url, schema=postgres_schema, prefix=broker.prefix)  # another process
    assert later.leftovers() == [("h-1", role)]
    with pytest.raises(SecretError, match="not made for handle"):
        later.revoke("h-other", role)
    with pytest.raises(SecretError, match="not one of this broker's roles"):
        later.revoke("h-1", "postgres")
    later.revoke("h-1", role)
    assert later.leftovers() == [] and roles(admin, broker.prefix) == []


def test_declarations_that_cannot_work_are_refused_when_the_tool_is_declared() -> None:
    spec = postgres_role("db", select={"orders": ["id"]}, rows={"orders": {"customer_id": "customer"}})
    with pytest.raises(ToolError, match="not one of its arguments"):
        spec.check_tool("t", ["other"], "read")
    with pytest.raises(ToolError, match="grants nothing"):
        postgres_role("db").check_tool("t", [], "read")
    with pytest.raises(ToolError, match="may not insert"):
        postgres_role("db", delete=["orders"]).check_tool("t", [], "read")
    with pytest.raises(ToolError, match="invalid table name"):
        postgres_role("db", select={"a.b.c": ["id"]}).check_tool("t", [], "read")
    with pytest.raises(ToolError, match="invalid column name"):
        postgres_role("db", select={"orders": ["id; DROP TABLE x"]}).check_tool("t", [], "read")
    with pytest.raises(ToolError, match="not one string"):
        postgres_role("db", select={"orders": "id"})
