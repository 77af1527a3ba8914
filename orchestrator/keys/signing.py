"""Turning a ``Signer``'s signatures into documents others verify: JWTs and X.509 certificates.

PyJWT and cryptography's ``CertificateBuilder`` sign only with a private key object in
this process; a token-held key is not one. So a JWT is assembled here (JWS compact
serialization, RFC 7515), and a certificate is built by cryptography with a throwaway
key of the same algorithm (the to-be-signed part depends only on the signature
algorithm, never on the signing key), then re-signed by the signer and reassembled.
"""

from __future__ import annotations

import base64
import functools
import json
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import KeystoreError
from .base import Signer

# DER AlgorithmIdentifier of each signature algorithm (RFC 8410; RFC 5758: no parameters).
_ALGORITHM_IDENTIFIER = {
    "EdDSA": bytes.fromhex("300506032b6570"),
    "ES256": bytes.fromhex("300a06082a8648ce3d040302"),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_jwt(signer: Signer, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
    """A compact JWS of ``claims`` with header ``alg``, ``typ: JWT`` and the signer's ``kid``."""
    if headers:
        header = _b64url(_compact({"alg": signer.algorithm, "typ": "JWT", **headers, "kid": signer.kid}).encode())
    else:  # the same for every token of a key: written once
        header = _plain_header(signer.algorithm, signer.kid)
    signing_input = header + "." + _b64url(_compact(dict(claims)).encode())
    return signing_input + "." + _b64url(signer.sign(signing_input.encode("ascii")))


_compact = json.JSONEncoder(separators=(",", ":")).encode  # ``json.dumps(…, separators=(",", ":"))``


@functools.lru_cache(maxsize=64)
def _plain_header(algorithm: str, kid: str) -> str:
    return _b64url(_compact({"alg": algorithm, "typ": "JWT", "kid": kid}).encode())


def sign_certificate(builder: x509.CertificateBuilder, signer: Signer) -> x509.Certificate:
    """The certificate ``builder`` describes, signed by ``signer``.

    Raises:
        KeystoreError: the signer's algorithm has no X.509 encoding here.
    """
    placeholder: Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    if signer.algorithm == "EdDSA":
        placeholder, digest = Ed25519PrivateKey.generate(), None
    elif signer.algorithm == "ES256":
        placeholder, digest = ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()
    else:  # pragma: no cover - Algorithm is a closed set
        raise KeystoreError(f"no X.509 signature encoding for {signer.algorithm!r}")
    tbs = builder.sign(placeholder, digest).tbs_certificate_bytes
    signature = signer.sign(tbs)
    if signer.algorithm == "ES256":
        half = len(signature) // 2
        signature = encode_dss_signature(int.from_bytes(signature[:half], "big"),
                                         int.from_bytes(signature[half:], "big"))
    bit_string = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + _ALGORITHM_IDENTIFIER[signer.algorithm] + bit_string
    return x509.load_der_x509_certificate(b"\x30" + _der_length(len(body)) + body)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets
