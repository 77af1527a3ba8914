"""Scoped tool calls for LangGraph hosts: the one path the ``create_agent`` middleware
and the scoped ``ToolNode`` share.

A run is opened per agent invocation: the planner fixes the plan from the trusted input
alone (the human message that started the invocation), and the run's id and plan are
kept in the graph's state under ``scopegraph`` (checkpointed by the user's checkpointer,
under the user's ``thread_id``). Every tool call the model proposes is then:

- mapped to the plan step for its tool (the first one not completed yet); a tool the
  plan has no step for is denied (``scopegraph:plan``);
- begun as that step under a grant of its own, with everything the model has seen in
  this run (the tool output in the conversation) as its context, and decided through
  the session: scope, Cedar, argument provenance;
- allowed: run by the gateway (so it is recorded) and answered with its ``ToolMessage``;
  denied: answered with a ``ToolMessage`` (``status="error"``) giving the reason, never
  the tool's output; held for approval: a LangGraph ``interrupt`` whose value follows
  LangChain's human-in-the-loop request format (``HITLRequest``), resumed with
  ``Command(resume=...)`` carrying HITL decisions;
- ended: the step's grant is revoked after the call, whatever its outcome, so no grant
  outlives the call it was minted for.

An answer applies only to the call it was asked about: ``approve`` resumes exactly the
held call (the session recomputes its digest and consumes the approval once), an answer
naming another approval id or digest is refused and the call asked about again, an
``edit`` is a new call decided from scratch, a ``reject`` returns the reason.

Who answers: a decision naming an ``approver`` is recorded through the session as
``scopegraph approve``/``deny`` records one (an allowed approver, never the initiator, a
signature where the workflow requires one): the host vouches for the approver's name,
as it does for the initiator's. A decision naming nobody resumes with what scopegraph's
own approval channels (CLI, web inbox) recorded; while the request is still pending the
call is asked about again.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.types import interrupt

from scopegraph import CallDecision, CallResult, Guard, Outcome, Session, StepEnd
from scopegraph import tracing as tr
from scopegraph.approvals import ApprovalRequest
from scopegraph.canonical import action_digest_v2, canonical_json, sha256_hex
from scopegraph.errors import ApprovalError, ScopegraphError, SessionError, ToolError, TransientToolError
from scopegraph.plan import Step, parse_plan
from scopegraph.policy import Decision
from scopegraph.provenance import Observation
from scopegraph.roles import Planner

STATE_KEY = "scopegraph"  # the graph-state key holding the run's id and plan
ARTIFACT_KEY = "scopegraph"  # a scoped ToolMessage's artifact: what the model was shown, and its labels
DECISIONS = ["approve", "edit", "reject"]  # "respond" would answer for a tool nobody authorized

Initiator = str | Callable[[RunnableConfig], str]


@dataclass
class _Run:
    """An open run in this process: its session, and its locks (the session is driven by
    one caller at a time; a model's parallel tool calls take turns: threads on ``lock``,
    tasks of an event loop on that loop's ``alock``)."""

    session: Session
    done: set[str] = field(default_factory=set)  # steps completed (their tool ran, successfully)
    lock: threading.RLock = field(default_factory=threading.RLock)
    _alocks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = field(
        default_factory=weakref.WeakKeyDictionary)

    def alock(self) -> asyncio.Lock:
        """The lock of the running loop's tasks (an ``asyncio.Lock`` serves one loop only)."""
        with self.lock:
            return self._alocks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


@dataclass(frozen=True)
class _Ready:
    """A decided call, left to run (if allowed) and answer."""

    step: Step | None
    decision: CallDecision
    tool_call: ToolCall


class ScopedCalls:
    """Opens runs, decides and runs tool calls, and ends runs, for one ``Guard``.

    ``planner`` fixes each run's plan from the invocation's human message; ``initiator``
    is who starts runs (a name the host vouches for, or a function of the run's
    ``RunnableConfig`` returning one).
    """

    def __init__(self, guard: Guard, *, planner: Planner, initiator: Initiator) -> None:
        self.guard = guard
        self.planner = planner
        self.initiator = initiator
        self._runs: dict[str, _Run] = {}
        self._runs_lock = threading.Lock()

    # tools the model sees -----------------------------------------------------------------
    def langchain_tools(self) -> list[BaseTool]:
        """The workflow's tools as LangChain tools for the model to call: each call reaches
        its tool only through the gateway (the tools' own bodies refuse to run)."""
        registry = self.guard.workflow.registry
        return [_model_facing(registry[name].name, registry[name].description, registry[name].args_model)
                for name in registry]

    # runs ---------------------------------------------------------------------------------
    def open_run(self, messages: Sequence[BaseMessage], config: RunnableConfig | None) -> dict[str, Any]:
        """Start a run for the invocation whose trusted input is the last human message
        of ``messages``, fix its plan, and return the state value to keep under
        ``STATE_KEY``.

        Raises:
            SessionError: there is no human message to plan from.
            PlanError: the planner's plan is refused (audited).
        """
        task = _task(messages)
        initiator = self.initiator(config or {}) if callable(self.initiator) else self.initiator
        session = self.guard.start_run(task, initiator=initiator, planner=self.planner, run_id=uuid.uuid4().hex)
        with self._runs_lock:
            self._runs[session.run_id] = _Run(session=session)
        return {"run_id": session.run_id, "plan": session.plan.model_dump(mode="json"), "ended": False}

    def end_run(self, state: Mapping[str, Any], *, status: str = "completed") -> dict[str, Any] | None:
        """End the state's run (every grant it still holds revoked, its end audited and the
        ledger's head signed); returns the new state value, or None if no run is open."""
        scope = state.get(STATE_KEY)
        if not scope or scope.get("ended"):
            return None
        run = self._run(scope)
        with run.lock:
            run.session.end_run(status=status)
        with self._runs_lock:
            self._runs.pop(scope["run_id"], None)
        return {**scope, "ended": True}

    # calls --------------------------------------------------------------------------------
    def call(self, tool_call: ToolCall, state: Mapping[str, Any]) -> ToolMessage:
        """Decide one tool call of the model and answer it: the tool's result, a denial,
        or (after an ``interrupt`` for approval) whatever the answer led to.

        Raises:
            SessionError: the state has no open run (no plan was fixed for it), or its
                plan is not the one the run's ledger recorded.
        """
        run = self._open(state)
        with run.lock, tr.model_tool_call(tool_call.get("id")):
            ready = self._decide(run, tool_call, state)
            return ready if isinstance(ready, ToolMessage) else self._finish(run, ready)

    async def acall(self, tool_call: ToolCall, state: Mapping[str, Any]) -> ToolMessage:
        """``call`` for a graph run on an event loop: an async tool is awaited on that loop
        (no thread, no loop of its own), and the model's parallel calls take turns
        without blocking it.

        Raises:
            SessionError: as for ``call``.
        """
        run = self._open(state)
        async with run.alock():
            with run.lock, tr.model_tool_call(tool_call.get("id")):
                ready = self._decide(run, tool_call, state)
                return ready if isinstance(ready, ToolMessage) else await self._afinish(run, ready)

    def _open(self, state: Mapping[str, Any]) -> _Run:
        scope = state.get(STATE_KEY)
        if not scope or scope.get("ended"):
            raise SessionError("no scopegraph run is open for this graph state: plan the run first "
                               "(the middleware's before_agent, or ScopedToolNode.plan as the graph's first node)")
        return self._run(scope)

    def _decide(self, run: _Run, tool_call: ToolCall, state: Mapping[str, Any]) -> ToolMessage | _Ready:
        """Decide the call (asking a human, through interrupts, if it needs one) up to
        what is left to do: run an allowed call, or answer with a message."""
        seen = _observations(state)
        name, args = tool_call["name"], dict(tool_call.get("args") or {})
        step = self._step_for(run, name)
        held = self._held(run, step, name, args, tool_call) if step is not None else None
        if held is None:
            decision = self._check(run, step, name, args, tool_call, seen)
            if decision.outcome is not Outcome.NEEDS_APPROVAL:
                return _Ready(step=step, decision=decision, tool_call=tool_call)
            assert decision.approval_id is not None and step is not None
            held = run.session.approval(decision.approval_id)
            run.session.end_step(step.id, _awaiting(decision))
        assert step is not None
        return self._ask(run, step, held, tool_call, state, seen)

    def _check(self, run: _Run, step: Step | None, name: str, args: dict[str, Any], tool_call: ToolCall,
               seen: tuple[Observation, ...]) -> CallDecision:
        if step is None:  # no step of the plan uses this tool: denied, audited, no grant involved
            return run.session.check(name, name, args)
        self._begin(run, step, seen)
        return run.session.check(step.id, name, args, call_id=tool_call.get("id"))

    def _ask(self, run: _Run, step: Step, held: ApprovalRequest, tool_call: ToolCall,
             state: Mapping[str, Any], seen: tuple[Observation, ...]) -> ToolMessage | _Ready:
        """Interrupt for a human's answer on ``held`` until one applies to it."""
        problem: str | None = None
        while True:
            answer = interrupt(hitl_request(held, problem))
            decision, problem = read_answer(answer, held)
            if decision is None:
                continue
            kind = decision["type"]
            if kind == "edit":
                edited = decision["edited_action"]
                new_call = ToolCall(name=edited["name"], args=dict(edited.get("args") or {}), id=tool_call["id"],
                                    type="tool_call")
                return self._decide(run, new_call, state)  # a new call, decided from scratch
            if kind == "reject":
                problem = self._answer_no(run, held, decision)
                if problem is None:
                    return _rejected(tool_call, decision)
                continue
            problem = self._answer_yes(run, held, decision)
            if problem is not None:
                continue
            now = self.guard.clock.now()
            current = run.session.approval(held.id)
            if current.effective_status(now) == "pending":
                problem = (f"approval {held.id!r} still needs "
                           f"{current.required_approvals - len(current.approvals)} more approval(s)")
                continue
            self._begin(run, step, seen)
            resumed = run.session.resume(held.id)
            if resumed.outcome is not Outcome.NEEDS_APPROVAL:
                return _Ready(step=step, decision=resumed, tool_call=tool_call)
            # Approved under policies changed since: asked about again, as a new request.
            assert resumed.approval_id is not None
            run.session.end_step(step.id, _awaiting(resumed))
            held, problem = run.session.approval(resumed.approval_id), None

    def _answer_yes(self, run: _Run, held: ApprovalRequest, decision: Mapping[str, Any]) -> str | None:
        approver = decision.get("approver")
        if not approver:
            return None  # answered (or not yet) through scopegraph's own channels
        current = run.session.approval(held.id)
        if any(v.approver == approver for v in current.approvals):
            return None  # recorded already (this node re-ran after a later interrupt)
        try:
            run.session.approve(held.id, approver=str(approver), reason=str(decision.get("reason") or ""),
                                signature=decision.get("signature"))
        except ApprovalError as exc:
            return str(exc)
        return None

    def _answer_no(self, run: _Run, held: ApprovalRequest, decision: Mapping[str, Any]) -> str | None:
        approver = decision.get("approver")
        current = run.session.approval(held.id)
        if not approver or current.denial is not None:
            return None
        try:
            run.session.deny(held.id, approver=str(approver), reason=str(decision.get("message") or "rejected"),
                             signature=decision.get("signature"))
        except ApprovalError as exc:
            return str(exc)
        return None

    def _finish(self, run: _Run, ready: _Ready) -> ToolMessage:
        """Run an allowed call through the gateway, end the step (its grant revoked), and
        answer the model."""
        try:
            result = run.session.execute(ready.decision)  # a decision that ended at its check runs nothing
        except TransientToolError as exc:  # recorded as failed; the model may try again, decided anew
            result = _transient(ready.decision, exc)
        finally:
            self._end(run, ready)
        return self._answer(run, ready, result)

    async def _afinish(self, run: _Run, ready: _Ready) -> ToolMessage:
        """``_finish``, awaiting an async tool on the caller's loop."""
        try:
            result = await run.session.aexecute(ready.decision)
        except TransientToolError as exc:
            result = _transient(ready.decision, exc)
        finally:
            self._end(run, ready)
        return self._answer(run, ready, result)

    def _end(self, run: _Run, ready: _Ready) -> None:
        if ready.step is not None:
            run.session.end_step(ready.step.id)  # the grant ends with its one call, whatever came of it

    def _answer(self, run: _Run, ready: _Ready, result: CallResult) -> ToolMessage:
        step_id = ready.step.id if ready.step is not None else None
        if step_id is not None and result.ok:
            run.done.add(step_id)
        return tool_message(result, ready.tool_call, step_id)

    # internals ----------------------------------------------------------------------------
    def _run(self, scope: Mapping[str, Any]) -> _Run:
        """The open run named in the state: this process's, or rebuilt from the state and
        the ledger (another process opened it, or this one restarted)."""
        run_id = str(scope["run_id"])
        with self._runs_lock:
            run = self._runs.get(run_id)
            if run is None:
                run = self._runs[run_id] = self._rebuilt(run_id, scope["plan"])
            return run

    def _rebuilt(self, run_id: str, plan_data: Mapping[str, Any]) -> _Run:
        plan = parse_plan(dict(plan_data))
        records = self.guard.ledger.records(run_id)
        fixed = [r for r in records if r["kind"] == "plan" and r.get("valid")]
        # The checkpoint is the host's storage: a plan in it counts only if it is the one
        # the run's (signed, hash-chained) ledger says the planner fixed.
        digest = sha256_hex(canonical_json(plan.model_dump(mode="json")))
        if not fixed or fixed[-1].get("plan_digest") != digest:
            raise SessionError(f"the plan in the graph state is not the plan run {run_id!r} fixed")
        session = self.guard.session(run_id, plan=plan)
        done = {r["step_id"] for r in records if r["kind"] == "step_ended" and r.get("status") == "completed"}
        return _Run(session=session, done=done)

    def _step_for(self, run: _Run, tool: str) -> Step | None:
        """The plan step a call of ``tool`` belongs to: the first of its steps not completed
        yet, else its last (a repeated call, decided again within that step's scope)."""
        steps = [s for s in run.session.plan.steps if s.tool == tool]
        if not steps:
            return None
        return next((s for s in steps if s.id not in run.done), steps[-1])

    def _begin(self, run: _Run, step: Step, seen: tuple[Observation, ...]) -> None:
        """Begin ``step`` under a new grant for one call, decided knowing all the model has
        seen so far (labels and values: what argument provenance is traced against)."""
        asked = len([r for r in self.guard.approvals.list(run_id=run.session.run_id) if r.step_id == step.id])
        labels = frozenset().union(*(o.labels for o in seen))
        run.session.begin_step(step, observations=seen, data_labels=labels, approvals_asked=asked)

    def _held(self, run: _Run, step: Step, tool: str, args: Mapping[str, Any],
              tool_call: ToolCall) -> ApprovalRequest | None:
        """The open approval request for exactly this call (this tool call of the model,
        with these arguments), if one was made: the node re-runs from its start when
        resumed, and must not decide the call twice, nor take another call's request
        for its own."""
        try:
            normalized = self.guard.workflow.registry.get_tool(tool).validate_arguments(args)
        except ScopegraphError:
            return None
        digest = action_digest_v2(run_id=run.session.run_id, step_id=step.id, tool=tool, arguments=normalized,
                                  policy_version=self.guard.policy.version)
        now = self.guard.clock.now()
        call_id = tool_call.get("id")
        made = run.session.approvals_for(call_id) if call_id else [
            r for r in self.guard.approvals.list(run_id=run.session.run_id) if r.call_id is None]
        open_ = [r for r in made
                 if r.step_id == step.id and r.digest == digest and r.effective_status(now) in ("pending", "approved")]
        return open_[-1] if open_ else None  # the last made: one asked again replaces the one before


# the human-in-the-loop exchange ----------------------------------------------------------
def hitl_request(request: ApprovalRequest, problem: str | None = None) -> dict[str, Any]:
    """The interrupt's value: LangChain's ``HITLRequest`` (one action request, its review
    config), and under ``scopegraph`` what binds an answer to this exact call. Secret
    argument values are masked."""
    shown = request.shown_arguments()
    description = (f"scopegraph: {request.tool} needs approval: {'; '.join(request.reasons)} "
                   f"(policies: {', '.join(request.policy_ids)}). Approval {request.id}: answer here, or with "
                   f"`scopegraph approve {request.id}`.")
    if problem:
        description += f" The last answer was not applied: {problem}."
    return {
        "action_requests": [{"name": request.tool, "args": shown, "description": description}],
        "review_configs": [{"action_name": request.tool, "allowed_decisions": list(DECISIONS)}],
        STATE_KEY: {"approval_id": request.id, "digest": request.digest, "run_id": request.run_id,
                    "step_id": request.step_id, "policy_ids": list(request.policy_ids),
                    "reasons": list(request.reasons), "required_approvals": request.required_approvals,
                    "allowed_approvers": list(request.allowed_approvers), "expires_at": request.expires_at,
                    **({"problem": problem} if problem else {})},
    }


def read_answer(answer: Any, held: ApprovalRequest) -> tuple[dict[str, Any] | None, str | None]:
    """One HITL decision for ``held`` from a resume value (a ``HITLResponse`` with one
    decision, or the decision itself), or why it does not apply to this call."""
    decision = answer
    if isinstance(answer, Mapping) and "decisions" in answer:
        decisions = answer["decisions"]
        if not isinstance(decisions, list) or len(decisions) != 1:
            return None, "the answer must hold exactly one decision, for this call"
        decision = decisions[0]
    if not isinstance(decision, Mapping) or decision.get("type") not in DECISIONS:
        return None, f"the answer is not one of the decisions {DECISIONS}"
    named = decision.get("approval_id")
    if named is not None and named != held.id:
        return None, f"the answer is for approval {named!r}, not this call's {held.id!r}"
    digest = decision.get("digest")
    if digest is not None and digest != held.digest:
        return None, "the answer is for another action digest than this call's"
    if decision["type"] == "edit":
        edited = decision.get("edited_action")
        if not isinstance(edited, Mapping) or not isinstance(edited.get("name"), str) \
                or not isinstance(edited.get("args", {}), Mapping):
            return None, "an edit must give edited_action with a name and args"
    return dict(decision), None


# messages --------------------------------------------------------------------------------
def tool_message(result: CallResult, tool_call: ToolCall, step_id: str | None) -> ToolMessage:
    """The model's answer for one call: the tool's value, or why there is none."""
    if result.ok:
        value = result.value
        content = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        return ToolMessage(content=content, name=tool_call["name"], tool_call_id=tool_call["id"], status="success",
                           artifact={ARTIFACT_KEY: {"step_id": step_id, "tool": result.tool, "status": "ok",
                                                    "labels": sorted(result.labels), "value": value}})
    if result.status == "denied":
        policies = ", ".join(result.decision.policy_ids)
        content = f"scopegraph denied this call ({policies}): {result.reason}"
    else:
        content = f"the call failed: {result.reason}"
    artifact: dict[str, Any] = {"step_id": step_id, "tool": result.tool, "status": result.status,
                                "policy_ids": list(result.decision.policy_ids)}
    if result.returned:  # a failed tool's error is tool output too: it may quote what it read
        artifact.update(labels=sorted(result.labels), value=result.error)
    return ToolMessage(content=content, name=tool_call["name"], tool_call_id=tool_call["id"], status="error",
                       artifact={ARTIFACT_KEY: artifact})


def _rejected(tool_call: ToolCall, decision: Mapping[str, Any]) -> ToolMessage:
    reason = decision.get("message")
    content = (f"A reviewer rejected the call to {tool_call['name']!r}" + (f": {reason}" if reason else "")
               + ". It was not run; do not retry it unless the user asks.")
    return ToolMessage(content=content, name=tool_call["name"], tool_call_id=tool_call["id"], status="error",
                       artifact={ARTIFACT_KEY: {"tool": tool_call["name"], "status": "rejected"}})


def _observations(state: Mapping[str, Any]) -> tuple[Observation, ...]:
    """The tool output the model has been shown in this conversation, as scopegraph
    answered it (its labels with it)."""
    seen = []
    for message in state.get("messages") or ():
        mark = getattr(message, "artifact", None)
        info = mark.get(ARTIFACT_KEY) if isinstance(message, ToolMessage) and isinstance(mark, Mapping) else None
        if isinstance(info, Mapping) and "labels" in info:
            seen.append(Observation(step_id=str(info.get("step_id")), tool=str(info.get("tool")),
                                    labels=frozenset(info["labels"]), value=info.get("value")))
    return tuple(seen)


def _task(messages: Iterable[BaseMessage]) -> str:
    human = [m for m in messages if isinstance(m, HumanMessage)]
    if not human:
        raise SessionError("no human message to plan the run from")
    content = human[-1].content
    text = content if isinstance(content, str) else " ".join(
        part if isinstance(part, str) else str(part.get("text", "")) for part in content)
    if not text.strip():
        raise SessionError("the human message to plan the run from is empty")
    return text


def _allowed(decision: CallDecision) -> Decision:
    return Decision(outcome="allow", reasons=decision.reasons, policy_ids=decision.policy_ids)


def _awaiting(decision: CallDecision) -> StepEnd:
    return StepEnd(status="awaiting_approval", decision="needs_approval", policy_ids=decision.policy_ids,
                   reason=decision.reason, approval_id=decision.approval_id)


def _transient(decision: CallDecision, exc: TransientToolError) -> CallResult:
    return CallResult(tool=decision.tool, arguments={}, status="error", decision=_allowed(decision),
                      error=f"tool {decision.tool!r} failed ({type(exc).__name__}); it may be retried")


def _model_facing(name: str, description: str, args_model: Any) -> BaseTool:
    def refuse(**_: Any) -> Any:
        raise ToolError(f"tool {name!r} runs only through scopegraph's gateway")

    return StructuredTool.from_function(func=refuse, name=name, description=description or name,
                                        args_schema=args_model)


__all__ = ["ARTIFACT_KEY", "STATE_KEY", "ScopedCalls", "hitl_request", "read_answer", "tool_message"]
