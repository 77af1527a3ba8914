"""LangChain tools become scoped tools (issue 5, point 6).

Real LangChain tools, a real runtime, real grants: every call goes through the gateway,
and nothing the grant or the schema rules out reaches the LangChain tool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import pytest
from langchain_core.tools import BaseTool, InjectedToolArg
from langchain_core.tools import tool as lc_tool
from pydantic import BaseModel, Field

from scopegraph import Risk, Runtime, Tool, Workflow
from scopegraph.agents.langchain_tools import from_langchain
from scopegraph.credentials import Grant
from scopegraph.errors import ToolError
from scopegraph.gateway import SCOPE_POLICY_ID, CallContext, CallResult

from ..helpers import mint_grant

RAN: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    RAN.clear()


@lc_tool
def search_docs(query: str, limit: int = 5) -> dict[str, Any]:
    """Search the documentation."""
    RAN.append(("search_docs", {"query": query, "limit": limit}))
    return {"query": query, "hits": [f"doc{i}" for i in range(limit)]}


@lc_tool
async def fetch_page(url: str) -> str:
    """Fetch a web page (async only)."""
    RAN.append(("fetch_page", {"url": url}))
    return f"<html>{url}</html>"


@lc_tool
def explode(reason: str) -> str:
    """Always fails."""
    RAN.append(("explode", {"reason": reason}))
    raise ValueError(f"exploded: {reason}")


class ReportInput(BaseModel):
    recipient: str = Field(description="who receives the report")
    body: str
    urgent: bool | None = None


class SendReport(BaseTool):
    """A hand-written ``BaseTool`` subclass with its own argument model."""

    name: str = "send_report"
    description: str = "Send a report to someone."
    args_schema: type[BaseModel] = ReportInput

    def _run(self, recipient: str, body: str, urgent: bool | None = None) -> str:
        RAN.append(("send_report", {"recipient": recipient, "body": body, "urgent": urgent}))
        return f"sent to {recipient}"


SEARCH = from_langchain(search_docs, risk="read")
FETCH = from_langchain(fetch_page, risk=Risk.READ, external=True)
EXPLODE = from_langchain(explode, risk="read")
REPORT = from_langchain(SendReport(), risk="egress", destinations=["recipient"], name="send-report")
LC_TOOLS = [SEARCH, FETCH, EXPLODE, REPORT]

Mint = Callable[..., tuple[Grant, CallContext]]


@pytest.fixture
def runtime(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(make_workflow(tools=LC_TOOLS))


def call(rt: Runtime, grant: Grant, tool_name: str, ctx: CallContext, **arguments: Any) -> CallResult:
    return rt.gateway.call(grant.danger_token(), tool_name, arguments, ctx)


# declaration ---------------------------------------------------------------------------
def test_a_langchain_function_tool_keeps_its_schema_and_gets_the_declared_tier() -> None:
    assert isinstance(SEARCH, Tool)
    assert (SEARCH.name, SEARCH.risk, SEARCH.labels) == ("search_docs", Risk.READ, frozenset())
    assert SEARCH.description == "Search the documentation."
    assert SEARCH.argument_names() == ["query", "limit"]
    assert SEARCH.validate_arguments({"query": "q"}) == {"query": "q", "limit": 5}


def test_a_basetool_subclass_keeps_its_model_and_declared_facts() -> None:
    assert (REPORT.name, REPORT.risk) == ("send-report", Risk.EGRESS)
    assert REPORT.destinations == frozenset({"recipient"})
    assert REPORT.argument_names() == ["recipient", "body", "urgent"]
    schema = REPORT.json_schema()
    assert schema["required"] == ["recipient", "body"]


def test_an_external_tool_is_labelled_untrusted_and_async_only_tools_are_async() -> None:
    assert FETCH.labels == frozenset({"untrusted"})
    assert FETCH.is_async and not SEARCH.is_async


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: from_langchain(len, risk="read"), "is not a LangChain tool"),  # type: ignore[arg-type]
    (lambda: from_langchain(search_docs, risk="dangerous"), "unknown risk tier 'dangerous'"),
    (lambda: from_langchain(search_docs, risk="egress", destinations=["url"]),
     "declares destination 'url', which is not one of its arguments"),
    (lambda: from_langchain(search_docs, risk="read", name="search docs"), "invalid tool name 'search docs'"),
])
def test_bad_declarations_are_refused_with_one_clear_line(make: Callable[[], Tool], fragment: str) -> None:
    with pytest.raises(ToolError) as caught:
        make()
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_risk_tier_has_no_default() -> None:
    with pytest.raises(TypeError, match="risk"):
        from_langchain(search_docs)  # type: ignore[call-arg]


def test_a_tool_needing_an_injected_argument_is_refused() -> None:
    @lc_tool
    def whoami(question: str, user_id: Annotated[str, InjectedToolArg]) -> str:
        """Answer for a user the runtime injects."""
        return user_id

    with pytest.raises(ToolError, match="requires injected argument 'user_id'"):
        from_langchain(whoami, risk="read")


# calls through the gateway -------------------------------------------------------------
def test_an_allowed_call_runs_the_langchain_tool(runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "search_docs", constraints={
        "query": {"kind": "prefix", "prefix": "billing"}, "limit": {"kind": "range", "min": 1, "max": 3}})
    result = call(runtime, grant, "search_docs", ctx, query="billing faq", limit=2)
    assert result.ok, result.reason
    assert result.value == {"query": "billing faq", "hits": ["doc0", "doc1"]}
    assert RAN == [("search_docs", {"query": "billing faq", "limit": 2})]


def test_an_out_of_scope_argument_is_denied_before_the_langchain_tool_runs(runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "search_docs", constraints={
        "query": {"kind": "prefix", "prefix": "billing"}, "limit": {"kind": "range", "min": 1, "max": 3}})
    result = call(runtime, grant, "search_docs", ctx, query="salaries", limit=2)
    assert result.status == "denied"
    assert SCOPE_POLICY_ID in result.decision.policy_ids
    assert "argument 'query' is outside the grant's scope" in result.reason
    assert "salaries" not in result.reason
    assert RAN == []


@pytest.mark.parametrize(("arguments", "fragment"), [
    ({"limit": 2}, "query"),                                    # missing
    ({"query": "billing", "limit": "many"}, "limit"),           # wrong type
    ({"query": "billing", "limit": 2, "sudo": True}, "sudo"),   # unknown argument
])
def test_arguments_the_schema_rejects_are_denied_before_the_tool_runs(
    runtime: Runtime, arguments: dict[str, Any], fragment: str,
) -> None:
    grant, ctx = mint_grant(runtime, "search_docs")
    result = runtime.gateway.call(grant.danger_token(), "search_docs", arguments, ctx)
    assert result.status == "denied", result
    assert fragment in result.reason
    assert RAN == []


def test_an_async_only_tool_is_awaited_and_its_output_labelled_untrusted(runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "fetch_page", constraints={"url": {"kind": "prefix", "prefix": "https://"}})
    result = call(runtime, grant, "fetch_page", ctx, url="https://example.org/a")
    assert result.ok, result.reason
    assert result.value == "<html>https://example.org/a</html>"
    assert result.labels == frozenset({"untrusted"})
    assert RAN == [("fetch_page", {"url": "https://example.org/a"})]


def test_a_basetool_call_is_decided_by_its_declared_tier(runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "send-report", constraints={
        "recipient": {"kind": "exact", "value": "boss@example.org"}, "body": {"kind": "any"},
        "urgent": {"kind": "any"}})
    result = call(runtime, grant, "send-report", ctx, recipient="boss@example.org", body="all good")
    assert result.status == "needs_approval"  # egress: the baseline asks a human first
    assert "egress-needs-approval" in result.decision.policy_ids
    assert RAN == []


def test_a_basetool_call_runs_when_policy_allows_it(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime], tmp_path: Any,
) -> None:
    allow_all = tmp_path / "allow.cedar"
    allow_all.write_text('@id("allow-all")\npermit (principal, action, resource);\n')
    rt = make_runtime(make_workflow(tools=LC_TOOLS, policies=[allow_all], baseline=False))
    grant, ctx = mint_grant(rt, "send-report")
    result = call(rt, grant, "send-report", ctx, recipient="boss@example.org", body="all good")
    assert result.ok, result.reason
    assert result.value == "sent to boss@example.org"
    assert RAN == [("send_report", {"recipient": "boss@example.org", "body": "all good", "urgent": None})]


def test_a_failing_langchain_tool_is_a_tool_error_not_a_crash(runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "explode")
    result = call(runtime, grant, "explode", ctx, reason="boom")
    assert result.status == "error"
    assert result.error_type == "ValueError"
    assert result.attempts == 1  # not transient: not retried
    assert RAN == [("explode", {"reason": "boom"})]
