"""``ScopegraphMiddleware``: scopegraph for a LangChain 1.x ``create_agent`` agent.

::

    agent = create_agent(model, middleware=[ScopegraphMiddleware(guard, initiator="alice")],
                         checkpointer=InMemorySaver())   # planner: the workflow's, by default

- ``before_agent``: the planner fixes the run's plan from the invocation's human message
  alone (it never sees tool output), opening the run's session; the run's id and plan
  are kept in the agent's state, under the user's ``thread_id``.
- ``wrap_tool_call``: every tool call the model proposes goes through the decision API
  under a grant of its own (see ``scopegraph.agents.scoped_calls``); the tool runs only
  through the gateway. A denial is a ``ToolMessage`` with the reason; a call that needs
  approval is an ``interrupt`` in LangChain's human-in-the-loop request format, resumed
  with ``Command(resume={"decisions": [{"type": "approve", ...}]})`` for that call only.
- ``after_agent``: the run ends, every grant it still holds revoked.

The middleware brings the workflow's tools for the model (``tools``); pass no others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState
from langchain.agents.middleware.types import PrivateStateAttr, ToolCallRequest
from langchain_core.messages import ToolMessage
from langgraph.config import get_config
from langgraph.runtime import Runtime
from langgraph.types import Command

from scopegraph import Guard
from scopegraph.roles import Planner

from .scoped_calls import STATE_KEY, Initiator, ScopedCalls


class ScopedAgentState(AgentState[Any]):
    """The agent's state with the open run's id and plan (hidden from input and output)."""

    scopegraph: NotRequired[Annotated[dict[str, Any], PrivateStateAttr]]


class ScopegraphMiddleware(AgentMiddleware[ScopedAgentState, Any, Any]):
    """Per-step scoping for a ``create_agent`` agent: plan first, then every tool call
    decided at the moment it is made, approvals through LangGraph interrupts."""

    state_schema = ScopedAgentState

    def __init__(self, guard: Guard, *, initiator: Initiator, planner: Planner | None = None) -> None:
        super().__init__()
        self.calls = ScopedCalls(guard, planner=planner or guard.workflow.planner, initiator=initiator)
        self.tools = self.calls.langchain_tools()

    def before_agent(self, state: ScopedAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        self.calls.end_run(state, status="cancelled")  # a run left paused is abandoned by a new input
        return {STATE_KEY: self.calls.open_run(state["messages"], _config())}

    async def abefore_agent(self, state: ScopedAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return self.before_agent(state, runtime)

    def wrap_tool_call(self, request: ToolCallRequest,
                       handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]]) -> ToolMessage | Command[Any]:
        # ``handler`` is never called: the tool runs only through the gateway.
        return self.calls.call(request.tool_call, request.state)

    async def awrap_tool_call(
        self, request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        return await self.calls.acall(request.tool_call, request.state)  # an async tool awaited on this loop

    def after_agent(self, state: ScopedAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        ended = self.calls.end_run(state)
        return None if ended is None else {STATE_KEY: ended}

    async def aafter_agent(self, state: ScopedAgentState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        return self.after_agent(state, runtime)


def _config() -> Any:
    try:
        return get_config()
    except RuntimeError:  # called outside a graph run
        return {}


__all__ = ["ScopedAgentState", "ScopegraphMiddleware"]
