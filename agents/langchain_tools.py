"""LangChain tools as scoped tools.

A LangChain ``BaseTool`` (``@langchain_core.tools.tool`` functions, ``StructuredTool``,
subclasses) becomes an ``scopegraph.tools.Tool``: its argument schema is the one the
model sees (``tool_call_schema``), so the gateway validates every call and checks it
against the step's grant *before* LangChain runs anything. The LangChain tool then
validates again with its own model, which costs little and keeps its behaviour intact.

The risk tier is a required keyword: nothing in a LangChain tool says how much harm a
call can do, and guessing ``read`` would be allowing by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel

from scopegraph.errors import ToolError
from scopegraph.tools import Risk, Tool

__all__ = ["from_langchain"]


def from_langchain(
    tool: BaseTool,
    *,
    risk: Risk | str,
    labels: Iterable[str] = (),
    external: bool = False,
    destinations: Iterable[str] = (),
    accepts_confidential: bool = False,
    name: str | None = None,
    roles: Mapping[str, str] | None = None,
) -> Tool:
    """Declare a LangChain tool as a scoped tool with an explicit risk tier.

    ``labels``, ``external``, ``destinations``, ``accepts_confidential`` and ``roles``
    (``{"url": "destination", "body": "content", "api_key": "secret"}``) mean what they
    mean for ``@scopegraph.tool``. ``name`` overrides the LangChain name (scopegraph
    names use letters, digits, ``_``, ``-`` and ``.``). A tool with only an async
    implementation is called with ``ainvoke``; any other with ``invoke``.

    Raises:
        ToolError: ``tool`` is not a LangChain tool, the risk tier is unknown, the tool
            needs injected arguments no caller can supply, its schema is unusable, or a
            destination or role is not one of its arguments or an unknown role.
    """
    if not isinstance(tool, BaseTool):
        raise ToolError(f"{tool!r} is not a LangChain tool (langchain_core.tools.BaseTool)")
    tool_name = name or tool.name
    parameters = _call_schema(tool, tool_name)
    _refuse_injected(tool, tool_name, parameters)

    if _async_only(tool):
        async def call_async(**arguments: Any) -> Any:
            return await tool.ainvoke(arguments)

        fn: Any = call_async
    else:
        def call(**arguments: Any) -> Any:
            return tool.invoke(arguments)

        fn = call
    return Tool.from_schema(
        name=tool_name, description=tool.description or "", parameters=parameters, fn=fn, risk=risk,
        labels=labels, external=external, destinations=destinations,
        accepts_confidential=accepts_confidential, roles=roles,
    )


def _call_schema(tool: BaseTool, name: str) -> dict[str, Any]:
    """The JSON Schema of the arguments a caller supplies (injected ones excluded)."""
    try:
        schema: Any = tool.tool_call_schema
    except Exception as exc:  # a broken args_schema surfaces here, not at call time
        raise ToolError(f"LangChain tool {name!r} has no usable argument schema: {type(exc).__name__}") from None
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, Mapping):
        return dict(schema)
    raise ToolError(f"LangChain tool {name!r} has an argument schema of unsupported type {type(schema).__name__}")


def _refuse_injected(tool: BaseTool, name: str, parameters: Mapping[str, Any]) -> None:
    """Refuse a tool that requires arguments LangChain injects at run time (``InjectedToolArg``).

    The gateway passes exactly the validated arguments; a required injected one would make
    every call fail, so say so at declaration.
    """
    try:
        full = tool.get_input_schema()
    except Exception:
        return  # nothing more to learn than ``tool_call_schema`` already told
    if not (isinstance(full, type) and issubclass(full, BaseModel)):
        return
    offered = set(parameters.get("properties") or ())
    missing = sorted(f for f, info in full.model_fields.items() if info.is_required() and f not in offered)
    if missing:
        raise ToolError(f"LangChain tool {name!r} requires injected argument {missing[0]!r}, "
                        "which a scoped call cannot supply")


def _async_only(tool: BaseTool) -> bool:
    return isinstance(tool, StructuredTool) and tool.func is None and tool.coroutine is not None
