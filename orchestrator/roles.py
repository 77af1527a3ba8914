"""What the runtime asks of planners and executors, and what it hands them.

The protocols live here, below the runtime, so that ``agents`` implements them
without the orchestrator ever importing ``agents``. A planner receives the task and
the tool catalogue: no grant, no tool handle. An executor receives one step and a
``ToolHandle`` bound to that step's grant; the token stays inside the handle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .canonical import canonical_json, sha256_hex
from .gateway import CallContext, CallResult, Gateway
from .identity import SpiffeId, Svid
from .plan import Plan, Step


@dataclass(frozen=True, kw_only=True)
class PlanningContext:
    """Everything a planner may see: the trusted task and the catalogue. No tool output."""

    task: str
    workflow: str
    run_id: str
    identity: SpiffeId
    catalogue: Sequence[Mapping[str, Any]]


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
    """An executor's only way to call tools: through the gateway, with its step's grant."""

    def __init__(self, gateway: Gateway, token: str, ctx: CallContext) -> None:
        self._gateway = gateway
        self.__token = token
        self._ctx = ctx
        self.calls: list[CallResult] = []

    def call(self, tool: str, /, **arguments: Any) -> CallResult:
        """Ask the gateway to run ``tool``; returns the result, allowed or not.

        Raises:
            NeedsApproval: policy wants a human to approve this exact call first.
        """
        key = _call_key(self._ctx, len(self.calls), tool, arguments)
        result = self._gateway.call(self.__token, tool, arguments, self._ctx, call_key=key)
        self.calls.append(result)
        # What this call returned is now something the executor has seen: later calls of
        # the step carry its labels, and their arguments are traced against it.
        self._ctx = self._ctx.after(result)
        if result.status == "needs_approval":
            raise NeedsApproval(result)
        return result

    def __repr__(self) -> str:
        return f"ToolHandle(step={self._ctx.step_id!r}, token=<redacted>)"


def _call_key(ctx: CallContext, index: int, tool: str, arguments: Mapping[str, Any]) -> str:
    """Names the n-th call of a step, so a step re-run after a crash replays, not repeats, it."""
    try:
        args = canonical_json(arguments)
    except (TypeError, ValueError):
        args = repr(sorted(arguments.items()))
    return sha256_hex(f"{ctx.run_id}\0{ctx.step_id}\0{index}\0{tool}\0{args}")


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


@runtime_checkable
class Executor(Protocol):
    def execute(self, ctx: StepContext) -> Any:
        """Carry out ``ctx.step`` with ``ctx.tools``; the return value is ignored."""
        ...
