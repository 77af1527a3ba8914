"""Workload identity: trust domains, SPIFFE IDs, SVIDs and the trust bundle.

Each run's planner and each executor step get their own SPIFFE ID, proved by a
JWT-SVID and an X.509-SVID. Every signature is made by a keystore (see ``trust`` and
``keys``), never with a key the store holds: grants by the ``grant`` key (EdDSA), SVIDs
and the domain's CA certificate by the ``svid`` key (ES256, because the SPIFFE JWT-SVID
standard, and so standard tooling such as py-spiffe, accepts no EdDSA). Verification
picks the key by the ``kid`` a token names, among the current and previous keys, so
what was signed before a rotation verifies until it expires.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from .clock import Clock, SystemClock
from .errors import ConfigError, IdentityError, KeystoreError
from .keys import Keystore, VerificationKey, sign_certificate, sign_jwt
from .store import Store
from .trust import TrustRoots

_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}\Z")
# Segments of [A-Za-z0-9._-], none empty, none "." or "..": one match for the whole path
# (an ID is parsed for every step's identity).
_PATH = re.compile(r"^(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+(?:/(?!\.\.?(?:/|\Z))[A-Za-z0-9._-]+)*\Z")
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
        if path and not _PATH.match(path):
            raise IdentityError(f"invalid SPIFFE ID {value!r}: bad path")
        return cls(domain, "/" + path if path else "")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"


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
    """A SPIFFE trust domain: its name, and the trust roots (keystore) that sign for it."""

    def __init__(self, name: str, store: Store | None = None, *, trust: TrustRoots | None = None,
                 keystore: Keystore | None = None, clock: Clock | None = None) -> None:
        """``trust`` binds a keystore to a store; without it, ``store``'s configured keystore is bound.

        Raises:
            IdentityError: invalid name.
            KeystoreError: the keystore cannot be opened, or does not hold the keys the store records.
        """
        if not _TRUST_DOMAIN.match(name):
            raise IdentityError(f"invalid trust domain {name!r}: use lowercase letters, digits, '.', '-', '_'")
        self.name = name
        self.clock = clock or (trust.clock if trust is not None else SystemClock())
        if trust is None:
            if store is None:
                raise ConfigError(f"trust domain {name!r} needs a store or trust roots")
            trust = TrustRoots.open(store, keystore=keystore, clock=self.clock)
        self.trust = trust
        self.issuer = f"spiffe://{name}"
        self._ca: dict[str, x509.Certificate] = {}

    def __repr__(self) -> str:
        try:
            kid: str | None = self.key.kid
        except KeystoreError:  # no keystore to sign with (a store opened only to verify)
            kid = None
        return f"TrustDomain({self.name!r}, kid={kid!r})"

    @property
    def key(self) -> VerificationKey:
        """The public half of the current grant key (its ``kid`` names it in every grant)."""
        return self.trust.signer("grant").verification_key

    def id(self, *segments: str) -> SpiffeId:
        """Build a SPIFFE ID in this domain from path segments."""
        return SpiffeId.parse(f"spiffe://{self.name}/" + "/".join(segments))

    def sign(self, claims: dict[str, Any]) -> str:
        """A grant: ``claims`` signed by the keystore's current grant key, named by ``kid``."""
        return sign_jwt(self.trust.signer("grant"), claims)

    def grant_key(self, token: str) -> VerificationKey | None:
        """The key a grant names in its ``kid`` header, among the current and previous grant keys;
        ``None`` when it names a key this domain never had.

        Raises:
            IdentityError: the token has no readable header, or names no kid.
        """
        keys = self.trust.grant_keys(_header_kid(token, "grant"), self.clock.now())
        return keys[0] if keys else None

    def sign_jwt_svid(self, claims: dict[str, Any]) -> str:
        return sign_jwt(self.trust.signer("svid"), claims)

    def jwt_svid_bundle(self) -> dict[str, Any]:
        """The JWT-SVID authorities as a JWK Set (SPIFFE bundle form, ``use: jwt-svid``), current and
        previous keys: what a verifier such as py-spiffe's ``JwtBundle.parse`` needs."""
        return {"keys": [{**k.jwk(), "use": "jwt-svid"} for k in self.trust.verification_keys("svid")]}

    def issue_svid(self, spiffe_id: SpiffeId, ttl: float = SVID_TTL_SECONDS) -> Svid:
        if spiffe_id.trust_domain != self.name:
            raise IdentityError(f"{spiffe_id} is not in trust domain {self.name!r}")
        now = self.clock.now()
        return Svid(spiffe_id, self, now, now + ttl)

    def verify_jwt_svid(self, token: str, *, audience: str = JWT_SVID_AUDIENCE) -> SpiffeId:
        """Raises:
        IdentityError: the JWT-SVID does not verify.
        """
        kid = _header_kid(token, "JWT-SVID")
        key = self.trust.find("svid", kid)
        if key is None:
            raise IdentityError("JWT-SVID does not verify: it names a key this trust domain never had")
        try:
            claims = jwt.decode(
                token, key.public_key, algorithms=["ES256"], audience=audience, issuer=self.issuer,
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
        """Self-signed CA certificate of the current SVID key (stable for the key's life)."""
        signer = self.trust.signer("svid")
        cert = self._ca.get(signer.kid)
        if cert is None:
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scopegraph"),
                              x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
            start = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
            # The serial follows from the key id: the same key always makes the same certificate.
            serial = int.from_bytes(hashlib.sha256(signer.kid.encode("ascii")).digest()[:16], "big") >> 1
            cert = sign_certificate(
                x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(signer.public_key)
                .serial_number(serial)
                .not_valid_before(start)
                .not_valid_after(start + dt.timedelta(days=365 * 30))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                    encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(self.issuer)]), critical=False),
                signer)
            self._ca[signer.kid] = cert
        return cert

    def issue_x509_svid(
        self, spiffe_id: SpiffeId, expires_at: float
    ) -> tuple[x509.Certificate, Ed25519PrivateKey]:
        leaf_key = Ed25519PrivateKey.generate()
        now = dt.datetime.fromtimestamp(self.clock.now(), tz=dt.timezone.utc)
        cert = sign_certificate(
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
                encipher_only=False, decipher_only=False), critical=True),
            self.trust.signer("svid"))
        return cert, leaf_key

    def verify_x509_svid(self, cert: x509.Certificate) -> SpiffeId:
        """Check the certificate was signed by this domain (a current or previous SVID key), is in
        date, and return its ID.

        Raises:
            IdentityError: wrong signer, out of date, or no single SPIFFE URI SAN.
        """
        if not any(_signed_by(cert, key) for key in self.trust.verification_keys("svid")):
            raise IdentityError("X.509-SVID is not signed by this trust domain")
        now = dt.datetime.fromtimestamp(self.clock.now(), tz=dt.timezone.utc)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise IdentityError("X.509-SVID is outside its validity period")
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise IdentityError("X.509-SVID must carry exactly one URI SAN")
        return SpiffeId.parse(uris[0])

    def bundle(self) -> Bundle:
        """The grant verification keys, current and previous (newest first)."""
        return Bundle(trust_domain=self.name, keys=self.trust.verification_keys("grant"))


@dataclass(frozen=True)
class Bundle:
    """The public half of a trust domain: what a tool server needs to verify grants."""

    trust_domain: str
    keys: tuple[VerificationKey, ...]

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(k.kid for k in self.keys)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk() for k in self.keys], "spiffe_sequence": 1, "trust_domain": self.trust_domain}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), indent=2)


def _header_kid(token: str, what: str) -> str:
    """The ``kid`` of a JWT's header, unverified: it only picks the key the signature is checked with.

    Raises:
        IdentityError: no readable header or no kid.
    """
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.PyJWTError:
        raise IdentityError(f"{what} is malformed: its header cannot be read") from None
    if not isinstance(kid, str) or not kid:
        raise IdentityError(f"{what} names no signing key (kid)")
    return kid


def _signed_by(cert: x509.Certificate, key: VerificationKey) -> bool:
    if not isinstance(key.public_key, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
        return False
    try:
        key.public_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    except InvalidSignature:
        return False
    return True
