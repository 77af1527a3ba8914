"""``ScopedToolNode`` in a hand-built LangGraph graph, on every store: the same decisions
as the ``create_agent`` middleware (planned calls run, off-plan and injected ones are
denied with a ``ToolMessage``, approvals go round through interrupts), over the user's
own checkpointer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import tools_condition
from langgraph.types import Command

from scopegraph import Guard
from scopegraph.agents import ScriptedPlanner
from scopegraph.agents.testing import CompromisedChatModel, ScriptedChatModel, tool_call
from scopegraph.agents.tool_node import ScopedMessagesState, ScopedToolNode
from scopegraph.clock import FixedClock
from scopegraph.errors import SessionError

from .conftest import Backend
from .test_langchain_middleware import (
    ATTACKER,
    EFFECTS,
    PLAN,
    RAN_ON,
    TASK,
    all_revoked,
    quote_guard,
    saver_for,
    workflow,
)


@pytest.fixture
def guard(backend: Backend) -> Iterator[Guard]:
    EFFECTS.clear()
    with Guard(workflow(), store=backend.url, clock=FixedClock(start=1_800_000_000.0)) as g:
        yield g


@pytest.fixture
def saver(backend: Backend, tmp_path: Path) -> Iterator[BaseCheckpointSaver[Any]]:
    with saver_for(backend, tmp_path) as s:
        yield s


def graph_for(guard: Guard, model: Any, saver: BaseCheckpointSaver[Any], *, plan_first: bool = True) -> Any:
    tools = ScopedToolNode(guard, planner=ScriptedPlanner(PLAN), initiator="alice")
    bound = model.bind_tools(tools.tools)

    def agent(state: ScopedMessagesState) -> dict[str, Any]:
        return {"messages": [bound.invoke(state["messages"])]}

    graph = StateGraph(ScopedMessagesState)
    graph.add_node("plan", tools.plan)
    graph.add_node("agent", agent)
    graph.add_node("tools", tools)
    graph.add_node("finish", tools.finish)
    graph.add_edge(START, "plan" if plan_first else "agent")
    graph.add_edge("plan", "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "finish"})
    graph.add_edge("tools", "agent")
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=saver)


def tool_messages(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


def test_planned_calls_run_and_an_injected_one_is_denied(guard: Guard, saver: BaseCheckpointSaver[Any]) -> None:
    model = CompromisedChatModel(replies=[tool_call("read_inbox", {"folder": "inbox"})], default="done")
    app = graph_for(guard, model, saver)
    config = {"configurable": {"thread_id": "n-injected"}}
    result = app.invoke({"messages": [{"role": "user", "content": TASK}]}, config)
    read, injected = tool_messages(result)
    assert read.status == "success" and injected.status == "error"
    assert "scopegraph:plan" in str(injected.content) and ATTACKER not in str(injected.content)
    assert [e[0] for e in EFFECTS] == ["read_inbox"]
    run_id = result["scopegraph"]["run_id"]
    assert result["scopegraph"]["ended"] and all_revoked(guard, run_id)
    assert guard.ledger.verify(run_id=run_id).ok


def test_parallel_calls_one_held_resume_runs_each_exactly_once(guard: Guard,
                                                                saver: BaseCheckpointSaver[Any]) -> None:
    both = AIMessage(content="", tool_calls=[
        {"name": "read_inbox", "args": {"folder": "inbox"}, "id": "p1", "type": "tool_call"},
        {"name": "write_note", "args": {"title": "q3", "amount": 40}, "id": "p2", "type": "tool_call"}])
    model = ScriptedChatModel(replies=[both, "done"])
    app = graph_for(guard, model, saver)
    config = {"configurable": {"thread_id": "n-parallel"}}
    paused = app.invoke({"messages": [{"role": "user", "content": TASK}]}, config)
    [pending] = paused["__interrupt__"]
    assert pending.value["action_requests"][0]["name"] == "write_note"
    approval_id = pending.value["scopegraph"]["approval_id"]
    assert EFFECTS == [("read_inbox", {"folder": "inbox"})]
    other = app.invoke(Command(resume={"decisions": [
        {"type": "approve", "approver": "bob", "approval_id": "not-this-one"}]}), config)
    assert "not this call's" in other["__interrupt__"][0].value["scopegraph"]["problem"]
    done = app.invoke(Command(resume={"decisions": [{"type": "approve", "approver": "bob"}]}), config)
    assert [m.status for m in tool_messages(done)] == ["success", "success"]
    # The node re-ran on each resume; the read was replayed from its record, never run again.
    assert EFFECTS == [("read_inbox", {"folder": "inbox"}), ("write_note", {"title": "q3", "amount": 40})]
    run_id = done["scopegraph"]["run_id"]
    assert guard.approvals.get(approval_id).status == "consumed"
    assert all_revoked(guard, run_id) and guard.ledger.verify(run_id=run_id).ok


def test_a_graph_without_the_plan_node_fails_closed(guard: Guard, saver: BaseCheckpointSaver[Any]) -> None:
    model = ScriptedChatModel(replies=[tool_call("read_inbox", {"folder": "inbox"}), "done"])
    app = graph_for(guard, model, saver, plan_first=False)
    with pytest.raises(SessionError, match="no scopegraph run is open"):
        app.invoke({"messages": [{"role": "user", "content": TASK}]}, {"configurable": {"thread_id": "n-noplan"}})
    assert EFFECTS == []


def test_a_transient_failure_ends_the_calls_grant_and_a_retry_is_decided_anew(
        backend: Backend, saver: BaseCheckpointSaver[Any]) -> None:
    from scopegraph import Workflow, tool
    from scopegraph.agents import DirectExecutor
    from scopegraph.errors import TransientToolError

    attempts: list[str] = []

    @tool(risk="read")
    def lookup(key: str) -> str:
        """Look a key up (the first attempt fails)."""
        attempts.append(key)
        if len(attempts) == 1:
            raise TransientToolError("upstream timed out")
        return f"value of {key}"

    plan = {"steps": [{"id": "look", "tool": "lookup", "purpose": "look it up",
                       "constraints": {"key": {"kind": "any"}}}]}
    wf = Workflow(name="flaky", tools=[lookup], planner=ScriptedPlanner(plan), executor=DirectExecutor())
    with Guard(wf, store=backend.url, clock=FixedClock(start=1_800_000_000.0)) as guard:
        tools = ScopedToolNode(guard, planner=ScriptedPlanner(plan), initiator="alice")
        model = ScriptedChatModel(replies=[tool_call("lookup", {"key": "a"}), tool_call("lookup", {"key": "a"}),
                                           "done"])
        bound = model.bind_tools(tools.tools)
        graph = StateGraph(ScopedMessagesState)
        graph.add_node("plan", tools.plan)
        graph.add_node("agent", lambda state: {"messages": [bound.invoke(state["messages"])]})
        graph.add_node("tools", tools)
        graph.add_node("finish", tools.finish)
        graph.add_edge(START, "plan")
        graph.add_edge("plan", "agent")
        graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "finish"})
        graph.add_edge("tools", "agent")
        graph.add_edge("finish", END)
        result = graph.compile(checkpointer=saver).invoke(
            {"messages": [{"role": "user", "content": "look up a"}]}, {"configurable": {"thread_id": "n-flaky"}})
        failed, retried = tool_messages(result)
        assert failed.status == "error" and "may be retried" in str(failed.content)
        assert retried.status == "success" and retried.content == "value of a"
        assert attempts == ["a", "a"]
        run_id = result["scopegraph"]["run_id"]
        grants = guard.store.grants_for_run(run_id)
        assert len(grants) == 2 and all(g.revoked_at is not None for g in grants)  # one grant per call
        assert guard.ledger.verify(run_id=run_id).ok


def test_an_async_graph_awaits_an_async_tool_on_the_callers_loop(backend: Backend) -> None:
    with quote_guard(backend) as guard:
        tools = ScopedToolNode(guard, initiator="alice")
        bound = ScriptedChatModel(replies=[tool_call("quote", {"symbol": "ACME"}), "done"]).bind_tools(tools.tools)

        async def agent(state: ScopedMessagesState) -> dict[str, Any]:
            return {"messages": [await bound.ainvoke(state["messages"])]}

        graph = StateGraph(ScopedMessagesState)
        graph.add_node("plan", tools.plan)
        graph.add_node("agent", agent)
        graph.add_node("tools", tools)
        graph.add_node("finish", tools.finish)
        graph.add_edge(START, "plan")
        graph.add_edge("plan", "agent")
        graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "finish"})
        graph.add_edge("tools", "agent")
        graph.add_edge("finish", END)
        app = graph.compile()

        async def drive() -> tuple[dict[str, Any], tuple[asyncio.AbstractEventLoop, int]]:
            here = (asyncio.get_running_loop(), threading.get_ident())
            return await app.ainvoke({"messages": [{"role": "user", "content": "price of ACME"}]}), here

        result, here = asyncio.run(drive())
        assert RAN_ON == [here]
        [answer] = tool_messages(result)
        assert answer.status == "success" and result["scopegraph"]["ended"]
