"""Token exchange (RFC 8693) and introspection (RFC 7662) over real HTTP: uvicorn on 127.0.0.1,
httpx as the client, and a small downstream service that verifies and introspects tokens."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.routing import Mount

from scopegraph import Runtime, Tool, Workflow
from scopegraph.agents import DirectExecutor, ScriptedPlanner
from scopegraph.brokers.tokens import (
    GRANT_TOKEN_TYPE,
    TOKEN_EXCHANGE_GRANT,
    IntrospectionClient,
    TokenService,
)
from scopegraph.clock import SystemClock
from scopegraph.store import Store, open_store
from scopegraph.web import create_app, token_routes
from tests.contract.conftest import closed_port
from tests.helpers import mint_grant

from .http import downstream_service, serving

AUDIENCE = "https://billing.example"
SECRET = "billing-client-secret-0c9f"
TRUST_DOMAIN = "scopegraph.local"


def fetch_invoices_tool(auth: list[str], billing: list[str], seen: list[dict[str, Any]]) -> Tool:
    """A tool that holds its step's grant (like an MCP client) and reaches the billing API with
    a token exchanged for it; ``auth`` and ``billing`` hold the servers' URLs once they run."""

    def fetch(arguments: dict[str, Any], grant_token: str | None) -> dict[str, Any]:
        with httpx.Client() as client:
            answer = client.post(f"{auth[0]}/oauth/token", data={
                "grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": grant_token,
                "subject_token_type": GRANT_TOKEN_TYPE, "audience": AUDIENCE})
            answer.raise_for_status()
            token = answer.json()["access_token"]
            got = client.get(f"{billing[0]}/invoices", headers={"authorization": f"Bearer {token}"})
        seen.append({"token": token, "exchange": answer.json(), "status": got.status_code, "body": got.json()})
        got.raise_for_status()
        return {"customer": got.json()["customer"]}

    return Tool.from_schema(name="fetch_invoices", description="Fetch a customer's invoices from billing.",
                            parameters={"type": "object", "properties": {"customer": {"type": "string"}},
                                        "required": ["customer"]},
                            fn=fetch, risk="read", takes_grant=True)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """The token server's own store object on the runtime's data (as another process would open it)."""
    s = open_store(store_url)
    yield s
    s.close()


@pytest.fixture
def runtime(make_runtime: Callable[..., Runtime], make_workflow: Callable[..., Workflow]) -> Runtime:
    return make_runtime(make_workflow(), clock=SystemClock())


def service(store: Store, **kw: Any) -> TokenService:
    kw.setdefault("audiences", {AUDIENCE: ["fetch_invoices", "lookup"]})
    kw.setdefault("clients", [IntrospectionClient.with_secret("billing", SECRET, [AUDIENCE, "tool:lookup"])])
    return TokenService(store, **kw)


def exchange(url: str, grant_token: str, **overrides: Any) -> httpx.Response:
    data = {"grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": grant_token,
            "subject_token_type": GRANT_TOKEN_TYPE, "audience": AUDIENCE, **overrides}
    return httpx.post(f"{url}/oauth/token", data={k: v for k, v in data.items() if v is not None})


def introspect(url: str, token: str, auth: Any = ("billing", SECRET), **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/oauth/introspect", data={"token": token, **kw}, auth=auth)


def test_a_tool_exchanges_its_grant_and_the_downstream_service_sees_the_revocation_at_once(
        store: Store, make_runtime: Callable[..., Runtime]) -> None:
    auth: list[str] = []
    billing: list[str] = []
    seen: list[dict[str, Any]] = []
    plan = {"steps": [{"id": "invoices", "tool": "fetch_invoices", "purpose": "fetch c-1's invoices",
                       "constraints": {"customer": {"kind": "exact", "value": "c-1"}}}]}
    workflow = Workflow(name="billing", tools=[fetch_invoices_tool(auth, billing, seen)],
                        planner=ScriptedPlanner(plan), executor=DirectExecutor())
    rt = make_runtime(workflow, clock=SystemClock())
    with serving(create_app(token_routes(service(store)))) as auth_url:
        auth.append(auth_url)
        with serving(downstream_service(auth_url=auth_url, audience=AUDIENCE, client_id="billing",
                                        client_secret=SECRET, trust_domain=TRUST_DOMAIN)) as billing_url:
            billing.append(billing_url)
            report = rt.run("fetch c-1's invoices", initiator="alice")
            assert report.status == "completed", report.summary()
            (call,) = seen
            # What the downstream service saw: the step's identity, its pinned customer, the chain.
            planner = f"spiffe://{TRUST_DOMAIN}/wf/billing/run/{report.run_id}/planner"
            assert call["body"] == {"customer": "c-1", "uses": 1, "act": {"sub": planner, "act": {"sub": "user:alice"}},
                                    "sub": report.steps[0].spiffe_id}
            assert call["exchange"]["token_type"] == "Bearer" and call["exchange"]["scope"] == "tool:fetch_invoices"
            assert 0 < call["exchange"]["expires_in"] <= 60
            # The step is over, its grant revoked: the token is dead everywhere at once.
            again = httpx.get(f"{billing_url}/invoices", headers={"authorization": f"Bearer {call['token']}"})
            assert again.status_code == 401 and again.json() == {"error": "token is not active"}
            assert introspect(auth_url, call["token"]).json() == {"active": False}
    (record,) = [r for r in rt.ledger.records(report.run_id) if r["kind"] == "token_exchanged"]
    claims = jwt.decode(call["token"], options={"verify_signature": False})
    assert (record["handle"], record["audience"], record["grant_id"]) == (claims["jti"], AUDIENCE,
                                                                          report.steps[0].grant_id)
    assert call["token"] not in json.dumps(rt.ledger.records())
    # The run's end revoked the token's record too (the report counts it as ended, not live).
    (token_record,) = rt.store.secrets_for_run(report.run_id)  # type: ignore[attr-defined]
    assert (token_record.handle, token_record.state, token_record.revoke_reason, token_record.uses) == (
        claims["jti"], "revoked", "run completed", 1)
    assert [r["handle"] for r in rt.ledger.records(report.run_id) if r["kind"] == "secret_revoked"] == [claims["jti"]]


def test_introspection_counts_uses_and_a_token_dies_after_its_last(store: Store, runtime: Runtime) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    with serving(create_app(token_routes(service(store, max_uses=2)))) as url:
        token = exchange(url, grant.danger_token(), audience=AUDIENCE).json()["access_token"]
        answers = [introspect(url, token).json() for _ in range(3)]
    assert [a["active"] for a in answers] == [True, True, False]
    assert [(a["uses"], a["max_uses"]) for a in answers[:2]] == [(1, 2), (2, 2)]
    first = answers[0]
    assert (first["aud"], first["sub"], first["scope"], first["jti"]) == (
        AUDIENCE, str(grant.subject), "tool:lookup", jwt.decode(token, options={"verify_signature": False})["jti"])
    assert first["act"] == dict(grant.act) and first["scopegraph"]["grant"] == grant.jti
    assert answers[2] == {"active": False}


def test_the_exchanged_token_is_for_one_audience_with_the_steps_scope_and_never_outlives_its_grant(
        store: Store, runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "lookup", constraints={"key": {"kind": "exact", "value": "alpha"},
                                                            "limit": {"kind": "range", "min": 1, "max": 5}})
    with serving(create_app(token_routes(service(store, ttl=900)))) as url:
        body = exchange(url, grant.danger_token()).json()
        jwks = httpx.get(f"{url}/.well-known/jwks.json", params={"trust_domain": TRUST_DOMAIN}).json()
    token = body["access_token"]
    key = jwt.PyJWKSet.from_dict(jwks).keys[0].key
    claims = jwt.decode(token, key, algorithms=["EdDSA"], audience=AUDIENCE)
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert claims["exp"] == grant.expires_at  # asked for 900 s; the grant ends first
    assert (claims["sub"], claims["scope"], claims["act"]) == (str(grant.subject), "tool:lookup", dict(grant.act))
    assert claims["scopegraph"]["constraints"]["key"] == {"kind": "exact", "value": "alpha"}
    # Presented to the gateway as if it were a grant, it is refused.
    result = runtime.gateway.call(token, "lookup", {"key": "alpha", "limit": 2}, ctx)
    assert result.status == "denied" and result.decision.policy_ids == ("scopegraph:grant",)


def test_exchange_refuses_what_it_must_with_oauth_errors_and_never_echoes_a_token(
        store: Store, runtime: Runtime) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    revoked, _ = mint_grant(runtime, "lookup", step_id="s2")
    runtime.issuer.revoke(revoked.jti, reason="step ended")
    other_tool, _ = mint_grant(runtime, "read_doc", step_id="s3")
    forged = jwt.encode(jwt.decode(grant.danger_token(), options={"verify_signature": False}),
                        Ed25519PrivateKey.generate(), algorithm="EdDSA")
    with serving(create_app(token_routes(service(store)))) as url:
        cases = {
            "revoked": exchange(url, revoked.danger_token()),
            "forged": exchange(url, forged),
            "garbage": exchange(url, "not-a-token"),
            "unregistered audience": exchange(url, grant.danger_token(), audience="https://elsewhere"),
            "our own audience": exchange(url, grant.danger_token(), audience="tool:lookup"),
            "tool not allowed": exchange(url, other_tool.danger_token()),
            "wider scope": exchange(url, grant.danger_token(), scope="tool:lookup tool:send_mail"),
            "grant type": exchange(url, grant.danger_token(), grant_type="client_credentials"),
            "token type": exchange(url, grant.danger_token(), subject_token_type="urn:x:saml"),
            "no audience": exchange(url, grant.danger_token(), audience=None),
            "resource": exchange(url, grant.danger_token(), resource="https://billing.example/x"),
            "twice": httpx.post(f"{url}/oauth/token", content=(
                f"grant_type={TOKEN_EXCHANGE_GRANT}&subject_token_type={GRANT_TOKEN_TYPE}"
                f"&subject_token={grant.danger_token()}&audience=a&audience={AUDIENCE}"),
                headers={"content-type": "application/x-www-form-urlencoded"}),
            "json body": httpx.post(f"{url}/oauth/token", json={"grant_type": TOKEN_EXCHANGE_GRANT}),
        }
        ok = exchange(url, grant.danger_token())
    expected = {"revoked": "invalid_grant", "forged": "invalid_grant", "garbage": "invalid_grant",
                "unregistered audience": "invalid_target", "our own audience": "invalid_target",
                "tool not allowed": "invalid_target", "wider scope": "invalid_scope",
                "grant type": "unsupported_grant_type", "token type": "invalid_request",
                "no audience": "invalid_request", "resource": "invalid_target", "twice": "invalid_request",
                "json body": "invalid_request"}
    assert {k: (r.status_code, r.json()["error"]) for k, r in cases.items()} == {
        k: (400, v) for k, v in expected.items()}
    assert "is revoked" in cases["revoked"].json()["error_description"]
    for r in cases.values():
        assert r.headers["cache-control"] == "no-store"
        assert grant.danger_token() not in r.text and revoked.danger_token() not in r.text
    assert ok.status_code == 200 and ok.headers["cache-control"] == "no-store"


def test_introspection_needs_an_authenticated_client_and_shows_it_only_its_audiences(
        store: Store, runtime: Runtime) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    clients = [IntrospectionClient.with_secret("billing", SECRET, [AUDIENCE]),
               IntrospectionClient.with_secret("crm", "crm-secret", ["https://crm.example"])]
    with serving(create_app(token_routes(service(store, clients=clients)))) as url:
        token = exchange(url, grant.danger_token()).json()["access_token"]
        nobody = httpx.post(f"{url}/oauth/introspect", data={"token": token})
        wrong = introspect(url, token, auth=("billing", "guess"))
        unknown = introspect(url, token, auth=("mallory", SECRET))
        other = introspect(url, token, auth=("crm", "crm-secret"))
        post = httpx.post(f"{url}/oauth/introspect",
                          data={"token": token, "client_id": "billing", "client_secret": SECRET})
        basic = introspect(url, token)
        garbage = introspect(url, "eyJhbGciOi.nonsense.x")
        bad_header = httpx.post(f"{url}/oauth/introspect", data={"token": token},
                                headers={"authorization": "Basic " + base64.b64encode(b"no-colon").decode()})
    for r in (nobody, wrong, unknown, bad_header):
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
        assert r.headers["www-authenticate"] == 'Basic realm="scopegraph"'
    assert other.json() == {"active": False}  # another resource server's token: not its to know
    assert post.json()["active"] is True and basic.json()["active"] is True
    assert garbage.json() == {"active": False}


def test_an_mcp_server_introspecting_a_step_grant_sees_its_revocation_at_once(store: Store, runtime: Runtime) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    with serving(create_app(token_routes(service(store)))) as url:
        live = introspect(url, grant.danger_token()).json()
        runtime.issuer.revoke(grant.jti, reason="step ended")
        dead = introspect(url, grant.danger_token()).json()
    assert live["active"] is True and (live["aud"], live["sub"], live["uses"], live["max_uses"]) == (
        "tool:lookup", str(grant.subject), 0, grant.max_uses)
    assert dead == {"active": False}


def test_the_app_mounts_inside_another_asgi_app(store: Store, runtime: Runtime) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    host = Starlette(routes=[Mount("/auth", app=create_app(token_routes(service(store))))])
    with serving(host) as url:
        meta = httpx.get(f"{url}/auth/.well-known/oauth-authorization-server").json()
        assert meta["token_endpoint"] == f"{url}/auth/oauth/token"
        assert meta["introspection_endpoint"] == f"{url}/auth/oauth/introspect"
        answer = exchange(f"{url}/auth", grant.danger_token())
        assert httpx.get(f"{url}/auth/healthz").json() == {"ok": True}
    assert answer.status_code == 200 and answer.json()["issued_token_type"].endswith(":access_token")


def test_scopegraph_serve_serves_exchange_and_introspection(store_url: str, runtime: Runtime) -> None:
    grant, _ = mint_grant(runtime, "lookup")
    port = closed_port()
    env = {**os.environ, "SCOPEGRAPH_CLIENT_SECRET_BILLING_API": SECRET, "OTEL_SDK_DISABLED": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "scopegraph.cli", "serve", "--store", store_url, "--port", str(port),
                             "--audience", f"{AUDIENCE}=lookup", "--client", f"billing-api={AUDIENCE}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "scopegraph serve did not answer"
                time.sleep(0.05)
        token = exchange(url, grant.danger_token()).json()["access_token"]
        assert introspect(url, token, auth=("billing-api", SECRET)).json()["active"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"serving token exchange and introspection on {url}" in err
    assert SECRET not in out + err and grant.danger_token() not in out + err


def test_scopegraph_serve_refuses_bad_options_and_a_missing_store(tmp_path: Path, store_url: str,
                                                                  runtime: Runtime) -> None:
    from scopegraph.cli import main

    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "scopegraph.cli", "serve", *args],
                              env={k: v for k, v in os.environ.items() if not k.startswith("SCOPEGRAPH_")},
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stderr

    code, err = run("--store", store_url, "--client", "crm=https://crm.example")
    assert code == 2 and "export SCOPEGRAPH_CLIENT_SECRET_CRM" in err
    code, err = run("--store", store_url, "--audience", "https://x")
    assert code == 2 and "AUDIENCE=TOOL" in err
    code, err = run("--store", store_url, "--audience", "tool:lookup=lookup")
    assert code == 2 and "cannot be registered" in err
    code, err = run("--store", f"sqlite:///{tmp_path / 'nothing' / 'here.db'}")
    assert code == 2 and "no store at" in err
    assert main(["serve", "--port", "not-a-port"]) == 2
