"""A keystore in a PKCS#11 token (an HSM, or SoftHSM2 in tests), through ``python-pkcs11``.

Keys are generated inside the token (``CKM_EC_EDWARDS_KEY_PAIR_GEN`` for Ed25519,
``CKM_EC_KEY_PAIR_GEN`` on P-256) as token objects with ``CKA_SENSITIVE`` true and
``CKA_EXTRACTABLE`` false, and the token signs (``CKM_EDDSA``; ``CKM_ECDSA`` over a
SHA-256 digest): the private value never reaches this process. A key that the token
reports as extractable, or as not generated in the token (``CKA_LOCAL`` false: imported,
perhaps planted), is refused.

Objects are labelled ``<namespace>/<purpose>/<generation>`` (the same bytes as
``CKA_ID``); the current key of a purpose is its newest generation with a private key.
Rotation generates the next generation and destroys the previous private key; public
key objects stay for verification.

The login state of a token is shared by all sessions of a process, and closing a
logged-in session logs them all out: so keystores on the same token share one session
(reference-counted, guarded by a lock), and a second keystore must present the same PIN.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random

from ..errors import KeystoreError
from .base import PURPOSE_ALGORITHM, Purpose, SignerBase, VerificationKey, check_purpose

PIN_ENV = "SCOPEGRAPH_PKCS11_PIN"
MODULE_ENV = "SCOPEGRAPH_PKCS11_MODULE"
_ED25519_PARAMS = bytes.fromhex("06032b6570")  # OID 1.3.101.112 (id-Ed25519), DER
_P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # OID 1.2.840.10045.3.1.7 (prime256v1), DER
_ED25519_POINT = 32
_P256_POINT = 65


@dataclass
class _Connection:
    session: Any
    pin_digest: bytes
    users: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)


_CONNECTIONS: dict[tuple[str, str], _Connection] = {}
_CONNECTIONS_LOCK = threading.Lock()


class Pkcs11Signer(SignerBase):
    """Signs with a private key that stays in the token."""

    def __init__(self, verification_key: VerificationKey, key: Any, connection: _Connection) -> None:
        super().__init__(verification_key)
        self._key = key
        self._connection = connection

    def sign(self, data: bytes) -> bytes:
        """Raises:
        KeystoreError: the token refused to sign (for example, the key was destroyed).
        """
        try:
            with self._connection.lock:
                if self.algorithm == "EdDSA":
                    return bytes(self._key.sign(data, mechanism=Mechanism.EDDSA))
                return bytes(self._key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"the PKCS#11 token refused to sign with {self.purpose!r} key "
                                f"{self.kid!r}: {type(exc).__name__}") from None


class Pkcs11Keystore:
    """Private keys in a PKCS#11 token: generated there, used there, never exported."""

    def __init__(self, *, module: str, token_label: str, pin: str, namespace: str = "scopegraph") -> None:
        """Open a logged-in session on the token labelled ``token_label``.

        Raises:
            KeystoreError: the module cannot be loaded, no such token, the PIN is refused,
                or the namespace contains ``/``.
        """
        if not namespace or "/" in namespace:
            raise KeystoreError(f"invalid PKCS#11 key namespace {namespace!r}: non-empty, without '/'")
        self.module = module
        self.token_label = token_label
        self.namespace = namespace
        self._key = (os.path.realpath(module), token_label)
        self._connection = _connect(self._key, module, token_label, pin)
        self._closed = False

    @classmethod
    def from_uri(cls, uri: str, environ: Mapping[str, str] | None = None) -> Pkcs11Keystore:
        """Open ``pkcs11:token=LABEL?module-path=/path/to/module.so`` (RFC 7512 attributes).

        The PIN comes from ``$SCOPEGRAPH_PKCS11_PIN``, never from the URI; the module
        from ``module-path`` or ``$SCOPEGRAPH_PKCS11_MODULE``.

        Raises:
            KeystoreError: not a ``pkcs11:`` URI, no token, no module, no PIN, or a PIN in the URI.
        """
        env = os.environ if environ is None else environ
        if not uri.startswith("pkcs11:"):
            raise KeystoreError("a PKCS#11 keystore URI must start with 'pkcs11:'")
        path, _, query = uri[len("pkcs11:"):].partition("?")
        attrs = dict(_pairs(path, ";")) | dict(_pairs(query, "&"))
        if "pin-value" in attrs:
            raise KeystoreError(f"a PKCS#11 keystore URI must not carry the PIN: set {PIN_ENV}")
        token = attrs.get("token")
        module = attrs.get("module-path") or env.get(MODULE_ENV)
        pin = env.get(PIN_ENV)
        if not token:
            raise KeystoreError("the PKCS#11 keystore URI names no token (token=LABEL)")
        if not module:
            raise KeystoreError(f"the PKCS#11 keystore URI names no module: add ?module-path=… or set {MODULE_ENV}")
        if not pin:
            raise KeystoreError(f"no PIN for PKCS#11 token {token!r}: set {PIN_ENV}")
        return cls(module=module, token_label=token, pin=pin, namespace=attrs.get("object", "scopegraph"))

    @property
    def location(self) -> str:
        return f"pkcs11:token={self.token_label}"

    def __repr__(self) -> str:
        return f"Pkcs11Keystore(token={self.token_label!r}, namespace={self.namespace!r})"

    # the Keystore protocol ---------------------------------------------------------------
    def signer(self, purpose: str) -> Pkcs11Signer:
        """The current signer of ``purpose``; its first key is generated on first use.

        Raises:
            KeystoreError: unknown purpose; the key is extractable, imported, ambiguous or
                does not match its public key; or the token failed.
        """
        checked = check_purpose(purpose)
        with self._guard() as session:
            generation = max(self._generations(session, checked, ObjectClass.PRIVATE_KEY), default=None)
            if generation is None:
                generation = self._generate(session, checked)
            private = self._one(session, ObjectClass.PRIVATE_KEY, checked, generation)
            _check_private(private, self._label(checked, generation))
            public = self._public(session, checked, generation)
        return Pkcs11Signer(public, private, self._connection)

    def verification_keys(self, purpose: str) -> tuple[VerificationKey, ...]:
        checked = check_purpose(purpose)
        with self._guard() as session:
            generations = sorted(self._generations(session, checked, ObjectClass.PUBLIC_KEY), reverse=True)
            return tuple(self._public(session, checked, g) for g in generations)

    def rotate(self, purpose: str) -> VerificationKey:
        checked = check_purpose(purpose)
        with self._guard() as session:
            generation = self._generate(session, checked)
            for old in self._generations(session, checked, ObjectClass.PRIVATE_KEY):
                if old < generation:
                    for obj in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                                    Attribute.LABEL: self._label(checked, old)}):
                        obj.destroy()
            return self._public(session, checked, generation)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _disconnect(self._key)

    # token objects -----------------------------------------------------------------------
    def _guard(self) -> _Session:
        if self._closed:
            raise KeystoreError(f"the PKCS#11 keystore on token {self.token_label!r} is closed")
        return _Session(self._connection)

    def _label(self, purpose: Purpose, generation: int) -> str:
        return f"{self.namespace}/{purpose}/{generation}"

    def _generations(self, session: Any, purpose: Purpose, object_class: ObjectClass) -> set[int]:
        prefix = f"{self.namespace}/{purpose}/"
        out = set()
        for obj in session.get_objects({Attribute.CLASS: object_class}):
            label = obj.label or ""
            if label.startswith(prefix) and label[len(prefix):].isdigit():
                out.add(int(label[len(prefix):]))
        return out

    def _one(self, session: Any, object_class: ObjectClass, purpose: Purpose, generation: int) -> Any:
        label = self._label(purpose, generation)
        found = list(session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: label}))
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise KeystoreError(f"PKCS#11 token {self.token_label!r} holds {what} {object_class.name.lower()} "
                                f"objects labelled {label!r}: expected exactly one")
        return found[0]

    def _public(self, session: Any, purpose: Purpose, generation: int) -> VerificationKey:
        obj = self._one(session, ObjectClass.PUBLIC_KEY, purpose, generation)
        return VerificationKey.of(purpose, generation, _public_key(obj[Attribute.EC_POINT], PURPOSE_ALGORITHM[purpose]))

    def _generate(self, session: Any, purpose: Purpose) -> int:
        generation = max(self._generations(session, purpose, ObjectClass.PUBLIC_KEY)
                         | self._generations(session, purpose, ObjectClass.PRIVATE_KEY), default=0) + 1
        label = self._label(purpose, generation)
        eddsa = PURPOSE_ALGORITHM[purpose] == "EdDSA"
        try:
            _, private = session.generate_keypair(
                KeyType.EC_EDWARDS if eddsa else KeyType.EC,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN if eddsa else Mechanism.EC_KEY_PAIR_GEN,
                id=label.encode("utf-8"), label=label, store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={Attribute.EC_PARAMS: _ED25519_PARAMS if eddsa else _P256_PARAMS,
                                 Attribute.TOKEN: True, Attribute.PRIVATE: False},
                private_template={Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                                  Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DERIVE: False},
            )
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"PKCS#11 token {self.token_label!r} cannot generate a "
                                f"{PURPOSE_ALGORITHM[purpose]} key: {type(exc).__name__}") from None
        _check_private(private, label)
        return generation


class _Session:
    """Holds the shared connection's lock for one keystore operation; maps token errors."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def __enter__(self) -> Any:
        self._connection.lock.acquire()
        return self._connection.session

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._connection.lock.release()
        if isinstance(exc, p11.PKCS11Error):
            raise KeystoreError(f"the PKCS#11 token failed: {type(exc).__name__}") from None


def _check_private(private: Any, label: str) -> None:
    """Raises:
    KeystoreError: the token says the key could leave it, or was not generated in it.
    """
    attrs: dict[Attribute, bool | None] = {}
    for attribute in (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                      Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL):
        try:
            attrs[attribute] = bool(private[attribute])
        except p11.PKCS11Error:
            attrs[attribute] = None
    if not attrs[Attribute.LOCAL]:
        raise KeystoreError(f"PKCS#11 key {label!r} was not generated in the token (imported?): refusing it")
    if not attrs[Attribute.SENSITIVE] or attrs[Attribute.EXTRACTABLE] is not False \
            or not attrs[Attribute.NEVER_EXTRACTABLE] or not attrs[Attribute.ALWAYS_SENSITIVE]:
        raise KeystoreError(f"PKCS#11 key {label!r} is or was extractable: refusing it")


def _public_key(point: bytes, algorithm: str) -> Ed25519PublicKey | ec.EllipticCurvePublicKey:
    """The public key from ``CKA_EC_POINT``: a DER OCTET STRING, or (some tokens) the raw point."""
    raw_len = _ED25519_POINT if algorithm == "EdDSA" else _P256_POINT
    if len(point) == raw_len + 2 and point[0] == 0x04 and point[1] == raw_len:
        point = point[2:]
    if len(point) != raw_len:
        raise KeystoreError(f"the PKCS#11 token returned a {len(point)}-byte public point for a {algorithm} key")
    if algorithm == "EdDSA":
        return Ed25519PublicKey.from_public_bytes(point)
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)


def _pairs(text: str, sep: str) -> list[tuple[str, str]]:
    out = []
    for part in filter(None, text.split(sep)):
        name, _, value = part.partition("=")
        out.append((urllib.parse.unquote(name), urllib.parse.unquote(value)))
    return out


def _connect(key: tuple[str, str], module: str, token_label: str, pin: str) -> _Connection:
    pin_digest = hashlib.sha256(pin.encode("utf-8")).digest()
    with _CONNECTIONS_LOCK:
        existing = _CONNECTIONS.get(key)
        if existing is not None:
            if not hmac.compare_digest(existing.pin_digest, pin_digest):
                raise KeystoreError(f"the PIN for PKCS#11 token {token_label!r} was refused")
            existing.users += 1
            return existing
        try:
            lib = pkcs11.lib(module)
        except (p11.PKCS11Error, RuntimeError, OSError) as exc:
            raise KeystoreError(f"cannot load PKCS#11 module {module}: {type(exc).__name__}") from None
        try:
            token = _get_token(lib, token_label)
        except p11.NoSuchToken:
            raise KeystoreError(f"no PKCS#11 token labelled {token_label!r} in {module}") from None
        except p11.MultipleTokensReturned:
            raise KeystoreError(f"several PKCS#11 tokens are labelled {token_label!r} in {module}") from None
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"cannot find PKCS#11 token {token_label!r}: {type(exc).__name__}") from None
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11.UserAlreadyLoggedIn:  # logged in by other code of this process
            session = token.open(rw=True)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked, p11.PinExpired):
            raise KeystoreError(f"the PIN for PKCS#11 token {token_label!r} was refused") from None
        except p11.PKCS11Error as exc:
            raise KeystoreError(f"cannot open PKCS#11 token {token_label!r}: {type(exc).__name__}") from None
        connection = _Connection(session=session, pin_digest=pin_digest)
        _CONNECTIONS[key] = connection
        return connection


@retry(retry=retry_if_exception_type((p11.GeneralError, p11.NoSuchToken)), stop=stop_after_attempt(8),
       wait=wait_random(0.02, 0.2), reraise=True)
def _get_token(lib: Any, token_label: str) -> Any:
    # A token whose objects another process is writing at that moment can fail to list
    # (SoftHSM2's file store answers CKR_GENERAL_ERROR, or leaves the token out of the slot
    # list): a read, so it is tried again. A token that is really missing fails within ~1 s.
    return lib.get_token(token_label=token_label)


def _disconnect(key: tuple[str, str]) -> None:
    with _CONNECTIONS_LOCK:
        connection = _CONNECTIONS.get(key)
        if connection is None:
            return
        connection.users -= 1
        if connection.users == 0:
            del _CONNECTIONS[key]
            with connection.lock:
                try:
                    connection.session.close()
                except p11.PKCS11Error:
                    pass
