"""What the runtime asks of planners and executors, and what it hands them.

The protocols live here, below the runtime, so that ``scopegraph.agents`` implements them
without the orchestrator ever importing ``scopegraph.agents``. A planner receives the task and
the tool catalogue: no grant, no tool handle. An executor receives one step and a
``ToolHandle`` bound to that step's grant; the token stays inside the handle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from .gateway import CallContext, CallResult, Gateway, StepClosing, call_key
from .identity import SpiffeId, Svid
from .plan import Plan, Step, parse_plan

if TYPE_CHECKING:
    from .session import Session

FailureKind = Literal["out_of_scope", "needs_other_tool", "denied", "tool_failed"]
FAILURE_KINDS: tuple[FailureKind, ...] = ("out_of_scope", "needs_other_tool", "denied", "tool_failed")


@dataclass(frozen=True, kw_only=True)
class StepFailure:
    """Why a step could not be done inside its scope, for the planner: structure only.

    Nothing here is text an executor or a tool wrote: the kind is from a fixed list,
    ``argument`` and ``needs_tool`` are checked against the tool's arguments and the
    catalogue, and ``policy_ids`` name the policies that refused. An executor that has
    read injected instructions cannot pass them on to the planner through a failure.
    """

    step_id: str
    tool: str
    kind: FailureKind
    argument: str | None = None  # the argument that needs a wider constraint
    needs_tool: str | None = None  # a catalogue tool the step needs instead
    policy_ids: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"step_id": self.step_id, "tool": self.tool, "kind": self.kind, "argument": self.argument,
                "needs_tool": self.needs_tool, "policy_ids": list(self.policy_ids)}


class ReplanRequested(Exception):
    """Raised by an executor: this step cannot be done inside its scope; ask for a new plan.

    ``kind`` is one of ``FAILURE_KINDS``; ``argument`` names the argument whose
    constraint is too narrow; ``needs_tool`` a tool the step needs instead. The runtime
    checks both and hands the planner a ``StepFailure``, never free text.
    """

    def __init__(self, kind: FailureKind, *, argument: str | None = None, needs_tool: str | None = None) -> None:
        super().__init__(f"step asks for a new plan ({kind})")
        self.kind = kind
        self.argument = argument
        self.needs_tool = needs_tool


@dataclass(frozen=True, kw_only=True)
class PlanningContext:
    """Everything a planner may see: the trusted task and the catalogue. No tool output.

    On a re-plan, also the plan so far, the ids of its completed steps (which a revision
    must keep unchanged) and structured failures of the steps that could not be done.
    """

    task: str
    workflow: str
    run_id: str
    identity: SpiffeId
    catalogue: Sequence[Mapping[str, Any]]
    previous_plan: Plan | None = None
    completed: tuple[str, ...] = ()
    failures: tuple[StepFailure, ...] = ()
    validator: Callable[[Any], Plan] | None = field(default=None, repr=False)

    def validate(self, data: Plan | Mapping[str, Any] | str) -> Plan:
        """Parse and check a plan as the runtime will, so a planner can re-ask on an error.

        Raises:
            PlanError: the plan is malformed or does not fit the workflow's tools.
        """
        if self.validator is None:
            return parse_plan(data)
        return self.validator(data)


@runtime_checkable
class Planner(Protocol):
    def plan(self, ctx: PlanningContext) -> Plan | Mapping[str, Any] | str:
        """Return a plan (a ``Plan``, or data/JSON the runtime parses and validates)."""
        ...


class NeedsApproval(Exception):
    """Signal, not an error: the call just made waits for a human approval."""

    def __init__(self, result: CallResult) -> None:
        super().__init__(f"call to {result.tool!r} needs approval")
        self.result = result


class ToolHandle:
    """An executor's only way to call tools: through a step of the run's ``Session`` (or,
    for a test, straight through the gateway with a grant). The token stays inside."""

    def __init__(self, gateway: Gateway, token: str, ctx: CallContext, *,
                 closing: StepClosing | None = None) -> None:
        """A handle that calls ``gateway`` with the grant ``token`` in ``ctx``."""
        self.__token = token
        self._ctx = ctx
        self.calls: list[CallResult] = []
        self._session: tuple[Session, str] | None = None

        def through_gateway(tool: str, arguments: dict[str, Any], last: bool) -> CallResult:
            key = call_key(self._ctx, len(self.calls), tool, arguments)
            return gateway.call(self.__token, tool, arguments, self._ctx, call_key=key,
                                closing=closing if last else None)

        self._through = through_gateway

    @classmethod
    def for_step(cls, session: Session, step_id: str, *, ends_step: bool = True) -> ToolHandle:
        """The handle of a step of ``session``: every call goes through ``Session.call``.
        With ``ends_step``, ``last_call`` ends the step in the call's write."""
        handle = cls.__new__(cls)
        handle.__token = session.danger_grant_token(step_id)  # held, as by any handle, never shown
        handle.calls = []
        handle._ctx = session.seen(step_id)

        def through_session(tool: str, arguments: dict[str, Any], last: bool) -> CallResult:
            return session.call(step_id, tool, arguments, last=last and ends_step)

        handle._through = through_session
        handle._session = (session, step_id)
        return handle

    def call(self, tool: str, /, **arguments: Any) -> CallResult:
        """Ask the gateway to run ``tool``; returns the result, allowed or not.

        Raises:
            NeedsApproval: policy wants a human to approve this exact call first.
        """
        return self._call(tool, arguments, False)

    def last_call(self, tool: str, /, **arguments: Any) -> CallResult:
        """``call``, for an executor that knows this is its step's last call.

        The step ends with this call: its grant is revoked and its outcome (this call's)
        recorded in the same write as the call's result, one commit fewer per step. Return
        right after it: nothing the executor does afterwards changes the step's outcome,
        and a further call is refused, its grant being revoked. Where the host cannot end
        the step with a call (a delegated child step), this is a plain ``call``.

        Raises:
            NeedsApproval: policy wants a human to approve this exact call first.
        """
        return self._call(tool, arguments, True)

    def _call(self, tool: str, arguments: dict[str, Any], last: bool) -> CallResult:
        result = self._through(tool, arguments, last)
        self.calls.append(result)
        # What this call returned is now something the executor has seen: later calls of
        # the step carry its labels, and their arguments are traced against it.
        self._ctx = self._ctx.after(result)
        if result.status == "needs_approval":
            raise NeedsApproval(result)
        return result

    def absorb(self, calls: Sequence[CallResult]) -> None:
        """Take in calls made on this step's behalf (by delegated children): they count as
        its calls, and what they returned counts as seen by its executor."""
        for result in calls:
            self.calls.append(result)
            self._ctx = self._ctx.after(result)
        if self._session is not None:
            session, step_id = self._session
            session.observe(step_id, calls)

    @property
    def context(self) -> CallContext:
        """Who calls and what they have seen so far (no token)."""
        return self._ctx

    def __repr__(self) -> str:
        return f"ToolHandle(step={self._ctx.step_id!r}, token=<redacted>)"


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """One step as its executor sees it."""

    step: Step
    plan: Plan
    identity: SpiffeId
    svid: Svid = field(repr=False)  # the step's JWT-SVID / X.509-SVID, to prove who it is
    dependencies: Mapping[str, Any]
    tools: ToolHandle = field(repr=False)
    data_labels: frozenset[str] = frozenset()
    # The labels of each dependency's output: an LLM executor marks ``untrusted`` content.
    dependency_labels: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # The step's tool as the catalogue describes it (name, description, risk, arguments
    # JSON Schema, destinations): what an LLM executor binds.
    tool_schema: Mapping[str, Any] = field(default_factory=dict)
    delegator: Delegator | None = field(default=None, repr=False)

    def delegate(self, task: str, *, planner: Planner, executor: Executor) -> DelegationResult:
        """Hand this step to a sub-workflow: its own planner plans ``task`` inside this
        step's scope, and its own executor carries out each child step under a child
        identity and a grant checked to be a subset of this step's.

        Raises:
            ConfigError: the runtime offers no delegation here.
            NeedsApproval: a child call needs a human approval: this step pauses on it.
        """
        if self.delegator is None:
            from .errors import ConfigError

            raise ConfigError(f"step {self.step.id!r} cannot delegate here")
        return self.delegator(task, planner, executor)


@dataclass(frozen=True, kw_only=True)
class DelegationResult:
    """What a sub-workflow did: each child step's record, and the results of those that completed."""

    steps: tuple[Mapping[str, Any], ...]
    results: Mapping[str, Any]

    @property
    def completed(self) -> bool:
        return bool(self.steps) and all(s.get("status") == "completed" for s in self.steps)


Delegator = Callable[[str, "Planner", "Executor"], DelegationResult]


@runtime_checkable
class Executor(Protocol):
    def execute(self, ctx: StepContext) -> Any:
        """Carry out ``ctx.step`` with ``ctx.tools``; the return value is ignored."""
        ...
