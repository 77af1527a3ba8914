"""``ScopedToolNode``: scopegraph for a hand-built LangGraph graph.

A drop-in for ``langgraph.prebuilt.ToolNode`` whose every tool call goes through the
decision API, as the ``create_agent`` middleware's do (``scopegraph.agents.scoped_calls``):
denials come back as ``ToolMessage``s, calls that need approval as interrupts in
LangChain's human-in-the-loop request format. Its ``plan`` and ``finish`` are the graph's
first and last nodes: they open the run (the plan fixed from the human message alone)
and end it (every grant revoked)::

    tools = ScopedToolNode(guard, initiator="alice")   # planner: the workflow's, by default
    graph = StateGraph(ScopedMessagesState)
    graph.add_node("plan", tools.plan)
    graph.add_node("agent", call_model)          # binds tools.tools to the model
    graph.add_node("tools", tools)
    graph.add_node("finish", tools.finish)
    graph.add_edge(START, "plan"); graph.add_edge("plan", "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "finish"})
    graph.add_edge("tools", "agent"); graph.add_edge("finish", END)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NotRequired

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.graph import MessagesState
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from scopegraph import Guard
from scopegraph.roles import Planner

from .scoped_calls import STATE_KEY, Initiator, ScopedCalls


class ScopedMessagesState(MessagesState):
    """``MessagesState`` with the open run's id and plan."""

    scopegraph: NotRequired[dict[str, Any]]


class ScopedToolNode(ToolNode):
    """A ``ToolNode`` that runs the workflow's tools only through scopegraph's gateway."""

    def __init__(self, guard: Guard, *, initiator: Initiator, planner: Planner | None = None,
                 name: str = "tools") -> None:
        self.calls = ScopedCalls(guard, planner=planner or guard.workflow.planner, initiator=initiator)
        self.tools: list[BaseTool] = self.calls.langchain_tools()  # for the model to bind
        super().__init__(self.tools, name=name, wrap_tool_call=self._wrap, awrap_tool_call=self._awrap)

    def plan(self, state: dict[str, Any], config: RunnableConfig) -> dict[str, Any]:
        """The graph's first node: open the run, its plan fixed from the human message."""
        self.calls.end_run(state, status="cancelled")  # a run left paused is abandoned by a new input
        return {STATE_KEY: self.calls.open_run(state["messages"], config)}

    def finish(self, state: dict[str, Any]) -> dict[str, Any]:
        """The graph's last node: end the run, revoking every grant it still holds."""
        ended = self.calls.end_run(state)
        return {} if ended is None else {STATE_KEY: ended}

    def _wrap(self, request: ToolCallRequest,
              handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]]) -> ToolMessage | Command[Any]:
        return self.calls.call(request.tool_call, request.state)

    async def _awrap(self, request: ToolCallRequest,
                     handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
                     ) -> ToolMessage | Command[Any]:
        return await self.calls.acall(request.tool_call, request.state)


__all__ = ["ScopedMessagesState", "ScopedToolNode"]
