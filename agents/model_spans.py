"""GenAI ``chat {model}`` spans for the model calls of LangChain planners and executors.

``ModelCallSpans`` is a LangChain callback handler: each chat model call becomes a
CLIENT span, a child of the span current when the call starts (the planner's or the
executor's ``invoke_agent`` span), with the attributes of the OpenTelemetry GenAI
inference span: operation, provider, requested and answering model, response id,
finish reasons and token usage. A failed call gets ``error.type`` (the exception's
class) and ERROR status, never the exception's message, which may quote the request.

Prompts and replies are never recorded: they hold the task, tool output and whatever
the model wrote, which are for the ledger's owners, not every reader of the traces.

``model_call_config()`` is what ``LLMPlanner`` and ``LLMExecutor`` pass to a model call: the
handler when an application has installed an OpenTelemetry SDK, else nothing, so a
process without one does no span work at all.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig
from opentelemetry.trace import Span, SpanKind

from scopegraph import tracing as tr

# LangChain's ``ls_provider`` for the integrations people use, as the GenAI conventions
# name the provider; any other is passed on as LangChain spells it.
_PROVIDERS = {
    "openai": "openai", "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference",
    "anthropic": "anthropic", "google_genai": "gcp.gemini", "google_vertexai": "gcp.vertex_ai",
    "amazon_bedrock": "aws.bedrock", "bedrock": "aws.bedrock", "mistral": "mistral_ai",
    "mistralai": "mistral_ai", "groq": "groq", "deepseek": "deepseek", "xai": "x_ai",
    "cohere": "cohere", "perplexity": "perplexity", "ibm": "ibm.watsonx.ai",
}
# Ids LangChain makes up for a message that came without one: not the provider's response id.
_LANGCHAIN_IDS = ("run-", "lc_run-")


class ModelCallSpans(BaseCallbackHandler):
    """Opens a GenAI ``chat`` span as a chat model call starts and ends it with the reply.

    Called inline (``run_inline``), so the span's parent is the caller's current span
    on an event loop too. A handler failure is logged by LangChain, never raised into
    the model call (``raise_error`` stays false).
    """

    run_inline = True
    ignore_chain = True
    ignore_agent = True
    ignore_retriever = True
    ignore_custom_event = True

    def __init__(self) -> None:
        self._spans: dict[UUID, Span] = {}
        self._lock = threading.Lock()

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        meta = metadata or {}
        model = _text(meta.get("ls_model_name"))
        provider = _text(meta.get("ls_provider"))
        attributes: dict[str, Any] = {
            tr.GEN_AI_OPERATION: tr.CHAT,
            tr.GEN_AI_PROVIDER: _PROVIDERS.get(provider or "", provider or "langchain"),
            tr.GEN_AI_REQUEST_MODEL: model,
            tr.GEN_AI_REQUEST_TEMPERATURE: _number(meta.get("ls_temperature")),
            tr.GEN_AI_REQUEST_MAX_TOKENS: _integer(meta.get("ls_max_tokens")),
        }
        name = f"{tr.CHAT} {model}" if model else tr.CHAT
        s = tr.tracer().start_span(name, kind=SpanKind.CLIENT,
                                   attributes={k: v for k, v in attributes.items() if v is not None})
        with self._lock:
            self._spans[run_id] = s

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: UUID | None = None,
                   **kwargs: Any) -> None:
        s = self._pop(run_id)
        if s is None:
            return
        for key, value in response_attributes(response).items():
            s.set_attribute(key, value)
        s.end()

    def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None,
                     **kwargs: Any) -> None:
        s = self._pop(run_id)
        if s is None:
            return
        error_type = type(error).__qualname__
        s.set_attribute(tr.ERROR_TYPE, error_type)
        tr.set_error(s, error_type)
        s.end()

    def _pop(self, run_id: UUID) -> Span | None:
        with self._lock:
            return self._spans.pop(run_id, None)


def model_call_config() -> RunnableConfig | None:
    """The config for one model call: a ``ModelCallSpans`` if spans are recorded, else none."""
    return RunnableConfig(callbacks=[ModelCallSpans()]) if tr.enabled() else None


def response_attributes(response: LLMResult) -> dict[str, Any]:
    """What a chat model's reply tells the GenAI conventions: answering model, response id,
    one finish reason per generation, and token usage summed over the generations."""
    out: dict[str, Any] = {}
    reasons: list[str] = []
    usage: dict[str, int] = {}
    for generation in (g for batch in response.generations for g in batch):
        info: Mapping[str, Any] = generation.generation_info or {}
        message = generation.message if isinstance(generation, ChatGeneration) else None
        meta: Mapping[str, Any] = message.response_metadata if message is not None else {}
        model = _text(meta.get("model_name") or meta.get("model"))
        if model and tr.GEN_AI_RESPONSE_MODEL not in out:
            out[tr.GEN_AI_RESPONSE_MODEL] = model
        response_id = _response_id(meta, message)
        if response_id and tr.GEN_AI_RESPONSE_ID not in out:
            out[tr.GEN_AI_RESPONSE_ID] = response_id
        reason = _text(meta.get("finish_reason") or meta.get("stop_reason") or info.get("finish_reason"))
        if reason:
            reasons.append(reason)
        if isinstance(message, AIMessage) and message.usage_metadata:
            _add_usage(usage, message.usage_metadata)
    if reasons:
        out[tr.GEN_AI_FINISH_REASONS] = reasons
    out.update(usage)
    return out


def _add_usage(usage: dict[str, int], metadata: Mapping[str, Any]) -> None:
    counts = {
        tr.GEN_AI_INPUT_TOKENS: metadata.get("input_tokens"),
        tr.GEN_AI_OUTPUT_TOKENS: metadata.get("output_tokens"),
        tr.GEN_AI_CACHE_READ_TOKENS: (metadata.get("input_token_details") or {}).get("cache_read"),
        tr.GEN_AI_REASONING_TOKENS: (metadata.get("output_token_details") or {}).get("reasoning"),
    }
    for key, value in counts.items():
        number = _integer(value)
        if number is not None:
            usage[key] = usage.get(key, 0) + number


def _response_id(meta: Mapping[str, Any], message: BaseMessage | None) -> str | None:
    found = _text(meta.get("id"))
    if found:
        return found
    own = _text(message.id) if message is not None else None
    return own if own and not own.startswith(_LANGCHAIN_IDS) else None


def _text(value: Any) -> str | None:
    # Provider metadata is the provider's reply: only short plain strings become attributes.
    return value if isinstance(value, str) and 0 < len(value) <= 256 else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

