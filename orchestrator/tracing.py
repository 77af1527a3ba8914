"""Span names, attribute keys and metric instruments: the one place they are spelled.

Library code uses the OpenTelemetry API only; applications (the CLI, examples, tests)
configure the SDK and exporters (see ``scopegraph.telemetry``). Names follow the
GenAI semantic conventions where they exist; what they lack (decisions, grants,
approvals) sits under ``scopegraph.*``. Tokens and keys never become attributes:
grants appear by their ``jti`` only.

A denial (by policy or by a person) is an outcome, not an error: it is an event and
attributes on its span, whose status stays unset. A failure (a tool raised, the store
is down, the plan is malformed) sets the span's status to ERROR; a failed tool call
also gets ``error.type`` and an ``exception`` event carrying the scrubbed message
(never ``record_exception``: its stack trace would quote the unscrubbed message).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    INVALID_SPAN,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "scopegraph"

# span names
INVOKE_WORKFLOW = "invoke_workflow"          # + " {workflow}"
INVOKE_AGENT = "invoke_agent"                # + " {agent}": the planner; the executor, once per step
EXECUTE_TOOL = "execute_tool"                # + " {tool}": one tool call, retries and refusals included
CHAT = "chat"                                # + " {model}": one model call (GenAI inference span)
GRANT_MINT = "scopegraph.grant.mint"
GRANT_REVOKE = "scopegraph.grant.revoke"
DECIDE = "scopegraph.decide"
APPROVAL_WAIT = "scopegraph.approval.wait"
TOOL_CALL = "scopegraph.tool.call"
SECRET_ISSUE = "scopegraph.secret.issue"      # a broker issues a downstream credential for one step
SECRET_REVOKE = "scopegraph.secret.revoke"    # ... and destroys it when the step ends
SECRET_SWEEP = "scopegraph.secret.sweep"      # credentials of ended or abandoned steps, revoked
TOKEN_EXCHANGE = "scopegraph.token.exchange"  # a step grant exchanged for a downstream token (RFC 8693)

# events
DENIED_EVENT = "scopegraph.denied"           # a call or step denied: policy ids and reason
EXCEPTION_EVENT = "exception"                # OpenTelemetry's exception event, scrubbed
WITNESS_EVENT = "scopegraph.witness.entry"   # a signed ledger head, as appended to the witness
WITNESS_LOGGER = "scopegraph.witness"         # the same, as a log record, when no span is current

# OpenTelemetry semantic convention attributes
ERROR_TYPE = "error.type"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"

# GenAI semantic convention attributes
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_AGENT_ID = "gen_ai.agent.id"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
# ... of a model call (inference span). The provider's name is ``gen_ai.provider.name``, which
# replaced ``gen_ai.system`` (opentelemetry-semantic-conventions 0.66b marks the latter deprecated).
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CACHE_READ_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_REASONING_TOKENS = "gen_ai.usage.reasoning.output_tokens"

# scopegraph attributes
WORKFLOW = "scopegraph.workflow"
RUN_ID = "scopegraph.run.id"
RUN_STATUS = "scopegraph.run.status"
STEP_ID = "scopegraph.step.id"
STEP_TOOL = "scopegraph.step.tool"            # the tool a step's plan names, on the executor's agent span
SPIFFE_ID = "scopegraph.spiffe_id"
GRANT_ID = "scopegraph.grant.id"
GRANT_EXPIRES_AT = "scopegraph.grant.expires_at"
DECISION = "scopegraph.decision"
POLICY_IDS = "scopegraph.decision.policy_ids"
DECISION_REASON = "scopegraph.decision.reason"
RISK = "scopegraph.tool.risk"
DATA_LABELS = "scopegraph.data_labels"
APPROVAL_ID = "scopegraph.approval.id"
APPROVER = "scopegraph.approval.approver"
APPROVAL_STATUS = "scopegraph.approval.status"
ATTEMPT = "scopegraph.attempt"
CALL_STATUS = "scopegraph.call.status"
REVOKED_COUNT = "scopegraph.grant.revoked_count"
SECRET_HANDLE = "scopegraph.secret.handle"    # a credential's handle: never the secret
SECRET_BROKER = "scopegraph.secret.broker"
SECRET_KIND = "scopegraph.secret.kind"        # "ephemeral" | "static"
SECRET_NAME = "scopegraph.secret.name"        # the tool parameter that receives it
SECRET_PRINCIPAL = "scopegraph.secret.principal"  # the downstream name: a role, an audience
TOKEN_AUDIENCE = "scopegraph.token.audience"
GRANT_REVOKED_WITH_CALL = "scopegraph.grant.revoked_with_call"  # written in the last call's transaction

_propagator = TraceContextTextMapPropagator()

# The id a model gave the tool call being made (see ``model_tool_call``). Set by the code
# that read it from the model's reply, read where the call's span starts: the gateway.
_MODEL_CALL_ID: ContextVar[str | None] = ContextVar("scopegraph_model_tool_call_id", default=None)
# A model's reply is untrusted: only an id-like value becomes an attribute.
_CALL_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


# A proxy until the application installs a provider, then it delegates to the real one,
# so it is safe to create at import time.
_TRACER = trace.get_tracer(TRACER_NAME)
_WITNESS_LOG = logging.getLogger(WITNESS_LOGGER)


def tracer() -> trace.Tracer:
    return _direct  # the proxy until ``enabled`` has seen a provider, then the provider's tracer


# ``get_tracer_provider`` looks up an environment variable on every call until an
# application installs a provider, and the global it keeps is set at most once: so a
# provider seen once stays, and while the global is still empty (and no provider is named
# in the environment) there is none, without the lookup.
_PROVIDER_FROM_ENV = bool(os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"))
_CAN_PEEK = hasattr(trace, "_TRACER_PROVIDER")
_installed = False
# The installed provider's own tracer, once there is one: ``_TRACER`` (a proxy) would look
# it up again and forward to it on every span. The global provider is set at most once, so
# the tracer found stays the right one.
_direct: trace.Tracer = _TRACER


def enabled() -> bool:
    """Whether an application installed a tracer provider: without one, spans are skipped
    outright (building attributes for a no-op span is most of a span's cost)."""
    global _installed, _direct
    if _installed:
        return True
    if _CAN_PEEK and not _PROVIDER_FROM_ENV and getattr(trace, "_TRACER_PROVIDER", None) is None:
        return False
    provider = trace.get_tracer_provider()
    _installed = not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider))
    if _installed:
        _direct = provider.get_tracer(TRACER_NAME)
    return _installed


class _NoSpan:
    """What ``span`` returns without an SDK: enters as ``INVALID_SPAN``, holds no state."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *exc: object) -> None:
        return None


_NO_SPAN = _NoSpan()


class _CurrentSpan:
    """A span made current for a ``with`` block; an exception sets ERROR and propagates.

    A class rather than a generator context manager: a span is opened several times per
    step, and the generator machinery (and ``start_as_current_span``'s own) cost more
    than the span."""

    __slots__ = ("_name", "_attributes", "_context", "_kind", "_span", "_token")

    def __init__(self, name: str, attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None,
                 context: Context | None, kind: SpanKind) -> None:
        self._name, self._attributes, self._context, self._kind = name, attributes, context, kind

    def __enter__(self) -> Span:
        attributes = self._attributes
        if callable(attributes):
            attributes = attributes()
        self._span = s = _direct.start_span(self._name, context=self._context, kind=self._kind,
                                            attributes=_clean(attributes) if attributes else None)
        self._token = otel_context.attach(trace.set_span_in_context(s))
        return s

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        s = self._span
        try:
            if exc_type is not None:
                s.set_status(Status(StatusCode.ERROR, exc_type.__name__))
        finally:
            otel_context.detach(self._token)
            s.end()


def span(name: str, attributes: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None, *,
         context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL) -> AbstractContextManager[Span]:
    """A span that records an exception as an error status and re-raises it.

    ``attributes`` may be a function that returns them: it is called only if an SDK
    records the span, so a caller without one builds nothing.
    """
    if not (_installed or enabled()):  # (the flag first: once set, it stays)
        return _NO_SPAN
    return _CurrentSpan(name, attributes, context, kind)


def set_error(s: Span, description: str) -> None:
    s.set_status(Status(StatusCode.ERROR, description))


def record_failure(s: Span, error_type: str, message: str) -> None:
    """Mark ``s`` failed: ``error.type``, an ``exception`` event and ERROR status.

    ``message`` must already be scrubbed of secrets (the gateway scrubs tool errors).
    """
    s.set_attribute(ERROR_TYPE, error_type)
    s.add_event(EXCEPTION_EVENT, {EXCEPTION_TYPE: error_type, EXCEPTION_MESSAGE: message})
    set_error(s, error_type)


def record_denial(s: Span, policy_ids: Iterable[str], reason: str) -> None:
    """Record a denial on ``s`` as an attribute and an event; its status stays unset."""
    ids = [str(p) for p in policy_ids]
    s.set_attribute(DECISION_REASON, reason)
    s.add_event(DENIED_EVENT, {POLICY_IDS: ids, DECISION_REASON: reason})


def witness_event(*, seq: int, records: int, head: str, kid: str, sig: str, at: float, prev: str,
                  path: str) -> None:
    """Copy a witness entry to the operator's telemetry backend, so that it holds a copy the
    store's writer cannot edit: an event on the current span (a run's, when a run pauses or
    ends), else a log record on the ``scopegraph.witness`` logger, which OpenTelemetry's
    logging handler exports when the application installs one (an answer given from the
    command line, an enrolment). The entry is public (hashes and a signature) and verifies
    on its own."""
    attributes: dict[str, str | int | float] = {
        "scopegraph.witness.seq": seq, "scopegraph.witness.records": records, "scopegraph.witness.head": head,
        "scopegraph.witness.kid": kid, "scopegraph.witness.sig": sig, "scopegraph.witness.at": at,
        "scopegraph.witness.prev": prev, "scopegraph.witness.path": path}
    current = trace.get_current_span()
    if enabled() and current.is_recording():
        current.add_event(WITNESS_EVENT, attributes)
        return
    _WITNESS_LOG.info("witness entry %d: %d ledger records, head %s", seq, records, head, extra=attributes)


@contextmanager
def model_tool_call(call_id: str | None) -> Iterator[None]:
    """The tool calls made inside answer the model's tool call ``call_id``: their
    ``execute_tool`` spans carry it as ``gen_ai.tool.call.id``, which links each to the
    ``chat`` span whose reply asked for it. An id that does not look like one is left out."""
    if not enabled() or not call_id or not _CALL_ID.fullmatch(call_id):
        yield
        return
    token = _MODEL_CALL_ID.set(call_id)
    try:
        yield
    finally:
        _MODEL_CALL_ID.reset(token)


def tool_call_span(tool: str, *, run_id: str, step_id: str, principal: object) -> Any:
    """The ``execute_tool {tool}`` span of one call, whatever comes of it: the decision of
    each attempt and each attempt's run are its children (a retry is the same call)."""
    return span(f"{EXECUTE_TOOL} {tool}", lambda: {
        GEN_AI_OPERATION: "execute_tool", GEN_AI_TOOL_NAME: tool, GEN_AI_TOOL_TYPE: "function",
        GEN_AI_TOOL_CALL_ID: _MODEL_CALL_ID.get(), RUN_ID: run_id, STEP_ID: step_id, SPIFFE_ID: str(principal),
    })


def tool_call_ended(s: Span, *, status: str, decision: str, policy_ids: Iterable[str], reasons: Iterable[str],
                    error_type: str | None = None) -> None:
    """What came of the call on its ``execute_tool`` span: a refusal is an event (see the
    module docstring), a failed tool sets ``error.type`` and ERROR."""
    if not s.is_recording():
        return
    ids = [str(p) for p in policy_ids]
    s.set_attributes({CALL_STATUS: status, DECISION: decision, POLICY_IDS: ids})  # one lock, not three
    if status == "denied":
        record_denial(s, ids, "; ".join(reasons))
    elif status == "error":
        s.set_attribute(ERROR_TYPE, error_type or "error")
        set_error(s, error_type or "error")


def inject_traceparent() -> dict[str, str]:
    """The current span context as W3C headers, to persist with a run."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def extract_context(carrier: Mapping[str, str] | None) -> Context | None:
    if not carrier:
        return None
    return _propagator.extract(dict(carrier))


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in attributes.items():
        kind = type(value)
        if kind is str or kind is int:  # most values: a name, an id, a count
            out[key] = value
        elif value is None:
            continue
        elif isinstance(value, (list, tuple, set, frozenset)):
            out[key] = [str(v) for v in value]
        elif isinstance(value, (str, bool, int, float)):
            out[key] = value
        else:
            out[key] = str(value)
    return out


class Metrics:
    """The instruments scopegraph records, through the OpenTelemetry metrics API."""

    def __init__(self) -> None:
        meter = metrics.get_meter(TRACER_NAME)
        self.decisions = meter.create_counter(
            "scopegraph.decisions", unit="{decision}", description="Tool-call decisions by outcome and policy")
        self.denials = meter.create_counter(
            "scopegraph.denials", unit="{decision}", description="Denied calls by reason class")
        self.grants_minted = meter.create_counter(
            "scopegraph.grants.minted", unit="{grant}", description="Grants minted")
        self.grants_revoked = meter.create_counter(
            "scopegraph.grants.revoked", unit="{grant}", description="Grants revoked")
        self.approval_wait = meter.create_histogram(
            "scopegraph.approval.wait", unit="s", description="Time from approval request to answer")
        self.secrets_issued = meter.create_counter(
            "scopegraph.secrets.issued", unit="{credential}", description="Downstream credentials issued")
        self.secrets_revoked = meter.create_counter(
            "scopegraph.secrets.revoked", unit="{credential}", description="Downstream credentials revoked")
        self.tool_latency = meter.create_histogram(
            "scopegraph.tool.duration", unit="s", description="Tool execution time")
