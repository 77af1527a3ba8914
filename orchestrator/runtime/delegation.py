"""Delegation: a step handed to a sub-workflow with its own planner and executor.

The child planner sees the sub-task and one tool: the parent step's. Each child step
gets its own identity (``…/step/<parent>/sub/<child>/executor``) and its own grant, and
that grant is minted *against the parent's grant*: the issuer refuses a child scope
that is wider (another tool, a looser constraint, an argument the parent may not pass,
a longer life). A child that asks for more is denied before its executor runs; a call
beyond its grant is denied by the gateway as any other. The ``act`` chain nests:
initiator → planner → executor → sub-planner → sub-executor.

Children run inline, one after another in dependency order, inside the parent step.
A child call that needs a human approval pauses the parent step on that exact call
(``NeedsApproval`` propagates); the children after it do not run. One level deep: a
child executor cannot delegate again.
"""

from __future__ import annotations

import graphlib
from typing import TYPE_CHECKING, Any

from .. import tracing as tr
from ..canonical import canonical_json, sha256_hex
from ..errors import GrantError, PlanError, ScopegraphError
from ..gateway import SCOPE_POLICY_ID
from ..identity import SpiffeId
from ..plan import Plan, Step, parse_plan, validate_plan
from ..provenance import Observation
from ..redaction import recorded_constraints
from ..roles import (
    DelegationResult,
    Delegator,
    Executor,
    NeedsApproval,
    Planner,
    PlanningContext,
    StepContext,
    ToolHandle,
)
from ..session import Session, StepEnd
from .outcome import step_outcome
from .repeat import identity_segments

if TYPE_CHECKING:
    from .runner import Runtime

CHILD_SEPARATOR = "."  # plan step ids never contain it, so "parent.child" cannot collide


def delegator_for(rt: Runtime, session: Session, step: Step, identity: SpiffeId, handle: ToolHandle,
                  children: list[dict[str, Any]]) -> Delegator:
    """The ``StepContext.delegate`` of one step: child records land in ``children`` and
    child calls in the parent's ``handle`` (they are calls made under its authority)."""

    def delegate(task: str, planner: Planner, executor: Executor) -> DelegationResult:
        return _Delegation(rt, session, step, identity, handle, children).run(task, planner, executor)

    return delegate


class _Delegation:
    def __init__(self, rt: Runtime, session: Session, step: Step, identity: SpiffeId, handle: ToolHandle,
                 children: list[dict[str, Any]]) -> None:
        self.rt, self.session, self.step, self.identity = rt, session, step, identity
        self.handle, self.children = handle, children
        self.run_id = session.run_id
        self.planner_id = rt.domain.id("wf", rt.workflow.name, "run", self.run_id, *identity_segments(step.id),
                                       "sub", "planner")

    def run(self, task: str, planner: Planner, executor: Executor) -> DelegationResult:
        plan = self._plan(task, planner)
        results: dict[str, Any] = {}
        records: list[dict[str, Any]] = []
        order = graphlib.TopologicalSorter({s.id: set(s.depends_on) for s in plan.steps}).static_order()
        for child_id in order:
            child = plan.step(child_id)
            if not set(child.depends_on) <= set(results):
                record = self._record(child, None, "skipped", reason="a step it depends on did not complete")
            else:
                record = self._run_child(plan, child, {d: results[d] for d in child.depends_on}, executor)
                if record["status"] == "completed":
                    results[child.id] = record.pop("result", None)
            records.append(record)
        return DelegationResult(steps=tuple(records), results=results)

    def _plan(self, task: str, planner: Planner) -> Plan:
        wf = self.rt.workflow
        ctx = PlanningContext(
            task=task, workflow=wf.name, run_id=self.run_id, identity=self.planner_id,
            catalogue=[wf.registry.catalogue_entry(self.step.tool)],
            validator=lambda data: validate_plan(parse_plan(data), wf.registry),
        )
        with tr.span(f"{tr.INVOKE_AGENT} sub-planner", {
            tr.GEN_AI_OPERATION: "invoke_agent", tr.GEN_AI_AGENT_NAME: "sub-planner",
            tr.GEN_AI_AGENT_ID: str(self.planner_id), tr.SPIFFE_ID: str(self.planner_id),
            tr.RUN_ID: self.run_id, tr.STEP_ID: self.step.id,
        }) as s:
            try:
                plan = ctx.validate(planner.plan(ctx))
            except PlanError as exc:
                tr.set_error(s, "malformed plan")
                self.rt.ledger.append("delegation_plan", self.run_id, step_id=self.step.id,
                                      planner=str(self.planner_id), valid=False, error=str(exc))
                raise
            dumped = plan.model_dump(mode="json")
            self.rt.ledger.append("delegation_plan", self.run_id, step_id=self.step.id,
                                  planner=str(self.planner_id), valid=True,
                                  plan_digest=sha256_hex(canonical_json(dumped)),
                                  steps=[{"id": st.id, "tool": st.tool,
                                          "constraints": recorded_constraints(
                                              st.constraints, wf.registry[st.tool].secrets)}
                                         for st in plan.steps])
        return plan

    def _run_child(self, plan: Plan, child: Step, dependencies: dict[str, Any], executor: Executor) -> dict[str, Any]:
        rt, session = self.rt, self.session
        path = f"{self.step.id}{CHILD_SEPARATOR}{child.id}"
        identity = rt.domain.id("wf", rt.workflow.name, "run", self.run_id, *identity_segments(self.step.id), "sub",
                                child.id, "executor")
        labels = rt.workflow.registry.get_tool(child.tool).labels
        seen = tuple(Observation(step_id=f"{self.step.id}{CHILD_SEPARATOR}{d}", tool=child.tool, labels=labels,
                                 value=v) for d, v in dependencies.items())
        try:
            scope = session.delegate_step(self.step.id, child, step_id=path, identity=identity,
                                          planner_id=self.planner_id, observations=seen)
        except GrantError as exc:  # the child asked for more than its parent holds
            session.record_step_end(path, StepEnd(status="denied", decision="deny", policy_ids=(SCOPE_POLICY_ID,),
                                                  reason=str(exc)))
            return self._record(child, identity, "denied", decision="deny", policy_ids=[SCOPE_POLICY_ID],
                                reason=str(exc))
        # A child cannot end its step with a call: its end is recorded as its parent's record is made.
        handle = ToolHandle.for_step(session, path, ends_step=False)
        record = self._record(child, identity, "failed", grant_id=scope.grant_id)
        try:
            executor.execute(StepContext(
                step=child, plan=plan, identity=identity, svid=scope.svid,
                dependencies=dependencies, tools=handle, data_labels=handle.context.data_labels,
                tool_schema=rt.workflow.registry.catalogue_entry(child.tool),
            ))
            record.update(step_outcome(handle.calls, child.tool))
        except NeedsApproval:
            record.update(status="awaiting_approval", decision="needs_approval")
            raise  # the parent step pauses on exactly this call
        except ScopegraphError as exc:
            record.update(status="failed", reason=str(exc))
        except Exception as exc:  # an executor bug ends the child, never the bookkeeping
            record.update(status="failed", reason=f"executor raised {type(exc).__name__}")
        finally:
            self.handle.absorb(handle.calls)
            session.end_step(path, StepEnd(status=record["status"], decision=record.get("decision"),
                                           policy_ids=tuple(record.get("policy_ids") or ()),
                                           reason=record.get("reason") or ""))
            self.children.append({k: v for k, v in record.items() if k != "result"})
        return record

    def _record(self, child: Step, identity: SpiffeId | None, status: str, **fields: Any) -> dict[str, Any]:
        return {"step_id": f"{self.step.id}{CHILD_SEPARATOR}{child.id}", "tool": child.tool,
                "spiffe_id": str(identity) if identity else None, "grant_id": None, "status": status,
                "decision": None, "policy_ids": [], "reason": "", **fields}

