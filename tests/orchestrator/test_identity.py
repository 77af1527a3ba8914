"""Workload identity: SPIFFE IDs, SVIDs, trust domains and their keys (invariants 2, 7)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph import Runtime, Workflow
from scopegraph.agents import DirectExecutor
from scopegraph.clock import FixedClock
from scopegraph.errors import IdentityError
from scopegraph.identity import SVID_TTL_SECONDS, SpiffeId, TrustDomain
from scopegraph.roles import StepContext, ToolHandle
from scopegraph.store import SqliteStore

from ..helpers import mint_grant


@pytest.fixture
def store(store_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(store_path)
    yield s
    s.close()


@pytest.fixture
def other_store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "elsewhere" / "other.db")
    yield s
    s.close()


@pytest.fixture
def domain(store: SqliteStore) -> TrustDomain:
    return TrustDomain("example.org", store)


# SPIFFE IDs --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    "spiffe://example.org/wf/expenses/run/abc123/step/s-1/executor",
    "spiffe://demo.scopegraph.local/wf/expenses/run/r/planner",
    "spiffe://example.org",
])
def test_valid_spiffe_ids_round_trip(value: str) -> None:
    parsed = SpiffeId.parse(value)
    assert str(parsed) == value
    assert parsed.trust_domain == value.split("/")[2]


@pytest.mark.parametrize("value", [
    "https://example.org/a",
    "spiffe://",
    "spiffe://Example.org/a",
    "spiffe://exa mple.org/a",
    "spiffe://example.org/a//b",
    "spiffe://example.org/a/../b",
    "spiffe://example.org/a/./b",
    "spiffe://example.org/a b",
    "spiffe://example.org/ä",
    "spiffe://example.org/a?b=c",
    "spiffe://example.org/a#frag",
    "spiffe://example.org/a/",
])
def test_invalid_spiffe_ids_are_refused(value: str) -> None:
    with pytest.raises(IdentityError, match="invalid SPIFFE ID"):
        SpiffeId.parse(value)


@pytest.mark.parametrize("value", [
    "spiffe://example.org/...", "spiffe://example.org/.a/..b/a.", "spiffe://example.org/a_b-c.9/Z",
])
def test_dots_are_refused_only_as_a_whole_segment(value: str) -> None:
    assert str(SpiffeId.parse(value)) == value


@pytest.mark.parametrize("value", [
    "spiffe://example.org/.", "spiffe://example.org/..", "spiffe://example.org/a/..",
    "spiffe://example.org/./a", "spiffe://example.org//a", "spiffe://example.org/a\nb",
    "spiffe://example.org/a\n",
])
def test_a_dot_segment_an_empty_segment_or_a_newline_is_refused(value: str) -> None:
    with pytest.raises(IdentityError, match="bad path"):
        SpiffeId.parse(value)


def test_spiffe_id_must_be_a_string() -> None:
    with pytest.raises(IdentityError):
        SpiffeId.parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [
    "spiffe://example.org/wf/x/step/a\n",
    "spiffe://example.org\n/wf/x",
])
def test_spiffe_id_with_a_trailing_newline_is_refused(value: str) -> None:
    """A newline in an identity is a log-injection vector; ``$`` in a regex lets one through."""
    with pytest.raises(IdentityError):
        SpiffeId.parse(value)


@pytest.mark.parametrize("name", ["Example.org", "exa mple.org", "", "a/b", "evil.org\n"])
def test_invalid_trust_domain_names_are_refused(store: SqliteStore, name: str) -> None:
    with pytest.raises(IdentityError, match="invalid trust domain"):
        TrustDomain(name, store)


# distinct identities per run and step -----------------------------------------------------
def test_planner_and_every_step_get_distinct_spiffe_ids(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    rt = make_runtime(make_workflow(trust_domain="ids.example"))
    first = rt.run("read things", run_id="run-a")
    second = rt.run("read things", run_id="run-b")
    assert first.status == second.status == "completed"
    for report in (first, second):
        run = report.run_id
        assert report.planner_spiffe_id == f"spiffe://ids.example/wf/testwf/run/{run}/planner"
        for s in report.steps:
            assert s.spiffe_id == f"spiffe://ids.example/wf/testwf/run/{run}/step/{s.step_id}/executor"
    ids = [r.planner_spiffe_id for r in (first, second)] + [s.spiffe_id for r in (first, second) for s in r.steps]
    assert len(ids) == len(set(ids)) == 6
    grants = [s.grant_id for r in (first, second) for s in r.steps]
    assert len(set(grants)) == 4


# JWT-SVIDs ---------------------------------------------------------------------------------
def test_jwt_svid_verifies_with_its_trust_domain(domain: TrustDomain) -> None:
    spiffe_id = domain.id("wf", "w", "run", "r1", "step", "s1", "executor")
    svid = domain.issue_svid(spiffe_id)
    assert domain.verify_jwt_svid(svid.danger_jwt()) == spiffe_id
    claims = jwt.decode(svid.danger_jwt(), options={"verify_signature": False})
    assert claims["sub"] == str(spiffe_id) and claims["iss"] == "spiffe://example.org"
    assert claims["exp"] - claims["iat"] == SVID_TTL_SECONDS


def test_jwt_svid_fails_for_another_trust_domain(domain: TrustDomain, store: SqliteStore,
                                                  other_store: SqliteStore) -> None:
    svid = domain.issue_svid(domain.id("agent"))
    other_name = TrustDomain("other.org", store)
    same_name_other_key = TrustDomain("example.org", other_store)
    assert same_name_other_key.key.kid != domain.key.kid
    for verifier in (other_name, same_name_other_key):
        with pytest.raises(IdentityError, match="JWT-SVID does not verify"):
            verifier.verify_jwt_svid(svid.danger_jwt())


def test_tampered_jwt_svid_fails(domain: TrustDomain) -> None:
    token = domain.issue_svid(domain.id("agent")).danger_jwt()
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["sub"] = "spiffe://example.org/admin"
    forged_payload = base64.urlsafe_b64encode(
        json.dumps(claims, separators=(",", ":")).encode()
    ).rstrip(b"=").decode()
    with pytest.raises(IdentityError):
        domain.verify_jwt_svid(f"{header}.{forged_payload}.{signature}")
    with pytest.raises(IdentityError):
        domain.verify_jwt_svid(token, audience="someone-else")


def test_svid_for_another_domain_is_not_issued(domain: TrustDomain) -> None:
    with pytest.raises(IdentityError, match="not in trust domain"):
        domain.issue_svid(SpiffeId.parse("spiffe://other.org/agent"))


def test_jwt_svid_is_judged_by_the_domain_clock(store: SqliteStore, clock: FixedClock) -> None:
    """A domain built on a fixed clock must verify (and expire) its SVIDs on that clock."""
    domain = TrustDomain("fixed.example", store, clock=clock)
    spiffe_id = domain.id("agent")
    token = domain.issue_svid(spiffe_id).danger_jwt()
    assert domain.verify_jwt_svid(token) == spiffe_id
    clock.advance(SVID_TTL_SECONDS + 60)
    with pytest.raises(IdentityError):
        domain.verify_jwt_svid(token)


# X.509-SVIDs -------------------------------------------------------------------------------
def test_x509_svid_carries_the_spiffe_id_and_verifies(domain: TrustDomain) -> None:
    spiffe_id = domain.id("wf", "w", "run", "r1", "step", "s1", "executor")
    cert = domain.issue_svid(spiffe_id).x509_certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(spiffe_id)]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(domain.ca_certificate)  # an independent check of the chain
    assert domain.verify_x509_svid(cert) == spiffe_id
    assert domain.ca_certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_x509_svid_fails_for_another_trust_domain(domain: TrustDomain, other_store: SqliteStore) -> None:
    cert = domain.issue_svid(domain.id("agent")).x509_certificate
    for verifier in (TrustDomain("other.org", other_store), TrustDomain("example.org", other_store)):
        with pytest.raises(IdentityError, match="not signed by this trust domain"):
            verifier.verify_x509_svid(cert)


def test_x509_svid_expires_on_the_domain_clock(store: SqliteStore, clock: FixedClock) -> None:
    domain = TrustDomain("fixed.example", store, clock=clock)
    cert = domain.issue_svid(domain.id("agent"), ttl=30).x509_certificate
    assert domain.verify_x509_svid(cert) == domain.id("agent")
    clock.advance(31)
    with pytest.raises(IdentityError, match="validity"):
        domain.verify_x509_svid(cert)


# the keys: made once, kept in the keystore (never the store), never shown ----------------------
def test_the_keys_persist_in_the_keystore_across_trust_domain_instances(store_path: Path) -> None:
    first_store = SqliteStore(store_path)
    first = TrustDomain("example.org", first_store)
    token = first.issue_svid(first.id("agent")).danger_jwt()
    first_store.close()

    second_store = SqliteStore(store_path)  # a new process would do the same
    try:
        second = TrustDomain("example.org", second_store)
        assert second.key.kid == first.key.kid
        assert second.verify_jwt_svid(token) == first.id("agent")
        # Issue 12: the keys are the keystore's, one per purpose, whatever the domain's name;
        # another domain's issuer still keeps its tokens apart.
        with pytest.raises(IdentityError, match="JWT-SVID does not verify"):
            TrustDomain("other.org", second_store).verify_jwt_svid(token)
        recorded = {(k.purpose, k.kid) for k in second_store.trust_keys()}
        assert ("grant", first.key.kid) in recorded and {p for p, _ in recorded} == {"grant", "svid", "ledger"}
    finally:
        second_store.close()
    assert b"PRIVATE KEY" not in store_path.read_bytes()
    assert sorted(p.name for p in (store_path.parent / "keys").iterdir() if p.suffix == ".key") == [
        "grant.000001.key", "ledger.000001.key", "svid.000001.key"]


def test_bundle_jwks_holds_the_public_key_only(domain: TrustDomain) -> None:
    jwks = domain.bundle().jwks()
    assert jwks["trust_domain"] == "example.org"
    [key] = jwks["keys"]
    assert key["kid"] == domain.key.kid and key["kty"] == "OKP" and key["crv"] == "Ed25519"
    assert "d" not in key  # no private part
    raw = domain.key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4)) == raw
    svid = domain.issue_svid(domain.id("agent"))
    # JWT-SVIDs are ES256 (the SPIFFE standard allows no EdDSA): their keys are the JWT-SVID bundle's.
    [svid_key] = domain.jwt_svid_bundle()["keys"]
    assert "d" not in svid_key and svid_key["use"] == "jwt-svid" and svid_key["kid"] != key["kid"]
    public = jwt.PyJWK.from_dict(svid_key).key
    claims = jwt.decode(svid.danger_jwt(), public, algorithms=["ES256"], audience="scopegraph")
    assert claims["sub"] == "spiffe://example.org/agent"


def test_reprs_never_show_keys_or_tokens(domain: TrustDomain, store_path: Path) -> None:
    secrets = []
    for path in (store_path.parent / "keys").glob("*.key"):
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        pem = path.read_text()
        raw = (private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption()) if isinstance(private, Ed25519PrivateKey)
               else private.private_numbers().private_value.to_bytes(32, "big"))  # type: ignore[union-attr]
        secrets += [pem.splitlines()[1], raw.hex(), base64.b64encode(raw).decode(),
                    base64.urlsafe_b64encode(raw).rstrip(b"=").decode()]
    assert len(secrets) == 12
    svid = domain.issue_svid(domain.id("agent"))
    token = svid.danger_jwt()
    signers = [domain.trust.signer(p) for p in ("grant", "svid", "ledger")]
    shown = " ".join([repr(domain.key), str(domain.key), repr(domain), str(domain), repr(svid),
                      str(svid), repr(domain.bundle()), repr(domain.trust), repr(domain.trust.keystore),
                      *map(repr, signers), *map(str, signers)])
    for secret in secrets:
        assert secret not in shown
    assert token not in shown and token.split(".")[2] not in shown
    assert all("redacted" in repr(s) for s in signers) and "redacted" in repr(svid)


def test_a_tool_handle_never_shows_its_grant(runtime: Runtime) -> None:
    grant, ctx = mint_grant(runtime, "lookup")
    handle = ToolHandle(runtime.gateway, grant.danger_token(), ctx)
    assert handle.call("lookup", key="k").ok  # a real handle, holding a working grant
    for shown in (repr(handle), str(handle)):
        assert grant.danger_token() not in shown and grant.danger_token().split(".")[2] not in shown
    assert "redacted" in repr(handle)


def test_each_step_proves_its_own_identity_and_shows_no_secret(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    seen: dict[str, tuple[str, str, str]] = {}
    holder: dict[str, Runtime] = {}

    class Checking(DirectExecutor):
        def execute(self, ctx: StepContext) -> object:
            domain = holder["rt"].domain
            token = ctx.svid.danger_jwt()
            assert domain.verify_jwt_svid(token) == ctx.identity
            assert domain.verify_x509_svid(ctx.svid.x509_certificate) == ctx.identity
            shown = " ".join([repr(ctx), str(ctx), repr(ctx.svid), repr(ctx.tools)])
            assert token not in shown and token.split(".")[2] not in shown
            seen[ctx.step.id] = (str(ctx.identity), token, shown)
            return super().execute(ctx)

    executor = Checking(builders={"read_doc": lambda c: {"path": "/docs/a"}, "lookup": lambda c: {"limit": 5}})
    rt = holder["rt"] = make_runtime(make_workflow(executor=executor))
    report = rt.run("read", run_id="svid1")
    assert report.status == "completed", report.summary()
    assert set(seen) == {"doc", "look"}
    assert seen["doc"][0] != seen["look"][0] and seen["doc"][1] != seen["look"][1]
