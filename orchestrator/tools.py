"""Declaring tools: name, argument schema, risk tier, output labels, destinations.

A tool is a plain Python function (sync or async). ``@tool`` derives a pydantic
argument model from its signature so every call is validated before it runs, and
records the facts policy needs: how risky the tool is, what its output carries
(``external`` tools bring in content from outside: their output is ``untrusted``), and
which arguments say where data or money goes (``destinations``: a recipient, a URL, an
account, a path), so policy can ask where those values came from. ``roles`` names what
an argument is to the outside world: ``destination`` (the same as ``destinations``),
``content`` (what the call sends or writes: a body, a message, a document; policy asks
whether it may carry untrusted data) or ``secret`` (a password, an API key: its value
is scrubbed from the tool's error messages before they reach a run record, a span or
the ledger, and masked wherever a call is shown; see ``redaction``).

``Tool.from_schema`` declares a tool from a JSON Schema instead of a signature: that is
how LangChain and MCP tools become scoped tools. A tool with ``takes_grant`` receives
the step's grant as a bearer token (an MCP server verifies it against our JWKS).
``secrets`` declares downstream credentials (``postgres_role(...)``, ``static_secret(...)``):
parameters left out of the argument schema, filled by a broker after the gateway
allowed a call (see ``scopegraph.brokers``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .brokers.base import SecretSpec
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
    destinations: frozenset[str] = frozenset()
    takes_grant: bool = False  # ``fn(arguments, grant_token)`` instead of ``fn(**arguments)``
    secrets: frozenset[str] = frozenset()  # arguments whose values never leave the call
    # Downstream credentials a broker issues per step: keyword parameters outside the schema.
    credentials: tuple[SecretSpec, ...] = ()
    contents: frozenset[str] = frozenset()  # arguments that carry what the call sends or writes

    @property
    def roles(self) -> dict[str, str]:
        """Each argument with a declared role: ``destination``, ``content`` or ``secret``."""
        declared = {**{a: "content" for a in self.contents}, **{a: "secret" for a in self.secrets},
                    **{a: "destination" for a in self.destinations}}
        return dict(sorted(declared.items()))

    def validate_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``arguments`` against the tool's schema and return them normalised.

        Raises:
            ToolArgumentsError: an argument is missing, unknown, of the wrong type, or
                nested more than ``MAX_ARGUMENT_DEPTH`` lists or mappings deep.
        """
        for name, value in arguments.items():
            if _deeper_than(value, MAX_ARGUMENT_DEPTH):
                raise ToolArgumentsError(f"invalid arguments for tool {self.name!r}: {name}: nested more than "
                                         f"{MAX_ARGUMENT_DEPTH} lists or mappings deep")
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

    def invoke(self, arguments: Mapping[str, Any], grant_token: str | None = None,
               credentials: Mapping[str, Any] | None = None) -> Any | Awaitable[Any]:
        """Run the underlying function; returns an awaitable for async tools.

        Only the gateway calls this, and passes the grant only to a ``takes_grant`` tool,
        and the brokers' ``credentials`` only to a tool that declares them.
        """
        if self.takes_grant:
            return self.fn(dict(arguments), grant_token)
        return self.fn(**arguments, **(credentials or {}))

    @classmethod
    def from_schema(
        cls,
        *,
        name: str,
        description: str,
        parameters: Mapping[str, Any],
        fn: Callable[..., Any],
        risk: Risk | str,
        labels: Iterable[str] = (),
        external: bool = False,
        destinations: Iterable[str] = (),
        accepts_confidential: bool = False,
        takes_grant: bool = False,
        roles: Mapping[str, str] | None = None,
    ) -> Tool:
        """A tool whose arguments are described by a JSON Schema object (``parameters``).

        ``fn`` is called as ``fn(**arguments)``, or as ``fn(arguments, grant_token)`` with
        ``takes_grant``; it may be async.

        Raises:
            ToolError: bad name, risk tier, schema or role, or a destination the schema lacks.
        """
        _check_name(name)
        model = _model_from_json_schema(name, parameters)
        return _declare(
            name=name, description=description, risk=_tier(risk), labels=labels, external=external,
            destinations=destinations, accepts_confidential=accepts_confidential, model=model, fn=fn,
            is_async=inspect.iscoroutinefunction(fn), takes_grant=takes_grant, roles=roles,
        )


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    risk: Risk | str = Risk.READ,
    labels: Iterable[str] = (),
    external: bool = False,
    destinations: Iterable[str] = (),
    accepts_confidential: bool = False,
    roles: Mapping[str, str] | None = None,
    secrets: Iterable[SecretSpec] = (),
) -> Any:
    """Declare a function as a tool.

    Usable bare (``@tool``) or with options (``@tool(risk="write", labels=["confidential"])``).
    ``risk`` is ``read``, ``write`` or ``egress``; ``labels`` are the data labels the
    tool's output carries; ``external`` says the output is content from outside the
    organisation (an email, a web page): it is labelled ``untrusted``. ``destinations``
    names the arguments that say where data or money goes (recipient, URL, account,
    path); policy sees where their values came from. ``accepts_confidential`` marks an
    egress tool the organisation trusts with confidential data (policy may use it).
    ``roles`` maps argument names to what they are: ``"destination"`` (as if listed in
    ``destinations``; on a ``read`` tool too: fetching a URL sends data to it),
    ``"content"`` (what the call sends or writes: policy asks whether it may carry
    untrusted data) or ``"secret"`` (its value is scrubbed from the tool's error
    messages, kept out of run records, spans, the ledger and usage records, and masked
    where a call is shown: ``approvals show``, the prompt, the run summary).
    ``secrets`` lists downstream credentials (``postgres_role("db", ...)``,
    ``static_secret("api_key")``): each names a parameter of the function that is not an
    argument (the executor and the model never see it); a broker fills it for each
    step after the gateway allowed the call, and revokes it when the step ends.

    Raises:
        ToolError: an unknown risk tier, role or argument name, or a credential that
            names no parameter or asks for more than the tool's risk tier allows.
    """

    tier = _tier(risk)

    def wrap(f: Callable[..., Any]) -> Tool:
        return _build_tool(
            f,
            name=name or f.__name__,
            risk=tier,
            labels=labels,
            external=external,
            destinations=destinations,
            accepts_confidential=accepts_confidential,
            roles=roles,
            secrets=secrets,
        )

    return wrap(fn) if fn is not None else wrap


UNTRUSTED = "untrusted"
ROLES = ("destination", "content", "secret")  # what an argument can be to the outside world
MAX_ARGUMENT_DEPTH = 64  # lists and mappings inside one argument: deeper is refused, not parsed


def _tier(risk: Risk | str) -> Risk:
    try:
        return Risk(risk)
    except ValueError:
        raise ToolError(f"unknown risk tier {risk!r}: use 'read', 'write' or 'egress'") from None


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _check_name(name: str) -> None:
    if not name or not set(name) <= _NAME_OK:
        raise ToolError(f"invalid tool name {name!r}: use letters, digits, '_', '-' or '.'")


def _build_tool(
    f: Callable[..., Any],
    *,
    name: str,
    risk: Risk,
    labels: Iterable[str],
    external: bool,
    destinations: Iterable[str],
    accepts_confidential: bool,
    roles: Mapping[str, str] | None = None,
    secrets: Iterable[SecretSpec] = (),
) -> Tool:
    _check_name(name)
    signature = inspect.signature(f)
    # ``include_extras``: ``Annotated[int, Field(ge=1)]`` keeps its validators and bounds.
    hints = get_type_hints(f, include_extras=True)
    credentials = _credential_specs(name, secrets, signature)
    fields: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolError(f"tool {name!r} may not take *args or **kwargs")
        if any(spec.param == param.name for spec in credentials):
            continue  # filled by a broker, never an argument
        annotation = hints.get(param.name, Any)
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model = _arguments_model(name, fields)
    return _declare(
        name=name, description=inspect.getdoc(f) or "", risk=risk, labels=labels, external=external,
        destinations=destinations, accepts_confidential=accepts_confidential, model=model, fn=f,
        is_async=inspect.iscoroutinefunction(f), takes_grant=False, roles=roles, credentials=credentials,
    )


def _credential_specs(name: str, secrets: Iterable[SecretSpec], signature: inspect.Signature) -> tuple[SecretSpec, ...]:
    """The declared credentials, each naming a keyword parameter of its own."""
    if isinstance(secrets, (str, SecretSpec)) or not isinstance(secrets, Iterable):
        raise ToolError(f"tool {name!r}: secrets is a list of declarations, e.g. [postgres_role('db', ...)]")
    specs = tuple(secrets)
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, SecretSpec):
            raise ToolError(f"tool {name!r}: {spec!r} is not a credential declaration (postgres_role, static_secret)")
        param = signature.parameters.get(spec.param)
        if param is None or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise ToolError(f"tool {name!r} declares credential {spec.param!r}, which is not one of its parameters")
        if spec.param in seen:
            raise ToolError(f"tool {name!r} declares credential {spec.param!r} twice")
        seen.add(spec.param)
    return specs


def _arguments_model(name: str, fields: Mapping[str, Any]) -> type[BaseModel]:
    return create_model(
        f"{name.replace('-', '_').replace('.', '_')}_arguments",
        __config__=ConfigDict(extra="forbid", strict=False),
        **fields,
    )


def _declare(
    *, name: str, description: str, risk: Risk, labels: Iterable[str], external: bool,
    destinations: Iterable[str], accepts_confidential: bool, model: type[BaseModel],
    fn: Callable[..., Any], is_async: bool, takes_grant: bool, roles: Mapping[str, str] | None = None,
    credentials: tuple[SecretSpec, ...] = (),
) -> Tool:
    if isinstance(labels, str) or isinstance(destinations, str):
        raise ToolError(f"tool {name!r}: labels and destinations are lists of names, not one string")
    label_set = frozenset(labels) | ({UNTRUSTED} if external else frozenset())
    by_role = _roles(name, roles or {}, model)
    dest_set = frozenset(destinations) | by_role["destination"]
    unknown = sorted(dest_set - set(model.model_fields))
    if unknown:
        raise ToolError(f"tool {name!r} declares destination {unknown[0]!r}, which is not one of its arguments")
    for spec in credentials:
        spec.check_tool(name, list(model.model_fields), risk.value)
    return Tool(
        name=name, description=description, risk=risk, labels=label_set, args_model=model, fn=fn,
        is_async=is_async, accepts_confidential=accepts_confidential, destinations=dest_set,
        takes_grant=takes_grant, secrets=by_role["secret"], contents=by_role["content"],
        credentials=credentials,
    )


def _roles(name: str, roles: Mapping[str, str], model: type[BaseModel]) -> dict[str, frozenset[str]]:
    """The arguments of each role, from ``{argument: role}``."""
    if not isinstance(roles, Mapping):
        raise ToolError(f"tool {name!r}: roles map argument names to roles, e.g. {{'api_key': 'secret'}}")
    for arg, role in roles.items():
        if not isinstance(role, str) or role not in ROLES:
            raise ToolError(f"tool {name!r}: unknown role {role!r} for argument {arg!r}: use "
                            + ", ".join(repr(r) for r in ROLES[:-1]) + f" or {ROLES[-1]!r}")
        if arg not in model.model_fields:
            raise ToolError(f"tool {name!r} declares role {role!r} for {arg!r}, which is not one of its arguments")
    return {r: frozenset(a for a, role in roles.items() if role == r) for r in ROLES}


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether lists, tuples, sets or mappings nest more than ``limit`` deep in ``value``.

    Iterative: a value nested thousands deep (or a list that contains itself) is
    measured without recursion, before pydantic, JSON or Cedar would recurse into it.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            inner: Iterable[Any] = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            inner = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((v, depth + 1) for v in inner)
    return False


_JSON_TYPES: dict[str, Any] = {
    "string": str, "integer": int, "number": float, "boolean": bool, "object": dict[str, Any],
}


def _json_type(name: str, arg: str, spec: Mapping[str, Any]) -> Any:
    """The Python type for one JSON Schema property (the subset tool schemas use)."""
    if "anyOf" in spec or "oneOf" in spec:
        options = [s for s in spec.get("anyOf", spec.get("oneOf", [])) if s.get("type") != "null"]
        nullable = len(options) < len(spec.get("anyOf", spec.get("oneOf", [])))
        inner = _json_type(name, arg, options[0]) if len(options) == 1 else Any
        return inner | None if nullable and inner is not Any else inner
    if "enum" in spec:
        values = tuple(spec["enum"])
        return Literal[values] if values else Any
    kind = spec.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kinds = [k for k in kind if k != "null"]
        inner = _json_type(name, arg, {**spec, "type": kinds[0]}) if len(kinds) == 1 else Any
        return inner | None if "null" in kind and inner is not Any else inner
    if kind == "array":
        items = spec.get("items") or {}
        return list[_json_type(name, arg, items) if items else Any]  # type: ignore[misc]
    if kind is None:
        return Any
    if kind not in _JSON_TYPES:
        raise ToolError(f"tool {name!r}: argument {arg!r} has unsupported JSON Schema type {kind!r}")
    return _JSON_TYPES[kind]


def _model_from_json_schema(name: str, parameters: Mapping[str, Any]) -> type[BaseModel]:
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ToolError(f"tool {name!r}: its argument schema must be a JSON Schema object")
    props = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())
    fields: dict[str, Any] = {}
    for arg, spec in props.items():
        if not isinstance(arg, str) or not arg.isidentifier():
            raise ToolError(f"tool {name!r}: argument name {arg!r} is not usable")
        annotation = _json_type(name, arg, spec if isinstance(spec, Mapping) else {})
        default = ... if arg in required else spec.get("default") if isinstance(spec, Mapping) else None
        fields[arg] = (annotation if arg in required or default is not None else annotation | None, default)
    return _arguments_model(name, fields)


class ToolRegistry(Mapping[str, Tool]):
    """The tools of one workflow, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        self._catalogue: dict[str, str] | None = None  # JSON text of each tool's entry
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
        return [json.loads(text) for text in self._catalogue_text().values()]

    def catalogue_entry(self, name: str) -> dict[str, Any]:
        """One tool's catalogue entry (see ``catalogue``).

        Raises:
            UnknownToolError: no tool of that name is registered.
        """
        self.get_tool(name)
        entry: dict[str, Any] = json.loads(self._catalogue_text()[name])
        return entry

    def _catalogue_text(self) -> dict[str, str]:
        # Kept as JSON text: each reader gets a fresh copy it may mutate (a planner, an
        # executor per step), and parsing it is cheaper than a deep copy.
        if self._catalogue is None:
            self._catalogue = {t.name: json.dumps(_catalogue_entry(t)) for t in self._tools.values()}
        return self._catalogue


def _catalogue_entry(t: Tool) -> dict[str, Any]:
    return {
        "name": t.name,
        "description": t.description,
        "risk": t.risk.value,
        "labels": sorted(t.labels),
        "destinations": sorted(t.destinations),
        "roles": t.roles,
        "arguments": t.json_schema(),
    }
