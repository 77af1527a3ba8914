"""Approvers' passkeys: enrolment by one-time invitation, and answers the authenticator signs.

``scopegraph approvers invite NAME`` makes an *invitation*: a random token, shown once as a
link, kept in the store only as its SHA-256, single-use and short-lived. Opening the link
in a browser makes a WebAuthn credential (a passkey) for NAME; its public key is recorded
with an *endorsement* (the keystore's ledger key over ``passkey_statement``, as for a key
enrolment: whoever can write the store but not use the keystore cannot plant a passkey)
and an ``approver_enrolled`` ledger record carrying the same public facts.

An answer given with a passkey is a WebAuthn assertion whose challenge is
``answer_challenge``: SHA-256 over the answer's exact bytes (``approvers.answer_message``:
approval id, action digest, decision, reason, approver) and a server nonce used once. So
the authenticator signs that one answer to that one call; the assertion is kept with the
answer and in the ledger, and ``check_passkey_answer`` verifies it again offline: the
enrolled public key, the challenge recomputed, the rpId hash and origin, the signature,
a sign count that only moves forward.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass, replace
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field

from .approvers import Decision, answer_message, normalize_name
from .clock import Clock, SystemClock
from .errors import ApprovalError, ConfigError
from .ledger import LEDGER_RUN, Ledger
from .store import Store
from .store.web_records import PasskeyRecord, WebStore
from .trust import TrustRoots

PASSKEY_ANSWER_TYPE = b"scopegraph.passkey-answer.v1"
DEFAULT_INVITATION_TTL = 15 * 60.0
MAX_INVITATION_TTL = 24 * 3600.0
ANSWER_NONCE_TTL = 5 * 60.0
_B64 = r"^[A-Za-z0-9_-]*$"  # pydantic's (Rust) regex: $ is the end of the text


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    """Raises:
    ValueError: not base64url.
    """
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_hash(token: str) -> str:
    """What the store keeps of an invitation or session token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def passkey_kid(credential_id: str) -> str:
    """A short id for a passkey in records and pages (the credential id can be long)."""
    return "passkey:" + hashlib.sha256(credential_id.encode("ascii")).hexdigest()[:16]


def answer_challenge(*, approval_id: str, digest: str, decision: Decision, approver: str, reason: str,
                     nonce: str) -> bytes:
    """The WebAuthn challenge of a passkey answer: SHA-256 of a type tag, the answer's exact
    bytes and the server's nonce, so the assertion signs this answer to this call, once.

    Raises:
        ConfigError: as ``approvers.answer_message`` (a malformed digest, decision or name).
    """
    message = answer_message(approval_id=approval_id, digest=digest, decision=decision, approver=approver,
                             reason=reason)
    return hashlib.sha256(PASSKEY_ANSWER_TYPE + b"\n" + message + b"\n" + nonce.encode("ascii")).digest()


def passkey_statement(record: PasskeyRecord) -> dict[str, object]:
    """What a passkey enrolment's endorsement signs: who, which credential and key, for which site."""
    return {"what": "passkey", "name": record.name, "display": record.display, "kid": record.kid,
            "credential_id": record.credential_id, "public_key": record.public_key, "rp_id": record.rp_id,
            "origin": record.origin, "enrolled_at": record.enrolled_at}


class PasskeyAssertion(BaseModel):
    """A WebAuthn assertion as the browser sends it (base64url fields), with the server nonce
    its challenge was made with. Untrusted until ``verify_assertion`` says otherwise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    credential_id: str = Field(min_length=1, max_length=1024, pattern=_B64)
    authenticator_data: str = Field(min_length=1, max_length=4096, pattern=_B64)
    client_data_json: str = Field(min_length=1, max_length=8192, pattern=_B64)
    signature: str = Field(min_length=1, max_length=2048, pattern=_B64)
    user_handle: str | None = Field(default=None, max_length=1024, pattern=_B64)
    nonce: str = Field(min_length=16, max_length=128, pattern=_B64)

    def credential_json(self) -> dict[str, Any]:
        response: dict[str, Any] = {"authenticatorData": self.authenticator_data,
                                    "clientDataJSON": self.client_data_json, "signature": self.signature}
        if self.user_handle:
            response["userHandle"] = self.user_handle
        return {"id": self.credential_id, "rawId": self.credential_id, "type": "public-key",
                "response": response, "clientExtensionResults": {}}


def verify_assertion(record: PasskeyRecord, assertion: PasskeyAssertion, *, challenge: bytes,
                     current_sign_count: int) -> int:
    """Check ``assertion`` against the enrolled passkey ``record``; return its new sign count.

    Raises:
        ApprovalError: another credential, a challenge, origin or rpId other than expected, a
            signature that does not verify, no user verification, or a sign count that did
            not move forward (a cloned authenticator or a replay).
    """
    import webauthn
    from webauthn.helpers.exceptions import WebAuthnException

    if assertion.credential_id != record.credential_id:
        raise ApprovalError(f"the assertion is by credential {passkey_kid(assertion.credential_id)}, "
                            f"not {record.kid}")
    try:
        verified = webauthn.verify_authentication_response(
            credential=assertion.credential_json(), expected_challenge=challenge, expected_rp_id=record.rp_id,
            expected_origin=record.origin, credential_public_key=unb64url(record.public_key),
            credential_current_sign_count=current_sign_count, require_user_verification=True)
    except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
        # The library's messages name what failed (challenge, origin, signature, count), never a key.
        raise ApprovalError(f"the passkey assertion of {record.display!r} ({record.kid}) is refused: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from None
    return int(verified.new_sign_count)


@dataclass(frozen=True, kw_only=True)
class Invitation:
    """A one-time enrolment link's token (shown once, never stored) and whom it is for."""

    token: str
    name: str
    display: str
    expires_at: float

    def __repr__(self) -> str:
        return f"Invitation(name={self.name!r}, expires_at={self.expires_at!r}, token=***)"

    def link(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/enrol#{self.token}"


class PasskeyRegistry:
    """Invites approvers, enrols their passkeys, and checks the answers signed with them."""

    def __init__(self, store: Store, trust: TrustRoots, *, clock: Clock | None = None,
                 ledger: Ledger | None = None) -> None:
        self.store = store
        self.records = cast(WebStore, store)
        self.trust = trust
        self.clock = clock or trust.clock or SystemClock()
        self.ledger = ledger

    # invitations --------------------------------------------------------------------------
    def invite(self, name: str, *, ttl: float = DEFAULT_INVITATION_TTL) -> Invitation:
        """A new invitation for ``name`` (any valid name: enrolling makes them an approver).

        Raises:
            ConfigError: an invalid name, or ``ttl`` not in (0, 24 h].
        """
        normal = normalize_name(name)
        if not 0 < ttl <= MAX_INVITATION_TTL:
            raise ConfigError(f"an invitation lasts more than 0 seconds and at most {MAX_INVITATION_TTL:.0f}")
        now = self.clock.now()
        invitation = Invitation(token=secrets.token_urlsafe(32), name=normal, display=name, expires_at=now + ttl)
        with self.store.atomic():
            self.records.add_invitation(token_hash(invitation.token), name=normal, display=name, created_at=now,
                                        expires_at=invitation.expires_at)
            self._audit("approver_invited", approver=normal, display=name, expires_at=invitation.expires_at)
        return invitation

    def invited(self, token: str) -> tuple[str, str] | None:
        """Whom an unused, unexpired invitation is for (name, display); ``None`` otherwise."""
        return self.records.invitation(token_hash(token), now=self.clock.now())

    def enrol(self, token: str, *, credential_id: str, public_key: str, sign_count: int, rp_id: str,
              origin: str) -> PasskeyRecord:
        """Spend the invitation ``token`` and enrol the verified credential for its approver.

        Raises:
            ApprovalError: the invitation is unknown, spent or expired, or the credential is
                enrolled already.
        """
        now = self.clock.now()
        with self.store.atomic():
            whom = self.records.use_invitation(token_hash(token), now=now)
            if whom is None:
                raise ApprovalError("this invitation is unknown, used or expired: ask for a new one "
                                    "(scopegraph approvers invite NAME)")
            name, display = whom
            unsigned = PasskeyRecord(credential_id=credential_id, name=name, display=display, public_key=public_key,
                                     kid=passkey_kid(credential_id), rp_id=rp_id, origin=origin,
                                     sign_count=sign_count, enrolled_at=now, endorsement="")
            record = replace(unsigned, endorsement=self.trust.endorse(passkey_statement(unsigned)))
            if not self.records.add_passkey(record):
                raise ApprovalError(f"passkey {record.kid} is enrolled already")
            self._audit("approver_enrolled", approver=name, display=display, kid=record.kid, method="passkey",
                        credential_id=credential_id, public_key=public_key, rp_id=rp_id, origin=origin)
        return record

    # passkeys -----------------------------------------------------------------------------
    def endorsed(self, record: PasskeyRecord) -> bool:
        return self.trust.endorsed(passkey_statement(record), record.endorsement)

    def passkeys(self, name: str) -> list[PasskeyRecord]:
        """``name``'s live passkeys whose enrolment the keystore vouched for."""
        return [r for r in self.records.list_passkeys(name=normalize_name(name)) if self.endorsed(r)]

    def live(self, credential_id: str) -> PasskeyRecord:
        """The live, vouched-for passkey ``credential_id``.

        Raises:
            ApprovalError: unknown, removed, or not enrolled with this store's keystore.
        """
        record = self.records.get_passkey(credential_id)
        if record is None or record.removed_at is not None:
            raise ApprovalError(f"passkey {passkey_kid(credential_id)} is not enrolled")
        if not self.endorsed(record):
            raise ApprovalError(f"passkey {record.kid} was not enrolled with this store's keystore: refused")
        return record

    def check_answer(self, *, approval_id: str, digest: str, decision: Decision, approver: str, reason: str,
                     assertion: PasskeyAssertion) -> tuple[str, dict[str, Any]]:
        """Verify a passkey answer and spend its nonce; return the passkey's kid and the
        evidence to keep with the answer. Call inside the transaction that records the answer,
        so a refused answer spends nothing and an accepted one cannot be given twice.

        Raises:
            ApprovalError: the nonce is unknown, spent, expired or for another request or
                approver; the passkey is not ``approver``'s live, vouched-for passkey; or the
                assertion does not verify (see ``verify_assertion``).
        """
        try:
            name = normalize_name(approver)
        except ConfigError as exc:
            raise ApprovalError(str(exc)) from None
        record = self.live(assertion.credential_id)
        if record.name != name:
            raise ApprovalError(f"passkey {record.kid} belongs to {record.display!r}, not {approver!r}")
        now = self.clock.now()
        if self.records.take_challenge(assertion.nonce, purpose="answer", subject=answer_subject(approval_id, name),
                                       now=now) is None:
            raise ApprovalError(f"the passkey answer to {approval_id!r} has no live challenge: it was used already, "
                                "expired, or was made for another request")
        challenge = answer_challenge(approval_id=approval_id, digest=digest, decision=decision, approver=approver,
                                     reason=reason, nonce=assertion.nonce)
        count = verify_assertion(record, assertion, challenge=challenge, current_sign_count=record.sign_count)
        if not self.records.advance_sign_count(record.credential_id, count, at=now):
            raise ApprovalError(f"the sign count of passkey {record.kid} did not move forward: a replay or a "
                                "cloned authenticator")
        return record.kid, {**assertion.model_dump(exclude_none=True), "sign_count": count}

    def new_answer_nonce(self, approval_id: str, approver: str) -> str:
        """A fresh nonce for one answer by ``approver`` to ``approval_id`` (single use, minutes)."""
        nonce = secrets.token_urlsafe(24)
        subject = answer_subject(approval_id, normalize_name(approver))
        self.records.add_challenge(nonce, purpose="answer", subject=subject,
                                   data=json.dumps({"approval_id": approval_id}),
                                   expires_at=self.clock.now() + ANSWER_NONCE_TTL)
        return nonce

    def _audit(self, kind: Any, **data: object) -> None:
        if self.ledger is not None:
            self.ledger.append(kind, LEDGER_RUN, **data)
            self.ledger.sign_head()


def answer_subject(approval_id: str, name: str) -> str:
    """The subject an answer nonce is made for: one request, one approver."""
    return f"{approval_id}\n{name}"


# offline checks (``audit verify``) --------------------------------------------------------------
def check_passkey_answer(record: PasskeyRecord, data: dict[str, Any], *, previous_count: int,
                         seen_nonces: set[str]) -> int:
    """Verify a recorded passkey answer (an ``approval_decided`` ledger record's data) offline;
    return the sign count it carried.

    Raises:
        ApprovalError: the evidence is malformed, its nonce was used before, the approver is
            not the passkey's, or the assertion does not verify.
    """
    evidence = data.get("passkey")
    if not isinstance(evidence, dict):
        raise ApprovalError("the passkey evidence is missing")
    fields = {k: v for k, v in evidence.items() if k != "sign_count"}
    try:
        assertion = PasskeyAssertion.model_validate(fields)
    except ValueError:
        raise ApprovalError("the passkey evidence is malformed") from None
    if assertion.nonce in seen_nonces:
        raise ApprovalError(f"the passkey assertion's nonce was used by an earlier answer (a replay of {record.kid})")
    seen_nonces.add(assertion.nonce)
    who = str(data.get("approver"))
    try:
        if normalize_name(who) != record.name:
            raise ApprovalError(f"the answer names {who!r} but passkey {record.kid} is {record.display!r}'s")
        decision: Decision = "approve" if data.get("answer") == "approve" else "deny"
        challenge = answer_challenge(approval_id=str(data.get("approval_id")), digest=str(data.get("digest")),
                                     decision=decision, approver=who, reason=str(data.get("reason") or ""),
                                     nonce=assertion.nonce)
    except ConfigError as exc:
        raise ApprovalError(str(exc)) from None
    return verify_assertion(record, assertion, challenge=challenge, current_sign_count=previous_count)
