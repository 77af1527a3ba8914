"""Failures you can see (issue 10, point 3).

A failed or denied step says why in the run summary and in ``scopegraph trace``. A
tool's exception message reaches the run record, the trace, the ledger and its span
(``error.type`` and an ``exception`` event), with the values of arguments declared
secret (``@tool(roles={"api_key": "secret"})``) replaced by ``[secret:api_key]``; the
secret itself reaches none of them, nor the store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, field_validator

from scopegraph import Runtime, Tool, Workflow, tool
from scopegraph.agents import DirectExecutor
from scopegraph.cli import main
from scopegraph.errors import ToolError, TransientToolError
from scopegraph.redaction import scrub
from scopegraph.roles import StepContext
from scopegraph.trace_view import build_trace, render_trace

from ..helpers import READ_PLAN, STANDARD_TOOLS
from ..otel_capture import Capture, by_name, is_error, otel, run_spans

__all__ = ["otel"]

API_KEY = "sk-live-7c4d9e2a61f04b8f"
ACCOUNT = "acct-4410"


@tool(risk="read", roles={"api_key": "secret"})
def charge_status(account: str, api_key: str) -> str:
    """Look up a payment; fails quoting its arguments, as careless libraries do."""
    raise ValueError(f"no payment for {account} (key {api_key!r} rejected; raw {api_key})")


@tool(risk="read", roles={"token": "secret"})
def flaky_fetch(url: str, token: str) -> str:
    """Always times out, quoting its token."""
    raise TransientToolError(f"timed out fetching {url} with {token}")


CHARGE_PLAN = {"steps": [{"id": "pay", "tool": "charge_status", "purpose": "check the payment",
                          "constraints": {"account": {"kind": "exact", "value": ACCOUNT},
                                          "api_key": {"kind": "any"}}}]}
FETCH_PLAN = {"steps": [{"id": "get", "tool": "flaky_fetch", "purpose": "fetch it",
                         "constraints": {"url": {"kind": "exact", "value": "https://example.org/a"},
                                         "token": {"kind": "any"}}}]}
EXPECTED = f"tool 'charge_status' failed: ValueError: no payment for {ACCOUNT} " \
           "(key '[secret:api_key]' rejected; raw [secret:api_key])"


def _store_text(path: Path) -> str:
    """Every value in the store but the key table, as text (checkpoints are bytes)."""
    out: list[str] = []
    with closing(sqlite3.connect(str(path))) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            if table == "sg_keys":
                continue
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - our own table names
                for value in row:
                    if isinstance(value, bytes):
                        out.append(value.decode("utf-8", "replace"))
                    elif value is not None:
                        out.append(str(value))
    return "\n".join(out)


@pytest.fixture
def failed(otel: Capture, make_workflow: Callable[..., Workflow],
           make_runtime: Callable[..., Runtime]) -> tuple[Runtime, Any]:
    rt = make_runtime(make_workflow(CHARGE_PLAN, tools=[*STANDARD_TOOLS, charge_status],
                                    executor=DirectExecutor(builders={
                                        "charge_status": lambda ctx: {"api_key": API_KEY}})))
    report = rt.run("check the payment", run_id="pay1")
    assert report.status == "failed", report.summary()
    return rt, report


# the message, scrubbed, everywhere --------------------------------------------------------
def test_a_tool_error_message_reaches_the_run_record_and_summary_scrubbed(failed: tuple[Runtime, Any]) -> None:
    _, report = failed
    (step,) = report.steps
    assert step.status == "failed" and step.reason == EXPECTED
    assert [c.reason for c in step.calls] == [EXPECTED]
    summary = report.summary()
    assert f"reason    {EXPECTED}" in summary
    assert API_KEY not in summary and API_KEY not in report.model_dump_json()


def test_a_tool_error_message_reaches_the_trace_and_the_ledger_scrubbed(failed: tuple[Runtime, Any]) -> None:
    rt, _ = failed
    (call,) = [r for r in rt.ledger.records("pay1") if r["kind"] == "tool_call"]
    assert call["error"] == EXPECTED and call["error_type"] == "ValueError"
    view = build_trace(rt.store, "pay1")
    (step,) = view["steps"]
    assert step["status"] == "failed" and step["reason"] == EXPECTED
    (grant,) = step["items"]
    (_, tool_call) = grant["events"]
    assert tool_call["type"] == "tool_call" and tool_call["error"] == EXPECTED
    text = render_trace(view)
    assert f"step pay  charge_status  failed: {EXPECTED}" in text
    assert any(line.endswith(f"─ {EXPECTED}") for line in text.splitlines()), text
    assert API_KEY not in text and API_KEY not in str(view)


def test_the_failed_call_span_has_error_type_and_a_scrubbed_exception_event(
        otel: Capture, failed: tuple[Runtime, Any]) -> None:
    spans = run_spans(otel.spans(), "pay1")
    (call,) = by_name(spans, "scopegraph.tool.call")
    assert is_error(call)
    assert dict(call.attributes or {})["error.type"] == "ValueError"
    (event,) = [dict(e.attributes or {}) for e in call.events if e.name == "exception"]
    assert event["exception.type"] == "ValueError"
    assert event["exception.message"] == EXPECTED
    assert "exception.stacktrace" not in event  # a stack trace would quote the raw message
    for s in spans:
        assert API_KEY not in repr(s.to_json()), s.name


def test_the_secret_reaches_no_table_of_the_store(failed: tuple[Runtime, Any], store_path: Path) -> None:
    text = _store_text(store_path)
    assert "[secret:api_key]" in text, "the scan did not see the scrubbed message"
    assert API_KEY not in text


def test_an_argument_not_declared_secret_is_quoted_as_the_tool_wrote_it(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    @tool(risk="read")
    def charge_status(account: str, api_key: str) -> str:  # the same tool, no roles
        raise ValueError(f"no payment for {account} (key {api_key!r} rejected)")

    rt = make_runtime(make_workflow(CHARGE_PLAN, tools=[*STANDARD_TOOLS, charge_status],
                                    executor=DirectExecutor(builders={
                                        "charge_status": lambda ctx: {"api_key": API_KEY}})))
    report = rt.run("check", run_id="pay2")
    assert report.steps[0].reason == f"tool 'charge_status' failed: ValueError: no payment for {ACCOUNT} " \
                                     f"(key {API_KEY!r} rejected)"


def test_retries_that_give_up_keep_the_last_message_scrubbed_and_trace_each_attempt(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    token = "tok-0f1e2d3c4b5a"
    rt = make_runtime(make_workflow(FETCH_PLAN, tools=[*STANDARD_TOOLS, flaky_fetch], grant_max_uses=5,
                                    executor=DirectExecutor(builders={"flaky_fetch": lambda ctx: {"token": token}})))
    report = rt.run("fetch", run_id="fetch1")
    assert report.status == "failed", report.summary()
    assert report.steps[0].reason == ("tool 'flaky_fetch' failed: TransientToolError after 3 attempts: "
                                      "timed out fetching https://example.org/a with [secret:token]")
    calls = by_name(run_spans(otel.spans(), "fetch1"), "scopegraph.tool.call")
    assert len(calls) == 3
    for span in calls:
        assert dict(span.attributes or {})["error.type"] == "TransientToolError"
        (event,) = [dict(e.attributes or {}) for e in span.events if e.name == "exception"]
        assert event["exception.message"] == "timed out fetching https://example.org/a with [secret:token]"
    records = [r for r in rt.ledger.records("fetch1") if r["kind"] == "tool_call"]
    assert [r["error"] for r in records] == ["tool 'flaky_fetch' failed: TransientToolError: timed out fetching "
                                             "https://example.org/a with [secret:token]"] * 3
    assert token not in str(records) and token not in report.summary()


# the reason of a failed or denied step ---------------------------------------------------
def test_a_denied_step_says_why_in_the_summary_and_the_trace(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    plan = {"steps": [{"id": "doc", "tool": "read_doc", "constraints": {"path": {"kind": "prefix",
                                                                                  "prefix": "/docs/"}}}]}
    rt = make_runtime(make_workflow(plan, executor=DirectExecutor(builders={
        "read_doc": lambda ctx: {"path": "/etc/passwd"}})))
    report = rt.run("read", run_id="deny1")
    assert report.status == "denied"
    reason = "argument 'path' is outside the grant's scope: it must be a string starting with '/docs/'"
    assert report.steps[0].reason == reason
    assert f"reason    {reason}" in report.summary()
    text = render_trace(build_trace(rt.store, "deny1"))
    assert f"step doc  read_doc  denied: {reason}" in text


def test_a_step_whose_executor_made_no_call_says_why(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    # The README's first stumble: DirectExecutor has no value for an ``any`` argument.
    plan = {"steps": [{"id": "doc", "tool": "read_doc", "constraints": {"path": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(plan, executor=DirectExecutor()))
    report = rt.run("read", run_id="nocall1")
    assert report.status == "failed"
    reason = "step 'doc': no value for argument 'path' in the plan or its dependencies"
    assert f"reason    {reason}" in report.summary()
    assert f"step doc  read_doc  failed: {reason}" in render_trace(build_trace(rt.store, "nocall1"))


def test_an_executor_that_raises_after_a_successful_call_reads_as_failed_in_the_trace(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    class CallsThenBreaks(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            super().execute(ctx)
            raise RuntimeError("lost the result")

    rt = make_runtime(make_workflow({"steps": [READ_PLAN["steps"][0]]}, executor=CallsThenBreaks(
        builders={"read_doc": lambda ctx: {"path": "/docs/a"}})))
    assert rt.run("read", run_id="broke1").status == "failed"
    (step,) = build_trace(rt.store, "broke1")["steps"]
    assert (step["status"], step["reason"]) == ("failed", "executor raised RuntimeError")


def test_trace_through_the_cli_shows_the_scrubbed_message(
        failed: tuple[Runtime, Any], store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["--store", store_url, "trace", "pay1"]) == 0
    out = capsys.readouterr().out
    assert EXPECTED in out and API_KEY not in out


# declaring roles --------------------------------------------------------------------------
def test_roles_declare_secrets_and_destinations() -> None:
    @tool(risk="egress", roles={"to": "destination", "api_key": "secret"})
    def send(to: str, body: str, api_key: str) -> str:
        return "sent"

    @tool(risk="egress", destinations=["to"])
    def send_listed(to: str, body: str) -> str:
        return "sent"

    assert send.secrets == frozenset({"api_key"})
    assert send.destinations == frozenset({"to"}) == send_listed.destinations
    assert send_listed.secrets == frozenset()


@pytest.mark.parametrize(("roles", "message"), [
    ({"api_kye": "secret"}, "tool 'send' declares role 'secret' for 'api_kye', which is not one of its arguments"),
    ({"api_key": "password"}, "tool 'send': unknown role 'password' for argument 'api_key': "
                              "use 'destination', 'content' or 'secret'"),
    ({"body": "recipient"}, "tool 'send': unknown role 'recipient' for argument 'body': "
                            "use 'destination', 'content' or 'secret'"),
    (["api_key"], "tool 'send': roles map argument names to roles, e.g. {'api_key': 'secret'}"),
])
def test_unknown_roles_and_arguments_are_refused_in_one_line(roles: Any, message: str) -> None:
    def send(to: str, body: str, api_key: str) -> str:
        return "sent"

    with pytest.raises(ToolError) as raised:
        tool(send, roles=roles)
    assert str(raised.value) == message


# the scrub itself --------------------------------------------------------------------------
@pytest.mark.parametrize("secret", [
    "pw-plain-1234", "it's\nmultiline", "naïve-€-secret", "tab\tand\\backslash", 1234567, 31.25,
])
def test_every_quoted_form_of_a_secret_is_scrubbed(secret: Any) -> None:
    import json

    forms = [str(secret), repr(secret), ascii(secret), json.dumps(secret), json.dumps(secret, ensure_ascii=False)]
    text = " | ".join(f"<{f}>" for f in forms)
    scrubbed = scrub(text, [("pin", secret)])
    for form in forms:
        inner = form.strip("'\"")
        assert inner not in scrubbed, (form, scrubbed)
    assert scrubbed.count("[secret:pin]") == len(forms)


def test_secrets_inside_a_list_or_mapping_are_scrubbed_one_by_one() -> None:
    value = {"user": "ann", "password": "hunter2-xyz", "pins": [48151623, "s3cr3t-pin"]}
    text = "login failed for password hunter2-xyz, pin 48151623 and s3cr3t-pin"
    assert scrub(text, [("creds", value)]) == \
        "login failed for password [secret:creds], pin [secret:creds] and [secret:creds]"


def test_a_short_secret_is_scrubbed_too_and_placeholders_are_not_rescrubbed() -> None:
    # One pass, longest form first: "e" inside "[secret:a]" is never replaced again.
    assert scrub("bad key e in e-mail", [("a", "e"), ("b", "e-mail")]) == \
        "bad k[secret:a]y [secret:a] in [secret:b]"
    assert scrub("nothing to hide", [("n", None), ("b", True), ("e", "")]) == "nothing to hide"


def test_a_tool_that_quotes_its_grant_in_an_error_leaks_no_token(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    # A tool that holds the step's grant (an MCP client) fails quoting its own request.
    seen: list[str] = []

    def call_server(arguments: dict[str, Any], grant_token: str | None) -> str:
        assert grant_token is not None
        seen.append(grant_token)
        raise RuntimeError(f"401 from server for request with 'Authorization: Bearer {grant_token}'")

    remote = Tool.from_schema(name="remote_lookup", description="Look up remotely.", risk="read",
                              parameters={"type": "object", "properties": {"q": {"type": "string"}},
                                          "required": ["q"]},
                              fn=call_server, takes_grant=True)
    plan = {"steps": [{"id": "r", "tool": "remote_lookup", "constraints": {"q": {"kind": "exact", "value": "x"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, remote]))
    report = rt.run("remote", run_id="tok1")
    (token,) = seen
    assert report.steps[0].reason == ("tool 'remote_lookup' failed: RuntimeError: 401 from server for request "
                                      "with 'Authorization: Bearer [token]'")
    signature = token.split(".")[2]
    places = [report.model_dump_json(), render_trace(build_trace(rt.store, "tok1")),
              *(repr(s.to_json()) for s in run_spans(otel.spans(), "tok1"))]
    assert not [p for p in places if signature in p]


class Credentials(BaseModel):
    key: str

    @field_validator("key")
    @classmethod
    def _known_prefix(cls, key: str) -> str:
        if not key.startswith("sk-"):
            raise ValueError(f"unknown key {key}")  # pydantic puts this message in its error
        return key


@tool(risk="read", roles={"creds": "secret"})
def whoami(creds: Credentials) -> str:
    """Says whose key this is."""
    return "someone"


def test_a_denial_reason_quoting_a_secret_argument_is_scrubbed(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    key = "pk-9f8e7d6c5b4a"
    plan = {"steps": [{"id": "w", "tool": "whoami", "constraints": {"creds": {"kind": "any"}}}]}
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, whoami], executor=DirectExecutor(
        builders={"whoami": lambda ctx: {"creds": {"key": key}}})))
    report = rt.run("who", run_id="cred1")
    assert report.status == "denied", report.summary()
    assert report.steps[0].reason == ("invalid arguments for tool 'whoami': creds.key: "
                                      "Value error, unknown key [secret:creds]")
    places = [report.model_dump_json(), str(rt.ledger.records("cred1")),
              *(repr(s.to_json()) for s in run_spans(otel.spans(), "cred1"))]
    assert not [p for p in places if key in p]
