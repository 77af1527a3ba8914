"""SVIDs that standard tooling accepts: py-spiffe (and OpenSSL) check what scopegraph issues.

Our own verifier agreeing with our own issuer proves little; here the SPIFFE reference
library parses and validates the JWT-SVIDs against the domain's JWT bundle, and the
X.509-SVIDs against the SPIFFE X.509-SVID rules and the domain's CA. The same holds for
SVIDs, grants and heads signed by a keystore, file or PKCS#11 token.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from spiffe.bundle.jwt_bundle.errors import AuthorityNotFoundError
from spiffe.svid.errors import InvalidLeafCertificateError, InvalidTokenError

from scopegraph.identity import TrustDomain
from scopegraph.keys import FileKeystore, Keystore, sign_certificate, sign_jwt
from scopegraph.keys.pkcs11_keystore import Pkcs11Keystore
from scopegraph.store import SqliteStore
from scopegraph.witness import WitnessedHead, WitnessFile
from tests.softhsm import USER_PIN, SoftHsm, softhsm

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:spiffe")


@pytest.fixture
def domain(tmp_path: Path) -> Iterator[TrustDomain]:
    store = SqliteStore(tmp_path / "store.db")
    try:
        yield TrustDomain("example.org", store)  # the system clock: py-spiffe judges expiry by it
    finally:
        store.close()


def _jwt_bundle(domain: TrustDomain) -> spiffe.JwtBundle:
    return spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), json.dumps(domain.jwt_svid_bundle()).encode())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# our TrustDomain's SVIDs -----------------------------------------------------------------
def test_py_spiffe_validates_our_jwt_svids(domain: TrustDomain) -> None:
    spiffe_id = domain.id("wf", "w", "run", "r1", "step", "s1", "executor")
    token = domain.issue_svid(spiffe_id).danger_jwt()
    svid = spiffe.JwtSvid.parse_and_validate(token, _jwt_bundle(domain), {"scopegraph"})
    assert str(svid.spiffe_id) == str(spiffe_id) and set(svid.audience) == {"scopegraph"}
    assert jwt.get_unverified_header(token)["alg"] == "ES256"


def test_py_spiffe_refuses_a_jwt_svid_of_another_domain_key_or_audience(domain: TrustDomain,
                                                                       tmp_path: Path) -> None:
    token = domain.issue_svid(domain.id("agent")).danger_jwt()
    other_store = SqliteStore(tmp_path / "other" / "store.db")
    try:
        impostor = TrustDomain("example.org", other_store)  # same name, other keys (its own keystore)
        with pytest.raises(AuthorityNotFoundError):
            spiffe.JwtSvid.parse_and_validate(token, _jwt_bundle(impostor), {"scopegraph"})
    finally:
        other_store.close()
    with pytest.raises(InvalidTokenError, match="(?i)audience"):
        spiffe.JwtSvid.parse_and_validate(token, _jwt_bundle(domain), {"tool:other"})
    header, _, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False}) | {"sub": "spiffe://example.org/admin"}
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidTokenError, match="(?i)signature"):
        spiffe.JwtSvid.parse_and_validate(f"{header}.{forged}.{signature}", _jwt_bundle(domain), {"scopegraph"})


def test_py_spiffe_validates_our_x509_svids(domain: TrustDomain, tmp_path: Path) -> None:
    spiffe_id = domain.id("wf", "w", "run", "r1", "step", "s1", "executor")
    svid = domain.issue_svid(spiffe_id)
    key_pem = svid.danger_x509_private_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    parsed = spiffe.X509Svid.parse(_pem(svid.x509_certificate), key_pem)
    assert str(parsed.spiffe_id) == str(spiffe_id)
    bundle = spiffe.X509Bundle.parse(spiffe.TrustDomain("example.org"), _pem(domain.ca_certificate))
    [authority] = bundle.x509_authorities
    parsed.leaf.verify_directly_issued_by(authority)
    # and OpenSSL's chain verification, with the domain CA as the only trust anchor
    (tmp_path / "ca.pem").write_bytes(_pem(domain.ca_certificate))
    (tmp_path / "leaf.pem").write_bytes(_pem(svid.x509_certificate))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_py_spiffe_refuses_a_leaf_without_digital_signature_usage(domain: TrustDomain) -> None:
    """What our leaves lacked before: the X.509-SVID standard requires the key usage."""
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    cert = sign_certificate(x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scopegraph")]))
            .issuer_name(domain.ca_certificate.subject).public_key(leaf_key.public_key())
            .serial_number(1).not_valid_before(domain.ca_certificate.not_valid_before_utc)
            .not_valid_after(domain.ca_certificate.not_valid_after_utc)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/a")]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True),
            domain.trust.signer("svid"))
    key_pem = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    with pytest.raises(InvalidLeafCertificateError, match="KeyUsage"):
        spiffe.X509Svid.parse(_pem(cert), key_pem)


# keystore-signed SVIDs, grants and heads (file and PKCS#11) ------------------------------
@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    with softhsm(tmp_path_factory.mktemp("softhsm")) as made:
        yield made


@pytest.fixture(params=["file", "pkcs11"])
def keystore(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Keystore]:
    if request.param == "file":
        opened: Keystore = FileKeystore(tmp_path / "keys")
    else:
        hsm: SoftHsm = request.getfixturevalue("hsm")
        opened = Pkcs11Keystore(module=hsm.module, token_label=hsm.new_token(), pin=USER_PIN)
    try:
        yield opened
    finally:
        opened.close()


def test_keystore_signed_svids_grants_and_heads_pass_standard_checks(keystore: Keystore, tmp_path: Path) -> None:
    svid_signer = keystore.signer("svid")
    now = int(time.time())
    token = sign_jwt(svid_signer, {"iss": "spiffe://example.org", "sub": "spiffe://example.org/agent",
                                   "aud": ["scopegraph"], "iat": now, "exp": now + 300})
    bundle = spiffe.JwtBundle.parse(spiffe.TrustDomain("example.org"), json.dumps(
        {"keys": [svid_signer.public_jwk() | {"use": "jwt-svid"}]}).encode())
    assert str(spiffe.JwtSvid.parse_and_validate(token, bundle, {"scopegraph"}).spiffe_id) == \
        "spiffe://example.org/agent"

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "example.org")])
    start = x509.CertificateBuilder().not_valid_before(_utc(now - 60)).not_valid_after(_utc(now + 3600))
    ca = sign_certificate(
        start.subject_name(ca_name).issuer_name(ca_name).public_key(svid_signer.public_key).serial_number(1)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]),
                       critical=False), svid_signer)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = sign_certificate(
        start.subject_name(x509.Name([])).issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(2)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier("spiffe://example.org/agent")]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True),
        svid_signer)
    parsed = spiffe.X509Svid.parse(_pem(leaf), leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    parsed.leaf.verify_directly_issued_by(ca)
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))
    done = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / "leaf.pem")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

    grant_signer = keystore.signer("grant")
    grant = sign_jwt(grant_signer, {"sub": "spiffe://example.org/agent", "aud": "tool:lookup", "exp": now + 60})
    jwks = jwt.PyJWKSet.from_dict({"keys": [k.jwk() for k in keystore.verification_keys("grant")]})
    key = next(k for k in jwks.keys if k.key_id == jwt.get_unverified_header(grant)["kid"])
    assert jwt.decode(grant, key.key, algorithms=["EdDSA"], audience="tool:lookup")["sub"].endswith("/agent")

    witness = WitnessFile(tmp_path / "witness.jsonl", keys=keystore.verification_keys("ledger")
                          or [keystore.signer("ledger").verification_key])
    entry = witness.append(records=4, head="a" * 64, at=float(now), signer=keystore.signer("ledger"))
    assert WitnessFile(witness.path, keys=keystore.verification_keys("ledger")).verify_against(
        WitnessedHead(records=4, hash="a" * 64, witness_seq=entry.seq)).ok


def _utc(timestamp: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc)


def test_the_svid_key_is_the_keystores_not_the_stores_and_never_shown(domain: TrustDomain, tmp_path: Path) -> None:
    signer = domain.trust.signer("svid")
    private_pem = (tmp_path / "keys" / "svid.000001.key").read_bytes()
    private = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and signer.public_pem() == private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    scalar = format(private.private_numbers().private_value, "x")
    shown = " ".join([repr(signer), str(signer), repr(domain), json.dumps(domain.jwt_svid_bundle())])
    assert scalar not in shown and private_pem.decode().splitlines()[1] not in shown and signer.kid in shown
    again = SqliteStore(tmp_path / "store.db")  # as another process would: the same key, from the keystore
    try:
        assert TrustDomain("example.org", again).trust.signer("svid").kid == signer.kid
        assert [k.kid for k in again.trust_keys() if k.purpose == "svid"] == [signer.kid]  # its public half only
    finally:
        again.close()
    assert b"PRIVATE KEY" not in (tmp_path / "store.db").read_bytes()
    other = SqliteStore(tmp_path / "other" / "other.db")  # another directory: another keystore
    try:
        assert TrustDomain("example.org", other).trust.signer("svid").kid != signer.kid
    finally:
        other.close()
