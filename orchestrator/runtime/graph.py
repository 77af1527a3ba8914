"""The run as a LangGraph graph.

::

    START → plan ─▶ route ─┬─▶ step     (one Send per ready step, concurrently) ─▶ route
                           ├─▶ approval (one Send per step awaiting a human)    ─▶ route
                           └─▶ END

``plan`` asks the planner (which holds no grant) and validates the plan. ``step`` mints
the step's identity and grant, runs the executor through a ``ToolHandle``, and revokes
the grant however the step ends; a call that needs approval is persisted as an
``ApprovalRequest``. ``approval`` pauses with ``interrupt()`` (nothing with side effects
runs before it), then reads the answer from the store and, if approved, executes
exactly the approved call under a fresh grant. Approvals are sent only when no step is
ready, so a run does everything it can before it waits. The runtime revokes every grant
of the run when the graph stops, however it stops.

Routing after a step: a node's conditional edge sees the state with only its own
writes. When a step ran alone in its superstep that is the whole truth, and the edge
routes straight on (one superstep per sequential step). When siblings ran beside it,
it goes through ``schedule``, a join that routes once all of them have landed.

A repeated step (``for_each``) is sent as one task per item, each its own step record
(``send[0]``, ``send[1]``…); routing and the run's outcome read them back through
``repeat.plan_view`` as one record per plan step.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send, interrupt

from .. import tracing as tr
from ..approvals import ApprovalRequest, approval_id
from ..canonical import action_digest_v2, canonical_json, sha256_hex
from ..constraints import narrows
from ..credentials import Grant
from ..errors import PlanError, ScopegraphError
from ..gateway import CallContext, CallResult, StepClosing, grant_minted_fields
from ..identity import SpiffeId, Svid
from ..plan import Plan, Step, parse_plan, validate_plan
from ..provenance import Observation
from ..redaction import recorded_constraints
from ..roles import (
    FAILURE_KINDS,
    NeedsApproval,
    PlanningContext,
    ReplanRequested,
    StepContext,
    StepFailure,
    ToolHandle,
)
from ..tools import ToolRegistry
from . import repeat
from .delegation import delegator_for
from .outcome import step_outcome
from .state import RunState, StepInput

if TYPE_CHECKING:
    from .runner import Runtime

STEP_ENDED = "step ended"  # why a step's grant is revoked when the step ends


def build_graph(rt: Runtime) -> StateGraph:
    graph = StateGraph(RunState)
    graph.add_node("plan", lambda state: _plan(rt, state))
    graph.add_node("schedule", lambda state: {})
    graph.add_node("step", lambda payload: _step(rt, payload))
    graph.add_node("approval", lambda payload: _approval(rt, payload))
    targets = ["step", "approval", "schedule", "plan", END]
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", lambda state: _route(rt, state), targets)
    graph.add_conditional_edges("schedule", lambda state: _route(rt, state), targets)
    graph.add_conditional_edges("step", lambda state: _after_task(rt, state), targets)
    graph.add_conditional_edges("approval", lambda state: _after_task(rt, state), targets)
    return graph


def _plan(rt: Runtime, state: RunState) -> dict[str, Any]:
    """Ask the planner for the run's plan, or, when steps asked for one, for a revision."""
    wf = rt.workflow
    run_id = state["run_id"]
    steps = state.get("steps") or {}
    previous = rt.plan_for(run_id, state["plan"]) if state.get("plan") else None
    asking = sorted(sid for sid, rec in steps.items() if rec.get("status") == "replan")
    completed = tuple(sorted(sid for sid, rec in repeat.plan_view(previous, steps).items()
                             if rec.get("status") == "completed")) if previous else ()
    ctx = PlanningContext(
        task=state["task"], workflow=wf.name, run_id=run_id,
        identity=SpiffeId.parse(state["planner_id"]), catalogue=wf.registry.catalogue(),
        previous_plan=previous, completed=completed if previous else (),
        failures=tuple(_failure(steps[sid]["failure"]) for sid in asking),
        validator=lambda data: validate_plan(parse_plan(data), wf.registry),
    )
    revision = int(state.get("replans") or 0) + 1 if previous is not None else 0
    with tr.span(f"{tr.INVOKE_AGENT} planner", {
        tr.GEN_AI_OPERATION: "invoke_agent", tr.GEN_AI_AGENT_NAME: "planner",
        tr.GEN_AI_AGENT_ID: state["planner_id"], tr.SPIFFE_ID: state["planner_id"],
        tr.RUN_ID: run_id, tr.WORKFLOW: wf.name, "scopegraph.plan.revision": revision,
    }, context=rt.trace_context(run_id)) as s:
        try:
            plan = ctx.validate(wf.planner.plan(ctx))
            if previous is not None:
                kept = tuple(sorted(sid for sid, rec in steps.items() if rec.get("status") != "replan"))
                _check_revision(previous, plan, kept)
        except PlanError as exc:
            tr.set_error(s, "malformed plan")
            rt.ledger.append("plan", run_id, planner=state["planner_id"], valid=False, error=str(exc),
                             revision=revision)
            # The steps that asked end failed: the run has no plan to give them.
            ended = {sid: {**steps[sid], "status": "failed", "reason": "the re-plan they asked for was refused"}
                     for sid in asking}
            return {"status": "failed", "error": str(exc), **({"steps": ended} if ended else {})}
        dumped = plan.model_dump(mode="json")
        widened: list[str] = []  # a first plan is the original: nothing in it is wider than itself
        if previous is not None:
            original = rt.plan_for(run_id + "#original", state.get("original_plan") or state["plan"])
            widened = sorted(st.id for st in plan.steps if not _within(st, original, wf.registry))
        rt.ledger.append("plan", run_id, planner=state["planner_id"], valid=True,
                         plan_digest=sha256_hex(canonical_json(dumped)), revision=revision,
                         failures=[steps[sid]["failure"] for sid in asking], widened=widened,
                         steps=[{"id": st.id, "tool": st.tool, "depends_on": list(st.depends_on),
                                 "purpose": st.purpose,
                                 "constraints": recorded_constraints(st.constraints, wf.registry[st.tool].secrets)}
                                for st in plan.steps])
        s.set_attribute("scopegraph.plan.steps", len(plan.steps))
    if previous is None:
        return {"plan": dumped}
    # The steps that asked are replaced: their records go, so a step of the same id starts afresh.
    return {"plan": dumped, "original_plan": state.get("original_plan") or state["plan"],
            "replans": revision, "widened": widened, "steps": {sid: None for sid in asking}}


def _check_revision(previous: Plan, revised: Plan, kept: tuple[str, ...]) -> None:
    """A revision may change what is left to do, never a step that has run or is running:
    completed steps, steps waiting for a human, steps that failed or were denied."""
    for sid in sorted({repeat.base_id(k) for k in kept}):  # an iteration keeps its whole step
        try:
            same = revised.step(sid) == previous.step(sid)
        except PlanError:
            same = False
        if not same:
            raise PlanError(f"revised plan changes or drops step {sid!r}, which has already run")


def _within(step: Step, original: Plan, tools: ToolRegistry) -> bool:
    """Whether some step of the original plan already allowed everything ``step`` allows.

    An argument the original constrained and ``step`` leaves out runs with the tool's
    default: that default must lie inside the original constraint.
    """
    fields = tools.get_tool(step.tool).args_model.model_fields

    def inside(o: Step) -> bool:
        if o.tool != step.tool or not repeat.repeats_within(step, o):
            return False
        for name, c in step.constraints.items():
            if name not in o.constraints or not narrows(c, o.constraints[name]):
                return False
        for name, c in o.constraints.items():
            if name not in step.constraints:
                field = fields.get(name)
                if field is None or field.is_required() or not c.allows(field.get_default(call_default_factory=True)):
                    return False
        return True

    return any(inside(o) for o in original.steps)


def _failure(data: dict[str, Any]) -> StepFailure:
    return StepFailure(**{**data, "policy_ids": tuple(data.get("policy_ids") or ())})


def _after_task(rt: Runtime, state: RunState) -> list[Send] | str:
    """Route on if every task of its batch has landed in this view, else join at ``schedule``."""
    return "schedule" if state.get("batches") else _route(rt, state)


def _route(rt: Runtime, state: RunState) -> list[Send] | str:
    if state.get("status") == "failed" or not state.get("plan"):
        return END
    plan = rt.plan_for(state["run_id"], state["plan"])
    steps = state.get("steps") or {}
    statuses = {sid: s["status"] for sid, s in steps.items()}
    human_denied = any(s.get("denied_by") for s in steps.values())
    if human_denied and state.get("on_denial", "fail") == "fail":
        return END
    if "replan" in statuses.values():
        return "plan"
    view = repeat.plan_view(plan, steps)
    done = {sid for sid, rec in view.items() if rec["status"] == "completed"}
    results = {sid: view[sid].get("result") for sid in done}
    ready = plan.ready_steps(done, started=view.keys())
    tasks = [t for s in ready for t in repeat.tasks_for(s, results)]
    tasks += repeat.missing_iterations(plan, view, steps, results)
    if tasks:
        batch = _dispatch(tasks)
        return [Send("step", _step_input(state, repeat.task_step(plan, t), results, batch, view)) for t in tasks]
    waiting = [sid for sid, st in statuses.items() if st == "awaiting_approval"]
    if waiting:
        batch = _dispatch(waiting)
        return [Send("approval", _step_input(state, repeat.task_step(plan, sid), results, batch, view))
                for sid in waiting]
    return END


def _dispatch(step_ids: list[str]) -> dict[str, Any]:
    """A batch of tasks sent together; each reports its landing (see ``state.merge_batches``)."""
    return {"id": uuid.uuid4().hex, "members": sorted(step_ids)}


def _landed(payload: StepInput) -> dict[str, Any]:
    """The write that reports this task's landing; none for a batch of one (nothing to join)."""
    batch = payload["dispatch"]
    if len(batch["members"]) < 2:
        return {}
    return {"batches": {batch["id"]: {"members": batch["members"], "landed": [payload["step_id"]]}}}


def _with_labels(update: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    # Written only when there are some: every channel write is a row in the checkpoint store.
    return {**update, "data_labels": labels} if labels else update


def _step_input(state: RunState, step: Step, results: dict[str, Any], batch: dict[str, Any],
                view: dict[str, Any] | None = None) -> StepInput:
    steps = state.get("steps") or {}
    records = steps if view is None else view
    return StepInput(
        run_id=state["run_id"], workflow=state["workflow"], initiator=state["initiator"],
        planner_id=state["planner_id"], plan=state["plan"], step_id=step.id,
        dependencies={d: results[d] for d in step.depends_on if d in results},
        dependency_labels={d: records[d].get("labels") or [] for d in step.depends_on if d in results},
        data_labels=state.get("data_labels") or [],
        widened=repeat.base_id(step.id) in (state.get("widened") or ()),
        replans=int(state.get("replans") or 0),
        record=steps.get(step.id, {}),
        dispatch=batch,
    )


def _observations(plan: Plan, payload: StepInput) -> tuple[Observation, ...]:
    """The dependencies' outputs, as what the executor has been shown."""
    labels = payload.get("dependency_labels") or {}
    return tuple(Observation(step_id=d, tool=plan.step(d).tool, labels=frozenset(labels.get(d) or ()), value=v)
                 for d, v in payload["dependencies"].items())


def _call_context(rt: Runtime, payload: StepInput, plan: Plan, step: Step, identity: SpiffeId,
                  extra_labels: frozenset[str] = frozenset()) -> CallContext:
    return CallContext(workflow=rt.workflow.name, run_id=payload["run_id"], step_id=step.id,
                       principal=identity, data_labels=frozenset(payload["data_labels"]) | extra_labels,
                       observations=_observations(plan, payload), widened=bool(payload.get("widened")))


def final_status(state: dict[str, Any]) -> str:
    """The run's outcome from its last state (a paused run is decided by the runtime)."""
    if state.get("status") == "failed":
        return "failed"
    steps = state.get("steps") or {}
    statuses = [s["status"] for s in steps.values()]
    plan_size = len(state["plan"]["steps"]) if state.get("plan") else 0
    if "failed" in statuses:
        return "failed"
    if "denied" in statuses:
        return "denied"
    view = repeat.plan_view(Plan.model_validate(state["plan"]), steps) if plan_size else {}
    if plan_size and [r["status"] for r in view.values()].count("completed") == plan_size:
        return "completed"
    return "failed"


def _step_identity(rt: Runtime, run_id: str, step_id: str) -> SpiffeId:
    return rt.domain.id("wf", rt.workflow.name, "run", run_id, *repeat.identity_segments(step_id), "executor")


def _mint(rt: Runtime, payload: StepInput, step: Step, identity: SpiffeId) -> tuple[Svid, Grant]:
    with tr.span(tr.GRANT_MINT, {tr.SPIFFE_ID: str(identity), tr.STEP_ID: step.id,
                                 tr.GEN_AI_TOOL_NAME: step.tool}) as s:
        # The step's proof of identity lives no longer than its grant.
        svid = rt.domain.issue_svid(identity, ttl=rt.workflow.grant_ttl)
        # Signed now; written, with its audit record, in the transaction of its first use
        # (or of its revocation, for a step that makes no call). Until then the store does
        # not know it, so it is unusable, and a crash before that loses nothing.
        grant = rt.issuer.mint(
            subject=identity, tool=step.tool, run_id=payload["run_id"], step_id=step.id,
            workflow=rt.workflow.name, constraints=step.constraints,
            act={"sub": payload["planner_id"], "act": {"sub": f"user:{payload['initiator']}"}},
            deferred=True,
        )
        s.set_attribute(tr.GRANT_ID, grant.jti)
        s.set_attribute(tr.GRANT_EXPIRES_AT, grant.expires_at)
    rt.metrics.grants_minted.add(1, {"workflow": rt.workflow.name, "tool": step.tool})
    return svid, grant


def _secrets(rt: Runtime, tool: str) -> frozenset[str]:
    return rt.workflow.registry.get_tool(tool).secrets


def _revoke(rt: Runtime, run_id: str, step: Step, grant: Grant,
            ended: dict[str, Any] | None = None) -> None:
    """Revoke the step's grant; with ``ended``, record the step's outcome in the same write."""
    with tr.span(tr.GRANT_REVOKE, {tr.GRANT_ID: grant.jti, tr.STEP_ID: step.id}), rt.store.atomic():
        minted = rt.issuer.write_unwritten(grant.jti)  # a step that made no call: written with its end
        revoked = rt.issuer.revoke(grant.jti, reason=STEP_ENDED)
        if minted:
            rt.ledger.append("grant_minted", run_id, **grant_minted_fields(grant, _secrets(rt, step.tool)))
        if revoked:
            _revoked(rt, run_id, step.id, grant.jti, step.tool)
        if ended is not None and "status" in ended:
            _step_ended(rt, run_id, ended)
    rt.secrets.end_step(run_id, step.id)  # the step's downstream credentials end with its grant


def _revoked_with_call(rt: Runtime, run_id: str, grant: Grant, step: Step) -> None:
    """The revocation's span for a step that ended with its last call: the revocation was
    written in that call's transaction, so only the step's downstream credentials are left."""
    with tr.span(tr.GRANT_REVOKE, {tr.GRANT_ID: grant.jti, tr.STEP_ID: step.id, tr.GRANT_REVOKED_WITH_CALL: True}):
        pass
    rt.secrets.end_step(run_id, step.id)  # the step's downstream credentials end with its grant


def _revoked(rt: Runtime, run_id: str, step_id: str, jti: str, tool: str) -> None:
    """Audit and count the revocation of a step's grant as its step ends."""
    rt.ledger.append("grant_revoked", run_id, step_id=step_id, grant_id=jti, reason=STEP_ENDED)
    rt.metrics.grants_revoked.add(1, {"workflow": rt.workflow.name, "tool": tool})


def _tool_span(rt: Runtime, payload: StepInput, step: Step, identity: SpiffeId) -> Any:
    # The executor's agent span: its model calls and each of its tool calls are children.
    return tr.span(f"{tr.INVOKE_AGENT} executor", lambda: {
        tr.GEN_AI_OPERATION: "invoke_agent", tr.STEP_TOOL: step.tool,
        tr.GEN_AI_AGENT_NAME: "executor", tr.GEN_AI_AGENT_ID: str(identity),
        tr.SPIFFE_ID: str(identity), tr.STEP_ID: step.id, tr.RUN_ID: payload["run_id"],
        tr.RISK: rt.workflow.registry.get_tool(step.tool).risk.value,
        tr.DATA_LABELS: list(payload["data_labels"]),
    }, context=rt.trace_context(payload["run_id"]))


def _close_step_span(s: Any, record: dict[str, Any]) -> None:
    s.set_attribute(tr.CALL_STATUS, record.get("status", ""))
    if record.get("decision"):
        s.set_attribute(tr.DECISION, record["decision"])
    s.set_attribute(tr.POLICY_IDS, list(record.get("policy_ids") or []))
    if record.get("approval_id"):
        s.set_attribute(tr.APPROVAL_ID, record["approval_id"])
    if record.get("status") == "denied":  # an outcome, not an error (see ``tracing``)
        tr.record_denial(s, record.get("policy_ids") or [], record.get("reason") or "")
    elif record.get("status") == "failed":
        tr.set_error(s, record["status"])


def _step(rt: Runtime, payload: StepInput) -> dict[str, Any]:
    plan = rt.plan_for(payload["run_id"], payload["plan"])
    step = repeat.concrete_step(plan, payload["step_id"], payload["dependencies"])
    if step.for_each is not None:  # a repeated step with no iteration to run: why is its record
        record = repeat.unrepeated_record(step, payload["dependencies"])
        _step_ended(rt, payload["run_id"], record)
        return {"steps": {step.id: record}, **_landed(payload)}
    identity = _step_identity(rt, payload["run_id"], step.id)
    with _tool_span(rt, payload, step, identity) as s:
        update = _run_step(rt, payload, plan, step, identity)  # records the outcome as it revokes
        _close_step_span(s, update["steps"][step.id])
    return {**update, **_landed(payload)}


def _run_step(rt: Runtime, payload: StepInput, plan: Plan, step: Step, identity: SpiffeId) -> dict[str, Any]:
    svid, grant = _mint(rt, payload, step, identity)
    ctx = _call_context(rt, payload, plan, step, identity)
    record: dict[str, Any] = {"step_id": step.id, "tool": step.tool, "spiffe_id": str(identity),
                              "grant_id": grant.jti, "grant_ids": [grant.jti]}
    sealed: dict[str, Any] = {}
    closing = _closing(rt, payload, step, identity, record, lambda: handle.calls, sealed)
    handle = ToolHandle(rt.gateway, grant.danger_token(), ctx, closing=closing)
    children: list[dict[str, Any]] = []
    try:
        rt.workflow.executor.execute(StepContext(
            step=step, plan=plan, identity=identity, svid=svid, dependencies=payload["dependencies"],
            tools=handle, data_labels=ctx.data_labels,
            dependency_labels={d: frozenset(v) for d, v in (payload.get("dependency_labels") or {}).items()},
            tool_schema=rt.workflow.registry.catalogue_entry(step.tool),
            delegator=delegator_for(rt, payload, step, identity, grant, handle, children),
        ))
        record.update(step_outcome(handle.calls, step.tool))
    except ReplanRequested as ask:
        record.update(_replan_record(rt, payload, step, ask, handle.calls))
    except NeedsApproval as pause:
        if pause.result is closing.result:  # asked for in the write that ended the step
            record.update(sealed)
        else:
            record.update(_paused(rt, payload, step, identity, pause.result, []))
    except ScopegraphError as exc:
        record.update(status="failed", decision=None, policy_ids=[], reason=str(exc))
    except Exception as exc:  # an executor bug ends the step, never the run's bookkeeping
        # The type only: the message may quote a tool's error, and with it secret arguments.
        record.update(status="failed", decision=None, policy_ids=[],
                      reason=f"executor raised {type(exc).__name__}")
    finally:
        # A step that ended with its last call has its grant revoked and its outcome
        # recorded already. Only an executor that did more after that call (raised, or
        # called again) changes the outcome: the step's end is then recorded again.
        if closing.result is None or ("status" in record and _ended(record) != _ended({**record, **sealed})):
            _revoke(rt, payload["run_id"], step, grant, ended=record)
        else:
            _revoked_with_call(rt, payload["run_id"], grant, step)
    record["revoked"] = True
    record["calls"] = [_call_summary(c) for c in handle.calls]
    if children:
        record["children"] = children
    # What the step's output may carry: its calls' labels and everything its executor was
    # shown, so taint survives a detour through a step whose tool adds no label.
    labels = sorted(set(_labels(handle.calls)).union(*(payload.get("dependency_labels") or {}).values()))
    if labels:
        record["labels"] = labels
    return _with_labels({"steps": {step.id: record}}, labels)


def _closing(rt: Runtime, payload: StepInput, step: Step, identity: SpiffeId, record: dict[str, Any],
             earlier: Callable[[], list[CallResult]], sealed: dict[str, Any]) -> StepClosing:
    """How a step ends with its last call (see ``StepClosing``): the outcome of its calls
    (``earlier`` ones and the last) goes into ``sealed`` and the ledger, in the call's write."""

    def end(result: CallResult, revoked: bool) -> None:
        if result.status == "needs_approval":
            outcome = _paused(rt, payload, step, identity, result, record.get("approval_ids") or [])
        else:
            outcome = step_outcome([*earlier(), result], step.tool)
        if revoked:
            _revoked(rt, payload["run_id"], step.id, result.grant_id or "", step.tool)
        sealed.clear()
        sealed.update(outcome)
        _step_ended(rt, payload["run_id"], {**record, **outcome})

    return StepClosing(reason=STEP_ENDED, end=end)


def _paused(rt: Runtime, payload: StepInput, step: Step, identity: SpiffeId, result: CallResult,
            approval_ids: list[str]) -> dict[str, Any]:
    """The outcome of a step whose call waits for a human: the approval request it made."""
    request = _request_approval(rt, payload, step, identity, result)
    return {"status": "awaiting_approval", "decision": "needs_approval",
            "policy_ids": list(result.decision.policy_ids), "reason": result.audit_reason,
            "approval_id": request.id, "approval_ids": [*approval_ids, request.id]}


def _replan_record(rt: Runtime, payload: StepInput, step: Step, ask: ReplanRequested,
                   calls: list[CallResult]) -> dict[str, Any]:
    """The step's record when its executor asks for a new plan: a checked, structured failure."""
    used = int(payload.get("replans") or 0)
    if used >= rt.workflow.max_replans:
        return {"status": "failed", "decision": None, "policy_ids": [],
                "reason": f"asked for a new plan, but the run has used its {rt.workflow.max_replans} re-plans"}
    tool = rt.workflow.registry.get_tool(step.tool)
    refused = [c for c in calls if not c.ok]
    # What the executor said is checked against fixed lists; anything else is dropped.
    kind, argument, needs_tool = (v if isinstance(v, str) else None for v in (ask.kind, ask.argument, ask.needs_tool))
    failure = StepFailure(
        step_id=step.id, tool=step.tool,
        kind=kind if kind in FAILURE_KINDS else "denied",
        argument=argument if argument in tool.argument_names() else None,
        needs_tool=needs_tool if needs_tool is not None and needs_tool in rt.workflow.registry else None,
        policy_ids=tuple(refused[-1].decision.policy_ids) if refused else (),
    )
    return {"status": "replan", "decision": refused[-1].decision.outcome if refused else None,
            "policy_ids": list(failure.policy_ids), "reason": f"asked for a new plan ({failure.kind})",
            "failure": failure.as_dict()}


def _request_approval(rt: Runtime, payload: StepInput, step: Step, identity: SpiffeId,
                      result: CallResult) -> ApprovalRequest:
    wf = rt.workflow
    digest = action_digest_v2(run_id=payload["run_id"], step_id=step.id, tool=result.tool,
                              arguments=dict(result.arguments), policy_version=rt.policy.version)
    now = rt.clock.now()
    tool = wf.registry.get_tool(result.tool)
    sequence = len(payload["record"].get("approval_ids") or [])
    request = rt.approvals.request(ApprovalRequest(
        id=approval_id(payload["run_id"], step.id, digest, sequence), run_id=payload["run_id"],
        step_id=step.id, workflow=wf.name, initiator=payload["initiator"], requester=str(identity),
        tool=result.tool, arguments=dict(result.arguments), digest=digest,
        secret_arguments=sorted(tool.secrets & set(result.arguments)),
        policy_version=rt.policy.version, risk=tool.risk.value,
        policy_ids=list(result.decision.policy_ids), reasons=list(result.decision.reasons),
        data_labels=sorted(payload["data_labels"]), purpose=step.purpose,
        required_approvals=max(1, result.decision.required_approvals),
        allowed_approvers=sorted(wf.approver_rule.allowed_for(tool.name, tool.risk.value)),
        created_at=now, expires_at=now + wf.approval_ttl,
        digest_version=2, signed_answers=wf.require_signed_answers,
    ))
    if request.created_at == now:  # new, not found again after a crash
        rt.ledger.append("approval_requested", payload["run_id"], approval_id=request.id,
                         step_id=step.id, tool=result.tool, digest=digest,
                         policy_ids=list(result.decision.policy_ids),
                         required_approvals=request.required_approvals, expires_at=request.expires_at,
                         **({"signed_answers": True} if request.signed_answers else {}))
    return request


def _approval(rt: Runtime, payload: StepInput) -> dict[str, Any]:
    record = dict(payload["record"])
    pending_id = record["approval_id"]
    # Nothing with side effects before this line: the node re-runs from the top on resume.
    interrupt({"approval_id": pending_id, "run_id": payload["run_id"], "step_id": payload["step_id"]})
    # The resume value only wakes us; the store is the source of truth for the answer.
    approval = rt.approvals.get(pending_id)
    state = approval.effective_status(rt.clock.now())
    if state == "pending":
        return _landed(payload)  # e.g. one of two approvers so far: ask again
    plan = rt.plan_for(payload["run_id"], payload["plan"])
    step = repeat.concrete_step(plan, payload["step_id"], payload["dependencies"])
    identity = _step_identity(rt, payload["run_id"], step.id)
    with _tool_span(rt, payload, step, identity) as s:
        _wait_span(approval, state, rt.clock.now())
        if approval.decided_at is not None:
            rt.metrics.approval_wait.record(approval.decided_at - approval.created_at,
                                            {"tool": approval.tool, "status": state})
        update, recorded = _answer(rt, payload, plan, step, identity, approval, state, record)
        _close_step_span(s, update["steps"][step.id])
    if not recorded:  # paths without a grant record the outcome here
        _step_ended(rt, payload["run_id"], update["steps"][step.id])
    return {**update, **_landed(payload)}


def _ended(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a ``step_ended`` record says of a step."""
    return (record.get("status"), record.get("decision"), list(record.get("policy_ids") or []),
            record.get("reason") or "", record.get("approval_id"))


def _step_ended(rt: Runtime, run_id: str, record: dict[str, Any]) -> None:
    rt.ledger.append("step_ended", run_id, step_id=record["step_id"], status=record.get("status"),
                     decision=record.get("decision"), policy_ids=list(record.get("policy_ids") or []),
                     reason=record.get("reason") or "", approval_id=record.get("approval_id"))


def _wait_span(approval: ApprovalRequest, state: str, now: float) -> None:
    """The human's part, drawn with its real start and end even if it spanned processes."""
    end = approval.decided_at or now
    s = tr.tracer().start_span(tr.APPROVAL_WAIT, start_time=int(approval.created_at * 1e9), attributes={
        tr.APPROVAL_ID: approval.id, tr.APPROVAL_STATUS: state,
        tr.APPROVER: ", ".join(approval.approvers) or (approval.denial.approver if approval.denial else ""),
        tr.GEN_AI_TOOL_NAME: approval.tool,
    })
    if state in ("denied", "expired"):  # a person's answer (or none): an outcome, not an error
        tr.record_denial(s, ["scopegraph:approval"], f"denied by {approval.denial.approver}: {approval.denial.reason}"
                         if approval.denial else "expired before it was answered")
    s.end(end_time=int(max(end, approval.created_at) * 1e9))


def _answer(rt: Runtime, payload: StepInput, plan: Plan, step: Step, identity: SpiffeId,
            approval: ApprovalRequest, state: str, record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The step's update after a human's answer, and whether its outcome is already audited."""
    pending_id = approval.id
    if state == "expired":
        record.update(status="denied", decision="deny", policy_ids=["scopegraph:approval"],
                      reason=f"approval {pending_id!r} expired before it was answered")
        return {"steps": {step.id: record}}, False
    if state == "denied" and approval.proposed_arguments is None:
        assert approval.denial is not None
        record.update(status="denied", decision="deny", policy_ids=["scopegraph:approval"],
                      reason=f"denied by {approval.denial.approver}: {approval.denial.reason}",
                      denied_by=approval.denial.approver)
        return {"steps": {step.id: record}}, False
    # Approved: run exactly the approved call. Counter-proposal: the new arguments are a
    # new action, decided by policy from scratch (and usually needing their own approval).
    # A proposal names only what it changes; the rest of the call stays as requested.
    arguments = approval.arguments if state in ("approved", "consumed") \
        else {**approval.arguments, **(approval.proposed_arguments or {})}
    # The request holds the normalised call, defaults filled in. Arguments still at their
    # default are left out, as the executor left them out (normalisation fills them in
    # again, so the digest is the same, and they are decided as defaults again).
    fields = rt.workflow.registry.get_tool(approval.tool).args_model.model_fields
    arguments = {k: v for k, v in (arguments or {}).items()
                 if k not in fields or fields[k].is_required() or not _is_default(v, fields[k])}
    _, grant = _mint(rt, payload, step, identity)
    record["grant_id"] = grant.jti
    record["grant_ids"] = [*record.get("grant_ids", []), grant.jti]
    ctx = _call_context(rt, payload, plan, step, identity, frozenset(record.get("labels") or ()))
    # The step's one call is its last: it ends in the write that records the call.
    sealed: dict[str, Any] = {}
    closing = _closing(rt, payload, step, identity, record, list, sealed)
    ended: dict[str, Any] | None = None
    # Approved under policies that have changed since (an upgrade while the run was paused):
    # the approval names the old version and cannot be used; the call is decided afresh,
    # and asked about again if it still needs a human.
    stale = state == "approved" and approval.policy_version != rt.policy.version
    try:
        if state in ("approved", "consumed") and not stale:
            result = rt.gateway.call(grant.danger_token(), approval.tool, arguments or {}, ctx,
                                     call_key=f"approval:{approval.id}", approval_id=approval.id,
                                     closing=closing)
        else:
            result = rt.gateway.call(grant.danger_token(), approval.tool, arguments or {}, ctx,
                                     call_key=f"{'reasked' if stale else 'proposal'}:{approval.id}", closing=closing)
        record["calls"] = [*record.get("calls", []), _call_summary(result)]
        if closing.result is not None:
            record.update(sealed)
        elif result.status == "needs_approval":
            record.update(_paused(rt, payload, step, identity, result, record.get("approval_ids") or []))
        else:
            record.update(step_outcome([result], step.tool))
        ended = record
    finally:
        if closing.result is None:
            _revoke(rt, payload["run_id"], step, grant, ended=ended)
        else:
            _revoked_with_call(rt, payload["run_id"], grant, step)
    return _with_labels({"steps": {step.id: record}}, _labels([result])), True


def _is_default(value: Any, field: Any) -> bool:
    default = field.get_default(call_default_factory=True)
    return type(value) is type(default) and bool(value == default)


def _labels(calls: list[CallResult]) -> list[str]:
    """Labels of what the executor got back: outputs, and error messages (they may quote them)."""
    return sorted(set().union(*(c.labels for c in calls if c.returned))) if calls else []


def _call_summary(c: CallResult) -> dict[str, Any]:
    return {"tool": c.tool, "status": c.status, "decision": c.decision.outcome,
            "policy_ids": list(c.decision.policy_ids), "reason": "" if c.ok else c.audit_reason,
            "attempts": c.attempts}
