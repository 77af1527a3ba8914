"""Grants: minted per step, short-lived, signed, counted and revocable (invariants 1, 2, 6)."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scopegraph import Runtime
from scopegraph.clock import FixedClock
from scopegraph.constraints import Exact, Prefix, Range
from scopegraph.credentials import (
    CLOCK_SKEW_SECONDS,
    DEFAULT_TTL_SECONDS,
    MAX_TTL_SECONDS,
    Grant,
    GrantIssuer,
)
from scopegraph.errors import (
    ConfigError,
    GrantError,
    GrantExhaustedError,
    GrantExpiredError,
    GrantRevokedError,
)
from scopegraph.identity import TrustDomain
from scopegraph.plan import Step
from scopegraph.store import SqliteStore

Mint = Callable[..., tuple[Grant, Any]]


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _claims(grant: Grant) -> dict[str, Any]:
    return jwt.decode(grant.danger_token(), options={"verify_signature": False})


# minting -----------------------------------------------------------------------------------
def test_grant_binds_one_identity_one_tool_one_step(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("read_doc", constraints={"path": {"kind": "prefix", "prefix": "/docs/"}},
                    run_id="run9", step_id="doc")
    claims = _claims(grant)
    assert claims["sub"] == "spiffe://scopegraph.local/wf/testwf/run/run9/step/doc/executor"
    assert claims["aud"] == "tool:read_doc"
    assert claims["iss"] == "spiffe://scopegraph.local"
    assert claims["run"] == "run9" and claims["step"] == "doc" and claims["wf"] == "testwf"
    assert claims["scope"] == {"tool": "read_doc", "max_uses": 3,
                               "constraints": {"path": {"kind": "prefix", "prefix": "/docs/"}}}
    assert claims["exp"] - claims["iat"] == DEFAULT_TTL_SECONDS
    # the delegation chain: the outermost act is the most recent delegator
    assert claims["act"]["sub"].endswith("/run/run9/planner")
    assert claims["act"]["act"] == {"sub": "user:tester"}
    assert claims["jti"] == grant.jti
    header = jwt.get_unverified_header(grant.danger_token())
    assert header["alg"] == "EdDSA" and header["kid"] == runtime.domain.key.kid


def test_every_grant_has_its_own_id(mint: Mint) -> None:
    ids = {mint("lookup")[0].jti for _ in range(20)}
    assert len(ids) == 20


def test_the_store_keeps_facts_not_tokens(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("lookup", run_id="facts")
    [record] = runtime.store.grants_for_run("facts")
    assert record.jti == grant.jti and record.tool == "lookup" and record.uses == 0
    assert record.expires_at - record.issued_at == DEFAULT_TTL_SECONDS
    assert grant.danger_token() not in repr(record)


@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL_SECONDS + 1, 86_400, math.nan, math.inf])
def test_ttl_has_an_upper_bound(runtime: Runtime, ttl: float) -> None:
    with pytest.raises(ConfigError, match="TTL"):
        GrantIssuer(runtime.domain, runtime.store, clock=runtime.clock, ttl=ttl)


@pytest.mark.parametrize("max_uses", [0, -3])
def test_max_uses_is_at_least_one(runtime: Runtime, max_uses: int) -> None:
    with pytest.raises(ConfigError, match="max_uses"):
        GrantIssuer(runtime.domain, runtime.store, clock=runtime.clock, max_uses=max_uses)


def test_ttl_at_the_bound_is_accepted_and_used(runtime: Runtime, clock: FixedClock, mint: Mint) -> None:
    issuer = GrantIssuer(runtime.domain, runtime.store, clock=clock, ttl=MAX_TTL_SECONDS)
    grant, _ = mint("lookup")
    long = issuer.mint(subject=grant.subject, tool="lookup", run_id="run1", step_id="s1",
                       workflow="testwf", constraints={}, act={})
    assert long.expires_at - long.issued_at == MAX_TTL_SECONDS


# verification --------------------------------------------------------------------------------
@pytest.fixture(params=["minting issuer", "fresh issuer"])
def verifier(request: pytest.FixtureRequest, runtime: Runtime) -> GrantIssuer:
    """The issuer that minted the grants, or a new one on the same domain (as another process)."""
    if request.param == "minting issuer":
        return runtime.issuer
    return GrantIssuer(runtime.domain, runtime.store, clock=runtime.clock)


def test_a_fresh_grant_verifies(verifier: GrantIssuer, mint: Mint) -> None:
    grant, _ = mint("read_doc", constraints={"path": {"kind": "prefix", "prefix": "/docs/"}})
    verified = verifier.verify(grant.danger_token(), tool="read_doc")
    assert verified.jti == grant.jti and verified.subject == grant.subject
    assert (verified.run_id, verified.step_id, verified.workflow) == ("run1", "s1", "testwf")
    assert verified.constraints["path"] == Prefix(prefix="/docs/")


def test_expiry_follows_the_fixed_clock_with_a_small_skew(verifier: GrantIssuer, clock: FixedClock,
                                                          mint: Mint) -> None:
    grant, _ = mint("lookup")
    clock.advance(DEFAULT_TTL_SECONDS + CLOCK_SKEW_SECONDS)  # exactly at the edge: still valid
    verifier.verify(grant.danger_token(), tool="lookup")
    clock.advance(0.001)
    with pytest.raises(GrantExpiredError, match=grant.jti):
        verifier.verify(grant.danger_token(), tool="lookup")


def test_a_grant_from_the_future_is_not_valid_yet(verifier: GrantIssuer, clock: FixedClock, mint: Mint) -> None:
    grant, _ = mint("lookup")
    clock.advance(-(CLOCK_SKEW_SECONDS + 1))
    with pytest.raises(GrantError, match="not valid yet"):
        verifier.verify(grant.danger_token(), tool="lookup")


def test_wrong_audience_is_refused(verifier: GrantIssuer, mint: Mint) -> None:
    grant, _ = mint("lookup")
    with pytest.raises(GrantError, match="not for tool 'send_mail'"):
        verifier.verify(grant.danger_token(), tool="send_mail")


def test_forged_signature_is_refused(runtime: Runtime, mint: Mint, tmp_path: Path) -> None:
    """An attacker with their own key for the same trust domain name cannot mint grants."""
    grant, _ = mint("lookup")
    attacker_store = SqliteStore(tmp_path / "attacker.db")
    try:
        attacker = TrustDomain(runtime.domain.name, attacker_store)
        forged = attacker.sign(_claims(grant) | {"jti": "forged"})
    finally:
        attacker_store.close()
    with pytest.raises(GrantError, match="signature does not verify"):
        runtime.issuer.verify(forged, tool="lookup")


def test_tampered_claims_are_refused(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("read_doc", constraints={"path": {"kind": "prefix", "prefix": "/docs/"}})
    header, _, signature = grant.danger_token().split(".")
    widened = _claims(grant)
    widened["scope"]["constraints"]["path"] = {"kind": "any"}
    widened["scope"]["max_uses"] = 1000
    with pytest.raises(GrantError, match="signature does not verify"):
        runtime.issuer.verify(f"{header}.{_b64(widened)}.{signature}", tool="read_doc")


@pytest.mark.parametrize("algorithm", ["none", "HS256"])
def test_algorithm_confusion_is_refused(runtime: Runtime, mint: Mint, algorithm: str) -> None:
    grant, _ = mint("lookup")
    claims = _claims(grant)
    if algorithm == "none":
        token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    else:  # sign with the *public* key bytes as an HMAC secret
        secret = runtime.domain.key.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        token = jwt.encode(claims, secret, algorithm="HS256")
    with pytest.raises(GrantError):
        runtime.issuer.verify(token, tool="lookup")


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "eyJ.eyJ.sig", None])
def test_malformed_tokens_are_refused(runtime: Runtime, token: Any) -> None:
    with pytest.raises(GrantError):
        runtime.issuer.verify(token, tool="lookup")


def test_a_grant_of_another_trust_domain_is_refused(runtime: Runtime, mint: Mint, tmp_path: Path) -> None:
    grant, _ = mint("lookup")
    other_store = SqliteStore(tmp_path / "other.db")
    try:
        other = GrantIssuer(TrustDomain("other.example", other_store), other_store, clock=runtime.clock)
        with pytest.raises(GrantError):
            other.verify(grant.danger_token(), tool="lookup")
    finally:
        other_store.close()


# uses and revocation ---------------------------------------------------------------------------
def test_max_uses_is_enforced(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("lookup")
    for _ in range(grant.max_uses):
        runtime.issuer.consume_use(grant)
    with pytest.raises(GrantExhaustedError, match="no uses left"):
        runtime.issuer.consume_use(grant)
    [record] = [g for g in runtime.store.grants_for_run("run1") if g.jti == grant.jti]
    assert record.uses == grant.max_uses


def test_revoked_grant_cannot_be_used(runtime: Runtime, clock: FixedClock, mint: Mint) -> None:
    grant, _ = mint("lookup")
    assert runtime.issuer.revoke(grant.jti, reason="test") is True
    assert runtime.issuer.revoke(grant.jti, reason="again") is False  # revocation is idempotent
    with pytest.raises(GrantRevokedError, match="revoked"):
        runtime.issuer.consume_use(grant)
    [record] = runtime.store.grants_for_run("run1")
    assert record.revoked_at == clock.now() and record.revoke_reason == "test"


def test_revocation_persists_across_store_instances(
    make_workflow: Callable[..., Any], make_runtime: Callable[..., Runtime]
) -> None:
    first = make_runtime(make_workflow())
    step = first.domain.id("wf", "testwf", "run", "r1", "step", "s1", "executor")
    grant = first.issuer.mint(subject=step, tool="lookup", run_id="r1", step_id="s1",
                              workflow="testwf", constraints={}, act={})
    first.issuer.revoke(grant.jti, reason="step ended")
    first.close()
    second = make_runtime(make_workflow())  # same store file, new connections
    verified = second.issuer.verify(grant.danger_token(), tool="lookup")  # still signed by the kept key
    with pytest.raises(GrantRevokedError):
        second.issuer.consume_use(verified)


def test_a_grant_the_store_never_saw_is_refused(runtime: Runtime, mint: Mint, tmp_path: Path) -> None:
    grant, _ = mint("lookup")
    stranger = SqliteStore(tmp_path / "stranger.db")
    try:
        issuer = GrantIssuer(runtime.domain, stranger, clock=runtime.clock)
        with pytest.raises(GrantError, match="unknown to the store"):
            issuer.consume_use(grant)
    finally:
        stranger.close()


def test_revoke_run_revokes_that_run_only(runtime: Runtime, mint: Mint) -> None:
    a1, _ = mint("lookup", run_id="runA", step_id="s1")
    a2, _ = mint("read_doc", run_id="runA", step_id="s2")
    b1, _ = mint("lookup", run_id="runB", step_id="s1")
    assert runtime.issuer.revoke_run("runA", reason="run ended") == 2
    assert runtime.issuer.revoke_run("runA", reason="run ended") == 0
    assert all(g.revoked_at is not None for g in runtime.store.grants_for_run("runA"))
    assert all(g.revoked_at is None for g in runtime.store.grants_for_run("runB"))
    runtime.issuer.consume_use(b1)
    with pytest.raises(GrantRevokedError):
        runtime.issuer.consume_use(a2)


def test_grant_repr_never_shows_the_token(mint: Mint) -> None:
    grant, _ = mint("lookup")
    token = grant.danger_token()
    for shown in (repr(grant), str(grant)):
        assert token not in shown
        assert token.split(".")[2] not in shown
    assert grant.jti in repr(grant)


# constraints survive the trip through a signed grant -----------------------------------------
constraint_data = st.one_of(
    st.builds(lambda v: {"kind": "exact", "value": v},
              st.one_of(st.integers(-5, 5), st.text(max_size=5), st.booleans())),
    st.builds(lambda p: {"kind": "prefix", "prefix": p}, st.sampled_from(["/docs/", "/", "x"])),
    st.builds(lambda lo, hi: {"kind": "range", "min": min(lo, hi), "max": max(lo, hi)},
              st.integers(-50, 50), st.integers(-50, 50)),
    st.just({"kind": "any"}),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=constraint_data, value=st.one_of(st.integers(-60, 60), st.text(max_size=6), st.booleans(),
                                             st.sampled_from(["/docs/a", "/docs/../x", "x/..", "/"])))
def test_constraints_in_a_grant_allow_what_the_plan_allowed(runtime: Runtime, mint: Mint,
                                                            data: dict[str, Any], value: Any) -> None:
    grant, _ = mint("lookup", constraints={"key": data})
    verified = runtime.issuer.verify(grant.danger_token(), tool="lookup")
    planned = Step(id="x", tool="lookup", constraints={"key": data}).constraints["key"]
    assert verified.constraints["key"].allows(value) is planned.allows(value)


def test_exact_and_range_types_survive(runtime: Runtime, mint: Mint) -> None:
    grant, _ = mint("lookup", constraints={"key": {"kind": "exact", "value": "a"},
                                           "limit": {"kind": "range", "min": 1, "max": 3}})
    verified = runtime.issuer.verify(grant.danger_token(), tool="lookup")
    assert verified.constraints == {"key": Exact(value="a"), "limit": Range(min=1, max=3)}
