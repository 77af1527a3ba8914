"""The gateway: the only way to a tool. Every attack is denied before the tool runs.

Invariants 2 (one grant, one step, one tool), 3 (request-time decisions, retries
included), 4 (plan-bound scope) and 6 (fail closed).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from scopegraph import Runtime, Workflow, policies, tool
from scopegraph.clock import FixedClock
from scopegraph.credentials import CLOCK_SKEW_SECONDS, DEFAULT_TTL_SECONDS, Grant
from scopegraph.errors import GrantRevokedError, TransientToolError
from scopegraph.gateway import CallContext, CallResult
from scopegraph.identity import TrustDomain
from scopegraph.store import SqliteStore

from ..helpers import mint_grant

Mint = Callable[..., tuple[Grant, CallContext]]
BASELINE = Path(policies.__file__).parent / "baseline.cedar"

RAN: list[tuple[str, dict[str, Any]]] = []
SCRIPT: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _reset() -> None:
    RAN.clear()
    SCRIPT.clear()


@tool(risk="read", labels=["confidential"])
def read_doc(path: str) -> dict[str, Any]:
    RAN.append(("read_doc", {"path": path}))
    return {"text": f"contents of {path}"}


@tool(risk="read")
def lookup(key: str, limit: int = 10) -> dict[str, Any]:
    RAN.append(("lookup", {"key": key, "limit": limit}))
    return {"key": key, "limit": limit}


@tool(risk="write")
def write_note(title: str, amount: int) -> str:
    RAN.append(("write_note", {"title": title, "amount": amount}))
    return "written"


@tool(risk="egress")
def send_mail(to: str, body: str) -> str:
    RAN.append(("send_mail", {"to": to, "body": body}))
    return "sent"


@tool(risk="read")
def flaky(key: str) -> str:
    """Fails transiently ``SCRIPT['failures']`` times; ``SCRIPT['during']`` runs on each failure."""
    RAN.append(("flaky", {"key": key}))
    if SCRIPT.get("failures", 0) > 0:
        SCRIPT["failures"] -= 1
        if "during" in SCRIPT:
            SCRIPT["during"]()
        raise TransientToolError("upstream timed out")
    return "finally"


@tool(risk="read")
def broken(key: str) -> str:
    RAN.append(("broken", {"key": key}))
    raise SCRIPT.get("error", ValueError("bad input"))


@tool(risk="read")
async def aread(key: str) -> str:
    RAN.append(("aread", {"key": key}))
    return f"async {key}"


GATEWAY_TOOLS = [read_doc, lookup, write_note, send_mail, flaky, broken, aread]


@pytest.fixture
def runtime(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(make_workflow(tools=GATEWAY_TOOLS))


def call(rt: Runtime, grant: Grant | str, tool_name: str, ctx: CallContext, **arguments: Any) -> CallResult:
    token = grant.danger_token() if isinstance(grant, Grant) else grant
    return rt.gateway.call(token, tool_name, arguments, ctx)


def assert_denied(result: CallResult, policy_id: str, fragment: str, *, token: str | None = None) -> None:
    assert result.status == "denied", result
    assert not result.ok and result.value is None
    assert result.decision.outcome == "deny"
    assert policy_id in result.decision.policy_ids, result.decision
    assert fragment in result.reason, result.reason
    assert "\n" not in result.reason and "Traceback" not in result.reason
    assert result.attempts == 1  # a denial is never retried
    if token:
        assert token not in result.reason and token.split(".")[-1] not in result.reason
    assert RAN == [], "the tool ran although the call was denied"


# the allowed path --------------------------------------------------------------------------
def test_an_allowed_call_runs_and_is_recorded(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("read_doc", constraints={"path": {"kind": "prefix", "prefix": "/docs/"}})
    result = call(runtime, grant, "read_doc", ctx, path="/docs/a.txt")
    assert result.ok and result.status == "ok"
    assert result.value == {"text": "contents of /docs/a.txt"}
    assert result.labels == frozenset({"confidential"})
    assert result.decision.outcome == "allow"
    assert result.decision.policy_ids == ("allow-planned-calls",)
    assert result.grant_id == grant.jti and result.attempts == 1
    assert RAN == [("read_doc", {"path": "/docs/a.txt"})]
    [use] = runtime.store.uses_for_run("run1")
    assert (use.jti, use.outcome, use.decision, use.attempt) == (grant.jti, "ok", "allow", 1)
    [record] = runtime.store.grants_for_run("run1")
    assert record.uses == 1


def test_async_tool_runs_through_the_gateway(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("aread")
    result = call(runtime, grant, "aread", ctx, key="k")
    assert result.ok and result.value == "async k"


def test_async_tool_runs_when_called_from_inside_an_event_loop(runtime: Runtime, mint: Mint) -> None:
    # An async host calling a workflow: the tool's coroutine gets its own loop in a worker thread.
    grant, ctx = mint("aread")

    async def host() -> Any:
        return call(runtime, grant, "aread", ctx, key="k")

    result = asyncio.run(host())
    assert result.ok and result.value == "async k"


def test_arguments_reach_the_tool_normalised(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup", constraints={"key": {"kind": "any"}, "limit": {"kind": "range", "min": 1, "max": 50}})
    result = call(runtime, grant, "lookup", ctx, key="k", limit="7")
    assert result.ok
    assert RAN == [("lookup", {"key": "k", "limit": 7})]


# grant attacks -----------------------------------------------------------------------------
def test_forged_signature_is_denied(runtime: Runtime, mint: Mint, tmp_path: Path) -> None:
    grant, ctx = mint("lookup")
    claims = jwt.decode(grant.danger_token(), options={"verify_signature": False})
    attacker_store = SqliteStore(tmp_path / "attacker.db")
    try:
        forged = TrustDomain(runtime.domain.name, attacker_store).sign(claims)
    finally:
        attacker_store.close()
    result = call(runtime, forged, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "signature does not verify", token=forged)
    assert result.grant_id is None
    assert runtime.store.grants_for_run("run1")[0].uses == 0  # a forged token takes no use


def test_grant_for_tool_a_presented_for_tool_b_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    result = call(runtime, grant, "send_mail", ctx, to="attacker@example.com", body="hi")
    assert_denied(result, "scopegraph:grant", "not for tool 'send_mail'", token=grant.danger_token())


def test_expired_grant_is_denied(runtime: Runtime, clock: FixedClock, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    clock.advance(DEFAULT_TTL_SECONDS + CLOCK_SKEW_SECONDS + 1)
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "expired", token=grant.danger_token())


def test_revoked_grant_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    runtime.issuer.revoke(grant.jti, reason="step ended")
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "revoked", token=grant.danger_token())
    [use] = runtime.store.uses_for_run("run1")
    assert use.outcome == "denied" and use.policy_ids == ("scopegraph:grant",)


def test_grant_from_another_run_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("lookup", run_id="oldrun", step_id="s1")
    _, ctx = mint("lookup", run_id="newrun", step_id="s1")
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "belongs to another run")


def test_grant_from_another_step_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("lookup", step_id="first")
    _, ctx = mint("lookup", step_id="second")
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "belongs to step 'first', not 'second'")


def test_grant_from_another_workflow_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup", workflow="payroll")
    mine = CallContext(workflow="testwf", run_id=ctx.run_id, step_id=ctx.step_id, principal=ctx.principal)
    result = call(runtime, grant, "lookup", mine, key="k")
    assert_denied(result, "scopegraph:grant", "another workflow")


def test_grant_presented_by_another_identity_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    thief = runtime.domain.id("wf", "testwf", "run", "run1", "step", "s1", "thief")
    stolen = CallContext(workflow=ctx.workflow, run_id=ctx.run_id, step_id=ctx.step_id, principal=thief)
    result = call(runtime, grant, "lookup", stolen, key="k")
    assert_denied(result, "scopegraph:grant", "was issued to")


def test_a_grant_issued_to_the_planner_is_useless(runtime: Runtime, mint: Mint) -> None:
    planner = runtime.domain.id("wf", "testwf", "run", "run1", "planner")
    grant, ctx = mint("lookup", subject=planner, role="planner")
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "non-executor identity")


def test_planner_role_is_denied_by_policy_even_with_a_valid_grant(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup", role="planner")
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "planner-never-calls-tools", "planner has no tool access")


@pytest.mark.parametrize("token", ["", "not-a-jwt", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."])
def test_missing_or_garbage_grant_is_denied(runtime: Runtime, mint: Mint, token: str) -> None:
    _, ctx = mint("lookup")
    result = call(runtime, token, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "grant")


def test_uses_run_out(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    for _ in range(grant.max_uses):
        assert call(runtime, grant, "lookup", ctx, key="k").ok
    RAN.clear()
    result = call(runtime, grant, "lookup", ctx, key="k")
    assert_denied(result, "scopegraph:grant", "no uses left")


def test_uses_are_counted_atomically_under_concurrency(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    start = threading.Barrier(8, timeout=10)
    results: list[CallResult] = []

    def one_call() -> None:
        start.wait()
        results.append(call(runtime, grant, "lookup", ctx, key="k"))

    threads = [threading.Thread(target=one_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 8
    assert sorted(r.status for r in results) == ["denied"] * 5 + ["ok"] * 3
    assert all("no uses left" in r.reason for r in results if r.status == "denied")
    assert len(RAN) == grant.max_uses == 3
    assert runtime.store.grants_for_run("run1")[0].uses == 3


# scope attacks -------------------------------------------------------------------------------
@pytest.mark.parametrize(("constraints", "arguments", "fragment"), [
    ({"path": {"kind": "prefix", "prefix": "/docs/"}}, {"path": "/docs/../etc/passwd"}, "outside the grant's scope"),
    ({"path": {"kind": "prefix", "prefix": "/docs/"}}, {"path": "/etc/passwd"}, "starting with '/docs/'"),
    ({"path": {"kind": "exact", "value": "/docs/a"}}, {"path": "/docs/b"}, "equal to '/docs/a'"),
    ({"path": {"kind": "one_of", "values": ["/docs/a"]}}, {"path": "/docs/b"}, "one of"),
    ({"path": {"kind": "pattern", "regex": "/docs/[a-z]+"}}, {"path": "/docs/a/../../x"}, "matching"),
])
def test_call_outside_the_step_constraints_is_denied(runtime: Runtime, mint: Mint, constraints: dict[str, Any],
                                                     arguments: dict[str, Any], fragment: str) -> None:
    grant, ctx = mint("read_doc", constraints=constraints)
    result = call(runtime, grant, "read_doc", ctx, **arguments)
    assert_denied(result, "scopegraph:scope", fragment)
    [use] = runtime.store.uses_for_run("run1")
    assert use.outcome == "denied" and use.policy_ids == ("scopegraph:scope",)


@pytest.mark.parametrize("limit", [0, 51, -1, 10**12, "1e9", float("nan"), [5]])
def test_numbers_outside_the_range_are_denied(runtime: Runtime, mint: Mint, limit: Any) -> None:
    grant, ctx = mint("lookup", constraints={"key": {"kind": "any"}, "limit": {"kind": "range", "min": 1, "max": 50}})
    result = call(runtime, grant, "lookup", ctx, key="k", limit=limit)
    assert result.status == "denied" and RAN == []
    assert "scopegraph:scope" in result.decision.policy_ids


def test_an_argument_the_plan_did_not_constrain_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup", constraints={"key": {"kind": "any"}})
    result = call(runtime, grant, "lookup", ctx, key="k", limit=10_000)
    assert_denied(result, "scopegraph:scope", "'limit' of tool 'lookup' is not in the grant's scope")


def test_an_argument_the_tool_does_not_take_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    result = call(runtime, grant, "lookup", ctx, key="k", shell="rm -rf /")
    assert_denied(result, "scopegraph:scope", "shell")


def test_unknown_tool_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("lookup")
    result = call(runtime, grant, "delete_everything", ctx)
    assert_denied(result, "scopegraph:tool", "unknown tool 'delete_everything'")


# policy at the moment of the call ------------------------------------------------------------
def test_a_write_needs_approval_and_does_not_run(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("write_note")
    result = call(runtime, grant, "write_note", ctx, title="t", amount=5)
    assert result.status == "needs_approval" and RAN == []
    assert result.decision.policy_ids == ("writes-need-approval",)


def test_egress_after_confidential_data_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("send_mail", labels=frozenset({"confidential"}))
    result = call(runtime, grant, "send_mail", ctx, to="x@example.com", body="the receipts")
    assert_denied(result, "no-confidential-egress", "confidential")


# retries: every attempt is a new, re-authorized call --------------------------------------
def test_transient_failures_are_retried_and_each_attempt_is_a_use(runtime: Runtime, mint: Mint,
                                                                  sleeps: list[float]) -> None:
    SCRIPT["failures"] = 2
    grant, ctx = mint("flaky")
    result = call(runtime, grant, "flaky", ctx, key="k")
    assert result.ok and result.value == "finally" and result.attempts == 3
    assert len(RAN) == 3 and len(sleeps) == 2
    uses = runtime.store.uses_for_run("run1")
    assert [(u.attempt, u.outcome, u.decision) for u in uses] == [
        (1, "error", "allow"), (2, "error", "allow"), (3, "ok", "allow")]
    assert runtime.store.grants_for_run("run1")[0].uses == 3


def test_a_grant_with_two_uses_stops_the_third_attempt(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime], sleeps: list[float]
) -> None:
    rt = make_runtime(make_workflow(tools=GATEWAY_TOOLS, grant_max_uses=2))
    SCRIPT["failures"] = 10
    grant, ctx = mint_grant(rt, "flaky")
    result = call(rt, grant, "flaky", ctx, key="k")
    assert len(RAN) == 2, "the third attempt must not reach the tool"
    assert result.status == "denied" and result.attempts == 3
    assert "no uses left" in result.reason and "scopegraph:grant" in result.decision.policy_ids
    assert [u.outcome for u in rt.store.uses_for_run("run1")] == ["error", "error", "denied"]


def test_a_retry_after_revocation_is_denied(runtime: Runtime, mint: Mint) -> None:
    grant, ctx = mint("flaky")
    SCRIPT["failures"] = 5
    SCRIPT["during"] = lambda: runtime.issuer.revoke(grant.jti, reason="operator revoked")
    result = call(runtime, grant, "flaky", ctx, key="k")
    assert len(RAN) == 1
    assert result.status == "denied" and "revoked" in result.reason and result.attempts == 2


def test_a_retry_after_expiry_is_denied(runtime: Runtime, clock: FixedClock, mint: Mint) -> None:
    grant, ctx = mint("flaky")
    SCRIPT["failures"] = 5
    SCRIPT["during"] = lambda: clock.advance(DEFAULT_TTL_SECONDS + CLOCK_SKEW_SECONDS + 1)
    result = call(runtime, grant, "flaky", ctx, key="k")
    assert len(RAN) == 1
    assert result.status == "denied" and "expired" in result.reason


def test_retries_are_decided_by_policy_with_the_attempt_number(
    tmp_path: Path, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    no_retries = tmp_path / "no-retries.cedar"
    no_retries.write_text(
        '@id("no-retries")\n@reason("this workflow does not retry")\n'
        'forbid (principal, action == Scopegraph::Action::"call", resource)\n'
        'when { context.attempt > 1 };\n'
    )
    rt = make_runtime(make_workflow(tools=GATEWAY_TOOLS, policies=[BASELINE, no_retries]))
    SCRIPT["failures"] = 1
    grant, ctx = mint_grant(rt, "flaky")
    result = call(rt, grant, "flaky", ctx, key="k")
    assert len(RAN) == 1
    assert result.status == "denied" and result.decision.policy_ids == ("no-retries",)
    assert result.attempts == 2


def test_transient_failures_give_up_after_the_configured_attempts(runtime: Runtime, mint: Mint) -> None:
    SCRIPT["failures"] = 99
    grant, ctx = mint("flaky", constraints={"key": {"kind": "any"}})
    result = call(runtime, grant, "flaky", ctx, key="k")
    assert result.status == "error" and not result.ok
    assert len(RAN) == 3 and result.attempts == 3
    assert "after 3 attempts" in result.reason


@pytest.mark.parametrize("error", [ValueError("bad input"), GrantRevokedError("the tool server says revoked"),
                                   PermissionError("nope")])
def test_other_failures_are_not_retried(runtime: Runtime, mint: Mint, sleeps: list[float],
                                        error: Exception) -> None:
    SCRIPT["error"] = error
    grant, ctx = mint("broken")
    result = call(runtime, grant, "broken", ctx, key="k")
    assert result.status == "error" and result.attempts == 1
    assert len(RAN) == 1 and sleeps == []
    assert type(error).__name__ in result.reason


def test_denials_are_never_retried(runtime: Runtime, mint: Mint, sleeps: list[float]) -> None:
    grant, ctx = mint("flaky", constraints={"key": {"kind": "exact", "value": "ok"}})
    SCRIPT["failures"] = 5
    result = call(runtime, grant, "flaky", ctx, key="not-ok")
    assert result.status == "denied" and result.attempts == 1 and sleeps == [] and RAN == []
