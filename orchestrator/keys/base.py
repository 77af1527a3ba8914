"""Purposes, verification keys and the two plug points: ``Signer`` and ``Keystore``.

Every private key scopegraph uses has one purpose and lives in a keystore, never in the
store: ``grant`` signs grants, ``svid`` issues SVIDs (JWT-SVIDs and X.509-SVIDs),
``ledger`` signs ledger heads and witness entries. A purpose's algorithm is fixed:
EdDSA (Ed25519) for grants and ledger heads; ES256 (ECDSA P-256) for SVIDs, because the
SPIFFE JWT-SVID standard, and so py-spiffe, accepts only RSA, ECDSA and RSA-PSS.

A key's id (``kid``) is its RFC 7638 JWK thumbprint: it follows from the public key
alone, so anyone holding the public key can recompute it, and it never changes.
A ``VerificationKey`` is the public half with its purpose, kid and generation; a
keystore lists the current and previous ones per purpose, newest first, so that
signatures made before a rotation still verify.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import KeystoreError

Purpose = Literal["grant", "svid", "ledger"]
PURPOSES: tuple[Purpose, ...] = get_args(Purpose)
Algorithm = Literal["EdDSA", "ES256"]
PURPOSE_ALGORITHM: Mapping[Purpose, Algorithm] = {"grant": "EdDSA", "svid": "ES256", "ledger": "EdDSA"}
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey

_P256_COORDINATE_BYTES = 32


def check_purpose(value: str) -> Purpose:
    """Raises:
    KeystoreError: ``value`` is not one of the known purposes.
    """
    for purpose in PURPOSES:
        if value == purpose:
            return purpose
    raise KeystoreError(f"unknown key purpose {value!r}: expected one of {', '.join(PURPOSES)}")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def key_algorithm(key: object) -> Algorithm:
    """The JOSE algorithm a public key is used with here.

    Raises:
        KeystoreError: the key is neither Ed25519 nor ECDSA P-256.
    """
    if isinstance(key, Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise KeystoreError(f"unsupported key type {type(key).__name__}: expected Ed25519 or ECDSA P-256")


def public_jwk_members(key: PublicKey) -> dict[str, str]:
    """The required JWK members of a public key (RFC 7517/8037), nothing else."""
    if key_algorithm(key) == "EdDSA":
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    assert isinstance(key, ec.EllipticCurvePublicKey)
    numbers = key.public_numbers()
    return {"crv": "P-256", "kty": "EC",
            "x": _b64url(numbers.x.to_bytes(_P256_COORDINATE_BYTES, "big")),
            "y": _b64url(numbers.y.to_bytes(_P256_COORDINATE_BYTES, "big"))}


def jwk_thumbprint(key: PublicKey) -> str:
    """RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order."""
    members = json.dumps(public_jwk_members(key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(members.encode("ascii")).digest())


@dataclass(frozen=True, kw_only=True)
class VerificationKey:
    """The public half of one key: what a verifier needs, and nothing secret."""

    purpose: Purpose
    kid: str
    generation: int
    public_key: PublicKey = field(repr=False, compare=False)

    @classmethod
    def of(cls, purpose: Purpose, generation: int, public_key: object) -> VerificationKey:
        """Raises:
        KeystoreError: the key's algorithm is not the one ``purpose`` uses.
        """
        algorithm = key_algorithm(public_key)
        if algorithm != PURPOSE_ALGORITHM[purpose]:
            raise KeystoreError(f"{purpose!r} keys must be {PURPOSE_ALGORITHM[purpose]}, not {algorithm}")
        assert isinstance(public_key, Ed25519PublicKey | ec.EllipticCurvePublicKey)
        return cls(purpose=purpose, kid=jwk_thumbprint(public_key), generation=generation, public_key=public_key)

    @property
    def algorithm(self) -> Algorithm:
        return PURPOSE_ALGORITHM[self.purpose]

    def jwk(self) -> dict[str, str]:
        """The public JWK with its kid, algorithm and use."""
        return {**public_jwk_members(self.public_key), "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")

    def verifies(self, data: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (JWS form: raw Ed25519, or r||s for ES256) signs ``data``."""
        try:
            if isinstance(self.public_key, Ed25519PublicKey):
                self.public_key.verify(signature, data)
            else:
                if len(signature) != 2 * _P256_COORDINATE_BYTES:
                    return False
                r = int.from_bytes(signature[:_P256_COORDINATE_BYTES], "big")
                s = int.from_bytes(signature[_P256_COORDINATE_BYTES:], "big")
                self.public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


def find_key(keys: Iterable[VerificationKey], kid: str) -> VerificationKey | None:
    """The key with id ``kid`` among ``keys``, or ``None``."""
    return next((key for key in keys if key.kid == kid), None)


def jwks(keys: Iterable[VerificationKey]) -> dict[str, Any]:
    """A JWK Set of ``keys`` (RFC 7517), in the order given."""
    return {"keys": [key.jwk() for key in keys]}


@runtime_checkable
class Signer(Protocol):
    """Signs with one private key that it never shows.

    ``sign`` returns the signature in JWS form: 64 raw bytes for EdDSA, ``r || s`` for
    ES256 (``scopegraph.keys.signing`` turns it into a JWT or an X.509 signature).
    """

    @property
    def verification_key(self) -> VerificationKey: ...

    @property
    def purpose(self) -> Purpose: ...

    @property
    def kid(self) -> str: ...

    @property
    def algorithm(self) -> Algorithm: ...

    @property
    def public_key(self) -> PublicKey: ...

    def public_jwk(self) -> dict[str, str]: ...

    def public_pem(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


@runtime_checkable
class Keystore(Protocol):
    """Where the private keys live: one current key per purpose, previous ones for verification.

    ``signer`` makes the purpose's first key on first use. ``rotate`` makes a new current
    key; the previous private key is retired (destroyed), its public key kept, so that
    what it signed still verifies. Unknown purposes are refused with ``KeystoreError``.
    """

    @property
    def location(self) -> str:
        """Where the keys are, for messages (a path or a token label; never a secret)."""
        ...

    def signer(self, purpose: str) -> Signer: ...

    def verification_keys(self, purpose: str) -> tuple[VerificationKey, ...]:
        """Current and previous public keys of ``purpose``, newest first (empty before the first)."""
        ...

    def rotate(self, purpose: str) -> VerificationKey: ...

    def close(self) -> None: ...


class SignerBase:
    """What every signer shares: its public half, and a ``repr`` that shows nothing secret."""

    def __init__(self, verification_key: VerificationKey) -> None:
        self._verification_key = verification_key

    @property
    def verification_key(self) -> VerificationKey:
        return self._verification_key

    @property
    def purpose(self) -> Purpose:
        return self._verification_key.purpose

    @property
    def kid(self) -> str:
        return self._verification_key.kid

    @property
    def algorithm(self) -> Algorithm:
        return self._verification_key.algorithm

    @property
    def public_key(self) -> PublicKey:
        return self._verification_key.public_key

    def public_jwk(self) -> dict[str, str]:
        return self._verification_key.jwk()

    def public_pem(self) -> str:
        return self._verification_key.pem()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(purpose={self.purpose!r}, kid={self.kid!r}, private=<redacted>)"

    __str__ = __repr__
