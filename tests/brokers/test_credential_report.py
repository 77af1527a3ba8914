"""The least privilege report lists each tool's credentials, ephemeral or static, issued and used,
and proposes moving static ones behind a broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.brokers.postgres import PostgresRoleBroker
from scopegraph.brokers.static import EnvSecretSource
from scopegraph.usage_report import build_report, render_report

from . import orders
from .test_static_secrets import API_KEY, billing_total


@tool(risk="read", roles={"token": "secret"})
def legacy_api(customer: str, token: str) -> dict[str, Any]:
    """A tool whose executor must hand it the API token."""
    return {"customer": customer}


@pytest.fixture(autouse=True)
def _fresh() -> None:
    orders.HELD.clear()


def test_the_report_counts_ephemeral_and_static_credentials_per_tool_and_proposes_brokers(
        broker: PostgresRoleBroker, make_runtime: Callable[..., Runtime]) -> None:
    steps = [{"id": f"o{i}", "tool": "customer_orders", "purpose": "orders",
              "constraints": {"customer": {"kind": "exact", "value": c}}} for i, c in enumerate(["c-1", "c-2"])]
    steps += [{"id": "open", "tool": "customer_orders", "purpose": "orders of anyone",
               "constraints": {"customer": {"kind": "any"}}},
              {"id": "bill", "tool": "billing_total", "purpose": "total",
               "constraints": {"customer": {"kind": "exact", "value": "c-1"}}},
              {"id": "legacy", "tool": "legacy_api", "purpose": "legacy",
               "constraints": {"customer": {"kind": "exact", "value": "c-1"}, "token": {"kind": "any"}}}]
    # The open step's executor picks c-3: the gateway allows it, the broker refuses a role for it.
    executor = DirectExecutor(builders={"customer_orders": lambda ctx: {"customer": "c-3"} if ctx.step.id == "open"
                                        else {}, "legacy_api": lambda ctx: {"token": "t0k"}})
    workflow = Workflow(name="reports", tools=[*orders.TOOLS, billing_total, legacy_api],
                        planner=ScriptedPlanner({"steps": steps}), executor=executor, on_denial="continue",
                        brokers={"postgres": broker,
                                 "env": EnvSecretSource(environ={"SCOPEGRAPH_SECRET_BILLING": API_KEY})})
    rt = make_runtime(workflow)
    rt.run("reports", initiator="alice")
    report = build_report(rt.store, workflows=[workflow])
    (wf,) = report["workflows"]
    section = wf["credentials"]
    by_tool = {t["tool"]: t for t in section["tools"]}
    (db,) = by_tool["customer_orders"]["credentials"]
    assert (db["kind"], db["broker"], db["issued"], db["used"], db["revoked"], db["refused"], db["live"]) == (
        "ephemeral", "postgres", 2, 2, 2, 1, 0)
    (key,) = by_tool["billing_total"]["credentials"]
    assert (key["kind"], key["broker"], key["issued"], key["used"], key["sources"]) == (
        "static", "env", 1, 1, ["env:SCOPEGRAPH_SECRET_BILLING"])
    assert by_tool["legacy_api"]["secret_arguments"] == ["token"]
    (never,) = by_tool["search_orders"]["credentials"]  # declared, not used in these runs
    assert (never["issued"], never["runs"], never["kind"]) == (0, 0, "ephemeral")
    kinds = {(p["kind"], p["tool"], p["credential"]) for p in section["proposals"]}
    assert kinds == {("move_static_behind_broker", "billing_total", "api_key"),
                     ("secret_argument_to_broker", "legacy_api", "token")}
    text = render_report(report)
    assert "downstream credentials for reports:" in text
    assert "credential 'db'  ephemeral (postgres)  issued 2  used 2  revoked 2  refused 1" in text
    assert "credential 'api_key'  static (env)  issued 1  used 1" in text
    assert "move billing_total's static secret 'api_key' behind a broker" in text
    assert API_KEY not in text and API_KEY not in str(report)


def test_a_workflow_without_credentials_reports_none(make_runtime: Callable[..., Runtime],
                                                    make_workflow: Callable[..., Workflow]) -> None:
    rt = make_runtime(make_workflow())
    rt.run("read", initiator="alice")
    (wf,) = build_report(rt.store)["workflows"]
    assert wf["credentials"]["tools"] == [] and wf["credentials"]["proposals"] == []
    assert "downstream credentials" not in render_report(build_report(rt.store))
