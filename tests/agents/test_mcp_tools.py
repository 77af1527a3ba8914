"""MCP tools become scoped tools; the step's grant is the bearer token (issue 5, point 6).

Real MCP servers (the ``mcp`` SDK's ``MCPServer`` over streamable HTTP, served by
uvicorn on 127.0.0.1) verify every grant they receive against the JWKS of the test's
trust domain. Two servers run for the module:

- *open*: listing needs no credential; each tool checks the request's bearer token
  itself (``GrantVerifier.verify_headers``) and the arguments against the grant;
- *guarded*: the SDK's bearer-token auth with ``GrantVerifier`` as its token verifier
  (401 for anything that is not a grant of the domain), and ``require_grant`` in the tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError as MCPToolError
from pydantic import AnyHttpUrl, BaseModel

from scopegraph import Risk, Runtime, Tool, Workflow
from scopegraph.agents.mcp_tools import (
    GrantClaims,
    GrantVerifier,
    ListedTool,
    MCPEndpoint,
    mcp_tool,
    mcp_tools,
    mcp_tools_async,
    require_grant,
)
from scopegraph.clock import FixedClock
from scopegraph.credentials import DEFAULT_TTL_SECONDS, Grant
from scopegraph.errors import ConfigError, GrantError, ToolError, ToolExecutionError
from scopegraph.gateway import GRANT_POLICY_ID, SCOPE_POLICY_ID, CallContext, CallResult, Gateway
from scopegraph.identity import Bundle
from scopegraph.keys import VerificationKey
from scopegraph.tools import ToolRegistry

from ..helpers import mint_grant

RISKS = {"lookup": "read", "write_note": "write", "broken": "read", "stall": "read"}


# the servers -------------------------------------------------------------------------------
@dataclass
class ToolServer:
    """One running MCP server and what it saw. ``verifier`` is set per test (its trust domain)."""

    url: str = ""
    verifier: GrantVerifier | None = None
    requests: int = 0  # HTTP requests received, of any kind
    seen: list[GrantClaims] = field(default_factory=list)  # grants verified inside a tool
    stalls: int = 0  # calls of ``stall`` that started
    released: threading.Event = field(default_factory=threading.Event)  # lets ``stall`` calls finish

    def reset(self, verifier: GrantVerifier) -> None:
        self.released.set()
        self.verifier, self.requests, self.seen, self.stalls = verifier, 0, [], 0
        self.released = threading.Event()

    def grant_for(self, tool: str, ctx: Context | None, arguments: dict[str, Any]) -> GrantClaims:
        """Inside a tool: the request's grant, verified for ``tool`` and these arguments, or a tool error."""
        assert self.verifier is not None
        try:
            claims = require_grant(tool) if ctx is None else self.verifier.verify_headers(ctx.headers, tool=tool)
            claims.check_arguments(arguments)
        except GrantError as exc:
            raise MCPToolError(f"refused: {exc}") from None
        self.seen.append(claims)
        return claims


class LookupResult(BaseModel):
    key: str
    limit: int
    caller: str


def build_server(state: ToolServer, *, guarded: bool) -> Any:
    """An MCP server whose tools trust nothing but a verified grant for themselves."""

    class CurrentVerifier:
        """The SDK holds one token verifier for its life; each test brings its own trust domain."""

        async def verify_token(self, token: str) -> AccessToken | None:
            return await state.verifier.verify_token(token) if state.verifier is not None else None

    auth: dict[str, Any] = {}
    if guarded:
        auth = {"token_verifier": CurrentVerifier(),
                "auth": AuthSettings(issuer_url=AnyHttpUrl("http://127.0.0.1"),
                                                                  resource_server_url=None)}
    server = MCPServer("guarded" if guarded else "open", log_level="WARNING", **auth)

    @server.tool()
    def lookup(key: str, ctx: Context, limit: int = 10) -> LookupResult:
        """Look a key up."""
        claims = state.grant_for("lookup", None if guarded else ctx, {"key": key, "limit": limit})
        return LookupResult(key=key, limit=limit, caller=str(claims.subject))

    @server.tool()
    def write_note(title: str, amount: int, ctx: Context) -> str:
        """Write a note."""
        state.grant_for("write_note", None if guarded else ctx, {"title": title, "amount": amount})
        return f"noted {title}"

    @server.tool()
    def broken(key: str, ctx: Context) -> str:
        """Fails on the server's side."""
        state.grant_for("broken", None if guarded else ctx, {"key": key})
        raise MCPToolError("backend rejected the key")

    @server.tool()
    async def stall(key: str, ctx: Context) -> str:
        """Answers only once the test releases it (or after five seconds)."""
        state.grant_for("stall", None if guarded else ctx, {"key": key})
        state.stalls += 1
        released = state.released
        for _ in range(500):
            if released.is_set():
                break
            await anyio.sleep(0.01)
        return "late"

    app = server.streamable_http_app(stateless_http=not guarded, json_response=not guarded)

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            state.requests += 1
        await app(scope, receive, send)

    return counted


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; stop it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # No websockets, no log configuration: the test process keeps its own logging.
    server = uvicorn.Server(uvicorn.Config(app, ws="none", log_config=None, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"mcp-{port}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the MCP server did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the MCP server did not stop"


@dataclass
class Servers:
    open: ToolServer
    guarded: ToolServer
    tools: list[Tool]  # the open server's tools, listed once


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    open_state, guarded_state = ToolServer(), ToolServer()
    with serving(build_server(open_state, guarded=False)) as open_url, \
            serving(build_server(guarded_state, guarded=True)) as guarded_url:
        open_state.url, guarded_state.url = open_url, guarded_url
        yield Servers(open=open_state, guarded=guarded_state, tools=mcp_tools(open_url, risks=RISKS))


@pytest.fixture
def runtime(servers: Servers, make_workflow: Callable[..., Workflow],
            make_runtime: Callable[..., Runtime]) -> Runtime:
    return make_runtime(make_workflow(tools=servers.tools))


@pytest.fixture
def server(servers: Servers, runtime: Runtime, clock: FixedClock) -> ToolServer:
    """The open server, trusting this test's trust domain (by its JWKS) on this test's clock."""
    servers.open.reset(GrantVerifier(runtime.domain.bundle().jwks(), clock=clock))
    return servers.open


@pytest.fixture
def guarded(servers: Servers, runtime: Runtime, clock: FixedClock) -> ToolServer:
    servers.guarded.reset(GrantVerifier(runtime.domain.bundle().jwks(), clock=clock, tools=RISKS))
    return servers.guarded


def call(rt: Runtime, grant: Grant, tool_name: str, ctx: CallContext, **arguments: Any) -> CallResult:
    return rt.gateway.call(grant.danger_token(), tool_name, arguments, ctx)


def send_directly(tool: Tool, arguments: dict[str, Any], token: str) -> Any:
    """Present ``token`` to the server as the gateway would, but without the gateway."""
    return asyncio.run(tool.invoke(arguments, token))  # type: ignore[arg-type]


def forged(grant: Grant, runtime: Runtime, **changes: Any) -> str:
    """The grant's claims (changed as asked), signed by a key the trust domain never had."""
    claims = jwt.decode(grant.danger_token(), options={"verify_signature": False})
    return jwt.encode({**claims, **changes}, Ed25519PrivateKey.generate(), algorithm="EdDSA",
                      headers={"kid": runtime.domain.key.kid})


def by_name(tools: list[Tool]) -> dict[str, Tool]:
    return {t.name: t for t in tools}


LOOKUP_SCOPE = {"key": {"kind": "one_of", "values": ["alpha", "beta"]}, "limit": {"kind": "range", "min": 1, "max": 5}}


# declaration -------------------------------------------------------------------------------
def test_listing_declares_each_tool_with_its_tier_schema_and_untrusted_output(servers: Servers) -> None:
    tools = by_name(servers.tools)
    assert list(tools) == ["lookup", "write_note", "broken", "stall"]
    assert (tools["lookup"].risk, tools["write_note"].risk) == (Risk.READ, Risk.WRITE)
    assert all(t.labels == frozenset({"untrusted"}) and t.takes_grant and t.is_async for t in tools.values())
    assert tools["lookup"].argument_names() == ["key", "limit"]  # the server's Context is not an argument
    assert tools["lookup"].validate_arguments({"key": "alpha"}) == {"key": "alpha", "limit": 10}
    assert tools["lookup"].description == "Look a key up."


def test_an_mcp_tool_without_a_declared_risk_is_refused(servers: Servers) -> None:
    with pytest.raises(ToolError, match="MCP tool 'write_note' has no declared risk tier"):
        mcp_tools(servers.open.url, risks={"lookup": "read", "broken": "read", "stall": "read"})
    only = mcp_tools(servers.open.url, risks={"lookup": "read"}, include=["lookup"])
    assert [t.name for t in only] == ["lookup"]


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"risks": {**RISKS, "delete_all": "write"}}, "offers no tool 'delete_all' (named in risks)"),
    ({"risks": RISKS, "include": ["lookup", "nope"]}, "offers no tool 'nope' (named in include)"),
    ({"risks": {**RISKS, "lookup": "harmless"}}, "unknown risk tier 'harmless'"),
    ({"risks": RISKS, "destinations": {"write_note": ["recipient"]}},
     "declares destination 'recipient', which is not one of its arguments"),
])
def test_bad_declarations_are_refused_with_one_clear_line(servers: Servers, kwargs: dict[str, Any],
                                                          fragment: str) -> None:
    with pytest.raises(ToolError) as caught:
        mcp_tools(servers.open.url, **kwargs)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


def test_output_labels_can_be_declared(servers: Servers) -> None:
    tools = by_name(mcp_tools(servers.open.url, risks=RISKS, external=False, labels={"lookup": ["confidential"]},
                              destinations={"write_note": ["title"]}, accepts_confidential=["write_note"]))
    assert tools["lookup"].labels == frozenset({"confidential"})
    assert tools["broken"].labels == frozenset()
    assert tools["write_note"].destinations == frozenset({"title"}) and tools["write_note"].accepts_confidential


def test_your_own_descriptions_replace_the_servers_in_what_the_planner_sees(servers: Servers) -> None:
    # A description reaches the planner, which fixes the run's scope: for a server you do not
    # control, your words, not the server's, should describe its tools.
    tools = mcp_tools(servers.open.url, risks=RISKS, descriptions={"lookup": "Look a customer key up."})
    registry = ToolRegistry(tools)
    assert registry.catalogue_entry("lookup")["description"] == "Look a customer key up."
    assert registry.catalogue_entry("broken")["description"] == by_name(servers.tools)["broken"].description
    with pytest.raises(ToolError, match="offers no tool 'nope' \\(named in descriptions\\)"):
        mcp_tools(servers.open.url, risks=RISKS, descriptions={"nope": "x"})


def test_a_url_with_credentials_or_another_scheme_is_refused() -> None:
    with pytest.raises(ToolError, match="must not carry credentials"):
        MCPEndpoint(url="http://user:secret@127.0.0.1:1/mcp")
    with pytest.raises(ToolError, match="is not a usable http"):
        MCPEndpoint(url="file:///etc/passwd")


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0, -1])
def test_a_timeout_that_is_not_a_finite_positive_number_is_refused(timeout: float) -> None:
    with pytest.raises(ToolError, match="MCP timeout .* must be a finite number above 0"):
        MCPEndpoint(url="http://127.0.0.1:1/mcp", timeout=timeout)


# calls through the gateway -----------------------------------------------------------------
def test_a_call_presents_the_step_grant_and_the_server_verifies_it(runtime: Runtime, server: ToolServer) -> None:
    grant, ctx = mint_grant(runtime, "lookup", constraints=LOOKUP_SCOPE)
    result = call(runtime, grant, "lookup", ctx, key="alpha", limit=3)
    assert result.ok, result.reason
    assert result.value == {"key": "alpha", "limit": 3, "caller": str(ctx.principal)}
    assert result.labels == frozenset({"untrusted"})
    [seen] = server.seen
    assert seen.subject == ctx.principal and seen.subject.path.endswith("/step/s1/executor")
    assert seen.audience == "tool:lookup"
    assert (seen.jti, seen.run_id, seen.step_id) == (grant.jti, "run1", "s1")
    assert seen.issuer == runtime.domain.issuer


def test_a_call_outside_the_grant_never_reaches_the_server(runtime: Runtime, server: ToolServer) -> None:
    grant, ctx = mint_grant(runtime, "lookup", constraints=LOOKUP_SCOPE)
    for arguments in ({"key": "gamma", "limit": 3}, {"key": "alpha", "limit": 50}):
        result = runtime.gateway.call(grant.danger_token(), "lookup", arguments, ctx)
        assert result.status == "denied" and SCOPE_POLICY_ID in result.decision.policy_ids, result
    other, _ = mint_grant(runtime, "write_note")
    result = runtime.gateway.call(other.danger_token(), "lookup", {"key": "alpha"}, ctx)
    assert result.status == "denied" and GRANT_POLICY_ID in result.decision.policy_ids
    assert server.requests == 0 and server.seen == []


def test_a_write_tool_waits_for_approval_before_any_request(runtime: Runtime, server: ToolServer) -> None:
    grant, ctx = mint_grant(runtime, "write_note")
    result = call(runtime, grant, "write_note", ctx, title="t", amount=1)
    assert result.status == "needs_approval"
    assert server.requests == 0


def test_a_tool_error_on_the_server_is_a_tool_execution_error(runtime: Runtime, server: ToolServer) -> None:
    grant, ctx = mint_grant(runtime, "broken")
    result = call(runtime, grant, "broken", ctx, key="k")
    assert result.status == "error"
    assert result.error_type == "ToolExecutionError" and result.attempts == 1
    assert "MCP tool 'broken' reported an error:" in (result.error or "")
    assert "backend rejected the key" in (result.error or "")
    assert len(server.seen) == 1  # the grant verified; the tool itself failed
    assert grant.danger_token() not in (result.error or "")


def test_the_grant_never_reaches_a_log_on_either_side(runtime: Runtime, server: ToolServer,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    grant, ctx = mint_grant(runtime, "lookup")
    other, _ = mint_grant(runtime, "write_note")
    with caplog.at_level(logging.DEBUG):
        assert call(runtime, grant, "lookup", ctx, key="alpha", limit=1).ok
        with pytest.raises(ToolExecutionError):
            send_directly(runtime.workflow.registry["lookup"], {"key": "alpha", "limit": 1}, other.danger_token())
    assert any(r.name.startswith("mcp.server") for r in caplog.records), "the server logged nothing"
    for token in (grant.danger_token(), other.danger_token()):
        assert token not in caplog.text and token.split(".")[-1] not in caplog.text
    assert token not in repr(server.verifier) and token not in repr(server.seen)


# the server's side -------------------------------------------------------------------------
def test_a_forged_grant_sent_directly_is_refused(runtime: Runtime, server: ToolServer) -> None:
    grant, _ = mint_grant(runtime, "lookup", constraints=LOOKUP_SCOPE)
    lookup = runtime.workflow.registry["lookup"]
    refused = {
        "grant signature does not verify": forged(grant, runtime),
        "is not for tool 'lookup'": mint_grant(runtime, "write_note")[0].danger_token(),
        "outside the grant's scope": None,  # a genuine grant, arguments it does not allow
        "grant is malformed": "not-a-jwt",
    }
    for fragment, token in refused.items():
        arguments = {"key": "gamma", "limit": 1} if token is None else {"key": "alpha", "limit": 1}
        with pytest.raises(ToolExecutionError) as caught:
            send_directly(lookup, arguments, token or grant.danger_token())
        assert fragment in str(caught.value), str(caught.value)
        assert grant.danger_token() not in str(caught.value)
    assert server.seen == []
    assert send_directly(lookup, {"key": "alpha", "limit": 1}, grant.danger_token())["key"] == "alpha"


def test_the_server_judges_expiry_by_its_clock(runtime: Runtime, server: ToolServer, clock: FixedClock) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    clock.advance(DEFAULT_TTL_SECONDS + 60)
    lookup = runtime.workflow.registry["lookup"]
    with pytest.raises(ToolExecutionError, match="expired"):
        send_directly(lookup, {"key": "alpha", "limit": 1}, grant.danger_token())
    assert server.seen == []


def test_the_sdk_token_verifier_admits_only_grants_of_the_domain(runtime: Runtime, guarded: ToolServer) -> None:
    """Through the SDK's bearer auth: listing needs a credential; calls carry the step's grant."""
    with pytest.raises(ToolError, match="wants a credential to list its tools: pass list_token="):
        mcp_tools(guarded.url, risks=RISKS)
    list_grant, _ = mint_grant(runtime, "lookup", step_id="catalogue")
    tools = by_name(mcp_tools(guarded.url, risks=RISKS, list_token=list_grant.danger_token()))
    guarded.seen.clear()
    gateway = Gateway(tools=ToolRegistry(tools.values()), issuer=runtime.issuer, policy=runtime.policy,
                      store=runtime.store, clock=runtime.clock)
    grant, ctx = mint_grant(runtime, "lookup", constraints=LOOKUP_SCOPE)
    result = gateway.call(grant.danger_token(), "lookup", {"key": "beta", "limit": 2}, ctx)
    assert result.ok, result.reason
    assert result.value == {"key": "beta", "limit": 2, "caller": str(ctx.principal)}
    assert [c.audience for c in guarded.seen] == ["tool:lookup"]
    with pytest.raises(ToolExecutionError, match=r"refused the credential presented \(HTTP 401\)"):
        send_directly(tools["lookup"], {"key": "beta", "limit": 2}, forged(grant, runtime))
    # A genuine grant for another of the server's tools passes the HTTP layer, not the tool.
    other, _ = mint_grant(runtime, "write_note")
    with pytest.raises(ToolExecutionError, match="grant is not for tool 'lookup'"):
        send_directly(tools["lookup"], {"key": "beta", "limit": 2}, other.danger_token())
    assert len(guarded.seen) == 1


def test_the_verifier_trusts_only_its_keys_and_issuer(runtime: Runtime, clock: FixedClock) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    jwks = runtime.domain.bundle().jwks()
    assert GrantVerifier(jwks, clock=clock).verify(grant.danger_token(), tool="lookup").jti == grant.jti
    stranger = Bundle(trust_domain="other.test",
                      keys=(VerificationKey.of("grant", 1, Ed25519PrivateKey.generate().public_key()),))
    cases = {
        "signed by a key this server does not trust": GrantVerifier(stranger.jwks(), clock=clock),
        "was not issued by 'spiffe://other.test'": GrantVerifier(jwks, issuer="spiffe://other.test", clock=clock),
    }
    for fragment, verifier in cases.items():
        with pytest.raises(GrantError, match=fragment):
            verifier.verify(grant.danger_token(), tool="lookup")
        assert asyncio.run(verifier.verify_token(grant.danger_token())) is None
    with pytest.raises(GrantError, match="no grant presented for tool 'lookup'"):
        GrantVerifier(jwks, clock=clock).verify_headers({"Authorization": "Basic abc"}, tool="lookup")
    with pytest.raises(ConfigError, match="JWKS"):
        GrantVerifier({"keys": []})
    with pytest.raises(ConfigError, match="issuer="):
        GrantVerifier({k: v for k, v in jwks.items() if k != "trust_domain"})


def test_the_blocking_listing_refuses_a_running_loop(servers: Servers) -> None:
    async def inside() -> list[Tool]:
        with pytest.raises(ConfigError, match="await mcp_tools_async"):
            mcp_tools(servers.open.url, risks=RISKS)
        return await mcp_tools_async(servers.open.url, risks=RISKS, include=["lookup"])

    assert [t.name for t in asyncio.run(inside())] == ["lookup"]


# failures of the connection ----------------------------------------------------------------
def closed_port_url() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


def test_an_unreachable_server_is_retried_and_each_try_reauthorized(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime], sleeps: list[float],
) -> None:
    listed = ListedTool(name="lookup", input_schema={"type": "object", "properties": {"key": {"type": "string"}},
                                                     "required": ["key"]})
    dead = mcp_tool(MCPEndpoint(url=closed_port_url(), timeout=5), listed, risk="read")
    rt = make_runtime(make_workflow(tools=[dead]))
    grant, ctx = mint_grant(rt, "lookup")
    result = call(rt, grant, "lookup", ctx, key="alpha")
    assert result.status == "error"
    assert result.attempts == 3 and result.error_type == "TransientToolError after 3 attempts"
    assert "is unreachable" in (result.error or "")
    assert len(sleeps) == 2  # waits between tries, none of them real
    assert [(u.attempt, u.decision) for u in rt.store.uses_for_run("run1")] == [(1, "allow"), (2, "allow"),
                                                                               (3, "allow")]


def test_listing_an_unreachable_server_is_a_declaration_error() -> None:
    with pytest.raises(ToolError, match=r"cannot list tools: MCP server '.*' is unreachable"):
        mcp_tools(MCPEndpoint(url=closed_port_url(), timeout=5), risks=RISKS)


def test_an_unanswered_call_is_retried_only_for_a_read(
    servers: Servers, server: ToolServer, make_workflow: Callable[..., Workflow],
    make_runtime: Callable[..., Runtime], tmp_path: Path,
) -> None:
    """A read that got no answer is safe to try again; a write may have happened, so it is not."""
    listed = ListedTool(name="stall", input_schema={"type": "object", "properties": {"key": {"type": "string"}},
                                                    "required": ["key"]})
    # Long enough for the MCP handshake on a loaded machine, so every attempt reaches ``stall``.
    impatient = MCPEndpoint(url=server.url, timeout=0.6)
    allow_all = tmp_path / "allow.cedar"
    allow_all.write_text('@id("allow-all")\npermit (principal, action, resource);\n')
    for risk, attempts, error_type in (("read", 3, "TransientToolError after 3 attempts"),
                                       ("write", 1, "ToolExecutionError")):
        rt = make_runtime(make_workflow(tools=[mcp_tool(impatient, listed, risk=risk)], policies=[allow_all],
                                        baseline=False))
        server.reset(GrantVerifier(rt.domain.bundle().jwks(), clock=rt.clock))
        grant, ctx = mint_grant(rt, "stall", run_id=f"run-{risk}")
        result = call(rt, grant, "stall", ctx, key="k")
        server.released.set()
        assert (result.status, result.attempts, result.error_type) == ("error", attempts, error_type), result
        assert "did not answer" in (result.error or "")
        assert server.stalls == attempts
    assert "may have taken effect" in (result.error or "")
