"""Bad input stays a clear error (issue 10, point 8).

- Text others wrote (a planner's purpose and step ids, a tool's error, an approver's
  reason) is shown with control and bidirectional characters escaped in the run summary,
  ``scopegraph trace``, ``approvals show`` and the terminal prompt.
- Anything raised while the gateway checks a call (arguments nested 10 000 deep, a list
  that contains itself, a validator or a policy engine that raises) denies the call with a
  reason; nothing escapes the gateway, and the run ends with that reason.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import BaseModel, field_validator

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor
from scopegraph.cli import main
from scopegraph.display import printable
from scopegraph.gateway import CallResult
from scopegraph.policy import CallRequest, CedarPolicyEngine, Decision
from scopegraph.prompt import describe, prompt_for
from scopegraph.roles import StepContext
from scopegraph.trace_view import build_trace, render_trace

from ..helpers import STANDARD_TOOLS, mint_grant

HOSTILE = "ok\x1b[2J\x1b]0;pwned\x07\r\u202etxt.exe\u2066\u200b\ufeff\u2028end"
SHOWN = "ok\\x1b[2J\\x1b]0;pwned\\x07\\r\\u202etxt.exe\\u2066\\u200b\\ufeff\\u2028end"


def _assert_escaped(text: str) -> None:
    assert SHOWN in text, text
    for ch in "\x1b\x07\r\u202e\u2066\u200b\ufeff\u2028":
        assert ch not in text, repr(ch)


# printable ---------------------------------------------------------------------------------
def test_printable_escapes_control_and_bidirectional_characters_and_keeps_the_rest() -> None:
    assert printable(HOSTILE) == SHOWN
    assert printable("naïve → ∞, 日本, emoji 🙂, tab\tnewline\n") == "naïve → ∞, 日本, emoji 🙂, tab\\tnewline\\n"
    assert printable("\U000e0001 tag, \ud800 lone") == "\\U000e0001 tag, \\ud800 lone"
    assert printable("plain ascii stays as it is") == "plain ascii stays as it is"


# others' text on screen ------------------------------------------------------------------
@pytest.fixture
def hostile_runtime(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Runtime:
    plan = {"steps": [{"id": "note", "tool": "write_note", "purpose": f"file it {HOSTILE}",
                       "constraints": {"title": {"kind": "exact", "value": "q"},
                                       "amount": {"kind": "exact", "value": 3}}}]}
    return make_runtime(make_workflow(plan, approvers=["bob"]))


def test_a_planners_purpose_is_escaped_in_approvals_show_the_prompt_and_trace(
        hostile_runtime: Runtime, store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    paused = hostile_runtime.run("note", initiator="alice", run_id="bidi1")
    assert paused.status == "paused"
    request = hostile_runtime.approvals.get(paused.approvals[0]["id"])
    assert HOSTILE in request.purpose  # kept as written; escaped only where shown
    _assert_escaped(describe(request))

    out = io.StringIO()
    assert prompt_for(hostile_runtime.approvals, request, ask=lambda _: "s", out=out) is False
    _assert_escaped(out.getvalue())

    capsys.readouterr()
    assert main(["--store", store_url, "approvals", "show", request.id]) == 0
    _assert_escaped(capsys.readouterr().out)
    assert main(["--store", store_url, "trace", "bidi1"]) == 0
    _assert_escaped(capsys.readouterr().out)


def test_an_approvers_reason_is_escaped_in_the_summary_and_trace(
        hostile_runtime: Runtime, make_runtime: Callable[..., Runtime]) -> None:
    paused = hostile_runtime.run("note", initiator="alice", run_id="bidi2")
    hostile_runtime.approvals.deny(paused.approvals[0]["id"], approver="bob", reason=HOSTILE)
    report = make_runtime(hostile_runtime.workflow).resume("bidi2")
    assert report.status == "denied"
    assert report.steps[0].reason == f"denied by bob: {HOSTILE}"
    _assert_escaped(report.summary())
    _assert_escaped(render_trace(build_trace(hostile_runtime.store, "bidi2")))


@tool(risk="read")
def render_page(url: str) -> str:
    """Fails quoting the page it fetched, terminal escapes and all."""
    raise ValueError(f"cannot parse page: {HOSTILE}")


def test_a_tools_error_message_is_escaped_in_the_summary_and_trace(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "page", "tool": "render_page",
                       "constraints": {"url": {"kind": "exact", "value": "https://example.org/"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, render_page]))
    report = rt.run("render", run_id="bidi3")
    assert report.status == "failed"
    assert report.steps[0].reason == f"tool 'render_page' failed: ValueError: cannot parse page: {HOSTILE}"
    _assert_escaped(report.summary())
    _assert_escaped(render_trace(build_trace(rt.store, "bidi3")))


# anything raised while checking a call is a denial ----------------------------------------
def _nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


def _self_containing() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


@tool(risk="read")
def ingest(document: Any) -> str:
    """Takes any JSON document."""
    return "ingested"


@tool(risk="read")
def ingest_list(items: list[Any]) -> str:
    """Takes a list."""
    return "ingested"


DEPTH_REASON = "nested more than 64 lists or mappings deep"


@pytest.fixture
def ingest_runtime(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(make_workflow(tools=[*STANDARD_TOOLS, ingest, ingest_list]))


def _call(rt: Runtime, tool_name: str, grant_tool: str | None = None, **arguments: Any) -> tuple[CallResult, str]:
    grant, ctx = mint_grant(rt, grant_tool or tool_name)
    return rt.gateway.call(grant.danger_token(), tool_name, arguments, ctx, call_key="k1"), grant.jti


@pytest.mark.parametrize(("tool_name", "argument"), [
    ("ingest", _nested(10_000, "list")), ("ingest", _nested(10_000, "dict")),
    ("ingest_list", _nested(10_000, "list")), ("ingest_list", _nested(10_000, "dict")),
    ("ingest", _self_containing()),
], ids=["any-list", "any-dict", "list-list", "list-dict", "cycle"])
def test_arguments_nested_thousands_deep_are_denied_with_a_reason(
        ingest_runtime: Runtime, tool_name: str, argument: Any) -> None:
    name = "document" if tool_name == "ingest" else "items"
    result, jti = _call(ingest_runtime, tool_name, **{name: argument})
    assert result.status == "denied", result
    assert result.decision.policy_ids == ("scopegraph:scope",)
    assert result.reason == f"invalid arguments for tool {tool_name!r}: {name}: {DEPTH_REASON}"
    (decision,) = [r for r in ingest_runtime.ledger.records("run1") if r["kind"] == "decision"]
    assert decision["decision"] == "deny" and decision["grant_id"] == jti
    assert ingest_runtime.ledger.verify().ok


def test_deep_arguments_to_an_unknown_tool_are_denied_too(ingest_runtime: Runtime) -> None:
    result, _ = _call(ingest_runtime, "no_such_tool", grant_tool="ingest", document=_nested(10_000, "dict"))
    assert result.status == "denied" and result.reason == "unknown tool 'no_such_tool'"


def test_arguments_nested_to_the_limit_still_run(ingest_runtime: Runtime) -> None:
    result, _ = _call(ingest_runtime, "ingest", document=_nested(63, "dict"))
    assert result.ok, result


class _Broken:
    """A value whose every rendering raises: nothing may write it down unguarded."""

    def __str__(self) -> str:
        raise RuntimeError("no str")

    __repr__ = __str__


@pytest.mark.parametrize("value", [10**5000, _Broken(), [_Broken()], {"n": math.inf}],
                         ids=["huge-int", "broken-str", "broken-in-list", "infinity"])
def test_values_that_cannot_be_written_down_do_not_escape_the_gateway(ingest_runtime: Runtime, value: Any) -> None:
    result, _ = _call(ingest_runtime, "ingest", document=value)
    assert result.status in ("ok", "denied"), result
    assert ingest_runtime.ledger.verify().ok


class Code(BaseModel):
    value: str

    @field_validator("value")
    @classmethod
    def _known(cls, value: str) -> str:
        if value.startswith("x"):
            raise LookupError(f"no table for {value}")  # not a ValueError: pydantic lets it through
        return value


@tool(risk="read")
def lookup_code(code: Code) -> str:
    """Validates its argument with a validator that raises a LookupError."""
    return code.value if isinstance(code, Code) else str(code)


def test_a_validator_that_raises_denies_the_call_naming_only_the_exception_type(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    rt = make_runtime(make_workflow(tools=[*STANDARD_TOOLS, lookup_code]))
    result, jti = _call(rt, "lookup_code", code={"value": "x-secretish"})
    assert result.status == "denied" and result.grant_id == jti
    assert result.decision.policy_ids == ("scopegraph:check",)
    assert result.reason == "checking the call raised LookupError; denied to fail closed"
    assert _call(rt, "lookup_code", code={"value": "fine"})[0].ok


class RaisingEngine:
    """A policy engine with a bug: it raises on some calls (a plug point, like any engine)."""

    def __init__(self, inner: CedarPolicyEngine) -> None:
        self.inner = inner
        self.version = inner.version

    def decide(self, request: CallRequest) -> Decision:
        if request.arguments.get("key") == "boom":
            raise KeyError(f"no rule for {request.arguments['key']}")
        return self.inner.decide(request)


def test_a_policy_engine_that_raises_denies_the_call_and_the_run_says_why(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "look", "tool": "lookup", "constraints": {
        "key": {"kind": "one_of", "values": ["boom"]}, "limit": {"kind": "range", "min": 1, "max": 9}}}]}
    workflow = make_workflow(plan)
    engine = RaisingEngine(CedarPolicyEngine.from_paths(None, workflow.registry))
    rt = make_runtime(workflow, policy=engine)
    report = rt.run("look", run_id="pol1")
    assert report.status == "denied", report.summary()
    reason = "policy evaluation raised KeyError; denied to fail closed"
    assert report.steps[0].reason == reason
    assert f"reason    {reason}" in report.summary()


def test_arguments_nested_thousands_deep_from_an_executor_end_the_run_denied(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "in", "tool": "ingest", "constraints": {"document": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, ingest], executor=DirectExecutor(
        builders={"ingest": lambda ctx: {"document": _nested(10_000, "list")}})))
    report = rt.run("ingest", run_id="deep1")
    assert report.status == "denied", report.summary()
    assert report.steps[0].reason == f"invalid arguments for tool 'ingest': document: {DEPTH_REASON}"
    assert rt.ledger.verify().ok


def test_a_lone_surrogate_in_an_argument_and_in_a_tool_error_is_recorded_escaped(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    # Text UTF-8 cannot hold: the call is keyed and decided, the tool's message quoting it
    # is recorded with the surrogate written as its escape, and the ledger stays valid.
    @tool(risk="read")
    def echo_fail(text: Any) -> str:
        raise ValueError(f"cannot take {text}")

    class SurrogateCaller(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            return ctx.tools.call("echo_fail", text="bad\ud800text")

    plan = {"steps": [{"id": "e", "tool": "echo_fail", "constraints": {"text": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, echo_fail], executor=SurrogateCaller()))
    report = rt.run("echo", run_id="sur1")
    assert report.status == "failed", report.summary()
    assert report.steps[0].reason == "tool 'echo_fail' failed: ValueError: cannot take bad\\ud800text"
    (call,) = [r for r in rt.ledger.records("sur1") if r["kind"] == "tool_call"]
    assert call["error"] == report.steps[0].reason
    assert rt.ledger.verify().ok
