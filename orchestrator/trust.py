"""Trust roots: a keystore bound to a store, the witness beside it, and endorsements.

The keystore holds every private key; the store records only the public keys and their
ids. Binding a keystore to a store (``TrustRoots.open``) checks that every key the store
records is one the keystore holds (or vouched for): a store whose keys were replaced, or
a keystore that is not the one the store was made with, is refused in one line, never
adopted. A store that records no keys yet (a new store, or one an old release made)
records the keystore's.

Where things are, unless configured (``$SCOPEGRAPH_KEYSTORE``, ``$SCOPEGRAPH_WITNESS``):

- a SQLite store at ``DIR/NAME.db`` has its keystore in ``DIR/keys/`` and its witness in
  ``DIR/NAME.witness.jsonl`` (the default store: ``.scopegraph/keys/`` and
  ``.scopegraph/scopegraph.witness.jsonl``);
- a PostgreSQL store has its keystore in ``.scopegraph/keys/`` of the working directory
  and its witness in ``.scopegraph/witness-<store id>.jsonl`` there; several machines
  sharing one PostgreSQL store must share one keystore (a PKCS#11 token) and should
  point ``$SCOPEGRAPH_WITNESS`` at one shared file.

An *endorsement* is the ledger key's signature over a typed statement (RFC 8785 JSON)
that the store keeps beside what it vouches for: the public half of a key an old release
kept in the store, and every approver's enrolment. Whoever can write the store cannot
make one, so a planted key or approver is refused.

Stores written by 0.1.0 kept the trust domain's private key in ``sg_keys``. Binding a
keystore moves it out: its public half is recorded, endorsed, as a retired key (grants
it signed verify until they expire, at most ``MAX_GRANT_TTL`` after the move; heads it
signed verify up to the ledger's length at the move), the keystore's own keys are made,
and the column is emptied in the same transaction. The old key is never imported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .canonical import jcs
from .clock import Clock, SystemClock
from .errors import KeystoreError
from .keys import KEYSTORE_ENV, PURPOSES, Keystore, Purpose, Signer, VerificationKey, check_purpose, open_keystore
from .keys.base import public_jwk_members
from .store import Store, TrustKeyRecord
from .witness import WITNESS_ENV, WitnessFile

ENDORSEMENT_TYPE = "scopegraph.endorsement.v1"
MAX_GRANT_TTL = 900.0  # credentials.MAX_TTL_SECONDS: how long a migrated grant key may still verify
_MIGRATED = "migrated"
_KEYSTORE = "keystore"


def state_directory(store: Store) -> Path:
    """Where a store's keystore and witness live by default: beside a SQLite file, else ``.scopegraph/``."""
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.parent
    return Path(".scopegraph")


def keystore_location(store: Store, environ: Mapping[str, str] | None = None) -> str:
    """``$SCOPEGRAPH_KEYSTORE``, or ``keys/`` in the store's state directory."""
    env = os.environ if environ is None else environ
    return env.get(KEYSTORE_ENV) or str(state_directory(store) / "keys")


def witness_path(store: Store, environ: Mapping[str, str] | None = None) -> Path:
    """``$SCOPEGRAPH_WITNESS``, or the store's own witness file in its state directory."""
    env = os.environ if environ is None else environ
    if env.get(WITNESS_ENV):
        return Path(env[WITNESS_ENV])
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.with_name(path.stem + ".witness.jsonl")
    store_id = hashlib.sha256(store.url.encode("utf-8")).hexdigest()[:16]
    return state_directory(store) / f"witness-{store_id}.jsonl"


def open_default_keystore(store: Store, *, create: bool = True, environ: Mapping[str, str] | None = None
                          ) -> Keystore:
    """The keystore configured for ``store`` (see the module docstring).

    Raises:
        KeystoreError: it cannot be opened safely; with ``create=False``, a file keystore
            that does not exist (a command that only reads never makes keys).
    """
    env = os.environ if environ is None else environ
    location = keystore_location(store, env)
    if not create and not location.startswith("pkcs11:") and not Path(location).is_dir():
        raise KeystoreError(f"no keystore at {location}: the keys of store {store.url!r} are not here "
                            f"(set {KEYSTORE_ENV} to where they are)")
    return open_keystore(Path(location), {**env, KEYSTORE_ENV: location})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _legacy_kid(key: VerificationKey) -> str:
    """The key id 0.1.0 put in the JWT headers it signed: SHA-256 of the raw public key, 16 hex digits."""
    raw = key.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class MigratedKey:
    """The public half of a key an old release kept in the store, and how far it may still verify."""

    key: VerificationKey
    legacy_kid: str
    retired_at: float
    records: int  # ledger heads it signed verify up to this record


class TrustRoots:
    """One store's trust roots: its keystore (signing), public keys (verifying), witness and endorsements."""

    def __init__(self, store: Store, keystore: Keystore, *, clock: Clock | None = None,
                 witness: Path | str | None = None, create: bool = True, owns_keystore: bool = False) -> None:
        """Bind ``keystore`` to ``store``.

        With ``create`` (the default), the keystore's first keys are made if it has none,
        recorded in the store, and a key an old release kept in the store is moved out.
        Without it (commands that only read) nothing is made or written.

        Raises:
            KeystoreError: the store records a key the keystore does not hold, a public key
                that differs from the keystore's, or an endorsement that does not verify.
        """
        self.store = store
        self.keystore = keystore
        self.clock = clock or SystemClock()
        self.witness_path = Path(witness) if witness is not None else witness_path(store)
        self._owns_keystore = owns_keystore
        self._keys: dict[str, tuple[VerificationKey, ...]] = {}  # verification keys, by purpose
        self._migrated: tuple[MigratedKey, ...] = ()
        self._appender: WitnessFile | None = None
        try:
            self._bind(create)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, store: Store, *, keystore: Keystore | None = None, clock: Clock | None = None,
             witness: Path | str | None = None, create: bool = True) -> TrustRoots:
        """The trust roots of ``store``: ``keystore``, or the one configured for it (see the module)."""
        if keystore is not None:
            return cls(store, keystore, clock=clock, witness=witness, create=create)
        opened = open_default_keystore(store, create=create)
        return cls(store, opened, clock=clock, witness=witness, create=create, owns_keystore=True)

    @classmethod
    def for_reading(cls, store: Store, *, clock: Clock | None = None,
                    witness: Path | str | None = None) -> TrustRoots:
        """Trust roots to verify with, making nothing that is not needed.

        The configured keystore when it exists. When it does not and the store never
        recorded a key: a store an old release wrote has its key moved out (which makes the
        keystore); any other has nothing signed to check, and gets no keys at all.

        Raises:
            KeystoreError: as ``open``; or the keystore is missing though the store records keys.
        """
        location = keystore_location(store)
        missing = not location.startswith("pkcs11:") and not Path(location).is_dir()
        recorded = store.trust_keys()
        if not recorded and store.legacy_signing_keys():
            return cls.open(store, clock=clock, witness=witness, create=True)
        if missing and not recorded:
            return cls(store, _NoKeystore(location), clock=clock, witness=witness, create=False)
        return cls.open(store, clock=clock, witness=witness, create=False)

    def close(self) -> None:
        if self._owns_keystore:
            self._owns_keystore = False
            self.keystore.close()

    def __repr__(self) -> str:
        return f"TrustRoots(store={self.store.url!r}, keystore={self.keystore.location!r})"

    # signing and verifying ---------------------------------------------------------------
    def signer(self, purpose: Purpose) -> Signer:
        """The keystore's current signer of ``purpose``."""
        return self.keystore.signer(purpose)

    def verification_keys(self, purpose: str) -> tuple[VerificationKey, ...]:
        """The keystore's current and previous public keys of ``purpose``, newest first."""
        checked = check_purpose(purpose)
        keys = self._keys.get(checked)
        if keys is None:
            keys = self._keys[checked] = self.keystore.verification_keys(checked)
        return keys

    def find(self, purpose: Purpose, kid: str) -> VerificationKey | None:
        """The keystore's key ``kid`` of ``purpose`` (looked up again once, for a rotation elsewhere)."""
        for attempt in range(2):
            for key in self.verification_keys(purpose):
                if key.kid == kid:
                    return key
            if attempt == 0:
                self._keys.pop(purpose, None)
        return None

    def migrated(self, purpose: Purpose) -> tuple[MigratedKey, ...]:
        """The endorsed public keys of ``purpose`` that an old release kept in the store."""
        return tuple(m for m in self._migrated if m.key.purpose == purpose)

    def grant_keys(self, kid: str, now: float) -> tuple[VerificationKey, ...]:
        """The keys a grant with header ``kid`` may verify with at ``now``."""
        found = self.find("grant", kid)
        if found is not None:
            return (found,)
        return tuple(m.key for m in self.migrated("grant")
                     if kid in (m.key.kid, m.legacy_kid) and now <= m.retired_at + MAX_GRANT_TTL)

    def head_keys(self, kid: str | None, seq: int) -> tuple[VerificationKey, ...]:
        """The keys a ledger head at record ``seq`` signed by ``kid`` (None: unnamed) may verify with."""
        if kid is not None:
            found = self.find("ledger", kid)
            return (found,) if found is not None else ()
        old = tuple(m.key for m in self.migrated("ledger") if seq <= m.records)
        return old + self.verification_keys("ledger")

    def rotate(self, purpose: str) -> VerificationKey:
        """Make a new current key of ``purpose`` in the keystore and record its public half.

        Raises:
            KeystoreError: the keystore cannot make the key.
        """
        checked = check_purpose(purpose)
        with self.store.atomic():
            made = self.keystore.rotate(checked)
            self._keys.pop(checked, None)
            self._record(self.verification_keys(checked))
            self.store.retire_trust_keys(checked, keep=made.kid, at=self.clock.now())
        return made

    def witness(self) -> WitnessFile:
        """The witness file, with every ledger key its entries may be signed by (to read it)."""
        self._keys.pop("ledger", None)  # another process may have rotated it
        return WitnessFile(self.witness_path, keys=self.verification_keys("ledger"))

    def witness_appender(self) -> WitnessFile:
        """The witness file, to append heads to: one object kept (it remembers the last line it
        wrote), with no keys (appending verifies nothing; ``read`` does, with ``witness()``)."""
        if self._appender is None:
            self._appender = WitnessFile(self.witness_path)
        return self._appender

    # endorsements ------------------------------------------------------------------------
    def endorse(self, statement: Mapping[str, Any]) -> str:
        """The ledger key's signature over ``statement`` (typed here), as ``KID.SIGNATURE``."""
        signer = self.signer("ledger")
        return f"{signer.kid}.{_b64url(signer.sign(_statement(statement)))}"

    def endorsed(self, statement: Mapping[str, Any], endorsement: str | None) -> bool:
        """Whether ``endorsement`` is a ledger key's signature over ``statement``."""
        kid, _, signature = (endorsement or "").partition(".")
        key = self.find("ledger", kid) if kid else None
        if key is None or not signature:
            return False
        try:
            raw = _unb64url(signature)
        except ValueError:
            return False
        return key.verifies(_statement(statement), raw)

    # binding -----------------------------------------------------------------------------
    def _bind(self, create: bool) -> None:
        if create:
            with self.store.atomic():
                self.store.lock_trust_keys()  # one binder at a time: a purpose's first key is made once
                for purpose in PURPOSES:
                    self.keystore.signer(purpose)
                recorded = self._check_recorded()
                self._refuse_planted_legacy_keys(recorded)
                self._record(tuple(k for p in PURPOSES for k in self.verification_keys(p)), recorded)
                moved = self._move_legacy_keys()
            if moved:
                self.store.erase_legacy_signing_keys()  # outside the transaction: drop the old bytes from the files
        else:
            self._refuse_planted_legacy_keys(self._check_recorded())

    def _refuse_planted_legacy_keys(self, recorded: set[tuple[str, str]]) -> None:
        """Raises:
        KeystoreError: the store holds a private key in ``sg_keys`` although its keys were
            moved to a keystore: someone put it there since (it is never adopted).
        """
        if not recorded:
            return  # a store an old release wrote: its key is moved out now
        legacy = self.store.legacy_signing_keys()
        if legacy:
            raise KeystoreError(f"store {self.store.url!r} holds a private key ({legacy[0][0]!r} in sg_keys) "
                                "although its keys moved to a keystore: it was put there since; refusing to "
                                "open it (empty sg_keys.private_pem to go on)")

    def _check_recorded(self) -> set[tuple[str, str]]:
        """Raises:
        KeystoreError: the store records a key this keystore does not hold or vouch for.
        """
        recorded: set[tuple[str, str]] = set()
        migrated = []
        for record in self.store.trust_keys():
            recorded.add((record.purpose, record.kid))
            try:
                purpose = check_purpose(record.purpose)
                jwk = json.loads(record.public_jwk)
            except (KeystoreError, ValueError):
                raise KeystoreError(f"store {self.store.url!r} records a malformed key {record.kid!r}: "
                                    "its key records were altered; refusing to open it") from None
            if record.origin == _KEYSTORE:
                held = self.find(purpose, record.kid)
                if held is None or public_jwk_members(held.public_key) != _members(jwk):
                    raise KeystoreError(
                        f"store {self.store.url!r} records {purpose!r} key {record.kid!r}, which keystore "
                        f"{self.keystore.location} does not hold: the store was made with other keys, or its "
                        "keys were replaced; refusing to open it (point SCOPEGRAPH_KEYSTORE at its keystore)")
            elif record.origin == _MIGRATED:
                migrated.append(self._check_migrated(purpose, record, jwk))
            else:
                raise KeystoreError(f"store {self.store.url!r} records key {record.kid!r} of unknown origin "
                                    f"{record.origin!r}; refusing to open it")
        self._migrated = tuple(migrated)
        return recorded

    def _check_migrated(self, purpose: Purpose, record: TrustKeyRecord, jwk: Mapping[str, Any]) -> MigratedKey:
        try:
            endorsement = json.loads(record.endorsement or "")
            records = int(endorsement["records"])
            statement = _migrated_statement(purpose, record.kid, jwk, record.retired_at, records)
            good = self.endorsed(statement, str(endorsement["by"]) + "." + str(endorsement["sig"]))
            key = VerificationKey.of(purpose, record.generation, _public_key(jwk))
        except (ValueError, KeyError, TypeError, KeystoreError):
            good = False
        if not good or key.kid != record.kid or record.retired_at is None:
            raise KeystoreError(f"store {self.store.url!r} records a migrated {purpose!r} key {record.kid!r} that "
                                f"keystore {self.keystore.location} never vouched for: refusing to open it")
        return MigratedKey(key=key, legacy_kid=_legacy_kid(key), retired_at=record.retired_at, records=records)

    def _record(self, keys: tuple[VerificationKey, ...], recorded: set[tuple[str, str]] | None = None) -> None:
        now = self.clock.now()
        for key in keys:
            if recorded is not None and (key.purpose, key.kid) in recorded:
                continue
            self.store.add_trust_key(TrustKeyRecord(
                purpose=key.purpose, kid=key.kid, generation=key.generation,
                public_jwk=json.dumps(key.jwk(), sort_keys=True), origin=_KEYSTORE, created_at=now))

    def _move_legacy_keys(self) -> bool:
        """Record the public half of each private key an old release kept in ``sg_keys``, endorsed,
        and empty the column (in the caller's transaction)."""
        legacy = self.store.legacy_signing_keys()
        if not legacy:
            return False
        now = self.clock.now()
        last = self.store.ledger_last()
        records = last[0] if last is not None else 0
        migrated = list(self._migrated)
        for name, pem in legacy:
            try:
                private = serialization.load_pem_private_key(pem, password=None)
            except (ValueError, TypeError):
                continue  # not a key anyone can sign with: it is erased all the same
            if not isinstance(private, Ed25519PrivateKey):
                continue
            for purpose in ("grant", "ledger"):
                key = VerificationKey.of(purpose, 0, private.public_key())
                jwk = key.jwk()
                statement = _migrated_statement(purpose, key.kid, jwk, now, records)
                by, _, sig = self.endorse(statement).partition(".")
                self.store.add_trust_key(TrustKeyRecord(
                    purpose=purpose, kid=key.kid, generation=0, public_jwk=json.dumps(jwk, sort_keys=True),
                    origin=_MIGRATED, created_at=now, retired_at=now,
                    endorsement=json.dumps({"by": by, "sig": sig, "records": records, "from": name},
                                           sort_keys=True)))
                migrated.append(MigratedKey(key=key, legacy_kid=_legacy_kid(key), retired_at=now, records=records))
        self.store.erase_legacy_signing_keys()
        self._migrated = tuple(migrated)
        return True


class _NoKeystore:
    """A keystore that is not there: no keys to verify with, none to sign with."""

    def __init__(self, location: str) -> None:
        self._location = location

    @property
    def location(self) -> str:
        return self._location

    def signer(self, purpose: str) -> Signer:
        raise KeystoreError(f"no keystore at {self._location}: nothing can be signed")

    def verification_keys(self, purpose: str) -> tuple[VerificationKey, ...]:
        check_purpose(purpose)
        return ()

    def rotate(self, purpose: str) -> VerificationKey:
        raise KeystoreError(f"no keystore at {self._location}: nothing to rotate")

    def close(self) -> None:
        pass


def _statement(statement: Mapping[str, Any]) -> bytes:
    return jcs({**statement, "type": ENDORSEMENT_TYPE})


def _members(jwk: Mapping[str, Any]) -> dict[str, Any]:
    return {k: jwk[k] for k in ("crv", "kty", "x", "y") if k in jwk}


def _migrated_statement(purpose: str, kid: str, jwk: Mapping[str, Any], retired_at: float | None,
                        records: int) -> dict[str, Any]:
    return {"what": "migrated-key", "purpose": purpose, "kid": kid, "jwk": _members(jwk),
            "retired_at": retired_at, "records": records}


def _public_key(jwk: Mapping[str, Any]) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
        return Ed25519PublicKey.from_public_bytes(_unb64url(str(jwk["x"])))
    if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
        x = int.from_bytes(_unb64url(str(jwk["x"])), "big")
        y = int.from_bytes(_unb64url(str(jwk["y"])), "big")
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    raise KeystoreError(f"unsupported JWK {jwk.get('kty')!r}/{jwk.get('crv')!r}")


__all__ = ["MigratedKey", "TrustRoots", "keystore_location", "open_default_keystore",
           "state_directory", "witness_path"]
