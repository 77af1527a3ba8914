"""Declaring tools: name, argument schema, risk tier and output labels.

A tool is a plain Python function (sync or async). ``@tool`` derives a pydantic
argument model from its signature so every call is validated before it runs, and
records the facts policy needs: how risky the tool is and what its output carries.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .errors import ToolArgumentsError, ToolError, UnknownToolError


class Risk(str, Enum):
    """How much harm a call can do; policy escalates on the higher tiers."""

    READ = "read"
    WRITE = "write"
    EGRESS = "egress"  # can send data outside the organisation


@dataclass(frozen=True, kw_only=True)
class Tool:
    """A registered tool. Call it only through the gateway."""

    name: str
    description: str
    risk: Risk
    labels: frozenset[str]
    args_model: type[BaseModel]
    fn: Callable[..., Any] = field(repr=False)
    is_async: bool
    accepts_confidential: bool = False

    def validate_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``arguments`` against the tool's schema and return them normalised.

        Raises:
            ToolArgumentsError: an argument is missing, unknown, or of the wrong type.
        """
        try:
            model = self.args_model.model_validate(dict(arguments))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "arguments"
            raise ToolArgumentsError(
                f"invalid arguments for tool {self.name!r}: {where}: {first['msg']}"
            ) from None
        return model.model_dump()

    def argument_names(self) -> list[str]:
        return list(self.args_model.model_fields)

    def json_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()

    def invoke(self, arguments: Mapping[str, Any]) -> Any | Awaitable[Any]:
        """Run the underlying function; returns an awaitable for async tools."""
        return self.fn(**arguments)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    risk: Risk | str = Risk.READ,
    labels: Iterable[str] = (),
    accepts_confidential: bool = False,
) -> Any:
    """Declare a function as a tool.

    Usable bare (``@tool``) or with options (``@tool(risk="write", labels=["confidential"])``).
    ``risk`` is ``read``, ``write`` or ``egress``; ``labels`` are the data labels the
    tool's output carries; ``accepts_confidential`` marks an egress tool the organisation
    trusts with confidential data (policy may use it).
    """

    try:
        tier = Risk(risk)
    except ValueError:
        raise ToolError(f"unknown risk tier {risk!r}: use 'read', 'write' or 'egress'") from None

    def wrap(f: Callable[..., Any]) -> Tool:
        return _build_tool(
            f,
            name=name or f.__name__,
            risk=tier,
            labels=frozenset(labels),
            accepts_confidential=accepts_confidential,
        )

    return wrap(fn) if fn is not None else wrap


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _build_tool(
    f: Callable[..., Any],
    *,
    name: str,
    risk: Risk,
    labels: frozenset[str],
    accepts_confidential: bool,
) -> Tool:
    if not name or not set(name) <= _NAME_OK:
        raise ToolError(f"invalid tool name {name!r}: use letters, digits, '_', '-' or '.'")
    signature = inspect.signature(f)
    hints = get_type_hints(f)
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolError(f"tool {name!r} may not take *args or **kwargs")
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model = create_model(
        f"{name.replace('-', '_').replace('.', '_')}_arguments",
        __config__=ConfigDict(extra="forbid", strict=False),
        **fields,
    )
    return Tool(
        name=name,
        description=inspect.getdoc(f) or "",
        risk=risk,
        labels=labels,
        args_model=model,
        fn=f,
        is_async=inspect.iscoroutinefunction(f),
        accepts_confidential=accepts_confidential,
    )


class ToolRegistry(Mapping[str, Tool]):
    """The tools of one workflow, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._catalogue: list[dict[str, Any]] | None = None
        for t in tools:
            self.register(t)

    def register(self, t: Tool) -> None:
        if not isinstance(t, Tool):
            raise ToolError(f"{t!r} is not a tool; declare it with @tool")
        if t.name in self._tools:
            raise ToolError(f"tool {t.name!r} is registered twice")
        self._tools[t.name] = t
        self._catalogue = None

    def get_tool(self, name: str) -> Tool:
        """Raises:
        UnknownToolError: no tool of that name is registered.
        """
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownToolError(f"unknown tool {name!r}") from None

    def __getitem__(self, name: str) -> Tool:
        return self.get_tool(name)  # UnknownToolError is a KeyError: ``in`` and ``.get`` work

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)

    def catalogue(self) -> list[dict[str, Any]]:
        """What a planner may see: names, descriptions, schemas and risk tiers, no handles."""
        if self._catalogue is None:
            self._catalogue = self._build_catalogue()
        return copy.deepcopy(self._catalogue)  # a planner may mutate what it is given

    def _build_catalogue(self) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "description": t.description,
                "risk": t.risk.value,
                "labels": sorted(t.labels),
                "arguments": t.json_schema(),
            }
            for t in self._tools.values()
        ]
