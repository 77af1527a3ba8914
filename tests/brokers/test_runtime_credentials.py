"""Per-step PostgreSQL roles in real runs: issued after an allowed call, used by the tool alone,
dropped when the step ends whatever its outcome, recorded by handle, never by secret."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from scopegraph import Runtime, Workflow
from scopegraph.agents import DirectExecutor
from scopegraph.brokers.postgres import PostgresCredential, PostgresRoleBroker
from scopegraph.credentials import Grant
from scopegraph.trace_view import build_trace, render_trace
from tests.helpers import mint_grant
from tests.otel_capture import Capture, by_name, otel

from . import orders
from .orders import HELD, orders_plan, orders_workflow

__all__ = ["otel"]


@pytest.fixture(autouse=True)
def _fresh_hooks() -> Iterator[None]:
    HELD.clear()
    orders.ON_CONNECT.clear()
    yield
    HELD.clear()
    orders.ON_CONNECT.clear()


def result(rt: Runtime, run_id: str, step_id: str) -> Any:
    return rt.graph.get_state(rt._config(run_id)).values["steps"][step_id].get("result")


def ledger(rt: Runtime, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in rt.ledger.records(run_id) if r["kind"] == kind]


def password(cred: PostgresCredential) -> str:
    return cred.scrub_values()[0]


def assert_nowhere(rt: Runtime, secret: str) -> None:
    """The secret is in no ledger record and no store record."""
    assert all(secret not in row.data for row in rt.store.ledger_rows())
    for run in rt.store.list_runs():
        assert all(secret not in json.dumps(r.__dict__) for r in rt.store.secrets_for_run(run.run_id))  # type: ignore[attr-defined]


def test_a_step_reads_its_customers_rows_through_a_role_made_for_it_and_dropped_after(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime], admin: psycopg.Connection[Any]) -> None:
    workflow = orders_workflow(broker, orders_plan("c-1"))
    # The credential is no argument: neither the planner's catalogue nor the executor's schema names it.
    assert set(workflow.registry.catalogue_entry("customer_orders")["arguments"]["properties"]) == {"customer"}
    rt = make_runtime(workflow)
    report = rt.run("report on customer c-1", initiator="alice")
    assert report.status == "completed", report.summary()
    assert result(rt, report.run_id, "orders0") == [{"id": 1, "customer": "c-1", "amount": 100},
                                                   {"id": 2, "customer": "c-1", "amount": 250}]
    (cred,) = HELD
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        cred.connect()  # the step is over: its role is gone
    assert broker.leftovers() == []
    (record,) = rt.store.secrets_for_run(report.run_id)  # type: ignore[attr-defined]
    assert (record.state, record.principal, record.kind, record.broker, record.uses, record.revoke_reason) == (
        "revoked", cred.user, "ephemeral", "postgres", 1, "step ended")
    (issued,) = ledger(rt, report.run_id, "secret_issued")
    (revoked,) = ledger(rt, report.run_id, "secret_revoked")
    assert issued["handle"] == revoked["handle"] == record.handle == cred.handle
    assert (issued["principal"], issued["secret_kind"], issued["step_id"]) == (cred.user, "ephemeral", "orders0")
    assert issued["granted"]["rows"] == {"orders": {"customer_id": ["c-1"]}}
    assert issued["grant_id"] == report.steps[0].grant_id
    assert_nowhere(rt, password(cred))
    # The trace shows the credential under its step's grant, by handle and role.
    text = render_trace(build_trace(rt.store, report.run_id))
    assert f"credential db issued  ephemeral (postgres)  {cred.user}  [{record.handle}]" in text
    assert f"credential revoked  {cred.user}  [{record.handle}]: step ended" in text
    assert password(cred) not in text


def test_concurrent_steps_get_distinct_roles_each_seeing_its_own_customer(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1", "c-2", "c-3")))
    report = rt.run("report on three customers", initiator="alice")
    assert report.status == "completed", report.summary()
    for i, customer in enumerate(["c-1", "c-2", "c-3"]):
        assert {row["customer"] for row in result(rt, report.run_id, f"orders{i}")} == {customer}
    principals = [r["principal"] for r in ledger(rt, report.run_id, "secret_issued")]
    assert len(principals) == 3 and len(set(principals)) == 3
    assert broker.leftovers() == []


def test_a_compromised_executor_is_refused_by_the_gateway_and_by_postgresql_itself(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    # Asking for another customer outright: the gateway denies it (the plan pinned c-1).
    bold = DirectExecutor(builders={"customer_orders": lambda ctx: {"customer": "c-2"}})
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1"), executor=bold, name="bold"))
    report = rt.run("report on customer c-1", initiator="alice")
    assert report.status == "denied" and report.steps[0].policy_ids == ["scopegraph:scope"]
    assert HELD == [] and rt.store.secrets_for_run(report.run_id) == []  # type: ignore[attr-defined]
    # Passing a credential of its own: not an argument the tool takes.
    forger = DirectExecutor(builders={"customer_orders": lambda ctx: {"db": "host=evil user=postgres"}})
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1"), executor=forger, name="forger"))
    report = rt.run("report on customer c-1", initiator="alice")
    assert report.status == "denied" and "db: Extra inputs are not permitted" in report.steps[0].reason
    assert HELD == []
    # Through an argument the plan left open, SQL that asks for every customer: the gateway
    # allows the call (any note), and PostgreSQL's row-level security returns c-1's rows only.
    sly = DirectExecutor(builders={"search_orders": lambda ctx: {"note": "%' OR customer_id <> 'c-1' OR '' = '"}})
    plan = orders_plan("c-1", tool_name="search_orders", note={"kind": "any"})
    rt = make_runtime(orders_workflow(broker, plan, executor=sly, name="sly"))
    report = rt.run("search customer c-1's orders", initiator="alice")
    assert report.status == "completed", report.summary()
    assert result(rt, report.run_id, "orders0") == [[1, "c-1", 100], [2, "c-1", 250]]
    # ... and a table the role was never granted is refused by PostgreSQL, not only hidden.
    greedy = DirectExecutor(builders={"search_orders": lambda ctx: {
        "note": "%' UNION SELECT 0, customer_id, 0 FROM cards --"}})
    rt = make_runtime(orders_workflow(broker, plan, executor=greedy, name="greedy"))
    report = rt.run("search customer c-1's orders", initiator="alice")
    assert report.status == "failed" and "permission denied for table cards" in report.steps[0].reason
    assert broker.leftovers() == []


def test_the_role_is_dropped_whatever_the_outcome_and_its_secret_is_scrubbed_from_the_error(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1", tool_name="leaky_orders")))
    report = rt.run("report on customer c-1", initiator="alice")
    assert report.status == "failed"
    (cred,) = HELD
    reason = report.steps[0].reason
    assert "RuntimeError" in reason and "[secret:db]" in reason and password(cred) not in reason
    assert password(cred) not in report.model_dump_json() and password(cred) not in report.summary()
    (call,) = ledger(rt, report.run_id, "tool_call")
    assert "[secret:db]" in call["error"]
    assert_nowhere(rt, password(cred))
    assert broker.leftovers() == [] and ledger(rt, report.run_id, "secret_revoked")


def test_a_role_wider_than_the_steps_constraints_is_refused_and_nothing_is_made(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "orders", "tool": "customer_orders", "purpose": "read orders",
                       "constraints": {"customer": {"kind": "pattern", "regex": "c-[0-9]+"}}}]}
    executor = DirectExecutor(builders={"customer_orders": lambda ctx: {"customer": "c-1"}})
    rt = make_runtime(orders_workflow(broker, plan, executor=executor))
    report = rt.run("report on customer c-1", initiator="alice")
    assert report.status == "failed", report.summary()
    assert "SecretRefusedError" in report.steps[0].reason and "leaves open" in report.steps[0].reason
    assert HELD == [] and broker.leftovers() == []
    (refused,) = ledger(rt, report.run_id, "secret_refused")
    assert refused["refused"] is True and refused["name"] == "db"
    (record,) = rt.store.secrets_for_run(report.run_id)  # type: ignore[attr-defined]
    assert (record.state, record.revoke_reason, record.principal) == ("revoked", "not issued", "")


def test_run_end_revokes_a_credential_its_step_still_held(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1")))
    grant: Grant
    grant, _ = mint_grant(rt, "customer_orders", constraints={"customer": {"kind": "exact", "value": "c-1"}},
                          run_id="run-x", step_id="orders0")
    creds = rt.secrets.credentials_for(rt.workflow.registry["customer_orders"], grant)
    cred = creds["db"]
    assert isinstance(cred, PostgresCredential)
    with cred.connect() as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (2,)
    # A second call of the same step reuses the role and counts a use.
    assert rt.secrets.credentials_for(rt.workflow.registry["customer_orders"], grant)["db"] is cred
    assert rt.store.secrets_for_run("run-x")[0].uses == 2  # type: ignore[attr-defined]
    rt.revoke_run("run-x", reason="run failed")
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        cred.connect()
    assert rt.store.secrets_for_run("run-x")[0].revoke_reason == "run failed"  # type: ignore[attr-defined]


def test_issue_and_revoke_are_spans_carrying_handles_never_secrets(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime], otel: Capture) -> None:
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1")))
    report = rt.run("report on customer c-1", initiator="alice")
    assert report.status == "completed"
    spans = otel.spans()
    (issue,) = by_name(spans, "scopegraph.secret.issue")
    (revoke,) = by_name(spans, "scopegraph.secret.revoke")
    (cred,) = HELD
    assert issue.attributes["scopegraph.secret.handle"] == revoke.attributes["scopegraph.secret.handle"] == cred.handle
    assert issue.attributes["scopegraph.secret.principal"] == cred.user
    assert issue.attributes["scopegraph.secret.kind"] == "ephemeral"
    (call,) = by_name(spans, "scopegraph.tool.call")
    assert issue.parent is not None and issue.parent.span_id == call.context.span_id
    for s in spans:
        text = json.dumps({k: str(v) for k, v in (s.attributes or {}).items()}) + "".join(
            json.dumps({k: str(v) for k, v in (e.attributes or {}).items()}) for e in s.events)
        assert password(cred) not in text
    issued = otel.totals("scopegraph.secrets.issued", "broker", "kind")
    assert issued == {("postgres", "ephemeral"): 1}


def test_a_tool_naming_a_broker_the_workflow_lacks_is_refused_at_start(
        make_runtime: Callable[..., Runtime], make_workflow: Callable[..., Workflow]) -> None:
    from scopegraph.errors import ConfigError

    workflow = make_workflow(orders_plan("c-1"), tools=orders.TOOLS)
    with pytest.raises(ConfigError, match="needs broker 'postgres' for 'db'"):
        make_runtime(workflow)
