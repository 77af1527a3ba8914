"""A crash leaves no live credential: the roles of a killed worker's step are dropped by the
sweep when a runtime starts, and its run resumes with a role of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scopegraph import Runtime
from scopegraph.brokers.postgres import PostgresRoleBroker

from . import orders
from .orders import orders_plan, orders_workflow

ROOT = Path(__file__).resolve().parents[2]


def killed_holding_a_role(store_url: str, broker: PostgresRoleBroker, postgres_url: str, run_id: str,
                          tmp_path: Path) -> str:
    """Run the workflow in another process that dies inside the tool; the role it held."""
    marker = tmp_path / "role.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCOPEGRAPH_")}
    env["OTEL_SDK_DISABLED"] = "true"
    done = subprocess.run([sys.executable, "-W", "error", "-m", "tests.brokers.broker_worker", store_url,
                           postgres_url, broker.schema, broker.prefix, run_id, str(marker)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    return marker.read_text()


def role_exists(admin: psycopg.Connection[Any], role: str) -> bool:
    return admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def test_a_killed_workers_role_is_dropped_by_the_sweep_on_start_and_the_run_resumes(
        broker: PostgresRoleBroker, postgres_url: str, store_url: str, tmp_path: Path,
        admin: psycopg.Connection[Any], make_runtime: Callable[..., Runtime]) -> None:
    run_id = uuid.uuid4().hex
    role = killed_holding_a_role(store_url, broker, postgres_url, run_id, tmp_path)
    assert role.startswith(broker.prefix) and role_exists(admin, role)  # the dead process left it live
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1")), clock=None)  # starting sweeps
    assert not role_exists(admin, role)
    (record,) = rt.store.secrets_for_run(run_id)  # type: ignore[attr-defined]
    assert (record.state, record.principal) == ("revoked", role)
    assert record.revoke_reason.startswith("swept")
    swept = [r for r in rt.ledger.records(run_id) if r["kind"] == "secret_revoked"]
    assert [r["handle"] for r in swept] == [record.handle]
    # The cut-off read runs again on resume, under a new grant and a new role, dropped in turn.
    orders.HELD.clear()
    report = rt.resume(run_id)
    assert report.status == "completed", report.summary()
    (cred,) = orders.HELD
    assert cred.user != role and broker.leftovers() == []
    assert [r.state for r in rt.store.secrets_for_run(run_id)] == ["revoked", "revoked"]  # type: ignore[attr-defined]


def test_the_sweep_leaves_alone_a_step_that_is_still_running(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime], admin: psycopg.Connection[Any]) -> None:
    rt = make_runtime(orders_workflow(broker, orders_plan("c-1")))
    seen: list[str] = []

    def start_another_runtime(cred: Any) -> None:
        # Mid-step, this process alive and holding the run's lease: another runtime starts.
        other = make_runtime(orders_workflow(broker, orders_plan("c-1")))
        assert other.secrets.sweep() == 0
        seen.append(cred.user)
        assert role_exists(admin, cred.user)

    orders.ON_CONNECT.append(start_another_runtime)
    try:
        report = rt.run("report on customer c-1", initiator="alice")
    finally:
        orders.ON_CONNECT.clear()
    assert report.status == "completed", report.summary()
    assert len(seen) == 1 and not role_exists(admin, seen[0])


@pytest.mark.parametrize("where", ["record only", "role only"])
def test_the_sweep_drops_a_role_its_record_says_is_revoked(
        where: str, broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime],
        admin: psycopg.Connection[Any]) -> None:
    """A crash between the store's write and the broker's (either order) still ends with no role."""
    from scopegraph.brokers.base import StepScope
    from scopegraph.constraints import Exact
    from scopegraph.store.secrets import SecretRecord

    rt = make_runtime(orders_workflow(broker, orders_plan("c-1")))
    scope = StepScope(run_id="r1", step_id="s1", workflow="orders", tool="customer_orders", risk="read",
                      subject="spiffe://x/y", grant_id="g", expires_at=rt.clock.now() + 60,
                      constraints={"customer": Exact(value="c-1")})
    store: Any = rt.store
    store.add_secret(SecretRecord(handle="h-1", run_id="r1", step_id="s1", tool="customer_orders", workflow="orders",
                                  name="db", broker="postgres", kind="ephemeral", principal="", grant_id="g",
                                  issued_at=rt.clock.now()))
    role = broker.issue(orders.ORDERS_ROLE, scope, handle="h-1").principal
    if where == "role only":  # the process died after the role was made, before the store heard of it
        pass
    else:  # the record was revoked, but dropping the role failed
        store.mark_secret_issued("h-1", principal=role, expires_at=None)
        store.revoke_secret("h-1", reason="step ended", at=rt.clock.now())
    assert role_exists(admin, role)
    assert rt.secrets.sweep() >= 1
    assert not role_exists(admin, role) and store.get_secret("h-1").state == "revoked"


def test_the_sweep_leaves_another_workflows_credentials_to_that_workflows_runtimes(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    """Another workflow's broker of the same name may be another server: only its own runtimes sweep it."""
    from scopegraph.store.secrets import SecretRecord

    rt = make_runtime(orders_workflow(broker, orders_plan("c-1")))
    store: Any = rt.store
    store.add_secret(SecretRecord(handle="h-other", run_id="r9", step_id="s1", tool="customer_orders",
                                  workflow="someone-else", name="db", broker="postgres", kind="ephemeral",
                                  principal="", grant_id="g", issued_at=rt.clock.now()))
    assert rt.secrets.sweep() == 0 and store.get_secret("h-other").state == "issuing"
    theirs = make_runtime(orders_workflow(broker, orders_plan("c-1"), name="someone-else"))  # sweeps on start
    assert theirs.store.get_secret("h-other").state == "revoked"  # type: ignore[attr-defined]
