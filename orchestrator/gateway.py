"""The gateway: the only path from an executor to a tool.

Every call, retries included, goes through the same pipeline of named stages:

1. validate (``_authorize``, ``_check``): the tool exists; the grant verifies (signature,
   issuer, audience, lifetime) and is this run's, this step's and this identity's; the
   arguments validate and lie inside the grant's constraints; an approval presented with
   the call is for exactly this action (its digest recomputed);
2. scope and decide (``_check``): policy decides on the call as made;
3. record (``_record_decision``): ONE short write transaction takes the grant's use with a
   conditional update (a revoked, exhausted or unknown grant denies the call, and that
   denial is what is recorded), consumes the approval, records the decision, the use and
   the idempotency key, and appends the ledger records;
4. execute (``_execute``): the tool runs, with no transaction open;
5. record (``_called``): one transaction for the result, the use's outcome and the
   ledger record (and, for a step's last call, the step's end: see ``StepClosing``).

Stages 1 and 2 only read: no constraint check, policy evaluation or tool call runs
inside an open store write transaction, so a slow one never holds the write lock.
Any failure denies the call with a reason, including an exception nobody expected
while checking it (a policy engine's bug, an argument nested too deep to parse):
nothing reaches the tool without an ``allow`` decided at the moment of the call, and
nothing raised while deciding escapes the gateway. A tool's own exception becomes the
call's error, its message kept with every secret argument's value scrubbed out.

A host that runs a call itself (see ``scopegraph.session``) takes stages 1 to 3 from
``decide`` and stage 5 from ``record``; ``run``/``arun`` are stages 4 and 5. The call's
value types are in ``scopegraph.calls``, the checks that need no store in
``scopegraph.call_checks``, the scrubbing of what is recorded in ``scopegraph.call_redaction``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from . import tracing as tr
from .approvals import ApprovalService, action_digest_for
from .call_checks import (
    CALLER_LOOP,
    approval_problem,
    binding_mismatch,
    check_failed,
    cut_off_read,
    digest_of,
    observed,
    outside_scope,
    replayed,
    run_tool,
)
from .call_redaction import CallRedactor
from .calls import (
    APPROVAL_POLICY_ID,
    CHECK_POLICY_ID,
    GRANT_POLICY_ID,
    MAX_ERROR_CHARS,
    SCOPE_POLICY_ID,
    STORE_POLICY_ID,
    TOOL_POLICY_ID,
    CallContext,
    CallResult,
    CallStatus,
    Decided,
    RetrySettings,
    StepClosing,
    call_key,
    grant_minted_fields,
)
from .canonical import sha256_hex
from .clock import Clock
from .credentials import Grant, GrantIssuer
from .errors import (
    ApprovalError,
    GrantError,
    ScopegraphError,
    SecretError,
    StoreError,
    ToolArgumentsError,
    ToolExecutionError,
    TransientToolError,
    UnknownToolError,
)
from .ledger import Ledger
from .policy import CallRequest, Decision, PolicyEngine
from .provenance import trace_arguments
from .store import CallRecord, Store, UseRecord
from .tools import Tool, ToolRegistry

if TYPE_CHECKING:
    from .brokers.service import SecretService

# The call's value types live in ``scopegraph.calls``; hosts import them from here too.
__all__ = [
    "APPROVAL_POLICY_ID", "CALLER_LOOP", "CHECK_POLICY_ID", "GRANT_POLICY_ID", "MAX_ERROR_CHARS", "SCOPE_POLICY_ID",
    "STORE_POLICY_ID", "TOOL_POLICY_ID", "CallContext", "CallResult", "CallStatus", "Decided", "Gateway",
    "RetrySettings", "StepClosing", "call_key", "grant_minted_fields",
]

# A tool's value as recorded (and replayed): ``json.dumps(value, default=str, sort_keys=True)``,
# its encoder made once rather than per call; the same text, the same errors.
_result_json = json.JSONEncoder(default=str, sort_keys=True).encode


class _Denied(Exception):
    def __init__(self, decision: Decision, grant_id: str | None = None) -> None:
        self.decision = decision
        self.grant_id = grant_id


@dataclass(frozen=True, kw_only=True)
class _Approval:
    """An approval presented with a call and checked for it: consumed when the use is taken."""

    id: str
    digest: str
    consumer: str  # the call's idempotency key


@dataclass(frozen=True, kw_only=True)
class _Checked:
    """What the checking stages concluded about one call, before anything is written.

    ``grant`` is set once the grant verified and is bound to the call: the call then
    spends one of its uses, whatever was decided. ``grant_id`` names the presented
    grant once its signature verified, bound or not.
    """

    decision: Decision
    tool: Tool | None = None
    grant: Grant | None = None
    grant_id: str | None = None
    normalized: dict[str, Any] | None = None
    approval: _Approval | None = None


@dataclass(frozen=True, kw_only=True)
class _Recorded:
    """What the record stage wrote: the final decision, and the call's result when it
    ends there (refused, paused for approval, or replayed) instead of running."""

    decision: Decision
    grant_id: str | None
    digest: str | None  # of the arguments, as recorded
    result: CallResult | None
    closed: bool  # the step ended in the same transaction


class Gateway:
    """Authorizes and executes tool calls. Holds no standing credential of its own."""

    def __init__(
        self,
        *,
        tools: ToolRegistry,
        issuer: GrantIssuer,
        policy: PolicyEngine,
        store: Store,
        clock: Clock,
        retry: RetrySettings | None = None,
        approvals: ApprovalService | None = None,
        ledger: Ledger | None = None,
        metrics: tr.Metrics | None = None,
        secrets: SecretService | None = None,
    ) -> None:
        self.secrets = secrets  # downstream credentials, issued per step after a call is allowed
        self.redact = CallRedactor(tools, secrets)  # what is recorded of a call, its secrets taken out
        self.approvals = approvals
        self.ledger = ledger
        self.metrics = metrics or tr.Metrics()
        self.tools = tools
        self.issuer = issuer
        self.policy = policy
        self.store = store
        self.clock = clock
        self.retry = retry or RetrySettings()

    def call(self, token: str, tool: str, arguments: Mapping[str, Any], ctx: CallContext, *,
             call_key: str | None = None, approval_id: str | None = None,
             closing: StepClosing | None = None, on_held: Callable[[CallResult], None] | None = None,
             ) -> CallResult:
        """``_call``, traced as one ``execute_tool`` span: its decisions, runs and outcome."""
        with tr.tool_call_span(tool, run_id=ctx.run_id, step_id=ctx.step_id, principal=ctx.principal) as s:
            result = self._call(token, tool, arguments, ctx, call_key=call_key, approval_id=approval_id,
                                closing=closing, on_held=on_held)
            _call_ended(s, result)
            return result

    def _call(
        self,
        token: str,
        tool: str,
        arguments: Mapping[str, Any],
        ctx: CallContext,
        *,
        call_key: str | None = None,
        approval_id: str | None = None,
        closing: StepClosing | None = None,
        on_held: Callable[[CallResult], None] | None = None,
    ) -> CallResult:
        """Authorize and run one call; retry transient failures, re-authorizing each try.

        ``call_key`` names this call for idempotency: a call whose key already completed
        returns its recorded result instead of running again (crash recovery). An
        ``approval_id`` presents a human approval for exactly this call. ``closing`` makes
        this the step's last call: the step ends in the transaction that records its
        final result (see ``StepClosing``). ``on_held`` is as for ``decide``.
        """
        # The common case is one attempt: the retry machinery is built only after a
        # transient failure. Every retry goes through ``_attempt`` again: a new decision.
        try:
            return self._attempt(token, tool, arguments, ctx, 1, call_key, approval_id, closing, on_held)
        except TransientToolError as exc:
            last: BaseException | None = exc
        attempt_no = 1
        sleep = self.retry.sleep or time.sleep
        if self.retry.attempts > 1:
            sleep(self.retry.wait_initial)
            retrying = Retrying(
                retry=retry_if_exception_type(TransientToolError),
                stop=stop_after_attempt(self.retry.attempts - 1),
                wait=wait_exponential(multiplier=self.retry.wait_initial * 2, max=self.retry.wait_max),
                reraise=False,
                sleep=sleep,
            )
            try:
                for attempt in retrying:
                    with attempt:
                        attempt_no = attempt.retry_state.attempt_number + 1
                        return self._attempt(token, tool, arguments, ctx, attempt_no, call_key, approval_id,
                                             closing, on_held)
            except RetryError as exc:
                last = exc.last_attempt.exception()
        return CallResult(
            tool=tool, arguments=dict(arguments), status="error",
            decision=Decision(outcome="allow"), attempts=attempt_no,
            error=self.redact.failure(tool, f"{type(last).__name__} after {attempt_no} attempts", last, arguments),
            error_type=f"{type(last).__name__} after {attempt_no} attempts",
            labels=self.tools[tool].labels if tool in self.tools else frozenset(),
        )

    def _attempt(
        self, token: str, tool_name: str, arguments: Mapping[str, Any], ctx: CallContext, attempt: int,
        call_key: str | None, approval_id: str | None, closing: StepClosing | None = None,
        on_held: Callable[[CallResult], None] | None = None,
    ) -> CallResult:
        decided = self.decide(token, tool_name, arguments, ctx, attempt=attempt, call_key=call_key,
                              approval_id=approval_id, closing=closing, on_held=on_held)
        return self.run(decided, ctx, closing=closing)

    def decide(
        self, token: str, tool_name: str, arguments: Mapping[str, Any], ctx: CallContext, *,
        attempt: int = 1, call_key: str | None = None, approval_id: str | None = None,
        closing: StepClosing | None = None, on_held: Callable[[CallResult], None] | None = None,
    ) -> Decided:
        """Stages 1 to 3 for one attempt: validate, scope, decide, and record the decision.

        The decision is written (the grant's use taken, an approval presented consumed)
        whatever it is; an allowed call then goes to ``run`` or ``record``. ``on_held``
        is called with the result of a call held for approval, inside the transaction
        that records the decision (the host's approval request lands with it).
        """
        # An approval is consumed once: a retry of an approved call cannot present it again.
        approval_id = approval_id if attempt == 1 else None
        key = f"{call_key}#{attempt}" if call_key else None
        closing = closing if closing is not None and closing.result is None else None
        with tr.span(tr.DECIDE, lambda: {tr.GEN_AI_TOOL_NAME: tool_name, tr.STEP_ID: ctx.step_id,
                                         tr.SPIFFE_ID: str(ctx.principal), tr.ATTEMPT: attempt,
                                         tr.DATA_LABELS: sorted(ctx.data_labels),
                                         tr.APPROVAL_ID: approval_id}) as decide_span:
            try:
                # validate → scope → decide: reads only. No write transaction is open, so a
                # slow check (a pattern, a policy) never holds the store's write lock.
                checked = self._checked(token, tool_name, arguments, ctx, attempt, approval_id, key)
                # record: one short transaction for the use taken (or refused), the approval
                # consumed, the decision's records and the idempotency key.
                recorded = self._record_decision(checked, tool_name, arguments, ctx, attempt, key, closing,
                                                 on_held)
            except StoreError as exc:
                # No store, no verified grant and no record of the call: fail closed.
                outage = Decision.deny(f"the store is unavailable, so the call is denied: {exc}",
                                       STORE_POLICY_ID)
                decide_span.set_attribute(tr.DECISION, "deny")
                tr.set_error(decide_span, "store unavailable")
                self.metrics.denials.add(1, {"reason": STORE_POLICY_ID, "tool": tool_name})
                return Decided(tool_name=tool_name, arguments=arguments, attempt=attempt, key=key,
                               decision=outage, result=CallResult(
                                   tool=tool_name, arguments=dict(arguments), status="denied",
                                   decision=outage, attempts=attempt))
            self._decided(decide_span, tool_name, recorded.grant_id, recorded.decision,
                          checked.tool if recorded.decision.outcome != "deny" else None)
        if closing is not None and recorded.closed:
            closing.result = recorded.result
        return Decided(tool_name=tool_name, arguments=arguments, attempt=attempt, key=key,
                       decision=recorded.decision, result=recorded.result, grant_id=recorded.grant_id,
                       tool=checked.tool, grant=checked.grant, normalized=checked.normalized,
                       digest=recorded.digest)

    def run(self, decided: Decided, ctx: CallContext, *, closing: StepClosing | None = None) -> CallResult:
        """Stages 4 and 5: run an allowed call's tool and record its result.

        A call that ended at its decision (refused, held for approval, replayed) returns
        that result and runs nothing.

        Raises:
            TransientToolError: the tool failed in a way worth retrying; the failed attempt
                is recorded, and a retry is a new call, decided again.
        """
        if decided.result is not None:
            return decided.result
        tool, grant, normalized = decided.tool, decided.grant, decided.normalized
        assert tool is not None and grant is not None and normalized is not None  # an allowed call was checked
        closing = closing if closing is not None and closing.result is None else None
        with tr.span(tr.TOOL_CALL, {tr.GEN_AI_TOOL_NAME: tool.name, tr.GRANT_ID: grant.jti,
                                    tr.ATTEMPT: decided.attempt, tr.RISK: tool.risk.value}) as call_span:
            try:
                result = self._execute(tool, grant, normalized, decided.decision, ctx, decided.attempt, decided.key,
                                       decided.arguments, closing=closing, digest=decided.digest)
            except TransientToolError as exc:
                call_span.set_attribute(tr.CALL_STATUS, "error")
                tr.record_failure(call_span, type(exc).__name__,
                                  self.redact.text(tool.name, str(exc), decided.arguments, normalized))
                raise
            call_span.set_attribute(tr.CALL_STATUS, result.status)
            if not result.ok:
                tr.record_failure(call_span, result.error_type or "error", result.error or "")
            return result

    async def arun(self, decided: Decided, ctx: CallContext, *, closing: StepClosing | None = None) -> CallResult:
        """``run`` for a caller on an event loop: an async tool is awaited on that loop (no
        thread, no loop of its own); a sync tool runs as ``run`` runs it.

        Raises:
            TransientToolError: as for ``run``.
        """
        tool, grant, normalized = decided.tool, decided.grant, decided.normalized
        if decided.result is not None or tool is None or not tool.is_async:
            return self.run(decided, ctx, closing=closing)
        assert grant is not None and normalized is not None  # an allowed call was checked
        closing = closing if closing is not None and closing.result is None else None
        with tr.span(tr.TOOL_CALL, {tr.GEN_AI_TOOL_NAME: tool.name, tr.GRANT_ID: grant.jti,
                                    tr.ATTEMPT: decided.attempt, tr.RISK: tool.risk.value}) as call_span:
            started = time.perf_counter()
            value: Any = None
            failure: Exception | None = None
            try:
                value = await tool.invoke(normalized, grant.danger_token() if tool.takes_grant else None,
                                          self._credentials(tool, grant))
            except Exception as exc:
                failure = exc
            if isinstance(failure, TransientToolError):
                # As ``_execute``: the attempt is recorded, and a retry is decided afresh.
                error = self.redact.failure(tool.name, type(failure).__name__, failure, decided.arguments, normalized)
                self._called(ctx, tool, grant, decided.decision, decided.attempt, normalized, "error", None, started,
                             decided.key, None, error_type=type(failure).__name__, digest=decided.digest, error=error)
                call_span.set_attribute(tr.CALL_STATUS, "error")
                tr.record_failure(call_span, type(failure).__name__, error)
                raise failure
            result = self._recorded_result(decided, ctx, value, failure, started, closing, extra_labels=frozenset())
            call_span.set_attribute(tr.CALL_STATUS, result.status)
            if not result.ok:
                tr.record_failure(call_span, result.error_type or "error", result.error or "")
            return result

    async def acall(
        self, token: str, tool: str, arguments: Mapping[str, Any], ctx: CallContext, *,
        call_key: str | None = None, approval_id: str | None = None, closing: StepClosing | None = None,
        on_held: Callable[[CallResult], None] | None = None,
    ) -> CallResult:
        """``call`` for a caller on an event loop: an async tool is awaited on that loop,
        and a retry waits without blocking it. Every retry is decided again."""
        with tr.tool_call_span(tool, run_id=ctx.run_id, step_id=ctx.step_id, principal=ctx.principal) as s:
            result = await self._acall(token, tool, arguments, ctx, call_key=call_key, approval_id=approval_id,
                                       closing=closing, on_held=on_held)
            _call_ended(s, result)
            return result

    async def _acall(
        self, token: str, tool: str, arguments: Mapping[str, Any], ctx: CallContext, *,
        call_key: str | None, approval_id: str | None, closing: StepClosing | None,
        on_held: Callable[[CallResult], None] | None,
    ) -> CallResult:
        attempt = 1
        last: BaseException | None = None
        while attempt <= max(1, self.retry.attempts):
            decided = self.decide(token, tool, arguments, ctx, attempt=attempt, call_key=call_key,
                                  approval_id=approval_id, closing=closing, on_held=on_held)
            try:
                return await self.arun(decided, ctx, closing=closing)
            except TransientToolError as exc:
                last = exc
            if attempt >= self.retry.attempts:
                break
            wait = min(self.retry.wait_max, self.retry.wait_initial * (2 ** (attempt - 1)))
            if self.retry.sleep is not None:
                self.retry.sleep(wait)
            else:
                await asyncio.sleep(wait)
            attempt += 1
        return CallResult(
            tool=tool, arguments=dict(arguments), status="error",
            decision=Decision(outcome="allow"), attempts=attempt,
            error=self.redact.failure(tool, f"{type(last).__name__} after {attempt} attempts", last, arguments),
            error_type=f"{type(last).__name__} after {attempt} attempts",
            labels=self.tools[tool].labels if tool in self.tools else frozenset(),
        )

    def record(self, decided: Decided, ctx: CallContext, *, value: Any = None, error: BaseException | str | None = None,
               labels: Iterable[str] = (), closing: StepClosing | None = None) -> CallResult:
        """Stage 5 for a call the host ran itself: record its ``value`` (or its ``error``)
        as a gateway-run call's result is recorded, with the same spans and ledger record.

        ``labels`` add to the tool's own labels (a host may know more about what came back;
        it cannot declare the tool's output cleaner than the tool does).
        """
        if decided.result is not None:
            return decided.result
        tool, grant = decided.tool, decided.grant
        assert tool is not None and grant is not None
        started = decided.started
        with tr.span(tr.TOOL_CALL, {tr.GEN_AI_TOOL_NAME: tool.name, tr.GRANT_ID: grant.jti,
                                    tr.ATTEMPT: decided.attempt, tr.RISK: tool.risk.value,
                                    "scopegraph.tool.run_by": "host"}) as call_span:
            failure: BaseException | None
            if error is None:
                failure = None
            elif isinstance(error, BaseException):
                failure = error
            else:
                failure = ToolExecutionError(str(error))
            result = self._recorded_result(decided, ctx, value, failure, started,
                                           closing if closing is not None and closing.result is None else None,
                                           extra_labels=frozenset(labels))
            call_span.set_attribute(tr.CALL_STATUS, result.status)
            if not result.ok:
                tr.record_failure(call_span, result.error_type or "error", result.error or "")
            return result

    def _recorded_result(self, decided: Decided, ctx: CallContext, value: Any, failure: BaseException | None,
                         started: float, closing: StepClosing | None, *, extra_labels: frozenset[str]) -> CallResult:
        """Record the outcome of a call that ran outside ``_execute`` (awaited, or run by the host)."""
        tool, grant, normalized = decided.tool, decided.grant, decided.normalized
        assert tool is not None and grant is not None and normalized is not None
        labels = tool.labels | extra_labels
        result_json: str | None = None
        if failure is None:
            try:
                result_json = _result_json(value)
            except Exception as exc:  # as ``_execute``: a value that cannot be recorded fails the call
                failure = exc
        if failure is not None:
            kind = type(failure).__name__
            error = self.redact.failure(tool.name, kind, failure, decided.arguments, normalized)
            failed = CallResult(tool=tool.name, arguments=normalized, status="error", decision=decided.decision,
                                error=error, attempts=decided.attempt, grant_id=grant.jti, error_type=kind,
                                labels=labels)
            self._called(ctx, tool, grant, decided.decision, decided.attempt, normalized, "error", json.dumps(error),
                         started, decided.key, None, error_type=kind, error=error, digest=decided.digest,
                         result=failed, closing=closing)
            return failed
        done = CallResult(tool=tool.name, arguments=normalized, status="ok", decision=decided.decision,
                          value=value, labels=labels, attempts=decided.attempt, grant_id=grant.jti)
        self._called(ctx, tool, grant, decided.decision, decided.attempt, normalized, "ok", result_json, started,
                     decided.key, result_json, digest=decided.digest, result=done, closing=closing)
        return done

    def _execute(self, tool: Tool, grant: Grant, normalized: dict[str, Any], decision: Decision,
                 ctx: CallContext, attempt: int, key: str | None, raw: Mapping[str, Any], *,
                 closing: StepClosing | None = None, digest: str | None = None) -> CallResult:
        started = time.perf_counter()
        try:
            value = run_tool(tool, normalized, grant.danger_token() if tool.takes_grant else None,
                         self._credentials(tool, grant))
            result_json = _result_json(value)
        except TransientToolError as exc:
            # Not the call's final result: the retry loop in ``call`` authorizes the next
            # attempt from scratch, so the step is not closed here.
            self._called(ctx, tool, grant, decision, attempt, normalized, "error", None, started, key, None,
                         error_type=type(exc).__name__, digest=digest,
                         error=self.redact.failure(tool.name, type(exc).__name__, exc, raw, normalized))
            raise exc
        except Exception as exc:
            # A value the tool returned that cannot be recorded (nested too deep, a cycle)
            # fails the call like an exception: it could not be replayed after a crash.
            error = self.redact.failure(tool.name, type(exc).__name__, exc, raw, normalized)
            failed = CallResult(tool=tool.name, arguments=normalized, status="error", decision=decision,
                                error=error, attempts=attempt, grant_id=grant.jti,
                                error_type=type(exc).__name__, labels=tool.labels)
            self._called(ctx, tool, grant, decision, attempt, normalized, "error", json.dumps(error),
                         started, key, None, error_type=type(exc).__name__, error=error, digest=digest,
                         result=failed, closing=closing)
            return failed
        done = CallResult(tool=tool.name, arguments=normalized, status="ok", decision=decision,
                          value=value, labels=tool.labels, attempts=attempt, grant_id=grant.jti)
        self._called(ctx, tool, grant, decision, attempt, normalized, "ok", result_json, started, key,
                     result_json, digest=digest, result=done, closing=closing)
        return done

    def _credentials(self, tool: Tool, grant: Grant) -> dict[str, Any] | None:
        """The downstream credentials ``tool`` declares, issued for this call's step: passed
        to the tool only, never to the executor (see ``scopegraph.brokers``)."""
        if not tool.credentials:
            return None
        if self.secrets is None:
            raise SecretError(f"tool {tool.name!r} declares credentials, but no broker serves this gateway")
        return self.secrets.credentials_for(tool, grant)

    def _decided(self, s: Any, tool_name: str, jti: str | None, decision: Decision, tool: Tool | None) -> None:
        """Account for one recorded decision: span attributes and metrics."""
        s.set_attribute(tr.DECISION, decision.outcome)
        s.set_attribute(tr.POLICY_IDS, list(decision.policy_ids))
        if jti:
            s.set_attribute(tr.GRANT_ID, jti)
        if tool is not None:
            s.set_attribute(tr.RISK, tool.risk.value)
        if decision.outcome == "deny":  # an outcome, not an error: an event and attributes
            tr.record_denial(s, decision.policy_ids, "; ".join(decision.reasons))
        policy = ",".join(decision.policy_ids) or "none"
        self.metrics.decisions.add(1, {"outcome": decision.outcome, "policy": policy, "tool": tool_name})
        if decision.outcome == "deny":
            self.metrics.denials.add(1, {"reason": decision.policy_ids[0] if decision.policy_ids else "none",
                                         "tool": tool_name})

    def _record_decision(self, checked: _Checked, tool_name: str, arguments: Mapping[str, Any],
                         ctx: CallContext, attempt: int, key: str | None,
                         closing: StepClosing | None,
                         on_held: Callable[[CallResult], None] | None = None) -> _Recorded:
        """The record stage: one transaction for everything written before a tool runs.

        The grant's row (if its mint was deferred), the use taken by a conditional update
        that refuses a revoked, exhausted or unknown grant (the call is then denied, and
        that denial is what is recorded), the approval consumed, the idempotency key, the
        use of a refused call and the ledger records, chained in this transaction. Rows
        are written before the ledger's tip is taken (the store's lock order). A call that
        ends here (refused, paused for approval, replayed) ends its step here too when
        ``closing`` says this is the step's last call.

        Should writing raise anything but a store failure (a bug), nothing of it is
        written, and the call is denied, that denial recorded on its own.
        """
        try:
            return self._write_decision(checked, tool_name, arguments, ctx, attempt, key, closing, on_held)
        except StoreError:
            raise
        except Exception as exc:
            failed = _Checked(decision=check_failed(exc), tool=checked.tool, grant_id=checked.grant_id)
            return self._write_decision(failed, tool_name, arguments, ctx, attempt, key, None, None)

    def _write_decision(self, checked: _Checked, tool_name: str, arguments: Mapping[str, Any],
                        ctx: CallContext, attempt: int, key: str | None,
                        closing: StepClosing | None,
                        on_held: Callable[[CallResult], None] | None) -> _Recorded:
        decision, grant, tool = checked.decision, checked.grant, checked.tool
        minted = consumed = revoked = False
        earlier: CallRecord | None = None
        result: CallResult | None = None
        with self.store.atomic():
            if grant is not None:  # a verified grant bound to this call: the call spends a use
                minted, consumed, decision = self._take_use(grant, checked.approval, decision)
            if decision.outcome == "deny":
                decision = self.redact.decision(tool_name, decision, arguments)
            # A refused call is recorded with the arguments it was given; a decided one with
            # the arguments as the tool would see them.
            recorded = arguments if decision.outcome == "deny" or checked.normalized is None else checked.normalized
            digest = digest_of(recorded)
            if decision.outcome == "allow":
                assert tool is not None and grant is not None and checked.normalized is not None
                if key is not None:
                    earlier = self.store.begin_call(key, run_id=ctx.run_id, step_id=ctx.step_id,
                                                    tool=tool_name, at=self.clock.now())
                if earlier is not None and not cut_off_read(earlier, tool):
                    result = replayed(earlier, tool, grant, checked.normalized, decision, attempt)
            elif decision.outcome == "needs_approval":
                assert grant is not None and checked.normalized is not None
                result = CallResult(tool=tool_name, arguments=checked.normalized, status="needs_approval",
                                    decision=decision, attempts=attempt, grant_id=grant.jti)
            else:
                result = CallResult(tool=tool_name, arguments=dict(arguments), status="denied",
                                    decision=decision, attempts=attempt, grant_id=checked.grant_id)
            if decision.outcome != "allow":  # an allowed call is counted once it has run (``_called``)
                self._record(checked.grant_id, ctx, tool_name, attempt, "denied", decision, recorded)
            closes = closing is not None and result is not None and grant is not None
            if closing is not None and result is not None and grant is not None:
                revoked = self.issuer.revoke(grant.jti, reason=closing.reason)
            if self.ledger is not None:
                if minted and grant is not None:
                    secrets = tool.secrets if tool is not None else ()
                    self.ledger.append("grant_minted", ctx.run_id, **grant_minted_fields(grant, secrets))
                if consumed and grant is not None and checked.approval is not None:
                    self.ledger.append("approval_consumed", ctx.run_id, approval_id=checked.approval.id,
                                       step_id=ctx.step_id, digest=checked.approval.digest, grant_id=grant.jti)
                self.ledger.append(
                    "decision", ctx.run_id, step_id=ctx.step_id, tool=tool_name, grant_id=checked.grant_id,
                    spiffe_id=str(ctx.principal), attempt=attempt, decision=decision.outcome,
                    policy_ids=list(decision.policy_ids), reasons=list(decision.reasons),
                    arguments_digest=digest,
                )
                if result is not None and earlier is not None and grant is not None:
                    self.ledger.append(
                        "tool_call", ctx.run_id, step_id=ctx.step_id, tool=tool_name, grant_id=grant.jti,
                        attempt=attempt, status=result.status, replayed=True,
                        arguments_digest=digest, result_digest=None, duration_ms=0.0,
                    )
            if on_held is not None and result is not None and result.status == "needs_approval":
                on_held(result)  # the host's approval request, in the decision's write
            if closing is not None and result is not None and closes:
                closing.end(result, revoked)
        return _Recorded(decision=decision, grant_id=checked.grant_id, digest=digest, result=result,
                         closed=closes)

    def _take_use(self, grant: Grant, approval: _Approval | None,
                  decision: Decision) -> tuple[bool, bool, Decision]:
        """Take one use of ``grant`` (the first one writes its row, if its mint was deferred)
        and consume ``approval`` with it: ``(written now, approval consumed, decision)``.
        A revoked, exhausted or unknown grant, or an approval used or expired since it was
        read, denies the call."""
        minted = self.issuer.write_unwritten(grant.jti, taking_use=True)
        try:
            if not minted:
                self.issuer.consume_use(grant)
        except GrantError as exc:
            return minted, False, Decision.deny(str(exc), GRANT_POLICY_ID)
        if approval is None:
            return minted, False, decision
        assert self.approvals is not None  # checked with the approval
        try:
            self.approvals.consume(approval.id, digest=approval.digest, consumer=approval.consumer)
        except ApprovalError as exc:
            return minted, False, Decision.deny(str(exc), APPROVAL_POLICY_ID)
        return minted, True, decision

    def _called(self, ctx: CallContext, tool: Tool, grant: Grant, decision: Decision, attempt: int,
                normalized: Mapping[str, Any], status: Literal["ok", "error"], stored: str | None,
                started: float, key: str | None, result_json: str | None,
                error_type: str | None = None, error: str | None = None, *, digest: str | None = None,
                result: CallResult | None = None, closing: StepClosing | None = None) -> None:
        """Account for one execution in one transaction: idempotency record, use record,
        ledger, and (for a step's last call) the step's end. Should ending the step raise
        anything but a store failure (a bug), the execution is recorded without it and the
        host ends the step itself."""
        elapsed = time.perf_counter() - started
        self.metrics.tool_latency.record(elapsed, {"tool": tool.name, "status": status})
        closes = closing is not None and result is not None
        try:
            self._write_result(ctx, tool, grant, decision, attempt, normalized, status, stored, key, result_json,
                               error_type, error, digest, elapsed, result if closes else None, closing)
        except StoreError:
            raise
        except Exception:
            if not closes:
                raise
            closes = False
            self._write_result(ctx, tool, grant, decision, attempt, normalized, status, stored, key, result_json,
                               error_type, error, digest, elapsed, None, None)
        if closes and closing is not None:
            closing.result = result

    def _write_result(self, ctx: CallContext, tool: Tool, grant: Grant, decision: Decision, attempt: int,
                      normalized: Mapping[str, Any], status: Literal["ok", "error"], stored: str | None,
                      key: str | None, result_json: str | None, error_type: str | None, error: str | None,
                      digest: str | None, elapsed: float, result: CallResult | None,
                      closing: StepClosing | None) -> None:
        with self.store.atomic():
            self._finish(key, status, stored)
            self._record(grant.jti, ctx, tool.name, attempt, status, decision, normalized)
            revoked = False
            if closing is not None and result is not None:  # a row: before the ledger's tip is taken
                revoked = self.issuer.revoke(grant.jti, reason=closing.reason)
            if self.ledger is not None:
                self.ledger.append(
                    "tool_call", ctx.run_id, step_id=ctx.step_id, tool=tool.name, grant_id=grant.jti,
                    attempt=attempt, status=status,
                    arguments_digest=digest if digest is not None else digest_of(normalized),
                    result_digest=sha256_hex(result_json) if result_json is not None else None,
                    duration_ms=round(elapsed * 1000, 3), error_type=error_type,
                    **({"error": error} if error is not None else {}),
                )
            if closing is not None and result is not None:
                closing.end(result, revoked)

    def _finish(self, key: str | None, status: str, result: str | None) -> None:
        if key is not None:
            self.store.finish_call(key, status=status, result=result, at=self.clock.now())

    def _checked(
        self, token: str, tool_name: str, arguments: Mapping[str, Any], ctx: CallContext, attempt: int,
        approval_id: str | None, key: str | None,
    ) -> _Checked:
        """validate → scope → decide, reading only. Any failure is a denial, including an
        exception nobody expected (only the store's failure escapes: the call fails closed)."""
        try:
            tool, grant = self._authorize(token, tool_name, ctx)
        except _Denied as denied:
            return _Checked(decision=denied.decision, grant_id=denied.grant_id)
        except StoreError:
            raise
        except Exception as exc:
            return _Checked(decision=check_failed(exc))
        try:
            return self._check(tool, grant, arguments, ctx, attempt, approval_id, key)
        except _Denied as denied:
            return _Checked(decision=denied.decision, tool=tool, grant=grant, grant_id=grant.jti)
        except StoreError:
            raise
        except Exception as exc:
            return _Checked(decision=check_failed(exc), tool=tool, grant=grant, grant_id=grant.jti)

    def _authorize(self, token: str, tool_name: str, ctx: CallContext) -> tuple[Tool, Grant]:
        """The tool, and the grant presented for it: signature, issuer, audience, lifetime,
        and bound to this run, step, workflow and identity. Its use is taken later, when
        the decision is recorded."""
        try:
            tool = self.tools.get_tool(tool_name)
        except UnknownToolError as exc:
            raise _Denied(Decision.deny(str(exc), TOOL_POLICY_ID)) from None
        try:
            grant = self.issuer.verify(token, tool=tool_name)
        except GrantError as exc:
            raise _Denied(Decision.deny(str(exc), GRANT_POLICY_ID)) from None
        mismatch = binding_mismatch(grant, ctx)
        if mismatch:
            raise _Denied(Decision.deny(mismatch, GRANT_POLICY_ID), grant.jti)
        return tool, grant

    def _check(
        self, tool: Tool, grant: Grant, arguments: Mapping[str, Any], ctx: CallContext, attempt: int,
        approval_id: str | None, key: str | None,
    ) -> _Checked:
        """Validate, scope and decide one call of a verified grant."""
        try:
            normalized = tool.validate_arguments(arguments)
        except ToolArgumentsError as exc:
            raise _Denied(Decision.deny(str(exc), SCOPE_POLICY_ID), grant.jti) from None
        outside = outside_scope(grant, arguments, normalized)
        if outside:
            raise _Denied(Decision.deny(outside, SCOPE_POLICY_ID), grant.jti)
        approval, approval_count = None, 0
        if approval_id is not None:
            approval, approval_count = self._check_approval(approval_id, tool, normalized, ctx, grant,
                                                            key or uuid.uuid4().hex)
        request = CallRequest(
            principal=ctx.principal, role=ctx.role, workflow=ctx.workflow, run_id=ctx.run_id,
            step_id=ctx.step_id, tool=tool, arguments=normalized, data_labels=ctx.data_labels,
            in_plan=True, attempt=attempt, approved=approval is not None, approval_count=approval_count,
            provenance=trace_arguments(normalized, grant.constraints if ctx.planned is None else ctx.planned,
                                       ctx.observations, passed=arguments),
            widened=ctx.widened,
        )
        try:
            decision = self.policy.decide(request)
        except ScopegraphError as exc:
            decision = Decision.deny(f"policy failed, failing closed: {exc}", "policy-error")
        except Exception as exc:  # a policy engine's bug: its message may quote the arguments
            decision = Decision.deny(f"policy evaluation raised {type(exc).__name__}; denied to fail closed",
                                     "policy-error")
        # A denied call still spends its use; the approval it presented is consumed with it.
        return _Checked(decision=decision, tool=tool, grant=grant, grant_id=grant.jti, normalized=normalized,
                        approval=approval)

    def _check_approval(self, approval_id: str, tool: Tool, normalized: Mapping[str, Any],
                        ctx: CallContext, grant: Grant, consumer: str) -> tuple[_Approval, int]:
        """Recompute the digest of the call actually made and check the approval for it.

        Read, not consumed: ``_take_approval`` consumes it atomically with the call's use,
        checking it again. Returns the approval to consume and its number of approvers.
        """
        if self.approvals is None:
            raise _Denied(Decision.deny("no approval service is configured", APPROVAL_POLICY_ID), grant.jti)
        try:
            approval = self.approvals.get(approval_id)
        except (ApprovalError, StoreError) as exc:
            raise _Denied(Decision.deny(str(exc), APPROVAL_POLICY_ID), grant.jti) from None
        # The digest in the layout the request was made with (stored requests keep theirs).
        digest = action_digest_for(approval.digest_version, run_id=ctx.run_id, step_id=ctx.step_id,
                                   tool=tool.name, arguments=normalized, policy_version=self.policy.version)
        problem = approval_problem(approval, digest, consumer, self.clock.now())
        if problem is None and (approval.run_id != ctx.run_id or approval.step_id != ctx.step_id):
            problem = f"approval {approval_id!r} is for another step"
        if problem is not None:
            raise _Denied(Decision.deny(problem, APPROVAL_POLICY_ID), grant.jti)
        return _Approval(id=approval_id, digest=digest, consumer=consumer), len(set(approval.approvers))

    def _record(self, jti: str | None, ctx: CallContext, tool: str, attempt: int,
                outcome: Literal["ok", "denied", "error"], decision: Decision,
                arguments: Mapping[str, Any]) -> None:
        if jti is None:
            return  # no verified grant: nothing to count against
        known = self.tools.get(tool)
        self.store.record_use(UseRecord(
            jti=jti, run_id=ctx.run_id, step_id=ctx.step_id, tool=tool, attempt=attempt,
            outcome=outcome, decision=decision.outcome, policy_ids=decision.policy_ids,
            at=self.clock.now(), observed=observed(arguments, known.secrets if known else frozenset()),
        ))


def _call_ended(span: Any, result: CallResult) -> None:
    tr.tool_call_ended(span, status=result.status, decision=result.decision.outcome,
                       policy_ids=result.decision.policy_ids, reasons=result.decision.reasons,
                       error_type=result.error_type)
