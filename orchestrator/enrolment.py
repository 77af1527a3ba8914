"""The store's enrolled approvers, each vouched for by the keystore.

``scopegraph approvers add NAME --key PUBKEY`` records an approver's normalised name and
Ed25519 public key, with an *endorsement*: the keystore's ledger key signing both (see
``trust``). Whoever can write the store but not use the keystore cannot enrol anyone,
or swap a key: an enrolment without a valid endorsement is ignored and reported. Every
enrolment and removal is also a ledger record, so ``audit verify`` can tell when the
table and the history disagree (a removal undone by editing the store).

While at least one approver is enrolled, every answer must be signed by the answering
approver's enrolled key (``approvers.verify_answer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

from .approvers import Approver, ApproverEnrolment, normalize_name, parse_public_key
from .clock import Clock, SystemClock
from .errors import ApprovalError, ConfigError
from .keys.base import jwk_thumbprint
from .ledger import LEDGER_RUN, Ledger, RecordKind
from .store import ApproverRecord, Store
from .store.web_records import WebStore
from .trust import TrustRoots


def anyone_enrolled(store: Store) -> bool:
    """Whether answers must be signed: someone is enrolled with a key or a passkey (even one
    with a bad endorsement: a planted enrolment never makes answers optional)."""
    return bool(store.list_approvers()) or bool(cast(WebStore, store).list_passkeys())


def enrolment_statement(record: ApproverRecord) -> dict[str, object]:
    """What an enrolment's endorsement signs: the name, the key and when."""
    return {"what": "approver", "name": record.name, "display": record.display, "kid": record.kid,
            "public_pem": record.public_pem, "enrolled_at": record.enrolled_at}


@dataclass(frozen=True, kw_only=True)
class Enrolled:
    """An enrolled approver whose enrolment the keystore vouched for."""

    approver: Approver
    record: ApproverRecord


class ApproverRegistry:
    """Enrols, lists and removes approvers; finds the enrolled key an answer must verify with."""

    def __init__(self, store: Store, trust: TrustRoots, *, clock: Clock | None = None,
                 ledger: Ledger | None = None) -> None:
        self.store = store
        self.trust = trust
        self.clock = clock or trust.clock or SystemClock()
        self.ledger = ledger  # enrolments and removals are audit records

    def add(self, name: str, key: str) -> Enrolled:
        """Enrol ``name`` with the Ed25519 public key ``key`` (PEM or ``ssh-ed25519 …``).

        Raises:
            ConfigError: invalid name or key, or ``name`` (under any spelling) is enrolled already.
        """
        try:
            enrolment = ApproverEnrolment(name=name, key=key)
        except ValueError as exc:
            first = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise ConfigError(str(first).removeprefix("Value error, ")) from None
        approver = enrolment.approver()
        unsigned = ApproverRecord(name=approver.name, display=approver.display, public_pem=approver.public_pem(),
                                  kid=approver.kid, enrolled_at=self.clock.now(), endorsement="")
        record = replace(unsigned, endorsement=self.trust.endorse(enrolment_statement(unsigned)))
        with self.store.atomic():
            if not self.store.add_approver(record):
                raise ConfigError(f"an approver named {name!r} is enrolled already: remove them first")
            self._audit("approver_enrolled", approver=record.name, display=record.display, kid=record.kid,
                        fingerprint=approver.fingerprint)
        return Enrolled(approver=approver, record=record)

    def remove(self, name: str) -> bool:
        """Remove the enrolled approver ``name`` (any spelling); the record stays, for audit.

        Raises:
            ConfigError: invalid name.
        """
        normal = normalize_name(name)
        with self.store.atomic():
            removed = self.store.remove_approver(normal, at=self.clock.now())
            removed = cast(WebStore, self.store).remove_passkeys(normal, at=self.clock.now()) > 0 or removed
            if removed:
                self._audit("approver_removed", approver=normal)
        return removed

    def enrolled(self) -> list[Enrolled]:
        """The approvers enrolled now, each with a valid endorsement (others are ignored)."""
        return [e for e in (self._checked(r) for r in self.store.list_approvers()) if e is not None]

    def records(self, *, include_removed: bool = False) -> list[ApproverRecord]:
        return self.store.list_approvers(include_removed=include_removed)

    def any_enrolled(self) -> bool:
        """Whether answers must be signed: some approver is enrolled (even with a bad endorsement)."""
        return anyone_enrolled(self.store)

    def find(self, name: str) -> Approver:
        """The enrolled approver ``name`` denotes.

        Raises:
            ApprovalError: nobody of that name is enrolled, or the enrolment was not made
                with this store's keystore (planted).
        """
        try:
            normal = normalize_name(name)
        except ConfigError as exc:
            raise ApprovalError(str(exc)) from None
        for record in self.store.list_approvers():
            if record.name == normal:
                checked = self._checked(record)
                if checked is None:
                    raise ApprovalError(f"the enrolment of {name!r} was not made with this store's keystore: "
                                        "refusing answers under it")
                return checked.approver
        raise ApprovalError(f"{name!r} is not an enrolled approver: answers must be signed by an enrolled key "
                            "(scopegraph approvers list)")

    def by_kid(self, kid: str, records: Sequence[ApproverRecord] | None = None) -> list[Enrolled]:
        """Every enrolment (current or removed) of key ``kid`` whose endorsement verifies."""
        rows = records if records is not None else self.store.list_approvers(include_removed=True)
        return [e for e in (self._checked(r) for r in rows if r.kid == kid) if e is not None]

    def _checked(self, record: ApproverRecord) -> Enrolled | None:
        if not self.trust.endorsed(enrolment_statement(record), record.endorsement):
            return None
        try:
            key = parse_public_key(record.public_pem)
        except ConfigError:
            return None
        if jwk_thumbprint(key) != record.kid:
            return None
        return Enrolled(approver=Approver(name=record.name, display=record.display, public_key=key, kid=record.kid),
                        record=record)

    def _audit(self, kind: RecordKind, **data: object) -> None:
        if self.ledger is not None:
            self.ledger.append(kind, LEDGER_RUN, **data)
            self.ledger.sign_head()  # witnessed and signed at once
