"""The gateway's write pattern (issue 11): a grant written with its first use, one write
before the tool runs and one after it, and a step's last call ending the step in the
write that records it. Counted, not timed.
"""

from __future__ import annotations

from typing import Any

from scopegraph import Runtime
from scopegraph.gateway import CallContext, CallResult, StepClosing
from scopegraph.plan import Step


def deferred_grant(rt: Runtime, tool: str, constraints: dict[str, Any], *,
                   step_id: str = "s1") -> tuple[Any, CallContext]:
    """A grant as the runtime mints one for a step: signed, not written to the store yet."""
    step = Step(id=step_id, tool=tool, constraints=constraints)
    identity = rt.domain.id("wf", rt.workflow.name, "run", "run1", "step", step_id, "executor")
    grant = rt.issuer.mint(subject=identity, tool=tool, run_id="run1", step_id=step_id, workflow=rt.workflow.name,
                           constraints=step.constraints, act={"sub": "planner"}, deferred=True)
    return grant, CallContext(workflow=rt.workflow.name, run_id="run1", step_id=step_id, principal=identity)


class Ending:
    """A host's end of its step, as the runtime writes one: here, what it was called with."""

    def __init__(self, fail: bool = False) -> None:
        self.ended: list[tuple[str, bool]] = []
        self.fail = fail

    def __call__(self, result: CallResult, revoked: bool) -> None:
        if self.fail:
            raise RuntimeError("the host's records could not be made")
        self.ended.append((result.status, revoked))


def kinds(rt: Runtime) -> list[str]:
    return [r["kind"] for r in rt.ledger.records("run1")]


def test_a_grant_is_written_with_its_first_use(runtime: Runtime) -> None:
    grant, ctx = deferred_grant(runtime, "lookup", {"key": {"kind": "any"}, "limit": {"kind": "any"}})
    assert runtime.store.grants_for_run("run1") == [], "a deferred grant is written with its first use"
    before = runtime.store.counts.commits
    result = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "k"}, ctx, call_key="c1")
    assert result.ok
    assert runtime.store.counts.commits - before == 2  # before the tool runs, after it
    [stored] = runtime.store.grants_for_run("run1")
    assert (stored.jti, stored.uses, stored.revoked_at) == (grant.jti, 1, None)
    assert kinds(runtime) == ["grant_minted", "decision", "tool_call"]
    again = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "k"}, ctx, call_key="c2")
    assert again.ok and runtime.store.grants_for_run("run1")[0].uses == 2
    assert kinds(runtime).count("grant_minted") == 1


def test_a_deferred_grant_revoked_before_its_first_use_is_useless(runtime: Runtime) -> None:
    grant, ctx = deferred_grant(runtime, "lookup", {"key": {"kind": "any"}, "limit": {"kind": "any"}})
    runtime.issuer.revoke(grant.jti, reason="operator")
    result = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "k"}, ctx)
    assert result.status == "denied" and "unknown to the store" in result.reason
    assert runtime.store.grants_for_run("run1") == []


def test_a_last_call_ends_its_step_in_the_write_that_records_its_result(runtime: Runtime) -> None:
    grant, ctx = deferred_grant(runtime, "lookup", {"key": {"kind": "any"}, "limit": {"kind": "any"}})
    ending = Ending()
    closing = StepClosing(reason="step ended", end=ending)
    before = runtime.store.counts.commits
    result = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "k"}, ctx, call_key="c1", closing=closing)
    assert result.ok and closing.result is result
    assert runtime.store.counts.commits - before == 2
    assert ending.ended == [("ok", True)]
    [stored] = runtime.store.grants_for_run("run1")
    assert stored.revoked_at is not None and stored.revoke_reason == "step ended"
    # The step has ended: its grant calls nothing more, and the step is not ended twice.
    after = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "k"}, ctx, call_key="c2", closing=closing)
    assert after.status == "denied" and "revoked" in after.reason
    assert ending.ended == [("ok", True)] and closing.result is result


def test_a_refused_last_call_ends_its_step_in_one_write(runtime: Runtime) -> None:
    grant, ctx = deferred_grant(runtime, "lookup", {"key": {"kind": "exact", "value": "k"}})
    ending = Ending()
    closing = StepClosing(reason="step ended", end=ending)
    before = runtime.store.counts.commits
    result = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "elsewhere"}, ctx, closing=closing)
    assert result.status == "denied" and closing.result is result
    assert runtime.store.counts.commits - before == 1
    assert ending.ended == [("denied", True)]
    assert kinds(runtime) == ["grant_minted", "decision"]
    assert runtime.store.grants_for_run("run1")[0].revoked_at is not None


def test_a_host_that_cannot_end_its_step_still_has_the_call_recorded(runtime: Runtime) -> None:
    grant, ctx = deferred_grant(runtime, "lookup", {"key": {"kind": "any"}, "limit": {"kind": "any"}})
    closing = StepClosing(reason="step ended", end=Ending(fail=True))
    result = runtime.gateway.call(grant.danger_token(), "lookup", {"key": "k"}, ctx, call_key="c1", closing=closing)
    assert result.ok and closing.result is None  # the host ends the step itself
    [stored] = runtime.store.grants_for_run("run1")
    assert stored.uses == 1 and stored.revoked_at is None
    assert kinds(runtime) == ["grant_minted", "decision", "tool_call"]
    [use] = runtime.store.uses_for_run("run1")
    assert use.outcome == "ok"
