"""The decision API: a run's scoped session, through which any host checks, runs and
records tool calls.

A ``Session`` is opened for one run by a ``Guard`` (``Guard.start_run``, or
``Guard.session`` for a run already started). The ``Runtime`` drives every call of its
runs through one; a host with an agent of its own (a LangChain agent, a hand-built
LangGraph graph, anything) does the same::

    session = guard.start_run(task, initiator="alice", planner=planner)   # plan fixed from the task
    decision = session.check("fetch", "http_get", {"url": url})           # mint, scope, Cedar
    if decision.outcome is Outcome.ALLOW:
        result = session.execute(decision)               # the gateway runs the tool...
        # ...or the host runs it and records what came of it:
        # result = session.record(decision, value=value)
    elif decision.outcome is Outcome.NEEDS_APPROVAL:
        ...                                              # decision.approval_id: ask a human
    session.end_step("fetch")                            # revoke the step's grant
    session.end_run(status="completed")                  # revoke everything of the run

Each plan step gets its own SPIFFE identity and grant, minted by its first check (or by
``begin_step``). Every check is decided at the moment of the call: the grant verifies
and is bound to the step, the arguments lie inside its scope, Cedar decides; the
decision, the use of the grant and the ledger records land in one write, before
anything runs. ``execute`` or ``record`` then writes the result in a second one. A call
not allowed cannot be executed or recorded, and an allowed one only once.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import tracing as tr
from .approvals import ApprovalRequest
from .approvals import approval_id as make_approval_id
from .call_span import HostCallSpan
from .canonical import action_digest_v2, canonical_json, sha256_hex
from .credentials import Grant
from .decisions import PLAN_POLICY_ID, STEP_ENDED, CallDecision, Outcome, StepEnd, StepScope, step_outcome
from .errors import PlanError, SessionError
from .gateway import (
    CallContext,
    CallResult,
    Decided,
    StepClosing,
    call_key,
    grant_minted_fields,
)
from .identity import SpiffeId, Svid
from .plan import Plan, Step, parse_plan, validate_plan
from .policy import Decision
from .provenance import Observation
from .redaction import recorded_constraints
from .resumption import failed_attempt, resumption, unanswerable
from .roles import Planner, PlanningContext
from .run_events import (
    ApprovalAnswered,
    ApprovalRequested,
    CallDecided,
    Listener,
    PlanFixed,
    RunEnded,
    RunEvent,
    StepEnded,
    StepStarted,
)

if TYPE_CHECKING:
    from .guard import Guard


class _Step:
    """A step's state in this session: its grant (token held here only), what its
    executor has seen, its calls, and how it ended."""

    def __init__(self, step: Step, identity: SpiffeId, svid: Svid, grant: Grant, ctx: CallContext,
                 asked: int, held_under: _Step | None) -> None:
        self.step, self.identity, self.svid, self.grant, self.ctx = step, identity, svid, grant, ctx
        self.step_id = ctx.step_id  # a delegated child's is its path, ``parent.child``
        self.labels = ctx.data_labels  # what it carried when it began: its approval requests show them
        self.calls: list[CallResult] = []
        self.pending: dict[str, Decided] = {}
        self.spans: dict[str, HostCallSpan] = {}  # of allowed calls not executed or recorded yet
        self.checks = 0
        self.asked = asked  # approval requests made for this step so far (their sequence)
        self.held_under = held_under  # a delegated child's calls are held as its parent's
        self.last_request: str | None = None  # the approval request of the step's last held call
        self.resumed_from: str | None = None  # the answered request the step was resumed on
        self.announced = False  # its end was told to the listener
        self.closing: StepClosing | None = None
        self.ended: StepEnd | None = None  # written with the step's last call
        self.revoked = False

    def scope(self) -> StepScope:
        return StepScope(step_id=self.step_id, step=self.step, identity=self.identity, svid=self.svid,
                         grant_id=self.grant.jti)


class Session:
    """The decision API for one run: ``check``, ``execute`` or ``record``, approvals, and
    the end of steps and of the run. Grants, ledger, spans, approvals and reports are
    those of a ``Runtime`` run: the runtime drives its runs through this class.

    Not thread-safe: one host thread drives a session (parallel steps each get their own).
    """

    def __init__(self, guard: Guard, *, run_id: str, initiator: str, plan: Plan | None = None,
                 listener: Listener | None = None) -> None:
        """Open with ``Guard.start_run`` or ``Guard.session``. ``listener`` is told of each
        event of the run (see ``scopegraph.run_events``) once it is written."""
        self.guard = guard
        self._listener = listener
        self.run_id = run_id
        self.initiator = initiator
        self.workflow = guard.workflow
        self.planner_id = guard.domain.id("wf", self.workflow.name, "run", run_id, "planner")
        self._plan = plan
        self._steps: dict[str, _Step] = {}

    # plan ---------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The run's plan. Raises ``SessionError`` if none was fixed yet."""
        if self._plan is None:
            raise SessionError(f"run {self.run_id!r} has no plan yet: fix one before checking calls")
        return self._plan

    def make_plan(self, task: str, planner: Planner) -> Plan:
        """Ask ``planner`` for the run's plan from the trusted ``task`` alone (it sees the
        catalogue, no tool output, and holds no grant), validate it and fix it.

        Raises:
            PlanError: the plan is malformed or does not fit the workflow's tools (the
                refusal is audited).
        """
        ctx = PlanningContext(
            task=task, workflow=self.workflow.name, run_id=self.run_id, identity=self.planner_id,
            catalogue=self.workflow.registry.catalogue(), validator=self.validate_plan,
        )
        with tr.span(f"{tr.INVOKE_AGENT} planner", {
            tr.GEN_AI_OPERATION: "invoke_agent", tr.GEN_AI_AGENT_NAME: "planner",
            tr.GEN_AI_AGENT_ID: str(self.planner_id), tr.SPIFFE_ID: str(self.planner_id),
            tr.RUN_ID: self.run_id, tr.WORKFLOW: self.workflow.name, "scopegraph.plan.revision": 0,
        }) as s:
            try:
                plan = ctx.validate(planner.plan(ctx))
            except PlanError as exc:
                tr.set_error(s, "malformed plan")
                self.refuse_plan(exc)
                raise
            s.set_attribute("scopegraph.plan.steps", len(plan.steps))
            return self.fix_plan(plan)

    def validate_plan(self, data: Plan | Mapping[str, Any] | str) -> Plan:
        """Parse and check a plan against the workflow's tools, as ``fix_plan`` does.

        Raises:
            PlanError: the plan is malformed or does not fit the workflow's tools.
        """
        return validate_plan(parse_plan(data), self.workflow.registry)

    def fix_plan(self, plan: Plan | Mapping[str, Any] | str, *, revision: int = 0,
                 failures: Iterable[Mapping[str, Any]] = (), widened: Iterable[str] = ()) -> Plan:
        """Validate ``plan`` and make it the run's plan, audited (``revision`` > 0 for a
        re-plan, with the ``failures`` that asked for it and the steps it ``widened``).

        Raises:
            PlanError: the plan is malformed or does not fit the workflow's tools.
        """
        plan = self.validate_plan(plan)
        registry = self.workflow.registry
        dumped = plan.model_dump(mode="json")
        self.guard.ledger.append(
            "plan", self.run_id, planner=str(self.planner_id), valid=True,
            plan_digest=sha256_hex(canonical_json(dumped)), revision=revision,
            failures=[dict(f) for f in failures], widened=sorted(widened),
            steps=[{"id": st.id, "tool": st.tool, "depends_on": list(st.depends_on), "purpose": st.purpose,
                    "constraints": recorded_constraints(st.constraints, registry[st.tool].secrets)}
                   for st in plan.steps])
        self._plan = plan
        self._emit(PlanFixed(run_id=self.run_id, steps=tuple(st.id for st in plan.steps), revision=revision))
        return plan

    def refuse_plan(self, error: PlanError, *, revision: int = 0) -> None:
        """Audit a plan that was refused (the run has no plan from it)."""
        self.guard.ledger.append("plan", self.run_id, planner=str(self.planner_id), valid=False,
                                 error=str(error), revision=revision)

    # steps --------------------------------------------------------------------------------
    def begin_step(self, step: Step | str, *, identity: SpiffeId | None = None,
                   observations: Iterable[Observation] = (), data_labels: Iterable[str] = (),
                   widened: bool = False, approvals_asked: int = 0,
                   resuming: str | ApprovalRequest | None = None) -> StepScope:
        """Mint the step's identity and grant (its scope: the plan step's tool and
        constraints) and start it. ``check`` does this for a plan step not begun yet.

        ``observations`` are the tool outputs its executor is shown before its first
        call (its dependencies' results), ``data_labels`` the labels of data it carries:
        argument provenance and label policies are decided against them. A step begun
        again (to resume it after an approval) gets a new grant; its old one must have
        been ended. ``resuming`` names the answered approval request it is begun again
        for, or is that request as the caller just read it (``resume`` and ``resume_call``
        then check that request's call).

        Raises:
            SessionError: the step is not in the plan, or is running already.
        """
        if isinstance(step, str):
            step = self._plan_step(step)
        current = self._steps.get(step.id)
        if current is not None and not current.revoked:
            raise SessionError(f"step {step.id!r} is running already: end it before beginning it again")
        identity = identity or self.guard.domain.id("wf", self.workflow.name, "run", self.run_id, "step",
                                                    step.id, "executor")
        svid, grant = self._mint(step, identity)
        labels = frozenset(data_labels)
        ctx = CallContext(workflow=self.workflow.name, run_id=self.run_id, step_id=step.id, principal=identity,
                          data_labels=labels, observations=tuple(observations), widened=widened)
        state = _Step(step, identity, svid, grant, ctx, approvals_asked, None)
        self._steps[step.id] = state
        if resuming is not None:
            request = self._request(resuming)
            state.resumed_from = request.id
            self._emit(ApprovalAnswered(run_id=self.run_id, step_id=request.step_id, approval_id=request.id,
                                        status=request.effective_status(self.guard.clock.now())))
        if self._listener is not None:
            self._emit(StepStarted(run_id=self.run_id, step_id=step.id, tool=step.tool, spiffe_id=str(identity)))
        return state.scope()

    def step(self, step_id: str) -> StepScope:
        """The step as it runs (begun by ``begin_step`` or its first check).

        Raises:
            SessionError: the step has not begun.
        """
        return self._state(step_id).scope()

    def calls(self, step_id: str) -> list[CallResult]:
        """The results of the step's calls so far, in order."""
        return list(self._state(step_id).calls)

    def seen(self, step_id: str) -> CallContext:
        """Who calls in the step and what its executor has seen so far (no token)."""
        return self._state(step_id).ctx

    def ended(self, step_id: str) -> StepEnd | None:
        """How the step ended, if its last call ended it (``last=True``) or ``end_step`` did."""
        return self._state(step_id).ended

    def danger_grant_token(self, step_id: str) -> str:
        """The step's signed grant, for a host that runs a call itself and must present
        the grant downstream (as the gateway does for a ``takes_grant`` tool). Never show
        it to a model, a log or a span."""
        return self._state(step_id).grant.danger_token()

    def pending_approval(self, step_id: str) -> str | None:
        """The approval request made for the step's last held call (a delegated child's
        calls are held under their parent step)."""
        return self._state(step_id).last_request

    def observe(self, step_id: str, results: Iterable[CallResult]) -> None:
        """Count results of calls made on the step's behalf (by its delegated children)
        as seen by its executor: later calls are decided knowing them."""
        state = self._state(step_id)
        for result in results:
            state.ctx = state.ctx.after(result)

    def delegate_step(self, parent: str, child: Step, *, step_id: str, identity: SpiffeId,
                      planner_id: SpiffeId, observations: Iterable[Observation] = ()) -> StepScope:
        """Begin a delegated child of step ``parent`` as step ``step_id``: its grant is
        minted against the parent's (a subset of its scope, never longer-lived), its
        executor has seen all the parent's has, and a call of it held for approval is
        held under the parent (the parent pauses on it).

        Raises:
            GrantError: the child asks for more than its parent holds (the refusal is the
                caller's to audit, with ``record_step_end``).
        """
        guard, p = self.guard, self._state(parent)
        registry = self.workflow.registry
        attributes = {tr.SPIFFE_ID: str(identity), tr.STEP_ID: step_id, tr.GEN_AI_TOOL_NAME: child.tool,
                      "scopegraph.grant.parent": p.grant.jti}
        with tr.span(tr.GRANT_MINT, attributes) as s, guard.store.atomic():
            # An argument the child leaves out keeps the parent's constraint: otherwise the
            # tool's default would run unchecked, though the parent's grant may refuse it.
            constraints = {**{k: v for k, v in p.grant.constraints.items() if k not in child.constraints},
                           **child.constraints}
            # The parent's grant may not be written yet: it is now, as the child's mint
            # spends one of its uses.
            parent_minted = guard.issuer.write_unwritten(p.grant.jti)
            grant = guard.issuer.mint(
                subject=identity, tool=child.tool, run_id=self.run_id, step_id=step_id, workflow=self.workflow.name,
                constraints=constraints, parent=p.grant,
                act={"sub": str(planner_id), "act": {"sub": str(p.identity), "act": dict(p.grant.act)}},
            )
            if parent_minted:
                guard.ledger.append("grant_minted", self.run_id,
                                    **grant_minted_fields(p.grant, registry[p.grant.tool].secrets))
            guard.ledger.append("grant_minted", self.run_id, step_id=step_id, grant_id=grant.jti,
                                spiffe_id=str(identity), tool=child.tool, issued_at=grant.issued_at,
                                expires_at=grant.expires_at, max_uses=grant.max_uses, parent_grant=p.grant.jti,
                                constraints=recorded_constraints(grant.constraints, registry[child.tool].secrets),
                                act=dict(grant.act))
            s.set_attribute(tr.GRANT_ID, grant.jti)
        guard.metrics.grants_minted.add(1, {"workflow": self.workflow.name, "tool": child.tool})
        svid = guard.domain.issue_svid(identity, ttl=self.workflow.grant_ttl)
        ctx = p.ctx.child(step_id=step_id, principal=identity, observations=tuple(observations),
                          planned=p.step.constraints)
        state = _Step(child, identity, svid, grant, ctx, 0, p.held_under or p)
        self._steps[step_id] = state
        self._emit(StepStarted(run_id=self.run_id, step_id=step_id, tool=child.tool, spiffe_id=str(identity)))
        return state.scope()

    def record_step_end(self, step_id: str, outcome: StepEnd) -> None:
        """Audit the end of a step that holds no grant (it never began, or was refused
        before it could): there is nothing to revoke."""
        self._step_ended(step_id, outcome)
        self._emit(StepEnded(run_id=self.run_id, step_id=step_id, status=outcome.status, reason=outcome.reason))

    # calls --------------------------------------------------------------------------------
    def check(self, step: str, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None = None,
              last: bool = False, call_id: str | None = None) -> CallDecision:
        """Decide one proposed call of ``step``: mint the step's grant if it has none yet,
        verify it, check the arguments against its scope, decide with Cedar, and record
        the decision (the grant's use, the audit records) before anything runs.

        ``approval_id`` presents a human's approval for exactly this call (the call's
        digest is recomputed; the approval is consumed once). For a step that ended
        waiting for that approval, the step is begun again under a new grant. ``last``
        says this is the step's last call: the step ends in the write that records its
        final result (one write fewer). ``call_id`` is the host's id for the call (a
        model's tool-call id): within the run's step a call already made under it is not
        made again (by default, the n-th call of the step with these arguments is), and an
        approval request made for it records it (``approvals_for`` finds it again).

        The call gets one ``execute_tool`` span, from this check to its ``execute`` or
        ``record`` (or to the check itself, for a call refused or held).

        A step the plan does not have is denied (``scopegraph:plan``), never raised.
        """
        return self._check(step, tool, arguments, approval_id=approval_id, last=last, call_id=call_id,
                           again=approval_id is not None, host_id=call_id)

    def _check(self, step: str, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None,
               last: bool, call_id: str | None, again: bool, resumed_from: str | None = None,
               host_id: str | None = None) -> CallDecision:
        try:
            state, name, key, closing = self._prepare(step, tool, arguments, last, call_id, again, resumed_from)
        except SessionError as exc:
            return self._refused(step, tool, call_id, str(exc))
        span = HostCallSpan(tool, run_id=self.run_id, step_id=state.step_id, principal=state.ctx.principal)
        try:
            with span.current():
                decided = self.guard.gateway.decide(
                    state.grant.danger_token(), tool, arguments, state.ctx, call_key=key, approval_id=approval_id,
                    closing=closing, on_held=lambda held: self._hold(state, held, host_id))
        except BaseException as exc:
            span.end(None, exc)
            raise
        self._decided(state, tool, decided.decision)
        if decided.result is None:
            state.pending[name] = decided
            state.spans[name] = span
            state.closing = closing
        else:
            span.end(decided.result)
            self._took(state, decided.result)
        held = state.held_under or state
        return CallDecision(
            call_id=name, run_id=self.run_id, step_id=state.step_id, tool=tool,
            outcome=Outcome(decided.decision.outcome), policy_ids=tuple(decided.decision.policy_ids),
            reasons=tuple(decided.decision.reasons),
            approval_id=held.last_request if decided.decision.outcome == "needs_approval" else None,
            required_approvals=decided.decision.required_approvals, grant_id=decided.grant_id,
            result=decided.result)

    def _prepare(self, step: str, tool: str, arguments: Mapping[str, Any], last: bool, call_id: str | None,
                 again: bool, resumed_from: str | None) -> tuple[_Step, str, str, StepClosing | None]:
        """The step a call is for (begun if need be), the call's name in this session, its
        idempotency key, and how the step ends with it if it is the last."""
        state = self._checking(step, again)
        state.resumed_from = resumed_from or state.resumed_from
        index = state.checks
        state.checks += 1
        if call_id is None:
            key = call_key(state.ctx, index, tool, arguments)
            return state, key, key, self._closing(state) if last else None
        # The store's idempotency keys are global; a host's id (a model's ``call_1``) is
        # not: scoped to the run's step, the same id in another run is another call.
        key = sha256_hex(f"{self.run_id}\0{state.step_id}\0call\0{call_id}")
        return state, call_id, key, self._closing(state) if last else None

    def execute(self, decision: CallDecision) -> CallResult:
        """Run an allowed call's tool through the gateway and record its result.

        A decision whose call ended at its check (refused, held, replayed) returns that
        result and runs nothing.

        Raises:
            SessionError: the decision is not this session's, or its call was executed
                or recorded already.
            TransientToolError: the tool failed in a way worth retrying (recorded as
                such); check the call again to retry it, decided afresh.
        """
        if decision.result is not None:
            return decision.result
        state, decided, span = self._pending(decision)
        try:
            with span.current():
                result = self.guard.gateway.run(decided, state.ctx, closing=state.closing)
        except BaseException as exc:
            failed = failed_attempt(decided, exc)
            span.end(failed, exc)
            state.calls.append(failed)
            raise
        span.end(result)
        self._took(state, result)
        return result

    def record(self, decision: CallDecision, *, value: Any = None, error: BaseException | str | None = None,
               labels: Iterable[str] = ()) -> CallResult:
        """Record the outcome of an allowed call the host ran itself: its ``value``, or
        the ``error`` it failed with (its message scrubbed of secret arguments). The
        records, spans and ledger entry are those of a call the gateway ran.

        ``labels`` add to the tool's own output labels (``untrusted``, ``confidential``…):
        later calls of the step are decided knowing what its executor has read.

        Raises:
            SessionError: the call was not allowed (there is nothing to record), is not
                this session's, or was executed or recorded already.
        """
        if decision.outcome is not Outcome.ALLOW:
            raise SessionError(f"call {decision.call_id!r} was not allowed ({decision.outcome.value}): "
                               "there is no result to record")
        if decision.result is not None:
            raise SessionError(f"call {decision.call_id!r} was made before and is not recorded again")
        state, decided, span = self._pending(decision)
        try:
            with span.current():
                result = self.guard.gateway.record(decided, state.ctx, value=value, error=error, labels=labels,
                                                   closing=state.closing)
        except BaseException as exc:
            span.end(None, exc)
            raise
        span.end(result)
        self._took(state, result)
        return result

    def call(self, step: str, tool: str, arguments: Mapping[str, Any], *, last: bool = False,
             approval_id: str | None = None, call_id: str | None = None) -> CallResult:
        """``check`` and ``execute`` in one, retrying a transient failure of the tool (each
        retry checked again: a new decision, never the old one reused)."""
        return self._call(step, tool, arguments, approval_id=approval_id, last=last, call_id=call_id,
                          again=approval_id is not None, host_id=call_id)

    def _call(self, step: str, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None, last: bool,
              call_id: str | None, again: bool, resumed_from: str | None = None,
              host_id: str | None = None) -> CallResult:
        try:
            state, _, key, closing = self._prepare(step, tool, arguments, last, call_id, again, resumed_from)
        except SessionError as exc:
            return self._refused(step, tool, call_id, str(exc)).result  # type: ignore[return-value]
        result = self.guard.gateway.call(state.grant.danger_token(), tool, arguments, state.ctx, call_key=key,
                                         approval_id=approval_id, closing=closing,
                                         on_held=lambda held: self._hold(state, held, host_id))
        self._decided(state, tool, result.decision)
        self._took(state, result)
        return result

    # async --------------------------------------------------------------------------------
    # The store is synchronous and quick; what an async host must not wait on in a thread
    # is the tool: an async tool is awaited on the host's own loop.
    async def acheck(self, step: str, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None = None,
                     last: bool = False, call_id: str | None = None) -> CallDecision:
        """``check``, for a host on an event loop."""
        return self.check(step, tool, arguments, approval_id=approval_id, last=last, call_id=call_id)

    async def aexecute(self, decision: CallDecision) -> CallResult:
        """``execute``, awaiting an async tool on the caller's loop (no thread, no loop of its own)."""
        if decision.result is not None:
            return decision.result
        state, decided, span = self._pending(decision)
        try:
            with span.current():
                result = await self.guard.gateway.arun(decided, state.ctx, closing=state.closing)
        except BaseException as exc:
            failed = failed_attempt(decided, exc)
            span.end(failed, exc)
            state.calls.append(failed)
            raise
        span.end(result)
        self._took(state, result)
        return result

    async def arecord(self, decision: CallDecision, *, value: Any = None, error: BaseException | str | None = None,
                      labels: Iterable[str] = ()) -> CallResult:
        """``record``, for a host on an event loop."""
        return self.record(decision, value=value, error=error, labels=labels)

    async def acall(self, step: str, tool: str, arguments: Mapping[str, Any], *, last: bool = False,
                    approval_id: str | None = None, call_id: str | None = None) -> CallResult:
        """``call``, awaiting an async tool on the caller's loop; a retry waits without blocking it."""
        return await self._acall(step, tool, arguments, approval_id=approval_id, last=last, call_id=call_id,
                                 again=approval_id is not None, host_id=call_id)

    async def aresume(self, approval_id: str, *, last: bool = False,
                      request: ApprovalRequest | None = None) -> CallDecision:
        """``resume``, for a host on an event loop."""
        return self.resume(approval_id, last=last, request=request)

    async def aresume_call(self, approval_id: str, *, last: bool = False,
                           request: ApprovalRequest | None = None) -> CallResult:
        """``resume_call``, awaiting an async tool on the caller's loop."""
        request = self._request(approval_id, request)
        state = request.effective_status(self.guard.clock.now())
        final = unanswerable(self.run_id, request, state) if request.run_id == self.run_id else None
        if request.run_id != self.run_id or final is not None:
            return self.resume(approval_id, request=request).result  # type: ignore[return-value]  # ended at its check
        self._answered(request, state)
        arguments, present, call_id = resumption(self.workflow.registry, self.guard.policy.version, request, state)
        return await self._acall(request.step_id, request.tool, arguments, approval_id=present, last=last,
                                 call_id=call_id, again=True, resumed_from=request.id, host_id=request.call_id)

    async def aend_step(self, step: str, outcome: StepEnd | None = None, *, audit: bool = True) -> StepEnd | None:
        """``end_step``, for a host on an event loop."""
        return self.end_step(step, outcome, audit=audit)

    async def aend_run(self, *, status: str, error: str | None = None) -> None:
        """``end_run``, for a host on an event loop."""
        self.end_run(status=status, error=error)

    async def _acall(self, step: str, tool: str, arguments: Mapping[str, Any], *, approval_id: str | None,
                     last: bool, call_id: str | None, again: bool, resumed_from: str | None = None,
                     host_id: str | None = None) -> CallResult:
        try:
            state, _, key, closing = self._prepare(step, tool, arguments, last, call_id, again, resumed_from)
        except SessionError as exc:
            return self._refused(step, tool, call_id, str(exc)).result  # type: ignore[return-value]
        result = await self.guard.gateway.acall(state.grant.danger_token(), tool, arguments, state.ctx,
                                                call_key=key, approval_id=approval_id, closing=closing,
                                                on_held=lambda held: self._hold(state, held, host_id))
        self._decided(state, tool, result.decision)
        self._took(state, result)
        return result

    # approvals ----------------------------------------------------------------------------
    def approval(self, approval_id: str) -> ApprovalRequest:
        """The approval request and its answers so far (``effective_status`` says where it stands).

        Raises:
            ApprovalError: no approval has that id.
        """
        return self.guard.approvals.get(approval_id)

    def approvals_for(self, call_id: str) -> list[ApprovalRequest]:
        """The approval requests made in this run for the host's call ``call_id`` (the id
        given to ``check``), oldest first: a host re-running after an interrupt finds the
        request for that very call, however many calls share its digest."""
        return [r for r in self.guard.approvals.list(run_id=self.run_id) if r.call_id == call_id]

    def approve(self, approval_id: str, *, approver: str, reason: str = "",
                signature: str | None = None) -> ApprovalRequest:
        """Answer an approval request yes, as ``scopegraph approve`` does (the same checks:
        an allowed approver, not the initiator, a valid signature where one is required).

        Raises:
            ApprovalError: the answer is refused.
        """
        return self.guard.approvals.approve(approval_id, approver=approver, reason=reason, signature=signature)

    def deny(self, approval_id: str, *, approver: str, reason: str, propose: Mapping[str, Any] | None = None,
             signature: str | None = None) -> ApprovalRequest:
        """Answer an approval request no, as ``scopegraph deny`` does.

        Raises:
            ApprovalError: the answer is refused.
        """
        return self.guard.approvals.deny(approval_id, approver=approver, reason=reason, propose=propose,
                                         signature=signature)

    def resume(self, approval_id: str, *, last: bool = False, request: ApprovalRequest | None = None) -> CallDecision:
        """Check again the call an approval request was made for, now it is answered.

        Approved: exactly the approved call is checked, presenting the approval (its
        digest recomputed; consumed once, before it expires). Denied with a counter-
        proposal: the proposed call is checked as a new action, from scratch. Approved
        under policies that have changed since: checked afresh, without the approval.
        Still pending: held, nothing written. Denied or expired: denied, nothing written
        (``scopegraph:approval``). The step is begun again under a new grant if it ended.

        ``request`` is the request as the caller just read it, to save reading it again
        (see ``_request``).
        """
        request = self._request(approval_id, request)
        if request.run_id != self.run_id:
            return self._refused(request.step_id, request.tool, None,
                                 f"approval {approval_id!r} belongs to another run")
        state = request.effective_status(self.guard.clock.now())
        final = unanswerable(self.run_id, request, state)
        if state != "pending":
            self._answered(request, state)
        if final is not None:
            return final
        arguments, present, call_id = resumption(self.workflow.registry, self.guard.policy.version, request, state)
        return self._check(request.step_id, request.tool, arguments, approval_id=present, last=last,
                           call_id=call_id, again=True, resumed_from=request.id, host_id=request.call_id)

    def resume_call(self, approval_id: str, *, last: bool = False,
                    request: ApprovalRequest | None = None) -> CallResult:
        """``resume`` and ``execute`` in one, retrying a transient failure as ``call`` does
        (a retry presents no approval: it is a new call, decided afresh). ``request`` as
        for ``resume``."""
        request = self._request(approval_id, request)
        state = request.effective_status(self.guard.clock.now())
        final = unanswerable(self.run_id, request, state) if request.run_id == self.run_id else None
        if request.run_id != self.run_id or final is not None:
            return self.resume(approval_id, request=request).result  # type: ignore[return-value]  # ended at its check
        self._answered(request, state)
        arguments, present, call_id = resumption(self.workflow.registry, self.guard.policy.version, request, state)
        return self._call(request.step_id, request.tool, arguments, approval_id=present, last=last,
                          call_id=call_id, again=True, resumed_from=request.id, host_id=request.call_id)

    # ends ---------------------------------------------------------------------------------
    def end_step(self, step: str, outcome: StepEnd | None = None, *, audit: bool = True) -> StepEnd | None:
        """End the step: revoke its grant and its downstream secrets, and audit its end
        (``outcome``, or by default the outcome of its calls), in one write.

        A step whose last call ended it has nothing left to write unless ``outcome``
        differs from what was recorded then (its executor did more after the call).
        ``audit=False`` revokes without a ``step_ended`` record (a step cut short).
        Ending a step twice does nothing the second time.
        """
        state = self._state(step)
        for span in state.spans.values():
            span.end(None)  # an allowed call never run: its grant ends now, and its span with it
        if state.revoked and state.ended is not None and (outcome is None or outcome == state.ended):
            with tr.span(tr.GRANT_REVOKE, {tr.GRANT_ID: state.grant.jti, tr.STEP_ID: state.step_id,
                                           tr.GRANT_REVOKED_WITH_CALL: True}):
                pass
            self.guard.secrets.end_step(self.run_id, state.step_id)
            self._announce_end(state)
            return state.ended
        if outcome is None and audit:
            outcome = self._outcome(state, state.calls)
        guard = self.guard
        with tr.span(tr.GRANT_REVOKE, {tr.GRANT_ID: state.grant.jti, tr.STEP_ID: state.step_id}), \
                guard.store.atomic():
            minted = guard.issuer.write_unwritten(state.grant.jti)  # a step that made no call: written now
            revoked = guard.issuer.revoke(state.grant.jti, reason=STEP_ENDED)
            if minted:
                guard.ledger.append("grant_minted", self.run_id,
                                    **grant_minted_fields(state.grant, self._secrets(state.step.tool)))
            if revoked:
                self._revoked(state)
            if outcome is not None and audit:
                self._step_ended(state.step_id, outcome)
        state.revoked = True
        if outcome is not None:
            state.ended = outcome
            state.announced = False  # recorded again: told again
        guard.secrets.end_step(self.run_id, state.step_id)  # the step's downstream credentials end with it
        self._announce_end(state)
        return outcome

    def end_run(self, *, status: str, error: str | None = None) -> None:
        """End the run: revoke every grant and downstream secret it still holds, set its
        status, audit its end and sign the ledger's head, in one write. ``status`` is
        ``completed``, ``denied``, ``failed``, ``cancelled``, or ``paused`` (waiting
        for approvals: its pending requests are listed in the record)."""
        guard = self.guard
        awaiting = [a.id for a in guard.approvals.list(run_id=self.run_id, status="pending")] \
            if status == "paused" else []
        with guard.store.atomic():
            guard.revoke_run(self.run_id, reason=f"run {status}")
            guard.store.set_run_status(self.run_id, status, at=guard.clock.now())
            guard.ledger.append("run_paused" if status == "paused" else "run_ended", self.run_id,
                                status=status, error=error, awaiting=awaiting)
            guard.ledger.sign_head(guard.domain)
        for state in self._steps.values():
            state.revoked = True
            for span in state.spans.values():
                span.end(None)
        self._emit(RunEnded(run_id=self.run_id, status=status, error=error))

    # internals ----------------------------------------------------------------------------
    def _plan_step(self, step_id: str) -> Step:
        try:
            return self.plan.step(step_id)
        except PlanError:
            raise SessionError(f"step {step_id!r} is not in the plan of run {self.run_id!r}") from None

    def _state(self, step_id: str) -> _Step:
        state = self._steps.get(step_id)
        if state is None:
            raise SessionError(f"step {step_id!r} of run {self.run_id!r} has not begun")
        return state

    def _checking(self, step_id: str, again: bool) -> _Step:
        """The step a check is for: begun now if it has not, or (resuming it) again."""
        state = self._steps.get(step_id)
        if state is None or (state.revoked and again):
            asked = state.asked if state is not None else 0
            if state is not None:
                self.begin_step(state.step, identity=state.identity, observations=state.ctx.observations,
                                data_labels=state.ctx.data_labels, widened=state.ctx.widened, approvals_asked=asked)
            else:
                self.begin_step(step_id)
            state = self._steps[step_id]
        return state

    def _refused(self, step: str, tool: str, call_id: str | None, reason: str) -> CallDecision:
        """A check refused before any grant is involved (no such step): denied, audited."""
        decision = Decision.deny(reason, PLAN_POLICY_ID)
        self.guard.ledger.append("decision", self.run_id, step_id=step, tool=tool, grant_id=None, spiffe_id=None,
                                 attempt=1, decision="deny", policy_ids=[PLAN_POLICY_ID], reasons=[reason],
                                 arguments_digest=None)
        result = CallResult(tool=tool, arguments={}, status="denied", decision=decision)
        return CallDecision(call_id=call_id or uuid.uuid4().hex, run_id=self.run_id, step_id=step, tool=tool,
                            outcome=Outcome.DENY, policy_ids=(PLAN_POLICY_ID,), reasons=(reason,), result=result)

    def _pending(self, decision: CallDecision) -> tuple[_Step, Decided, HostCallSpan]:
        state = self._steps.get(decision.step_id)
        if decision.run_id != self.run_id or state is None:
            raise SessionError(f"call {decision.call_id!r} was not checked in this session")
        decided = state.pending.pop(decision.call_id, None)
        if decided is None:
            raise SessionError(f"call {decision.call_id!r} was executed or recorded already, or never allowed")
        return state, decided, state.spans.pop(decision.call_id)

    def _took(self, state: _Step, result: CallResult) -> None:
        if result.status == "needs_approval":
            holder = state.held_under or state
            if holder.last_request is not None:
                self._emit(ApprovalRequested(run_id=self.run_id, step_id=holder.step_id, tool=result.tool,
                                             approval_id=holder.last_request))
        state.calls.append(result)
        if state.ended is not None and state.revoked:  # the call ended its step
            self._announce_end(state)
        # What this call returned is now something the executor has seen: later calls of
        # the step carry its labels, and their arguments are traced against it.
        state.ctx = state.ctx.after(result)

    def _emit(self, event: RunEvent) -> None:
        if self._listener is not None:
            self._listener(event)

    # The events of every step and call (below, and ``StepStarted``) are made only for a
    # listener: without one, nobody reads them.
    def _decided(self, state: _Step, tool: str, decision: Decision) -> None:
        if self._listener is not None:
            self._emit(CallDecided(run_id=self.run_id, step_id=state.step_id, tool=tool,
                                   outcome=Outcome(decision.outcome), policy_ids=tuple(decision.policy_ids),
                                   reason="; ".join(decision.reasons)))

    def _announce_end(self, state: _Step) -> None:
        if state.ended is not None and not state.announced:
            state.announced = True
            if self._listener is not None:
                self._emit(StepEnded(run_id=self.run_id, step_id=state.step_id, status=state.ended.status,
                                     reason=state.ended.reason))

    def _request(self, approval: str | ApprovalRequest, read: ApprovalRequest | None = None) -> ApprovalRequest:
        """The approval request ``approval`` names: the request itself, or ``read`` (the
        caller's read of it), or read from the store now.

        A caller's read (made just before) only says which call to check again and whether
        the answer already ends it (an answer, once given, only turns consumed or expires,
        and expiry is told from the clock when asked). It authorizes nothing: the gateway
        reads the request afresh to check the approval against the call actually made, and
        consumes it in the transaction of the call's use; a read that is out of date or
        wrong can only get the call refused or held again.
        """
        if isinstance(approval, ApprovalRequest):
            return approval
        if read is not None and read.id == approval:
            return read
        return self.guard.approvals.get(approval)

    def _answered(self, request: ApprovalRequest, status: str) -> None:
        state = self._steps.get(request.step_id)
        if state is not None and not state.revoked and state.resumed_from == request.id:
            return  # told as the step was begun again for it
        self._emit(ApprovalAnswered(run_id=self.run_id, step_id=request.step_id, approval_id=request.id,
                                    status=status))

    def _closing(self, state: _Step) -> StepClosing:
        """How ``state``'s step ends with its last call (see ``StepClosing``): revoked, and
        its outcome audited, in the write that records the call's final result."""

        def end(result: CallResult, revoked: bool) -> None:
            if result.status == "needs_approval":
                outcome = StepEnd(status="awaiting_approval", decision="needs_approval",
                                  policy_ids=tuple(result.decision.policy_ids), reason=result.audit_reason,
                                  approval_id=(state.held_under or state).last_request)
            else:
                outcome = self._outcome(state, [*state.calls, result])
            if revoked:
                self._revoked(state)
            self._step_ended(state.step_id, outcome)
            state.ended = outcome
            state.revoked = True

        return StepClosing(reason=STEP_ENDED, end=end)

    def _outcome(self, state: _Step, calls: list[CallResult]) -> StepEnd:
        """The end of a step from its calls; a step resumed on an approval names it."""
        outcome = step_outcome(calls, state.step.tool)
        if state.resumed_from is None:
            return outcome
        return StepEnd(status=outcome.status, decision=outcome.decision, policy_ids=outcome.policy_ids,
                       reason=outcome.reason, approval_id=state.resumed_from, result=outcome.result)

    def _hold(self, state: _Step, result: CallResult, call_id: str | None) -> None:
        """Make the approval request for a held call (naming the host's ``call_id``), in
        the write that records its decision: for a delegated child, under its parent step
        (which pauses on it)."""
        holder = state.held_under or state
        request = self._request_approval(holder, result, call_id)
        holder.last_request = request.id

    def _request_approval(self, state: _Step, result: CallResult, call_id: str | None) -> ApprovalRequest:
        guard, wf, step = self.guard, self.workflow, state.step
        digest = action_digest_v2(run_id=self.run_id, step_id=state.step_id, tool=result.tool,
                                  arguments=dict(result.arguments), policy_version=guard.policy.version)
        now = guard.clock.now()
        tool = wf.registry.get_tool(result.tool)
        sequence = state.asked
        state.asked += 1
        request = guard.approvals.request(ApprovalRequest(
            id=make_approval_id(self.run_id, state.step_id, digest, sequence), run_id=self.run_id,
            step_id=state.step_id, workflow=wf.name, initiator=self.initiator, requester=str(state.identity),
            tool=result.tool, arguments=dict(result.arguments), digest=digest,
            secret_arguments=sorted(tool.secrets & set(result.arguments)),
            policy_version=guard.policy.version, risk=tool.risk.value,
            policy_ids=list(result.decision.policy_ids), reasons=list(result.decision.reasons),
            data_labels=sorted(state.labels), purpose=step.purpose,
            required_approvals=max(1, result.decision.required_approvals),
            allowed_approvers=sorted(wf.approver_rule.allowed_for(tool.name, tool.risk.value)),
            created_at=now, expires_at=now + wf.approval_ttl,
            digest_version=2, signed_answers=wf.require_signed_answers, call_id=call_id,
        ))
        if request.created_at == now:  # new, not found again after a crash
            guard.ledger.append("approval_requested", self.run_id, approval_id=request.id,
                                step_id=state.step_id, tool=result.tool, digest=digest,
                                policy_ids=list(result.decision.policy_ids),
                                required_approvals=request.required_approvals, expires_at=request.expires_at,
                                **({"signed_answers": True} if request.signed_answers else {}))
        return request

    def _mint(self, step: Step, identity: SpiffeId) -> tuple[Svid, Grant]:
        guard = self.guard
        with tr.span(tr.GRANT_MINT, {tr.SPIFFE_ID: str(identity), tr.STEP_ID: step.id,
                                     tr.GEN_AI_TOOL_NAME: step.tool}) as s:
            # The step's proof of identity lives no longer than its grant.
            svid = guard.domain.issue_svid(identity, ttl=self.workflow.grant_ttl)
            # Signed now; written, with its audit record, in the transaction of its first use
            # (or of its revocation, for a step that makes no call). Until then the store does
            # not know it, so it is unusable, and a crash before that loses nothing.
            grant = guard.issuer.mint(
                subject=identity, tool=step.tool, run_id=self.run_id, step_id=step.id,
                workflow=self.workflow.name, constraints=step.constraints,
                act={"sub": str(self.planner_id), "act": {"sub": f"user:{self.initiator}"}},
                deferred=True,
            )
            s.set_attribute(tr.GRANT_ID, grant.jti)
            s.set_attribute(tr.GRANT_EXPIRES_AT, grant.expires_at)
        guard.metrics.grants_minted.add(1, {"workflow": self.workflow.name, "tool": step.tool})
        return svid, grant

    def _secrets(self, tool: str) -> frozenset[str]:
        return self.workflow.registry.get_tool(tool).secrets

    def _revoked(self, state: _Step) -> None:
        """Audit and count the revocation of a step's grant as its step ends."""
        self.guard.ledger.append("grant_revoked", self.run_id, step_id=state.step_id, grant_id=state.grant.jti,
                                 reason=STEP_ENDED)
        self.guard.metrics.grants_revoked.add(1, {"workflow": self.workflow.name, "tool": state.step.tool})

    def _step_ended(self, step_id: str, outcome: StepEnd) -> None:
        self.guard.ledger.append("step_ended", self.run_id, step_id=step_id, status=outcome.status,
                                 decision=outcome.decision, policy_ids=list(outcome.policy_ids),
                                 reason=outcome.reason, approval_id=outcome.approval_id)


__all__ = ["PLAN_POLICY_ID", "STEP_ENDED", "CallDecision", "Outcome", "Session", "StepEnd", "StepScope", "step_outcome"]
