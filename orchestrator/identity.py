"""Workload identity: trust domains, SPIFFE IDs, SVIDs and the trust bundle.

Each run's planner and each executor step get their own SPIFFE ID, proved by a
JWT-SVID and an X.509-SVID. X.509-SVIDs (and grants) are signed by the trust domain's
Ed25519 key; JWT-SVIDs by its ES256 (ECDSA P-256) key, because the SPIFFE JWT-SVID
standard, and so standard tooling such as py-spiffe, accepts no EdDSA. The Ed25519 key
is made on first use and kept in the store; the ES256 key is derived from it (HKDF), so
the store holds no second secret. Neither leaves this module in clear text except the
Ed25519 key to the store, and both redact themselves in ``repr``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from .clock import Clock, SystemClock
from .errors import IdentityError
from .keys.base import jwk_thumbprint, public_jwk_members
from .store import Store

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}\Z")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+\Z")
JWT_SVID_AUDIENCE = "scopegraph"
SVID_TTL_SECONDS = 300
SVID_CLOCK_SKEW_SECONDS = 5


@dataclass(frozen=True)
class SpiffeId:
    """A validated SPIFFE ID: ``spiffe://<trust-domain>/<path>``."""

    trust_domain: str
    path: str

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Raises:
        IdentityError: ``value`` is not a valid SPIFFE ID.
        """
        if not isinstance(value, str) or not value.startswith("spiffe://"):
            raise IdentityError(f"invalid SPIFFE ID {value!r}: must start with 'spiffe://'")
        rest = value[len("spiffe://"):]
        domain, _, path = rest.partition("/")
        if not _TRUST_DOMAIN.match(domain):
            raise IdentityError(f"invalid SPIFFE ID {value!r}: bad trust domain {domain!r}")
        segments = path.split("/") if path else []
        if any(not _PATH_SEGMENT.match(s) or s in (".", "..") for s in segments):
            raise IdentityError(f"invalid SPIFFE ID {value!r}: bad path")
        return cls(domain, "/" + path if path else "")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


class SigningKey:
    """An Ed25519 private key that never shows itself."""

    __slots__ = ("_key", "kid")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.kid = hashlib.sha256(raw).hexdigest()[:16]

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def danger_private_key(self) -> Ed25519PrivateKey:
        """The raw key, for signing code only. Never log or return it."""
        return self._key

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, private=<redacted>)"

    __str__ = __repr__


class JwtSvidKey:
    """The trust domain's ES256 key for JWT-SVIDs, that never shows itself; kid = RFC 7638 thumbprint."""

    __slots__ = ("_key", "kid")

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self.kid = jwk_thumbprint(key.public_key())

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    def danger_private_key(self) -> ec.EllipticCurvePrivateKey:
        """The raw key, for signing code only. Never log or return it."""
        return self._key

    def __repr__(self) -> str:
        return f"JwtSvidKey(kid={self.kid!r}, private=<redacted>)"

    __str__ = __repr__


class Svid:
    """A proved identity: the SPIFFE ID with its JWT-SVID and X.509-SVID.

    Both documents are made on first access and then kept: a step that never presents
    its identity to a third party never pays for signing them, yet every identity can
    produce both, valid for the same window.
    """

    def __init__(self, spiffe_id: SpiffeId, domain: TrustDomain, issued_at: float, expires_at: float) -> None:
        self.spiffe_id = spiffe_id
        self._domain = domain
        self.issued_at = issued_at
        self.expires_at = expires_at
        self._jwt: str | None = None
        self._x509: tuple[x509.Certificate, Ed25519PrivateKey] | None = None

    def danger_jwt(self) -> str:
        """The JWT-SVID token. Never log or trace it."""
        if self._jwt is None:
            self._jwt = self._domain.sign_jwt_svid({
                "iss": self._domain.issuer, "sub": str(self.spiffe_id), "aud": [JWT_SVID_AUDIENCE],
                "iat": int(self.issued_at), "exp": int(self.expires_at), "jti": uuid.uuid4().hex,
            })
        return self._jwt

    @property
    def x509_certificate(self) -> x509.Certificate:
        if self._x509 is None:
            self._x509 = self._domain.issue_x509_svid(self.spiffe_id, self.expires_at)
        return self._x509[0]

    def danger_x509_private_key(self) -> Ed25519PrivateKey:
        """The X.509-SVID's private key, for a TLS client. Never log it."""
        self.x509_certificate  # noqa: B018 - builds the pair on first use
        assert self._x509 is not None
        return self._x509[1]

    def __repr__(self) -> str:
        return f"Svid({str(self.spiffe_id)!r}, token=<redacted>)"


class TrustDomain:
    """A SPIFFE trust domain with its signing key and CA certificate."""

    def __init__(self, name: str, store: Store, *, clock: Clock | None = None) -> None:
        if not _TRUST_DOMAIN.match(name):
            raise IdentityError(f"invalid trust domain {name!r}: use lowercase letters, digits, '.', '-', '_'")
        self.name = name
        self.clock = clock or SystemClock()
        self.key = _load_or_create_key(store, f"trust-domain:{name}", self.clock.now())
        self.issuer = f"spiffe://{name}"
        self._ca_cert: x509.Certificate | None = None
        self._jwt_svid_key: JwtSvidKey | None = None

    def __repr__(self) -> str:
        return f"TrustDomain({self.name!r}, kid={self.key.kid!r})"

    def id(self, *segments: str) -> SpiffeId:
        """Build a SPIFFE ID in this domain from path segments."""
        return SpiffeId.parse(f"spiffe://{self.name}/" + "/".join(segments))

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key.danger_private_key(), algorithm="EdDSA",
                          headers={"kid": self.key.kid})

    @property
    def jwt_svid_key(self) -> JwtSvidKey:
        """The ES256 key of JWT-SVIDs, derived from the domain's key on first use."""
        if self._jwt_svid_key is None:
            self._jwt_svid_key = JwtSvidKey(_derive_jwt_svid_key(self.key.danger_private_key(), self.name))
        return self._jwt_svid_key

    def sign_jwt_svid(self, claims: dict[str, Any]) -> str:
        key = self.jwt_svid_key
        return jwt.encode(claims, key.danger_private_key(), algorithm="ES256", headers={"kid": key.kid})

    def jwt_svid_bundle(self) -> dict[str, Any]:
        """The JWT-SVID authorities as a JWK Set (SPIFFE bundle form, ``use: jwt-svid``): what a
        verifier such as py-spiffe's ``JwtBundle.parse`` needs to check this domain's JWT-SVIDs."""
        key = self.jwt_svid_key
        return {"keys": [{**public_jwk_members(key.public_key), "kid": key.kid, "alg": "ES256",
                          "use": "jwt-svid"}]}

    def issue_svid(self, spiffe_id: SpiffeId, ttl: float = SVID_TTL_SECONDS) -> Svid:
        if spiffe_id.trust_domain != self.name:
            raise IdentityError(f"{spiffe_id} is not in trust domain {self.name!r}")
        now = self.clock.now()
        return Svid(spiffe_id, self, now, now + ttl)

    def verify_jwt_svid(self, token: str, *, audience: str = JWT_SVID_AUDIENCE) -> SpiffeId:
        """Raises:
        IdentityError: the JWT-SVID does not verify.
        """
        try:
            claims = jwt.decode(
                token, self.jwt_svid_key.public_key, algorithms=["ES256"], audience=audience, issuer=self.issuer,
                # Lifetime is judged by the domain's clock below, so tests can fix time.
                options={"require": ["exp", "iat", "sub", "iss"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise IdentityError(f"JWT-SVID does not verify: {exc}") from None
        now = self.clock.now()
        if now > float(claims["exp"]) + SVID_CLOCK_SKEW_SECONDS:
            raise IdentityError("JWT-SVID expired")
        if now + SVID_CLOCK_SKEW_SECONDS < float(claims["iat"]):
            raise IdentityError("JWT-SVID is not valid yet")
        return SpiffeId.parse(claims["sub"])

    @property
    def ca_certificate(self) -> x509.Certificate:
        """Self-signed CA certificate of the domain's key (stable for the key's life)."""
        if self._ca_cert is None:
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scopegraph"),
                              x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
            start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
            self._ca_cert = (
                x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(self.key.public_key)
                .serial_number(int(self.key.kid, 16))
                .not_valid_before(start)
                .not_valid_after(start + dt.timedelta(days=365 * 30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(self.issuer)]), critical=False)
                .sign(self.key.danger_private_key(), None)
            )
        return self._ca_cert

    def issue_x509_svid(
        self, spiffe_id: SpiffeId, expires_at: float
    ) -> tuple[x509.Certificate, Ed25519PrivateKey]:
        leaf_key = Ed25519PrivateKey.generate()
        now = dt.datetime.fromtimestamp(self.clock.now(), tz=dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scopegraph")]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=5))
            .not_valid_after(dt.datetime.fromtimestamp(expires_at, tz=dt.timezone.utc))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(spiffe_id))]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # The X.509-SVID standard: a leaf must be usable for signatures, never to sign certificates.
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key.danger_private_key(), None)
        )
        return cert, leaf_key

    def verify_x509_svid(self, cert: x509.Certificate) -> SpiffeId:
        """Check the certificate was signed by this domain, is in date, and return its ID.

        Raises:
            IdentityError: wrong signer, out of date, or no single SPIFFE URI SAN.
        """
        try:
            self.key.public_key.verify(cert.signature, cert.tbs_certificate_bytes)
        except Exception:
            raise IdentityError("X.509-SVID is not signed by this trust domain") from None
        now = dt.datetime.fromtimestamp(self.clock.now(), tz=dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise IdentityError("X.509-SVID is outside its validity period")
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise IdentityError("X.509-SVID must carry exactly one URI SAN")
        return SpiffeId.parse(uris[0])

    def bundle(self) -> Bundle:
        return Bundle(trust_domain=self.name, keys=(self.key.public_key,), kids=(self.key.kid,))


@dataclass(frozen=True)
class Bundle:
    """The public half of a trust domain: what a tool server needs to verify grants."""

    trust_domain: str
    keys: tuple[Ed25519PublicKey, ...] = field(repr=False)
    kids: tuple[str, ...]

    def jwks(self) -> dict[str, Any]:
        out = []
        for key, kid in zip(self.keys, self.kids, strict=True):
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            out.append({
                "kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "alg": "EdDSA",
                "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
            })
        return {"keys": out, "spiffe_sequence": 1, "trust_domain": self.trust_domain}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), indent=2)


def _load_or_create_key(store: Store, name: str, now: float) -> SigningKey:
    pem = store.load_signing_key(name)
    if pem is None:
        fresh = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        # Two processes may race to create the key; the store keeps the first.
        pem = store.save_signing_key(name, fresh, now)
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"stored key {name!r} is not an Ed25519 key")
    return SigningKey(key)


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _derive_jwt_svid_key(key: Ed25519PrivateKey, domain: str) -> ec.EllipticCurvePrivateKey:
    """A P-256 key derived from the domain's Ed25519 key: HKDF-SHA256 to 384 bits, reduced into [1, n-1]
    (the extra 128 bits make the bias negligible, as in FIPS 186-5 A.2.1)."""
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"scopegraph jwt-svid p-256 v1",
               info=domain.encode("utf-8")).derive(raw)
    return ec.derive_private_key(int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1())


def load_domain_public_key(store: Store, name: str) -> Ed25519PublicKey | None:
    """The public key of a trust domain whose key the store holds, or ``None``."""
    pem = store.load_signing_key(f"trust-domain:{name}")
    if pem is None:
        return None
    key = serialization.load_pem_private_key(pem, password=None)
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else None
