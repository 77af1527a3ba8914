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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send, interrupt

from .. import tracing as tr
from ..approvals import ApprovalRequest
from ..constraints import narrows
from ..errors import PlanError, ScopegraphError
from ..gateway import CallResult
from ..identity import SpiffeId
from ..plan import Plan, Step
from ..provenance import Observation
from ..roles import (
    FAILURE_KINDS,
    NeedsApproval,
    PlanningContext,
    ReplanRequested,
    StepContext,
    StepFailure,
    ToolHandle,
)
from ..session import STEP_ENDED, Session, StepEnd, StepScope
from ..tools import ToolRegistry
from . import repeat
from .delegation import delegator_for
from .outcome import step_outcome
from .routing import Routing, forget_before
from .state import RunState, StepInput

if TYPE_CHECKING:
    from .runner import Runtime

__all__ = ["STEP_ENDED", "build_graph", "final_status"]


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
    session = rt.session(run_id, initiator=state["initiator"])
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
        validator=session.validate_plan,
    )
    revision = int(state.get("replans") or 0) + 1 if previous is not None else 0
    with tr.span(f"{tr.INVOKE_AGENT} planner", {
        tr.GEN_AI_OPERATION: "invoke_agent", tr.GEN_AI_AGENT_NAME: "planner",
        tr.GEN_AI_AGENT_ID: state["planner_id"], tr.SPIFFE_ID: state["planner_id"],
        tr.RUN_ID: run_id, tr.WORKFLOW: wf.name, "scopegraph.plan.revision": revision,
    }, context=rt.trace_context(run_id)) as s:
        try:
            proposed = wf.planner.plan(ctx)
            if previous is None:  # a first plan: validated once, as it is fixed
                plan = session.fix_plan(proposed)
            else:  # a revision: validated, and compared with the plan before it, before it is fixed
                plan = ctx.validate(proposed)
                kept = tuple(sorted(sid for sid, rec in steps.items() if rec.get("status") != "replan"))
                _check_revision(previous, plan, kept)
        except PlanError as exc:
            tr.set_error(s, "malformed plan")
            session.refuse_plan(exc, revision=revision)
            # The steps that asked end failed: the run has no plan to give them.
            ended = {sid: {**steps[sid], "status": "failed", "reason": "the re-plan they asked for was refused"}
                     for sid in asking}
            return {"status": "failed", "error": str(exc), **({"steps": ended} if ended else {})}
        widened: list[str] = []  # a first plan is the original: nothing in it is wider than itself
        if previous is not None:
            original = rt.plan_for(run_id + "#original", state.get("original_plan") or state["plan"])
            widened = sorted(st.id for st in plan.steps if not _within(st, original, wf.registry))
            plan = session.fix_plan(plan, revision=revision, failures=[steps[sid]["failure"] for sid in asking],
                                    widened=widened)
        dumped = plan.model_dump(mode="json")
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
    if not plan.repeats():
        routing = rt.routing_for(state["run_id"], plan)
        with routing.lock:
            return _route_by(routing, state, steps)
    forget_before(steps)  # as ``Routing`` does: older values of the records can go
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


def _route_by(routing: Routing, state: RunState, steps: dict[str, Any]) -> list[Send] | str:
    """``_route`` for a plan without repeated steps, from what ``routing`` keeps up to date
    (the same decisions, without reading every record at every step: issue 11)."""
    routing.see(steps)
    if routing.denied and state.get("on_denial", "fail") == "fail":
        return END
    if routing.replan:
        return "plan"
    results = routing.results()
    ready = [s.id for s in routing.ready()]
    if ready:
        batch = _dispatch(ready)
        return [Send("step", _step_input(state, routing.plan.step(sid), results, batch, steps)) for sid in ready]
    waiting = routing.waiting_in(steps)
    if waiting:
        batch = _dispatch(waiting)
        return [Send("approval", _step_input(state, routing.plan.step(sid), results, batch, steps))
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


def _step_input(state: RunState, step: Step, results: Mapping[str, Any], batch: dict[str, Any],
                view: Mapping[str, Any] | None = None) -> StepInput:
    steps = state.get("steps") or {}
    records = steps if view is None else view
    return StepInput(
        run_id=state["run_id"], workflow=state["workflow"], initiator=state["initiator"],
        planner_id=state["planner_id"], step_id=step.id,
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


def _session(rt: Runtime, payload: StepInput, plan: Plan) -> Session:
    """The run's decision session, for one node (cheap: nothing is read or written)."""
    return rt.session(payload["run_id"], initiator=payload["initiator"], plan=plan)


def _begin(session: Session, payload: StepInput, plan: Plan, step: Step, identity: SpiffeId,
           record: dict[str, Any], extra_labels: frozenset[str] = frozenset(),
           resuming: ApprovalRequest | None = None) -> StepScope:
    """Begin ``step`` in ``session`` with what its executor has been shown and carries."""
    return session.begin_step(step, identity=identity, observations=_observations(plan, payload),
                              data_labels=frozenset(payload["data_labels"]) | extra_labels,
                              widened=bool(payload.get("widened")),
                              approvals_asked=len(record.get("approval_ids") or []), resuming=resuming)


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
    plan = rt.current_plan(payload["run_id"])
    step = repeat.concrete_step(plan, payload["step_id"], payload["dependencies"])
    if step.for_each is not None:  # a repeated step with no iteration to run: why is its record
        record = repeat.unrepeated_record(step, payload["dependencies"])
        _session(rt, payload, plan).record_step_end(step.id, _end_of(record))
        return {"steps": {step.id: record}, **_landed(payload)}
    identity = _step_identity(rt, payload["run_id"], step.id)
    with _tool_span(rt, payload, step, identity) as s:
        update = _run_step(rt, payload, plan, step, identity)  # records the outcome as it revokes
        _close_step_span(s, update["steps"][step.id])
    return {**update, **_landed(payload)}


def _run_step(rt: Runtime, payload: StepInput, plan: Plan, step: Step, identity: SpiffeId) -> dict[str, Any]:
    session = _session(rt, payload, plan)
    scope = _begin(session, payload, plan, step, identity, payload["record"])
    record: dict[str, Any] = {"step_id": step.id, "tool": step.tool, "spiffe_id": str(identity),
                              "grant_id": scope.grant_id, "grant_ids": [scope.grant_id]}
    handle = ToolHandle.for_step(session, step.id)
    children: list[dict[str, Any]] = []
    try:
        rt.workflow.executor.execute(StepContext(
            step=step, plan=plan, identity=identity, svid=scope.svid, dependencies=payload["dependencies"],
            tools=handle, data_labels=handle.context.data_labels,
            dependency_labels={d: frozenset(v) for d, v in (payload.get("dependency_labels") or {}).items()},
            tool_schema=rt.workflow.registry.catalogue_entry(step.tool),
            delegator=delegator_for(rt, session, step, identity, handle, children),
        ))
        record.update(step_outcome(handle.calls, step.tool))
    except ReplanRequested as ask:
        record.update(_replan_record(rt, payload, step, ask, handle.calls))
    except NeedsApproval as pause:
        ended = session.ended(step.id)
        record.update(_sealed(ended, record) if ended is not None else _paused(session, step.id, pause.result, []))
    except ScopegraphError as exc:
        record.update(status="failed", decision=None, policy_ids=[], reason=str(exc))
    except Exception as exc:  # an executor bug ends the step, never the run's bookkeeping
        # The type only: the message may quote a tool's error, and with it secret arguments.
        record.update(status="failed", decision=None, policy_ids=[],
                      reason=f"executor raised {type(exc).__name__}")
    finally:
        # A step that ended with its last call has its grant revoked and its outcome
        # recorded already; ``end_step`` records it again only if the executor did more
        # after that call (raised, or called again) and so changed it.
        session.end_step(step.id, _end_of(record) if "status" in record else None, audit="status" in record)
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


def _end_of(record: dict[str, Any]) -> StepEnd:
    """A step's record, as the end of the step its ``step_ended`` audit record says."""
    return StepEnd(status=record.get("status") or "", decision=record.get("decision"),
                   policy_ids=tuple(record.get("policy_ids") or ()), reason=record.get("reason") or "",
                   approval_id=record.get("approval_id"), result=record.get("result"))


def _sealed(ended: StepEnd, record: dict[str, Any]) -> dict[str, Any]:
    """The record of a step that ended with its last call, as the session recorded that end."""
    if ended.status == "awaiting_approval":
        return {"status": ended.status, "decision": ended.decision, "policy_ids": list(ended.policy_ids),
                "reason": ended.reason, "approval_id": ended.approval_id,
                "approval_ids": [*(record.get("approval_ids") or []), ended.approval_id]}
    return {"status": ended.status, "decision": ended.decision, "policy_ids": list(ended.policy_ids),
            "reason": ended.reason, "result": ended.result}


def _paused(session: Session, step_id: str, result: CallResult, approval_ids: list[str]) -> dict[str, Any]:
    """The outcome of a step whose call waits for a human: the approval request the
    session made for it as it recorded the decision."""
    request_id = session.pending_approval(step_id)
    return {"status": "awaiting_approval", "decision": "needs_approval",
            "policy_ids": list(result.decision.policy_ids), "reason": result.audit_reason,
            "approval_id": request_id, "approval_ids": [*approval_ids, request_id]}


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


def _approval(rt: Runtime, payload: StepInput) -> dict[str, Any]:
    record = dict(payload["record"])
    pending_id = record["approval_id"]
    # Nothing with side effects before this line: the node re-runs from the top on resume.
    interrupt({"approval_id": pending_id, "run_id": payload["run_id"], "step_id": payload["step_id"]})
    # The resume value only wakes us; the store is the source of truth for the answer (as
    # ``resume`` read it under the run's lease: what authorizes the call reads it afresh).
    approval = rt.answered_request(payload["run_id"], pending_id)
    state = approval.effective_status(rt.clock.now())
    if state == "pending":
        return _landed(payload)  # e.g. one of two approvers so far: ask again
    plan = rt.current_plan(payload["run_id"])
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
        _session(rt, payload, plan).record_step_end(step.id, _end_of(update["steps"][step.id]))
    return {**update, **_landed(payload)}


def _ended(record: dict[str, Any]) -> tuple[Any, ...]:
    """What a ``step_ended`` record says of a step."""
    return (record.get("status"), record.get("decision"), list(record.get("policy_ids") or []),
            record.get("reason") or "", record.get("approval_id"))


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
    session = _session(rt, payload, plan)
    if state == "expired" or (state == "denied" and approval.proposed_arguments is None):
        refused = session.resume(approval.id, request=approval)  # nothing checked or written: the answer ends it
        record.update(status="denied", decision="deny", policy_ids=list(refused.policy_ids), reason=refused.reason)
        if state == "denied" and approval.denial is not None:
            record["denied_by"] = approval.denial.approver
        return {"steps": {step.id: record}}, False
    # Approved: run exactly the approved call. Counter-proposal: the new arguments are a
    # new action, decided by policy from scratch (see ``Session.resume``). Either way under
    # a fresh grant, as the step's one and last call: it ends in the write that records it.
    scope = _begin(session, payload, plan, step, identity, record, frozenset(record.get("labels") or ()),
                   resuming=approval)
    record["grant_id"] = scope.grant_id
    record["grant_ids"] = [*record.get("grant_ids", []), scope.grant_id]
    ended: dict[str, Any] | None = None
    try:
        result = session.resume_call(approval.id, last=True, request=approval)
        record["calls"] = [*record.get("calls", []), _call_summary(result)]
        sealed = session.ended(step.id)
        if sealed is not None:
            record.update(_sealed(sealed, record))
        elif result.status == "needs_approval":
            record.update(_paused(session, step.id, result, record.get("approval_ids") or []))
        else:
            record.update(step_outcome([result], step.tool))
        ended = record
    finally:
        session.end_step(step.id, _end_of(ended) if ended is not None else None, audit=ended is not None)
    return _with_labels({"steps": {step.id: record}}, _labels([result])), True


def _labels(calls: list[CallResult]) -> list[str]:
    """Labels of what the executor got back: outputs, and error messages (they may quote them)."""
    return sorted(set().union(*(c.labels for c in calls if c.returned))) if calls else []


def _call_summary(c: CallResult) -> dict[str, Any]:
    return {"tool": c.tool, "status": c.status, "decision": c.decision.outcome,
            "policy_ids": list(c.decision.policy_ids), "reason": "" if c.ok else c.audit_reason,
            "attempts": c.attempts}
