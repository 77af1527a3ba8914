"""The gateway: the only path from an executor to a tool.

Every call, retries included, goes through the same pipeline:
verify the grant (signature, issuer, audience, lifetime) → check it is this run's,
this step's and this identity's → take one use (revocation and remaining uses,
atomically in the store) → validate the arguments → check them against the grant's
constraints → decide with policy → execute → label the output → record the use.
Any failure denies the call with a reason; nothing reaches the tool without an
``allow`` decided at the moment of the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from .clock import Clock
from .credentials import Grant, GrantIssuer
from .errors import (
    ConfigError,
    GrantError,
    ScopegraphError,
    StoreError,
    ToolArgumentsError,
    TransientToolError,
    UnknownToolError,
)
from .identity import SpiffeId
from .policy import CallRequest, Decision, PolicyEngine
from .store import Store, UseRecord
from .tools import Tool, ToolRegistry

CallStatus = Literal["ok", "denied", "needs_approval", "error"]
GRANT_POLICY_ID = "scopegraph:grant"
SCOPE_POLICY_ID = "scopegraph:scope"
TOOL_POLICY_ID = "scopegraph:tool"
STORE_POLICY_ID = "scopegraph:store"


@dataclass(frozen=True, kw_only=True)
class CallContext:
    """Who is calling, from where: supplied by the runtime, never by the executor."""

    workflow: str
    run_id: str
    step_id: str
    principal: SpiffeId
    role: str = "executor"
    data_labels: frozenset[str] = frozenset()
    approved: bool = False
    approval_count: int = 0


@dataclass(frozen=True, kw_only=True)
class CallResult:
    """What came of one call: the value, or why there is none."""

    tool: str
    arguments: Mapping[str, Any]
    status: CallStatus
    decision: Decision
    value: Any = None
    error: str | None = None
    labels: frozenset[str] = frozenset()
    attempts: int = 1
    grant_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def reason(self) -> str:
        return self.error or "; ".join(self.decision.reasons)


@dataclass
class RetrySettings:
    """Retries for transient tool failures; each retry is a new, re-authorized call."""

    attempts: int = 3
    wait_initial: float = 0.05
    wait_max: float = 1.0
    sleep: Callable[[float], None] | None = field(default=None, repr=False)


class _Denied(Exception):
    def __init__(self, decision: Decision, grant_id: str | None = None) -> None:
        self.decision = decision
        self.grant_id = grant_id


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
    ) -> None:
        self.tools = tools
        self.issuer = issuer
        self.policy = policy
        self.store = store
        self.clock = clock
        self.retry = retry or RetrySettings()

    def call(self, token: str, tool: str, arguments: Mapping[str, Any], ctx: CallContext) -> CallResult:
        """Authorize and run one call; retry transient failures, re-authorizing each try."""
        retrying = Retrying(
            retry=retry_if_exception_type(TransientToolError),
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential(multiplier=self.retry.wait_initial, max=self.retry.wait_max),
            reraise=False,
            **({"sleep": self.retry.sleep} if self.retry.sleep else {}),
        )
        attempt_no = 0
        try:
            for attempt in retrying:
                with attempt:
                    attempt_no = attempt.retry_state.attempt_number
                    return self._attempt(token, tool, arguments, ctx, attempt_no)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            return CallResult(
                tool=tool, arguments=dict(arguments), status="error",
                decision=Decision(outcome="allow"), attempts=attempt_no,
                grant_id=getattr(last, "grant_id", None),
                error=f"tool {tool!r} failed after {attempt_no} attempts: {last}",
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _attempt(
        self, token: str, tool_name: str, arguments: Mapping[str, Any], ctx: CallContext, attempt: int
    ) -> CallResult:
        try:
            tool, grant, normalized, decision = self._authorize(token, tool_name, arguments, ctx, attempt)
        except _Denied as denied:
            self._record(denied.grant_id, ctx, tool_name, attempt, "denied", denied.decision)
            return CallResult(tool=tool_name, arguments=dict(arguments), status="denied",
                              decision=denied.decision, attempts=attempt, grant_id=denied.grant_id)
        if decision.outcome == "needs_approval":
            self._record(grant.jti, ctx, tool_name, attempt, "denied", decision)
            return CallResult(tool=tool_name, arguments=normalized, status="needs_approval",
                              decision=decision, attempts=attempt, grant_id=grant.jti)
        try:
            value = _run(tool, normalized)
        except TransientToolError:
            self._record(grant.jti, ctx, tool_name, attempt, "error", decision)
            raise  # the retry loop in ``call`` authorizes the next attempt from scratch
        except Exception as exc:
            self._record(grant.jti, ctx, tool_name, attempt, "error", decision)
            return CallResult(tool=tool_name, arguments=normalized, status="error", decision=decision,
                              error=f"tool {tool_name!r} failed: {type(exc).__name__}: {exc}",
                              attempts=attempt, grant_id=grant.jti)
        self._record(grant.jti, ctx, tool_name, attempt, "ok", decision)
        return CallResult(tool=tool_name, arguments=normalized, status="ok", decision=decision,
                          value=value, labels=tool.labels, attempts=attempt, grant_id=grant.jti)

    def _authorize(
        self, token: str, tool_name: str, arguments: Mapping[str, Any], ctx: CallContext, attempt: int
    ) -> tuple[Tool, Grant, dict[str, Any], Decision]:
        try:
            tool = self.tools.get_tool(tool_name)
        except UnknownToolError as exc:
            raise _Denied(Decision.deny(str(exc), TOOL_POLICY_ID)) from None
        try:
            grant = self.issuer.verify(token, tool=tool_name)
        except GrantError as exc:
            raise _Denied(Decision.deny(str(exc), GRANT_POLICY_ID)) from None
        mismatch = _binding_mismatch(grant, ctx)
        if mismatch:
            raise _Denied(Decision.deny(mismatch, GRANT_POLICY_ID), grant.jti)
        try:
            self.issuer.consume_use(grant)
        except GrantError as exc:
            raise _Denied(Decision.deny(str(exc), GRANT_POLICY_ID), grant.jti) from None
        except StoreError as exc:
            raise _Denied(Decision.deny(f"store unavailable, failing closed: {exc}", STORE_POLICY_ID),
                          grant.jti) from None
        try:
            normalized = tool.validate_arguments(arguments)
        except ToolArgumentsError as exc:
            raise _Denied(Decision.deny(str(exc), SCOPE_POLICY_ID), grant.jti) from None
        outside = _outside_scope(grant, arguments, normalized)
        if outside:
            raise _Denied(Decision.deny(outside, SCOPE_POLICY_ID), grant.jti)
        request = CallRequest(
            principal=ctx.principal, role=ctx.role, workflow=ctx.workflow, run_id=ctx.run_id,
            step_id=ctx.step_id, tool=tool, arguments=normalized, data_labels=ctx.data_labels,
            in_plan=True, attempt=attempt, approved=ctx.approved, approval_count=ctx.approval_count,
        )
        try:
            decision = self.policy.decide(request)
        except ScopegraphError as exc:
            raise _Denied(Decision.deny(f"policy failed, failing closed: {exc}", "policy-error"), grant.jti) from None
        if decision.outcome == "deny":
            raise _Denied(decision, grant.jti)
        return tool, grant, normalized, decision

    def _record(self, jti: str | None, ctx: CallContext, tool: str, attempt: int,
                outcome: Literal["ok", "denied", "error"], decision: Decision) -> None:
        if jti is None:
            return  # no verified grant: nothing to count against
        self.store.record_use(UseRecord(
            jti=jti, run_id=ctx.run_id, step_id=ctx.step_id, tool=tool, attempt=attempt,
            outcome=outcome, decision=decision.outcome, policy_ids=decision.policy_ids,
            at=self.clock.now(),
        ))


def _binding_mismatch(grant: Grant, ctx: CallContext) -> str | None:
    if grant.run_id != ctx.run_id:
        return f"grant {grant.jti!r} belongs to another run"
    if grant.step_id != ctx.step_id:
        return f"grant {grant.jti!r} belongs to step {grant.step_id!r}, not {ctx.step_id!r}"
    if grant.workflow != ctx.workflow:
        return f"grant {grant.jti!r} belongs to another workflow"
    if grant.subject != ctx.principal:
        return f"grant {grant.jti!r} was issued to {grant.subject}, not {ctx.principal}"
    if not grant.subject.path.endswith("/executor"):
        return f"grant {grant.jti!r} names a non-executor identity"
    return None


def _outside_scope(grant: Grant, raw: Mapping[str, Any], normalized: Mapping[str, Any]) -> str | None:
    constraints = grant.constraints
    for name in raw:
        if name not in constraints:
            return f"argument {name!r} of tool {grant.tool!r} is not in the grant's scope"
    for name, constraint in constraints.items():
        if name in normalized and not constraint.allows(normalized[name]):  # type: ignore[union-attr]
            return (f"argument {name!r}={normalized[name]!r} is outside the grant's scope: "
                    f"must be {constraint.describe()}")  # type: ignore[union-attr]
    return None


def _run(tool: Tool, arguments: Mapping[str, Any]) -> Any:
    if not tool.is_async:
        return tool.invoke(arguments)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(tool.invoke(arguments))  # type: ignore[arg-type]
    raise ConfigError(f"async tool {tool.name!r} called from a running event loop; run the workflow in a thread")
