"""Static secrets, contained: from the environment or a private directory, into the declaring
tool only, scrubbed from errors, spans and the ledger; and how tools declare credentials."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.brokers.base import StepScope
from scopegraph.brokers.postgres import postgres_role
from scopegraph.brokers.service import RecordOnlyBroker
from scopegraph.brokers.static import EnvSecretSource, FileSecretSource, StaticSecret, static_secret
from scopegraph.errors import ConfigError, SecretError, ToolError
from tests.otel_capture import Capture, otel

__all__ = ["otel"]

API_KEY = "sk-live-5f1c9a7e"  # what the billing API key is, in these tests
SEEN: dict[str, list[Any]] = {}


@tool(risk="read", secrets=[static_secret("api_key", name="billing")])
def billing_total(customer: str, api_key: StaticSecret) -> dict[str, Any]:
    """The billing API's total for one customer."""
    SEEN.setdefault("billing_total", []).append(api_key)
    if customer == "boom":
        raise RuntimeError(f"billing refused key {api_key.danger_value()!r} for {customer}")
    return {"customer": customer, "total": 42, "authorized": api_key.danger_value() == API_KEY}


def workflow(customer: str, environ: dict[str, str]) -> Workflow:
    plan = {"steps": [{"id": "total", "tool": "billing_total", "purpose": "total for a customer",
                       "constraints": {"customer": {"kind": "exact", "value": customer}}},
                      {"id": "look", "tool": "lookup", "purpose": "look up",
                       "constraints": {"key": {"kind": "exact", "value": customer}}}]}

    @tool(risk="read")
    def lookup(key: str) -> dict[str, Any]:
        """A tool that declares no secret."""
        return {"key": key}

    return Workflow(name="billing", tools=[billing_total, lookup], planner=ScriptedPlanner(plan),
                    executor=DirectExecutor(), brokers={"env": EnvSecretSource(environ=environ)})


@pytest.fixture(autouse=True)
def _fresh() -> None:
    SEEN.clear()


def test_the_declaring_tool_gets_the_static_secret_and_no_one_else_sees_it(
        make_runtime: Callable[..., Runtime]) -> None:
    wf = workflow("c-1", {"SCOPEGRAPH_SECRET_BILLING": API_KEY})
    assert "api_key" not in json.dumps(wf.registry.catalogue())  # not an argument: no model sees it
    assert wf.registry["lookup"].credentials == ()
    rt = make_runtime(wf)
    report = rt.run("total for c-1", initiator="alice")
    assert report.status == "completed", report.summary()
    (cred,) = SEEN["billing_total"]
    assert API_KEY not in repr(cred) and API_KEY not in str(cred)
    (issued,) = [r for r in rt.ledger.records(report.run_id) if r["kind"] == "secret_issued"]
    assert (issued["secret_kind"], issued["principal"], issued["broker"]) == (
        "static", "env:SCOPEGRAPH_SECRET_BILLING", "env")
    (record,) = rt.store.secrets_for_run(report.run_id)  # type: ignore[attr-defined]
    assert (record.kind, record.state, record.uses, record.tool) == ("static", "revoked", 1, "billing_total")
    assert all(API_KEY not in row.data for row in rt.store.ledger_rows())


def test_a_static_secret_is_scrubbed_from_the_tools_error_in_records_spans_and_the_ledger(
        make_runtime: Callable[..., Runtime], otel: Capture) -> None:
    rt = make_runtime(workflow("boom", {"SCOPEGRAPH_SECRET_BILLING": API_KEY}))
    report = rt.run("total for boom", initiator="alice")
    assert report.status == "failed"
    reason = report.steps[0].reason
    assert "[secret:api_key]" in reason and API_KEY not in reason
    assert API_KEY not in report.model_dump_json() and API_KEY not in report.summary()
    assert all(API_KEY not in row.data for row in rt.store.ledger_rows())
    for s in otel.spans():
        dumped = json.dumps({k: str(v) for k, v in (s.attributes or {}).items()})
        dumped += "".join(json.dumps({k: str(v) for k, v in (e.attributes or {}).items()}) for e in s.events)
        assert API_KEY not in dumped and (s.status.description or "").find(API_KEY) < 0
    assert any("[secret:api_key]" in str(e.attributes) for s in otel.spans() for e in s.events)


def test_a_missing_static_secret_fails_the_call_naming_the_variable(make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(workflow("c-1", {}))
    report = rt.run("total for c-1", initiator="alice")
    assert report.status == "failed" and "export SCOPEGRAPH_SECRET_BILLING" in report.steps[0].reason
    assert SEEN == {}


def scope() -> StepScope:
    return StepScope(run_id="r", step_id="s", workflow="w", tool="t", risk="read", subject="spiffe://x/y",
                     grant_id="g", expires_at=0.0)


def test_a_file_source_reads_a_private_directory_and_refuses_one_others_can_read(tmp_path: Path) -> None:
    directory = tmp_path / "secrets"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)
    (directory / "billing").write_text(API_KEY + "\n")
    os.chmod(directory / "billing", 0o600)
    source = FileSecretSource(directory)
    issued = source.issue(static_secret("api_key", name="billing", source="files"), scope(), handle="h")
    assert isinstance(issued.credential, StaticSecret) and issued.credential.danger_value() == API_KEY
    assert issued.principal == f"file:{directory / 'billing'}"
    with pytest.raises(SecretError, match="is not in"):
        source.issue(static_secret("x", name="missing"), scope(), handle="h")
    os.chmod(directory / "billing", 0o644)
    with pytest.raises(SecretError, match="readable by others"):
        source.issue(static_secret("api_key", name="billing"), scope(), handle="h")
    os.chmod(directory / "billing", 0o600)
    os.chmod(directory, 0o755)
    with pytest.raises(SecretError, match="readable by others"):
        source.issue(static_secret("api_key", name="billing"), scope(), handle="h")
    os.chmod(directory, 0o700)
    (directory / "link").symlink_to(directory / "billing")
    with pytest.raises(SecretError, match="symlink"):
        source.issue(static_secret("api_key", name="link"), scope(), handle="h")


def test_credentials_are_declared_on_parameters_outside_the_argument_schema() -> None:
    with pytest.raises(ToolError, match="declares credential 'db', which is not one of its parameters"):
        @tool(secrets=[postgres_role("db", select={"t": ["a"]})])
        def no_param(customer: str) -> None: ...
    with pytest.raises(ToolError, match="twice"):
        @tool(secrets=[static_secret("key"), static_secret("key", name="other")])
        def twice(key: str) -> None: ...
    with pytest.raises(ToolError, match="is a list of declarations"):
        @tool(secrets=static_secret("key"))  # type: ignore[arg-type]
        def not_a_list(key: str) -> None: ...
    with pytest.raises(ToolError, match="not a credential declaration"):
        @tool(secrets=["key"])  # type: ignore[list-item]
        def a_string(key: str) -> None: ...
    with pytest.raises(ToolError, match="may not insert"):
        @tool(risk="read", secrets=[postgres_role("db", insert={"t": ["a"]})])
        def reads(db: Any) -> None: ...
    with pytest.raises(ToolError, match="role 'secret' for 'db', which is not one of its arguments"):
        @tool(secrets=[static_secret("db")], roles={"db": "secret"})
        def both(db: Any) -> None: ...

    @tool(risk="write", secrets=[postgres_role("db", insert={"t": ["a"]})])
    def writes(a: int, db: Any) -> None:
        """Writes."""
    assert writes.argument_names() == ["a"] and writes.credentials[0].param == "db"


def test_a_workflows_brokers_are_checked(make_runtime: Callable[..., Runtime]) -> None:
    with pytest.raises(ConfigError, match="has no accepts/issue/revoke/leftovers"):
        Workflow(name="w", tools=[billing_total], planner=ScriptedPlanner({"steps": []}),
                 executor=DirectExecutor(), brokers={"env": object()})  # type: ignore[dict-item]
    wrong = Workflow(name="w", tools=[billing_total], planner=ScriptedPlanner({"steps": []}),
                     executor=DirectExecutor(), brokers={"env": FileSecretSource("/nonexistent")})
    make_runtime(wrong)  # a file source serves static secrets as well as the environment does
    pg = Workflow(name="w2", tools=[billing_total], planner=ScriptedPlanner({"steps": []}), executor=DirectExecutor(),
                  brokers={"env": RecordOnlyBroker()})
    with pytest.raises(ConfigError, match="cannot issue static secret 'billing'"):
        make_runtime(pg)
