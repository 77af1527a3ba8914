"""Keys out of the store (issue 12, point 1), on SQLite and PostgreSQL.

The keystore holds every private key; the store records public keys and their ids only.
A read-only copy of the store mints nothing the gateway accepts; key material replaced
in the store, or a keystore that is not the store's, is refused when the store is opened;
rotation keeps what was signed before verifying (grants until they expire, heads always)
and the JWKS lists current and previous keys.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph import Runtime, Workflow
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.credentials import GrantIssuer
from scopegraph.errors import GrantError, GrantExpiredError, KeystoreError
from scopegraph.identity import TrustDomain
from scopegraph.keys import FileKeystore, VerificationKey
from scopegraph.ledger import Ledger
from scopegraph.store import open_store
from scopegraph.trust import TrustRoots
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401

from ..helpers import mint_grant
from .trust_helpers import Where, where


@pytest.fixture(params=["sqlite", "postgresql"])
def at(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    return where(request, tmp_path)


@pytest.fixture
def opened(at: Where, clock: FixedClock, make_workflow: Callable[..., Workflow]) -> Callable[..., Runtime]:
    runtimes: list[Runtime] = []

    def make(**kwargs: Any) -> Runtime:
        rt = Runtime(kwargs.pop("workflow", None) or make_workflow(), store=at.url, clock=clock, **kwargs)
        runtimes.append(rt)
        return rt

    yield make  # type: ignore[misc]
    for rt in reversed(runtimes):
        rt.close()


def _private_forms(keys_dir: Path) -> list[bytes]:
    """Every private key of a file keystore, as PEM body lines and raw bytes."""
    forms: list[bytes] = []
    for path in keys_dir.glob("*.key"):
        pem = path.read_bytes()
        forms += [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
        key = serialization.load_pem_private_key(pem, password=None)
        forms.append(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption()) if isinstance(key, Ed25519PrivateKey)
                     else key.private_numbers().private_value.to_bytes(32, "big"))  # type: ignore[union-attr]
    return forms


def _dump(at: Where) -> bytes:
    """Everything the store holds that scopegraph wrote (tables ``sg_*``), as text."""
    if at.backend == "sqlite":
        return Path(at.url[len("sqlite:///"):]).read_bytes()
    tables = [r[0] for r in at.sql("SELECT table_name FROM information_schema.tables "
                                  "WHERE table_schema = current_schema() AND table_name LIKE 'sg_%'")]
    return b"".join(repr(at.sql(f"SELECT * FROM {t}")).encode() for t in tables)


# the store records public keys only --------------------------------------------------------------
def test_the_store_records_public_keys_only_and_the_keystore_holds_the_private_ones(
        at: Where, opened: Callable[..., Runtime]) -> None:
    rt = opened()
    assert rt.run("read", initiator="alice", run_id="r1").status == "completed"
    rt.close()
    recorded = at.sql("SELECT purpose, kid, public_jwk, origin FROM sg_trust_keys")
    assert sorted(r[0] for r in recorded) == ["grant", "ledger", "svid"]
    for _, kid, jwk, origin in recorded:
        assert origin == "keystore" and "d" not in json.loads(jwk) and json.loads(jwk)["kid"] == kid
    assert at.sql("SELECT COUNT(*) FROM sg_keys")[0][0] == 0
    assert sorted(p.name for p in at.keys.glob("*.key")) == ["grant.000001.key", "ledger.000001.key",
                                                            "svid.000001.key"]
    dump = _dump(at)
    assert b"PRIVATE KEY" not in dump
    forms = _private_forms(at.keys)
    assert len(forms) >= 6 and not [f for f in forms if f in dump]


def test_a_read_only_copy_of_the_store_cannot_make_a_grant_the_gateway_accepts(
        at: Where, opened: Callable[..., Runtime], tmp_path: Path) -> None:
    rt = opened()
    grant, ctx = mint_grant(rt, "lookup")
    claims = jwt.decode(grant.danger_token(), options={"verify_signature": False}) | {"jti": "forged"}
    # Everything the store holds is readable to the attacker; no private key is among it, so
    # the best they can do is sign with a key of their own, under the real key's id.
    attacker = Ed25519PrivateKey.generate()
    forged = jwt.encode(claims, attacker, algorithm="EdDSA", headers={"kid": rt.domain.key.kid})
    result = rt.gateway.call(forged, "lookup", {"key": "alpha"}, ctx)
    assert result.status == "denied" and "signature does not verify" in result.reason
    with pytest.raises(GrantError, match="signature does not verify"):
        rt.issuer.verify(forged, tool="lookup")
    # Nor can they open the store with a keystore of their own to mint through scopegraph.
    copy = open_store(at.url)
    try:
        with pytest.raises(KeystoreError, match="does not hold"):
            TrustDomain(rt.domain.name, copy, keystore=FileKeystore(tmp_path / "attacker-keys"))
    finally:
        copy.close()


@pytest.mark.parametrize("edit", ["public key swapped", "key and kid swapped", "migrated key planted"])
def test_key_material_replaced_in_the_store_is_refused_at_open(
        at: Where, opened: Callable[..., Runtime], edit: str, capsys: pytest.CaptureFixture[str]) -> None:
    rt = opened()
    assert rt.run("read", initiator="alice", run_id="r1").status == "completed"
    rt.close()
    planted = VerificationKey.of("grant", 1, Ed25519PrivateKey.generate().public_key())
    [(kid,)] = at.sql("SELECT kid FROM sg_trust_keys WHERE purpose = 'grant'")
    if edit == "public key swapped":
        at.sql("UPDATE sg_trust_keys SET public_jwk = ? WHERE kid = ?",
               (json.dumps({**planted.jwk(), "kid": kid}), kid))
    elif edit == "key and kid swapped":
        at.sql("UPDATE sg_trust_keys SET kid = ?, public_jwk = ? WHERE kid = ?",
               (planted.kid, json.dumps(planted.jwk()), kid))
    else:
        at.sql("INSERT INTO sg_trust_keys (purpose, kid, generation, public_jwk, origin, created_at, retired_at, "
               "endorsement) VALUES ('grant', ?, 0, ?, 'migrated', 1, 1, ?)",
               (planted.kid, json.dumps(planted.jwk()), json.dumps({"by": "x", "sig": "AAAA", "records": 99})))
    with pytest.raises(KeystoreError) as refused:
        opened()
    message = str(refused.value)
    assert "\n" not in message and "refusing to open" in message
    assert (planted.kid in message) or (kid in message)
    # The command line says so in one line, and exits 2.
    assert main(["--store", at.url, "audit", "verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to open" in err[0]


def test_a_store_opened_with_another_keystore_is_refused_not_adopted(
        at: Where, opened: Callable[..., Runtime], tmp_path: Path) -> None:
    opened().close()
    store = open_store(at.url)
    try:
        with pytest.raises(KeystoreError, match="does not hold"):
            TrustRoots.open(store, keystore=FileKeystore(tmp_path / "other-keys"))
        assert len(store.trust_keys()) == 3  # nothing of the other keystore was recorded
    finally:
        store.close()


# rotation ---------------------------------------------------------------------------------------
def test_grants_signed_before_a_rotation_verify_until_they_expire(
        at: Where, opened: Callable[..., Runtime], clock: FixedClock, capsys: pytest.CaptureFixture[str]) -> None:
    rt = opened()
    old, _ = mint_grant(rt, "lookup")
    old_kid = rt.domain.key.kid
    rt.close()
    assert main(["--store", at.url, "keys", "rotate", "--purpose", "grant"]) == 0
    assert f"{old_kid} still verifies" in capsys.readouterr().out
    rt = opened()  # a new process: nothing cached from before
    new, _ = mint_grant(rt, "lookup", run_id="run2")
    assert jwt.get_unverified_header(new.danger_token())["kid"] == rt.domain.key.kid != old_kid
    verifier = GrantIssuer(rt.domain, rt.store, clock=clock)
    assert verifier.verify(old.danger_token(), tool="lookup").jti == old.jti
    assert verifier.verify(new.danger_token(), tool="lookup").jti == new.jti
    # The JWKS lists both, newest first; a tool server holding it verifies both.
    assert main(["--store", at.url, "bundle", "--jwks"]) == 0
    jwks = json.loads(capsys.readouterr().out)
    assert [k["kid"] for k in jwks["keys"]] == [rt.domain.key.kid, old_kid]
    for token in (old, new):
        kid = jwt.get_unverified_header(token.danger_token())["kid"]
        [jwk] = [k for k in jwks["keys"] if k["kid"] == kid]
        jwt.decode(token.danger_token(), jwt.PyJWK.from_dict(jwk).key, algorithms=["EdDSA"],
                   audience="tool:lookup", options={"verify_exp": False, "verify_nbf": False, "verify_iat": False})
    clock.advance(old.expires_at - clock.now() + 10)
    with pytest.raises(GrantExpiredError):
        verifier.verify(old.danger_token(), tool="lookup")
    # The old private key is gone: only its public half is left to verify with.
    assert sorted(p.name for p in at.keys.glob("grant.*")) == [
        "grant.000001.pub", "grant.000002.key", "grant.000002.pub"]


def test_every_head_names_its_key_and_verifies_after_rotation(
        at: Where, opened: Callable[..., Runtime], capsys: pytest.CaptureFixture[str]) -> None:
    rt = opened()
    assert rt.run("read", initiator="alice", run_id="r1").status == "completed"
    first = rt.store.ledger_head()
    rt.close()
    assert first is not None and first.kid and jwt.get_unverified_header(first.signature)["kid"] == first.kid
    assert main(["--store", at.url, "keys", "rotate", "--purpose", "ledger", "--json"]) == 0
    rotated = json.loads(capsys.readouterr().out)["rotated"]["ledger"]
    assert rotated["previous"] == first.kid and rotated["kid"] != first.kid
    assert main(["--store", at.url, "audit", "verify"]) == 0, capsys.readouterr()
    capsys.readouterr()
    rt = opened()
    assert rt.run("read", initiator="alice", run_id="r2").status == "completed"
    head = rt.store.ledger_head()
    assert head is not None and head.kid == rotated["kid"]
    result = Ledger(rt.store, clock=rt.clock).verify()
    assert result.ok, result
    # The witness holds entries by both keys, and they verify.
    kids = [json.loads(line)["kid"] for line in at.witness.read_text().splitlines()]
    assert first.kid in kids and rotated["kid"] in kids
    assert main(["--store", at.url, "keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["kid"], k["state"]) for k in listed if k["purpose"] == "ledger"] == [
        (rotated["kid"], "current"), (first.kid, "previous (verifies only)")]


def test_svids_issued_before_a_rotation_still_verify(opened: Callable[..., Runtime]) -> None:
    rt = opened()
    svid = rt.domain.issue_svid(rt.domain.id("agent"))
    token, cert = svid.danger_jwt(), svid.x509_certificate
    old_kid = jwt.get_unverified_header(token)["kid"]
    rt.trust.rotate("svid")
    fresh = rt.domain.issue_svid(rt.domain.id("agent"))
    assert jwt.get_unverified_header(fresh.danger_jwt())["kid"] != old_kid
    assert rt.domain.verify_jwt_svid(token) == rt.domain.verify_jwt_svid(fresh.danger_jwt())
    assert rt.domain.verify_x509_svid(cert) == rt.domain.verify_x509_svid(fresh.x509_certificate)
    assert [k["kid"] for k in rt.domain.jwt_svid_bundle()["keys"]][1] == old_kid


def test_a_signature_by_an_unrecorded_key_of_another_keystore_never_verifies(
        opened: Callable[..., Runtime], tmp_path: Path) -> None:
    rt = opened()
    other = FileKeystore(tmp_path / "elsewhere")
    signer = other.signer("grant")
    grant, _ = mint_grant(rt, "lookup")
    header, payload, _ = grant.danger_token().split(".")
    signature = base64.urlsafe_b64encode(signer.sign(f"{header}.{payload}".encode())).rstrip(b"=").decode()
    with pytest.raises(GrantError, match="signature does not verify"):
        GrantIssuer(rt.domain, rt.store, clock=rt.clock).verify(f"{header}.{payload}.{signature}", tool="lookup")
