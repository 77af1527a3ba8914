"""MCP tools as scoped tools, and grant verification for MCP tool servers.

Client side: ``mcp_tools`` lists a streamable-HTTP MCP server's tools once and declares
each as an ``scopegraph.tools.Tool`` with a declared risk tier. Each call the gateway
allows opens a fresh client session carrying the step's grant as
``Authorization: Bearer <grant>``, so the server sees exactly one credential: a grant
for that step and that tool, never a standing one. Listing is not a tool call and
carries no grant: a server that guards its catalogue is given a separate ``list_token``.

Output from an MCP server is content from another system, so it is labelled
``untrusted`` unless the caller says otherwise (``external=False``).

Failures are mapped at the boundary: a tool-level error (``isError``) or a refused grant
is a ``ToolExecutionError``; a server that could not be reached is a
``TransientToolError``, which the gateway retries, authorizing each attempt again. A call
that was sent but not answered is retried only for a ``read`` tool: a write may have
taken effect.

Server side: ``GrantVerifier`` checks a presented grant against the trust domain's JWKS
(``scopegraph bundle --jwks``): EdDSA signature, issuer, audience ``tool:<name>`` and
lifetime. Either each tool checks the request's grant itself
(``verify_headers(ctx.headers, tool=...)``, leaving the listing open), or the verifier
serves as the MCP SDK's ``TokenVerifier`` (every request needs a grant of the domain)
and ``require_grant`` inside a tool insists the grant is for that very tool.
``GrantClaims.check_arguments`` re-checks the call's arguments against the grant's
constraints. Revocation and use counts live in the gateway's store, which a tool server
cannot see: for those it relies on the grant's short lifetime.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx2
import jwt
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent
from mcp_types import Tool as ListedTool
from pydantic import ConfigDict, TypeAdapter, ValidationError

from scopegraph.clock import Clock, SystemClock
from scopegraph.constraints import Constraint
from scopegraph.credentials import CLOCK_SKEW_SECONDS, audience_for
from scopegraph.errors import (
    ConfigError,
    GrantError,
    GrantExpiredError,
    GrantScopeError,
    IdentityError,
    ToolError,
    ToolExecutionError,
    TransientToolError,
)
from scopegraph.identity import SpiffeId
from scopegraph.tools import Risk, Tool

__all__ = [
    "GrantClaims", "GrantVerifier", "ListedTool", "MCPEndpoint", "mcp_tool", "mcp_tools", "mcp_tools_async",
    "require_grant",
]

DEFAULT_TIMEOUT_SECONDS = 30.0
_MAX_LIST_PAGES = 100
_MAX_MESSAGE = 200
_CONSTRAINTS = TypeAdapter(dict[str, Constraint])


# client side ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MCPEndpoint:
    """Where a streamable-HTTP MCP server listens, and how long one exchange may take.

    The URL carries no credentials: the only credential sent is the step's grant.
    """

    url: str
    timeout: float = DEFAULT_TIMEOUT_SECONDS

    def __post_init__(self) -> None:
        authority = re.split(r"[/?#]", self.url.partition("//")[2], maxsplit=1)[0]
        if "@" in authority:  # checked first: the messages below quote the URL
            raise ToolError("MCP server URL must not carry credentials; the step's grant is the credential")
        try:
            parts = urlsplit(self.url)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        except ValueError:  # a malformed host or port
            usable = False
        if not usable:
            raise ToolError(f"MCP server URL {self.url!r} is not a usable http:// or https:// URL")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ToolError(f"MCP timeout {self.timeout!r} s must be a finite number above 0")


def mcp_tools(
    endpoint: MCPEndpoint | str,
    *,
    risks: Mapping[str, Risk | str],
    include: Iterable[str] | None = None,
    labels: Mapping[str, Iterable[str]] | None = None,
    destinations: Mapping[str, Iterable[str]] | None = None,
    external: bool = True,
    accepts_confidential: Iterable[str] = (),
    list_token: str | None = None,
    descriptions: Mapping[str, str] | None = None,
    roles: Mapping[str, Mapping[str, str]] | None = None,
) -> list[Tool]:
    """List an MCP server's tools once and declare them as scoped tools.

    Blocking; from async code use ``mcp_tools_async``. See it for the arguments.

    Raises:
        ConfigError: called while an event loop is running in this thread.
        ToolError: see ``mcp_tools_async``.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(mcp_tools_async(
            endpoint, risks=risks, include=include, labels=labels, destinations=destinations,
            external=external, accepts_confidential=accepts_confidential, list_token=list_token,
            descriptions=descriptions, roles=roles,
        ))
    raise ConfigError("mcp_tools() was called inside a running event loop; await mcp_tools_async() instead")


async def mcp_tools_async(
    endpoint: MCPEndpoint | str,
    *,
    risks: Mapping[str, Risk | str],
    include: Iterable[str] | None = None,
    labels: Mapping[str, Iterable[str]] | None = None,
    destinations: Mapping[str, Iterable[str]] | None = None,
    external: bool = True,
    accepts_confidential: Iterable[str] = (),
    list_token: str | None = None,
    descriptions: Mapping[str, str] | None = None,
    roles: Mapping[str, Mapping[str, str]] | None = None,
) -> list[Tool]:
    """List an MCP server's tools once and declare them as scoped tools.

    Every declared tool needs a risk tier in ``risks`` (by the server's tool name): an
    MCP tool's risk is unknown until someone says it. ``include`` restricts the
    declaration to those names, so a server's other tools can be left out rather than
    given a made-up tier. ``labels``, ``destinations`` and ``roles`` (``{argument:
    role}``, as for ``@scopegraph.tool``) are per tool name;
    ``accepts_confidential`` names the tools that may receive confidential data. Tools
    keep the server's names, since a grant's audience (``tool:<name>``) is what the
    server checks. ``list_token`` is sent as the bearer token for the listing only, for
    servers that guard their catalogue; without it the listing carries no credential.
    ``descriptions`` replaces a server's tool descriptions with your own. A description
    reaches the planner, which fixes the run's scope, so a server you do not control can
    use it to steer planning ("tool poisoning"): give your own for such servers.

    Raises:
        ToolError: the server cannot be listed; a tool has no declared or an unknown
            risk tier; a name in ``risks``, ``include``, ``labels``, ``destinations``,
            ``roles`` or ``accepts_confidential`` is not one of the server's tools; or a
            tool's name, schema or roles cannot be declared.
    """
    endpoint = _endpoint(endpoint)
    listed = {t.name: t for t in await _list(endpoint, list_token)}
    wanted = list(listed) if include is None else list(dict.fromkeys(include))
    labels, destinations, descriptions = labels or {}, destinations or {}, descriptions or {}
    roles = roles or {}
    confidential = set(accepts_confidential)
    for what, names in (("include", wanted), ("risks", risks), ("labels", labels),
                        ("destinations", destinations), ("accepts_confidential", confidential),
                        ("descriptions", descriptions), ("roles", roles)):
        unknown = sorted(set(names) - set(listed))
        if unknown:
            raise ToolError(f"MCP server {endpoint.url!r} offers no tool {unknown[0]!r} (named in {what})")
    undeclared = [name for name in wanted if name not in risks]
    if undeclared:
        raise ToolError(f"MCP tool {undeclared[0]!r} has no declared risk tier: add it to risks= "
                        "or leave it out with include=")
    return [
        mcp_tool(endpoint, listed[name], risk=risks[name], labels=labels.get(name, ()), external=external,
                 destinations=destinations.get(name, ()), accepts_confidential=name in confidential,
                 description=descriptions.get(name), roles=roles.get(name))
        for name in wanted
    ]


def mcp_tool(
    endpoint: MCPEndpoint | str,
    listed: ListedTool,
    *,
    risk: Risk | str,
    labels: Iterable[str] = (),
    external: bool = True,
    destinations: Iterable[str] = (),
    accepts_confidential: bool = False,
    description: str | None = None,
    roles: Mapping[str, str] | None = None,
) -> Tool:
    """Declare one tool from a server's listing (``mcp_types.Tool``) without connecting.

    ``description`` replaces the server's (see ``mcp_tools_async`` on tool poisoning);
    ``roles`` maps its arguments to roles as for ``@scopegraph.tool``.

    Raises:
        ToolError: unknown risk tier, unusable name or schema, or a destination or role
            that is not one of the tool's arguments.
    """
    endpoint = _endpoint(endpoint)
    name = listed.name
    required = frozenset(listed.input_schema.get("required") or ())
    # A read can be retried after a lost answer; anything else may already have happened.
    retry_unanswered = risk == Risk.READ

    async def call(arguments: dict[str, Any], grant_token: str | None) -> Any:
        if not grant_token:
            raise ToolExecutionError(f"no grant to present to the MCP server for tool {name!r}")
        # Validation fills absent optional arguments with None; the server's own schema
        # may not accept null, and absent means the same to it.
        sent = {k: v for k, v in arguments.items() if v is not None or k in required}
        statuses: list[int] = []
        try:
            with anyio.fail_after(endpoint.timeout):
                async with _session(endpoint, grant_token, statuses) as client:
                    result = await client.call_tool(name, sent, read_timeout_seconds=endpoint.timeout)
        except Exception as exc:
            raise _call_failure(exc, endpoint, name, statuses, retry_unanswered) from None
        return _result_value(name, result)

    return Tool.from_schema(
        name=name, description=listed.description or "" if description is None else description,
        parameters=listed.input_schema, fn=call, risk=risk,
        labels=labels, external=external, destinations=destinations,
        accepts_confidential=accepts_confidential, takes_grant=True, roles=roles,
    )


def _endpoint(endpoint: MCPEndpoint | str) -> MCPEndpoint:
    return endpoint if isinstance(endpoint, MCPEndpoint) else MCPEndpoint(url=endpoint)


@asynccontextmanager
async def _session(endpoint: MCPEndpoint, token: str | None, statuses: list[int]) -> AsyncIterator[Client]:
    """A client session whose every HTTP request carries ``token`` (if any) as the bearer."""

    async def record(response: httpx2.Response) -> None:
        statuses.append(response.status_code)

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=endpoint.timeout, event_hooks={"response": [record]}) as http,
        Client(streamable_http_client(endpoint.url, http_client=http), cache=None,
               read_timeout_seconds=endpoint.timeout) as client,
    ):
        yield client


async def _list(endpoint: MCPEndpoint, token: str | None) -> list[ListedTool]:
    statuses: list[int] = []
    tools: list[ListedTool] = []
    try:
        with anyio.fail_after(endpoint.timeout):
            async with _session(endpoint, token, statuses) as client:
                cursor: str | None = None
                for _ in range(_MAX_LIST_PAGES):
                    page = await client.list_tools(cursor=cursor)
                    tools.extend(page.tools)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
    except Exception as exc:
        if token is None and any(s in (401, 403) for s in statuses):
            raise ToolError(f"MCP server {endpoint.url!r} wants a credential to list its tools: "
                            "pass list_token=") from None
        failure = _call_failure(exc, endpoint, None, statuses, retry_unanswered=False)
        raise ToolError(f"cannot list tools: {failure}") from None
    return tools


def _result_value(name: str, result: CallToolResult) -> Any:
    """Structured content if the server sent it; else the text; else the content blocks."""
    if result.is_error:
        raise ToolExecutionError(f"MCP tool {name!r} reported an error: {_one_line(_text(result)) or 'no detail'}")
    if result.structured_content is not None:
        return result.structured_content
    if not result.content:
        return None
    if all(isinstance(block, TextContent) for block in result.content):
        return _text(result)
    return [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]


def _text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def _call_failure(exc: BaseException, endpoint: MCPEndpoint, name: str | None, statuses: Sequence[int],
                  retry_unanswered: bool) -> ToolExecutionError:
    """Map what the MCP SDK and httpx2 raised (often inside exception groups) to one error."""
    what = f"tool {name!r} on MCP server {endpoint.url!r}" if name else f"MCP server {endpoint.url!r}"
    refused = [s for s in statuses if s in (401, 403)]
    if refused:
        return ToolExecutionError(f"{what} refused the credential presented (HTTP {refused[0]})")
    leaves = list(_leaves(exc))
    if any(isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)) for e in leaves):
        return TransientToolError(f"{what} is unreachable")
    unavailable = [s for s in statuses if s in (502, 503, 504)]
    unanswered = unavailable or any(isinstance(e, (httpx2.TransportError, TimeoutError)) for e in leaves)
    if unanswered:
        detail = f"HTTP {unavailable[0]}" if unavailable else type(next(
            e for e in leaves if isinstance(e, (httpx2.TransportError, TimeoutError)))).__name__
        if retry_unanswered:
            return TransientToolError(f"{what} did not answer ({detail})")
        return ToolExecutionError(f"{what} did not answer ({detail}); the call may have taken effect, "
                                  "so it is not retried")
    protocol = next((e for e in leaves if isinstance(e, MCPError)), None)
    if protocol is not None:
        status = next((f" (HTTP {s})" for s in statuses if s >= 400), "")
        return ToolExecutionError(f"{what} answered with a protocol error{status}: "
                                  f"{_one_line(protocol.error.message)}")
    return ToolExecutionError(f"calling {what} failed: {type(leaves[0]).__name__}")


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_MESSAGE else flat[: _MAX_MESSAGE - 1] + "…"


# server side ---------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GrantClaims:
    """What a verified grant says: who (``subject``), which tool, which step, until when."""

    jti: str
    subject: SpiffeId
    tool: str
    audience: str
    issuer: str
    run_id: str
    step_id: str
    workflow: str
    issued_at: float
    not_before: float
    expires_at: float
    constraints: Mapping[str, Any] = field(repr=False)
    act: Mapping[str, Any] = field(repr=False)

    def check_arguments(self, arguments: Mapping[str, Any]) -> None:
        """Check call arguments against the grant's argument constraints, as the gateway did.

        A server that checks again does not have to trust that every caller went through
        a gateway.

        Raises:
            GrantScopeError: an argument is not in the grant's scope or lies outside it.
        """
        for arg, value in arguments.items():
            constraint = self.constraints.get(arg)
            if constraint is None:
                raise GrantScopeError(f"argument {arg!r} of tool {self.tool!r} is not in the grant's scope")
            if not constraint.allows(value):
                raise GrantScopeError(f"argument {arg!r} is outside the grant's scope: it must be "
                                      f"{constraint.describe()}")


class GrantVerifier:
    """Verifies scopegraph grants presented to a tool server, offline, against a JWKS.

    ``jwks`` is the trust domain's key set (``Bundle.jwks()``, or ``scopegraph bundle
    --jwks``); ``issuer`` defaults to ``spiffe://<trust_domain>`` from it. ``tools``
    limits which audiences ``verify_token`` admits at the HTTP layer (default: any
    ``tool:`` audience; the per-tool check is ``verify`` or ``require_grant``). The clock
    judges lifetime, so tests can fix time. Tokens are never logged or put in errors.
    """

    def __init__(self, jwks: Mapping[str, Any], *, issuer: str | None = None, clock: Clock | None = None,
                 tools: Iterable[str] | None = None) -> None:
        try:
            self._keys = jwt.PyJWKSet.from_dict(dict(jwks))
        except (jwt.PyJWTError, TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"the JWKS is not usable: {type(exc).__name__}") from None
        domain = jwks.get("trust_domain")
        if issuer is None and not isinstance(domain, str):
            raise ConfigError("the JWKS names no trust_domain: pass issuer= explicitly")
        self.issuer = issuer or f"spiffe://{domain}"
        self.clock = clock or SystemClock()
        self.tools = None if tools is None else frozenset(tools)

    def __repr__(self) -> str:
        return f"GrantVerifier(issuer={self.issuer!r})"

    def verify(self, token: str, *, tool: str) -> GrantClaims:
        """Verify ``token`` as a grant for ``tool``: signature, issuer, audience, lifetime.

        Raises:
            GrantError: malformed, forged, from another issuer, for another tool, or not valid yet.
            GrantExpiredError: expired (beyond the allowed clock skew).
        """
        claims = self._verified(token)
        if claims.audience != audience_for(tool):
            raise GrantError(f"grant is not for tool {tool!r}")
        return claims

    def verify_headers(self, headers: Mapping[str, str] | None, *, tool: str) -> GrantClaims:
        """Verify the bearer token in HTTP ``headers`` (e.g. an MCP tool's ``ctx.headers``) for ``tool``.

        Raises:
            GrantError: no bearer token, or it does not verify for ``tool``.
        """
        value = next((v for k, v in (headers or {}).items() if k.lower() == "authorization"), "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GrantError(f"no grant presented for tool {tool!r}")
        return self.verify(token.strip(), tool=tool)

    async def verify_token(self, token: str) -> AccessToken | None:
        """The MCP SDK's ``TokenVerifier``: admit any valid grant for one of this server's tools.

        Which tool a request calls is not known at the HTTP layer; ``require_grant`` checks
        that inside the tool.
        """
        try:
            claims = self._verified(token)
        except GrantError:
            return None
        if self.tools is not None and claims.tool not in self.tools:
            return None
        return _GrantAccessToken(token=token, client_id=str(claims.subject), scopes=[], subject=str(claims.subject),
                                 resource=claims.audience, grant=claims)

    def _verified(self, token: str) -> GrantClaims:
        if not isinstance(token, str) or not token:
            raise GrantError("no grant presented")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = self._keys[kid] if isinstance(kid, str) else None
        except jwt.PyJWTError:
            raise GrantError("grant is malformed") from None
        except KeyError:
            key = None
        if key is None:
            raise GrantError("grant is signed by a key this server does not trust")
        try:
            raw = jwt.decode(
                token, key.key, algorithms=["EdDSA"], issuer=self.issuer,
                # Audience is checked by the caller (per tool); time against our clock below.
                options={"require": ["exp", "iat", "nbf", "sub", "jti", "aud", "iss"], "verify_aud": False,
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise GrantError("grant signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise GrantError(f"grant was not issued by {self.issuer!r}") from None
        except jwt.PyJWTError as exc:
            raise GrantError(f"grant is malformed: {type(exc).__name__}") from None
        try:
            scope = raw["scope"]
            claims = GrantClaims(
                jti=_text_claim(raw, "jti"), subject=SpiffeId.parse(raw["sub"]), tool=_text_claim(scope, "tool"),
                audience=_text_claim(raw, "aud"), issuer=raw["iss"], run_id=_text_claim(raw, "run"),
                step_id=_text_claim(raw, "step"), workflow=_text_claim(raw, "wf"),
                issued_at=float(raw["iat"]), not_before=float(raw["nbf"]), expires_at=float(raw["exp"]),
                constraints=_CONSTRAINTS.validate_python(scope["constraints"]), act=dict(raw["act"]),
            )
        except (KeyError, TypeError, ValueError, ValidationError, IdentityError) as exc:
            raise GrantError(f"grant {raw.get('jti')!r} has malformed claims: {type(exc).__name__}") from None
        now = self.clock.now()
        if now > claims.expires_at + CLOCK_SKEW_SECONDS:
            raise GrantExpiredError(f"grant {claims.jti!r} expired")
        if now + CLOCK_SKEW_SECONDS < claims.not_before:
            raise GrantError(f"grant {claims.jti!r} is not valid yet")
        if claims.audience != audience_for(claims.tool):
            raise GrantError(f"grant {claims.jti!r} names tool {claims.tool!r} but another audience")
        return claims


def _text_claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims[name]
    if not isinstance(value, str):
        raise TypeError(f"claim {name!r} is not a string")
    return value


class _GrantAccessToken(AccessToken):
    """The SDK's access token, carrying the verified grant (so ``require_grant`` knows its origin)."""

    grant: GrantClaims

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def __repr__(self) -> str:  # the SDK's model would print the token
        return f"_GrantAccessToken(jti={self.grant.jti!r}, tool={self.grant.tool!r})"

    __str__ = __repr__


def require_grant(tool: str) -> GrantClaims:
    """Inside an MCP tool on a server whose token verifier is a ``GrantVerifier``: the
    request's verified grant, which must be for ``tool``.

    Raises:
        GrantError: the request carries no verified grant, or a grant for another tool.
    """
    access = get_access_token()
    if not isinstance(access, _GrantAccessToken):
        raise GrantError(f"no verified grant for tool {tool!r}: is the server's token verifier a GrantVerifier?")
    if access.grant.audience != audience_for(tool):
        raise GrantError(f"grant is not for tool {tool!r}")
    return access.grant
