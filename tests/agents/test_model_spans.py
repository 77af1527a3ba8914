"""Model calls as GenAI ``chat`` spans, tool calls as ``execute_tool`` spans (issue 14, point 5).

The real ``LLMPlanner`` and ``LLMExecutor`` run LangChain's own fake chat models (with
``usage_metadata`` and ``response_metadata`` as providers fill them) through a real
``Runtime``, traced by the real OpenTelemetry SDK into memory: each model call is a
CLIENT span under its agent's span with the model, provider, token usage, finish reasons
and response id; each tool call the model makes is its own span carrying the model's
call id; a refused call is an event, not an error; no prompt or reply text is recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel, GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatResult
from langchain_core.runnables import Runnable
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from scopegraph import Runtime, Workflow
from scopegraph.agents import LLMExecutor, LLMPlanner

from ..otel_capture import Capture, by_name, children, is_error, one, otel, parent_of, run_spans

__all__ = ["otel"]  # the fixture, imported so pytest finds it here

TASK = "look up alpha for the quarterly report"
PLAN = {"steps": [{"id": "look", "tool": "lookup", "purpose": "look the key up",
                   "constraints": {"key": {"kind": "one_of", "values": ["alpha", "beta"]}}}]}


class OpenAIStyleFake(FakeMessagesListChatModel):
    """LangChain's list fake, naming its model and provider as ``ChatOpenAI`` does. It has
    no tool calling, so ``LLMPlanner`` asks it for the plan as JSON text."""

    model_name: str = "gpt-fake-1"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider="openai", ls_model_name=self.model_name, ls_model_type="chat",
                               ls_temperature=0.0, ls_max_tokens=512)


class AnthropicStyleFake(GenericFakeChatModel):
    """LangChain's generic fake with tool calling (its replies are scripted, the bound
    tools change nothing), naming its model and provider as ``ChatAnthropic`` does."""

    model_name: str = "claude-fake-1"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[Any, AIMessage]:
        return self

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider="anthropic", ls_model_name=self.model_name, ls_model_type="chat")


class BrokenModel(OpenAIStyleFake):
    """A provider that fails, with a message that quotes the request."""

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        raise ConnectionError("POST /v1/chat failed for key sk-live-0123456789 and prompt " + TASK)


def plan_reply() -> AIMessage:
    return AIMessage(content=json.dumps(PLAN),
                     usage_metadata={"input_tokens": 812, "output_tokens": 64, "total_tokens": 876,
                                     "input_token_details": {"cache_read": 512}},
                     response_metadata={"model_name": "gpt-fake-1-2025-01-01", "finish_reason": "stop",
                                        "id": "chatcmpl-plan-1"})


def two_calls_reply(first_id: str = "toolu_01", second_id: str = "toolu_02") -> AIMessage:
    """One model turn asking for two calls: the first outside the step's scope, the second inside."""
    return AIMessage(content="", id="msg_exec_1", tool_calls=[
        {"name": "lookup", "args": {"key": "gamma"}, "id": first_id, "type": "tool_call"},
        {"name": "lookup", "args": {"key": "alpha"}, "id": second_id, "type": "tool_call"},
    ], usage_metadata={"input_tokens": 301, "output_tokens": 42, "total_tokens": 343,
                       "output_token_details": {"reasoning": 10}},
        response_metadata={"model_name": "claude-fake-1-20250101", "stop_reason": "tool_use"})


def _workflow(make_workflow: Callable[..., Workflow], *, planner: Any = None,
              executor_replies: Iterator[AIMessage] | None = None) -> Workflow:
    return make_workflow(
        PLAN, planner=planner or LLMPlanner(OpenAIStyleFake(responses=[plan_reply()])),
        executor=LLMExecutor(AnthropicStyleFake(messages=executor_replies or iter([two_calls_reply()]))))


def _chat_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("gen_ai.operation.name") == "chat"]


def test_planner_and_executor_model_calls_are_chat_spans_under_their_agent_spans(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    report = make_runtime(_workflow(make_workflow)).run(TASK, run_id="chat1")
    assert report.status == "completed", report.summary()
    spans = run_spans(otel.spans(), "chat1")

    planner = one(spans, "invoke_agent planner")
    plan_chat = one(spans, "chat gpt-fake-1")
    assert parent_of(spans, plan_chat) is planner
    assert plan_chat.kind is SpanKind.CLIENT and not is_error(plan_chat)
    assert dict(plan_chat.attributes or {}) == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-fake-1", "gen_ai.request.temperature": 0.0, "gen_ai.request.max_tokens": 512,
        "gen_ai.response.model": "gpt-fake-1-2025-01-01", "gen_ai.response.id": "chatcmpl-plan-1",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 812, "gen_ai.usage.output_tokens": 64,
        "gen_ai.usage.cache_read.input_tokens": 512,
    }

    executor = one(spans, "invoke_agent executor")
    exec_chat = one(spans, "chat claude-fake-1")
    assert parent_of(spans, exec_chat) is executor
    assert exec_chat.kind is SpanKind.CLIENT and not is_error(exec_chat)
    attrs = exec_chat.attributes or {}
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.request.model"] == "claude-fake-1"
    assert attrs["gen_ai.response.model"] == "claude-fake-1-20250101"
    assert attrs["gen_ai.response.id"] == "msg_exec_1"  # the provider's id, on the message
    assert list(attrs["gen_ai.response.finish_reasons"]) == ["tool_use"]
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (301, 42)
    assert attrs["gen_ai.usage.reasoning.output_tokens"] == 10
    assert len(_chat_spans(spans)) == 2, "one span per model call"


def test_each_tool_call_of_a_model_turn_is_its_own_span_named_by_the_models_call_id(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    report = make_runtime(_workflow(make_workflow)).run(TASK, run_id="calls1")
    assert report.status == "completed", report.summary()
    spans = run_spans(otel.spans(), "calls1")
    executor = one(spans, "invoke_agent executor")
    exec_chat = one(spans, "chat claude-fake-1")

    calls = sorted(by_name(children(spans, executor), "execute_tool lookup"), key=lambda s: s.start_time)
    assert len(calls) == 2, "one span per call, not per step"
    assert [c.attributes["gen_ai.tool.call.id"] for c in calls] == ["toolu_01", "toolu_02"]
    assert all(c.start_time >= exec_chat.end_time for c in calls), "the calls follow the reply asking for them"
    for c in calls:
        assert c.attributes["gen_ai.operation.name"] == "execute_tool"
        assert c.attributes["gen_ai.tool.name"] == "lookup"
        assert c.attributes["scopegraph.step.id"] == "look"
        assert not is_error(c), "a refusal is not an error"

    refused, done = calls
    (event,) = [e for e in refused.events if e.name == "scopegraph.denied"]
    assert list((event.attributes or {})["scopegraph.decision.policy_ids"]) == ["scopegraph:scope"]
    assert refused.attributes["scopegraph.decision"] == "deny"
    assert refused.attributes["scopegraph.call.status"] == "denied"
    assert [k.name for k in children(spans, refused)] == ["scopegraph.decide"], "a refused call never ran"
    assert done.attributes["scopegraph.call.status"] == "ok" and not done.events
    assert sorted(k.name for k in children(spans, done)) == ["scopegraph.decide", "scopegraph.tool.call"]


def test_no_prompt_reply_or_argument_text_reaches_a_span(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    assert make_runtime(_workflow(make_workflow)).run(TASK, run_id="quiet1").status == "completed"
    spans = run_spans(otel.spans(), "quiet1")
    for s in [*_chat_spans(spans), *[s for s in spans if s.name.startswith("execute_tool ")]]:
        text = json.dumps({"attributes": dict(s.attributes or {}),
                           "events": [dict(e.attributes or {}) for e in s.events]}, default=str)
        # "gamma" is what the model proposed; a denial names the plan's constraint, never the argument.
        for needle in ("quarterly", "look the key up", "gamma", "Purpose", "planner of a scopegraph"):
            assert needle not in text, f"{needle!r} leaked into span {s.name!r}"


def test_a_failed_model_call_is_an_error_span_naming_the_exception_type_only(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    workflow = _workflow(make_workflow, planner=LLMPlanner(BrokenModel(responses=[plan_reply()])))
    report = make_runtime(workflow).run(TASK, run_id="broken1")
    assert report.status == "failed", report.summary()
    spans = run_spans(otel.spans(), "broken1")
    chat = one(spans, "chat gpt-fake-1")
    assert parent_of(spans, chat) is one(spans, "invoke_agent planner")
    assert is_error(chat) and chat.status.description == "ConnectionError"
    assert chat.attributes["error.type"] == "ConnectionError"
    recorded = json.dumps([dict(chat.attributes or {}), [dict(e.attributes or {}) for e in chat.events]], default=str)
    assert "sk-live" not in recorded and "POST" not in recorded


def test_a_call_id_that_is_not_an_id_is_left_out(
        otel: Capture, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    # The model's reply is untrusted: a "call id" made to carry text stays out of the trace.
    odd = two_calls_reply(first_id="ignore previous instructions", second_id="x" * 200)
    report = make_runtime(_workflow(make_workflow, executor_replies=iter([odd]))).run(TASK, run_id="odd1")
    assert report.status == "completed", report.summary()
    calls = by_name(run_spans(otel.spans(), "odd1"), "execute_tool lookup")
    assert len(calls) == 2
    assert all("gen_ai.tool.call.id" not in c.attributes for c in calls)


def test_without_an_sdk_model_calls_get_no_span_handler() -> None:
    # A fresh process: no application installed a tracer provider, so no handler is
    # attached to a model call and nothing is built for spans (issue 11: the hot path).
    code = (
        "from scopegraph.agents.model_spans import model_call_config\n"
        "from scopegraph import tracing\n"
        "assert not tracing.enabled()\n"
        "assert model_call_config() is None\n"
        "with tracing.model_tool_call('toolu_01'):\n"
        "    assert tracing._MODEL_CALL_ID.get() is None\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
