"""The run as a LangGraph graph.

::

    START → plan → schedule ─┬─▶ step (one Send per ready step, run concurrently) ─▶ schedule
                             └─▶ finish → END

``plan`` asks the planner (which holds no grant) and validates the plan. ``step`` mints
the step's identity and grant, runs the executor through a ``ToolHandle``, and revokes
the grant however the step ends. ``finish`` revokes every grant of the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from ..errors import PlanError, ScopegraphError
from ..gateway import CallContext
from ..identity import SpiffeId
from ..plan import Plan, parse_plan, validate_plan
from ..roles import NeedsApproval, PlanningContext, StepContext, ToolHandle
from .state import RunState, StepInput

if TYPE_CHECKING:
    from .runner import Runtime

TERMINAL = frozenset({"completed", "denied", "failed", "awaiting_approval"})


def build_graph(rt: Runtime) -> StateGraph:
    graph = StateGraph(RunState)
    graph.add_node("plan", lambda state: _plan(rt, state))
    graph.add_node("schedule", lambda state: {})
    graph.add_node("step", lambda payload: _step(rt, payload))
    graph.add_node("finish", lambda state: _finish(rt, state))
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", _after_plan, ["schedule", "finish"])
    graph.add_conditional_edges("schedule", _route, ["step", "finish"])
    graph.add_edge("step", "schedule")
    graph.add_edge("finish", END)
    return graph


def _plan(rt: Runtime, state: RunState) -> dict[str, Any]:
    wf = rt.workflow
    ctx = PlanningContext(
        task=state["task"], workflow=wf.name, run_id=state["run_id"],
        identity=SpiffeId.parse(state["planner_id"]),
        catalogue=wf.registry.catalogue(),
    )
    try:
        plan = validate_plan(parse_plan(wf.planner.plan(ctx)), wf.registry)
    except PlanError as exc:
        return {"status": "failed", "error": str(exc)}
    return {"plan": plan.model_dump(mode="json"), "steps": {}}


def _after_plan(state: RunState) -> str:
    return "finish" if state.get("status") == "failed" else "schedule"


def _route(state: RunState) -> list[Send] | str:
    plan = Plan.model_validate(state["plan"])
    steps = state.get("steps") or {}
    done = {sid for sid, s in steps.items() if s["status"] == "completed"}
    ready = plan.ready_steps(done, started=steps.keys())
    if not ready:
        return "finish"
    results = {sid: s.get("result") for sid, s in steps.items() if s["status"] == "completed"}
    return [
        Send("step", StepInput(
            run_id=state["run_id"], workflow=state["workflow"], initiator=state["initiator"],
            planner_id=state["planner_id"], plan=state["plan"], step_id=step.id,
            dependencies={d: results[d] for d in step.depends_on},
            data_labels=state.get("data_labels") or [],
        ))
        for step in ready
    ]


def _step(rt: Runtime, payload: StepInput) -> dict[str, Any]:
    wf = rt.workflow
    plan = Plan.model_validate(payload["plan"])
    step = plan.step(payload["step_id"])
    run_id = payload["run_id"]
    identity = rt.domain.id("wf", wf.name, "run", run_id, "step", step.id, "executor")
    rt.domain.issue_svid(identity)  # the step's proof of identity, short-lived like its grant
    grant = rt.issuer.mint(
        subject=identity, tool=step.tool, run_id=run_id, step_id=step.id, workflow=wf.name,
        constraints=step.constraints,
        act={"sub": payload["planner_id"], "act": {"sub": f"user:{payload['initiator']}"}},
    )
    labels = frozenset(payload["data_labels"])
    handle = ToolHandle(rt.gateway, grant.danger_token(), CallContext(
        workflow=wf.name, run_id=run_id, step_id=step.id, principal=identity, data_labels=labels,
    ))
    record: dict[str, Any] = {
        "step_id": step.id, "tool": step.tool, "spiffe_id": str(identity), "grant_id": grant.jti,
    }
    try:
        wf.executor.execute(StepContext(
            step=step, plan=plan, identity=identity, dependencies=payload["dependencies"],
            tools=handle, data_labels=labels,
        ))
        record.update(_outcome(handle, step.tool))
    except NeedsApproval as pause:
        record.update(status="awaiting_approval", decision="needs_approval",
                      policy_ids=list(pause.result.decision.policy_ids), reason=pause.result.reason)
    except ScopegraphError as exc:
        record.update(status="failed", decision=None, policy_ids=[], reason=str(exc))
    except Exception as exc:  # an executor bug ends the step, never the run's bookkeeping
        record.update(status="failed", decision=None, policy_ids=[],
                      reason=f"executor raised {type(exc).__name__}: {exc}")
    finally:
        rt.issuer.revoke(grant.jti, reason="step ended")
    record["revoked"] = True
    record["calls"] = [_call_summary(c) for c in handle.calls]
    new_labels = sorted(set().union(*(c.labels for c in handle.calls if c.ok)) if handle.calls else set())
    return {"steps": {step.id: record}, "data_labels": new_labels}


def _outcome(handle: ToolHandle, planned_tool: str) -> dict[str, Any]:
    """A step completes when its last call was an allowed, successful call of its tool."""
    if not handle.calls:
        return {"status": "failed", "decision": None, "policy_ids": [], "reason": "executor made no call"}
    last = handle.calls[-1]
    status = "completed" if last.ok and last.tool == planned_tool else (
        "denied" if last.status == "denied" else "failed")
    return {"status": status, "decision": last.decision.outcome,
            "policy_ids": list(last.decision.policy_ids), "reason": last.reason if not last.ok else "",
            "result": last.value if last.ok else None}


def _call_summary(c: Any) -> dict[str, Any]:
    return {"tool": c.tool, "status": c.status, "decision": c.decision.outcome,
            "policy_ids": list(c.decision.policy_ids), "reason": "" if c.ok else c.reason,
            "attempts": c.attempts}


def _finish(rt: Runtime, state: RunState) -> dict[str, Any]:
    rt.issuer.revoke_run(state["run_id"], reason="run ended")
    if state.get("status") == "failed":
        return {"status": "failed"}
    statuses = [s["status"] for s in (state.get("steps") or {}).values()]
    plan_size = len(state["plan"]["steps"]) if state.get("plan") else 0
    if "failed" in statuses:
        status = "failed"
    elif "denied" in statuses:
        status = "denied"
    elif "awaiting_approval" in statuses:
        status = "paused"
    elif statuses.count("completed") == plan_size:
        status = "completed"
    else:
        status = "failed"
    return {"status": status}
