"""The gateway's checks that need no store: a grant bound to its call, arguments inside
its scope, an approval for exactly this call; what a call's records keep of its
arguments; and how a tool's body runs (sync, or async on the right event loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import json
import math
from collections.abc import Coroutine, Mapping
from typing import Any

from .approvals import ApprovalRequest
from .calls import CHECK_POLICY_ID, CallContext, CallResult
from .canonical import sha256_hex, sorted_json
from .constraints import admits
from .credentials import Grant
from .policy import Decision
from .store import CallRecord
from .tools import Tool


def approval_problem(approval: ApprovalRequest, digest: str, consumer: str, now: float) -> str | None:
    """Why ``approval`` cannot authorize the call of ``digest`` by ``consumer`` now, if it
    cannot: the checks ``ApprovalService.consume`` makes again, atomically, when it is used."""
    if approval.digest != digest:
        return f"approval {approval.id!r} is for a different action"
    state = approval.effective_status(now)
    if state == "consumed":
        return None if approval.consumed_by == consumer else f"approval {approval.id!r} was already used"
    if state == "expired":
        return f"approval {approval.id!r} expired"
    if state != "approved":
        return f"approval {approval.id!r} is {state}, not approved"
    return None


def cut_off_read(earlier: CallRecord, tool: Tool) -> bool:
    """A read that started and never finished (the process died, or Ctrl-C) runs again,
    decided anew under the step's new grant: it changed nothing. A write or egress call
    cut off so is reported, never repeated: it may have taken effect."""
    return earlier.status == "started" and tool.risk.value == "read"


def replayed(earlier: CallRecord, tool: Tool, grant: Grant, normalized: dict[str, Any],
             decision: Decision, attempt: int) -> CallResult:
    """A call whose key was seen before, answered from its record: never run twice."""
    base: dict[str, Any] = {"tool": tool.name, "arguments": normalized, "decision": decision,
                            "attempts": attempt, "grant_id": grant.jti}
    if earlier.status == "ok":
        value = json.loads(earlier.result) if earlier.result is not None else None
        return CallResult(status="ok", value=value, labels=tool.labels, **base)
    if earlier.status == "started":
        return CallResult(status="error", error=(
            f"call to {tool.name!r} was interrupted by a crash and is not repeated: "
            "it may or may not have taken effect"), error_type="interrupted by a crash, not repeated",
            **base)
    error = json.loads(earlier.result) if earlier.result else f"tool {tool.name!r} failed"
    return CallResult(status="error", error=str(error), error_type="failed before a crash",
                      labels=tool.labels, **base)


def digest_of(arguments: Mapping[str, Any]) -> str | None:
    """The digest of a call's arguments in the ledger: SHA-256 over their sorted compact
    JSON, ASCII-escaped, anything not JSON written as its ``str``. ``usage_report``
    recomputes it from old records, so its bytes never change."""
    try:
        return sha256_hex(_arguments_json({"arguments": arguments}))
    except Exception:  # arguments that cannot be written down (too deep, too big, a broken ``__str__``)
        return None


def _arguments_json(value: dict[str, Any]) -> str:
    # ``sorted_json`` (one prepared C encoder) writes the same bytes as the ``json.dumps``
    # below whenever its output is ASCII without DEL (which ``ensure_ascii`` escapes) and it
    # did not refuse a value (NaN, or one that needs ``default=str``): the usual call.
    try:
        text = sorted_json(value)
        if text.isascii() and "\x7f" not in text:
            return text
    except (TypeError, ValueError):
        pass
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))


def observed(arguments: Mapping[str, Any], secrets: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Numbers and booleans only: enough to propose narrower ranges, no free text, no secret.

    Only numbers a store can write as JSON: 64-bit integers and finite floats."""
    return {k: v for k, v in arguments.items() if k not in secrets and (
        isinstance(v, bool) or (isinstance(v, int) and -(2**63) <= v < 2**63)
        or (isinstance(v, float) and math.isfinite(v)))}


def recordable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a lone surrogate is written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_failed(exc: Exception) -> Decision:
    """The denial for an exception nobody expected while checking a call.

    Only the exception's type is named: its message may quote the arguments.
    """
    if isinstance(exc, RecursionError):
        return Decision.deny("the arguments are nested too deeply to check; denied to fail closed",
                             CHECK_POLICY_ID)
    return Decision.deny(f"checking the call raised {type(exc).__name__}; denied to fail closed",
                         CHECK_POLICY_ID)


def binding_mismatch(grant: Grant, ctx: CallContext) -> str | None:
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


def outside_scope(grant: Grant, raw: Mapping[str, Any], normalized: Mapping[str, Any]) -> str | None:
    constraints = grant.constraints
    for name in raw:
        if name not in constraints:
            return f"argument {name!r} of tool {grant.tool!r} is not in the grant's scope"
    for name, constraint in constraints.items():
        if name in normalized and not admits(constraint, raw.get(name), normalized[name]):
            # The value itself stays out of the reason: reasons reach spans, the ledger and
            # the executor's model, and an out-of-scope value may be exactly what must not leak.
            return (f"argument {name!r} is outside the grant's scope: it must be "
                    f"{constraint.describe()}")
    return None


CALLER_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "scopegraph_caller_loop", default=None)
"""The event loop of an async host driving a run from a worker thread (``Runtime.arun``):
async tools called from that thread are awaited on it, not on a loop of their own."""


async def _in_context(coroutine: Coroutine[Any, Any, Any], context: contextvars.Context) -> Any:
    """Await ``coroutine`` as a task in ``context`` (this thread's: the current span)."""
    return await asyncio.get_running_loop().create_task(coroutine, context=context)


def run_tool(tool: Tool, arguments: Mapping[str, Any], grant_token: str | None,
         credentials: Mapping[str, Any] | None = None) -> Any:
    if not tool.is_async:
        return tool.invoke(arguments, grant_token, credentials)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    caller = CALLER_LOOP.get()
    if caller is not None and caller is not running and caller.is_running():
        # A run driven for an async host: the tool runs on the host's own loop, which is
        # free (it awaits the drive) while this thread waits for the tool's result.
        coroutine = tool.invoke(arguments, grant_token, credentials)
        in_context = _in_context(coroutine, contextvars.copy_context())  # type: ignore[arg-type]
        return asyncio.run_coroutine_threadsafe(in_context, caller).result()
    if running is None:
        return asyncio.run(tool.invoke(arguments, grant_token, credentials))  # type: ignore[arg-type]
    # Called from inside an event loop (an async host, an async LangChain tool): this
    # thread's loop is busy, so the coroutine gets a loop of its own in a worker thread,
    # with this thread's context (the current span) carried over.
    context = contextvars.copy_context()
    coroutine = tool.invoke(arguments, grant_token, credentials)

    def run_in_own_loop() -> Any:
        return asyncio.run(coroutine)  # type: ignore[arg-type]

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scopegraph-tool") as pool:
        return pool.submit(context.run, run_in_own_loop).result()
