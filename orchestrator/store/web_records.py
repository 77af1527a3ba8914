"""Records of the web inbox: passkeys, invitations, browser sessions and WebAuthn challenges.

Nothing here is a secret: a passkey is a public key; an invitation and a session are kept
as the SHA-256 of their token (whoever reads the store cannot sign in or enrol); a
challenge is a random nonce the browser is shown anyway. What makes each one safe is that
it is used once (``use_invitation``, ``take_challenge``), and that a passkey's sign count
only moves forward (``advance_sign_count``), each atomically in the store.

``WebRecords`` is mixed into the SQL store: its statements are written once, in the words
of the store's ``Dialect``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

PASSKEY_COLUMNS = ("credential_id, name, display, public_key, kid, rp_id, origin, sign_count, enrolled_at, "
                   "removed_at, endorsement, last_used_at")


@dataclass(frozen=True, kw_only=True)
class PasskeyRecord:
    """An approver's passkey: the credential's public key (COSE, base64url) and where it was made."""

    credential_id: str  # base64url, as WebAuthn names it
    name: str  # the approver's normalised name
    display: str
    public_key: str  # COSE_Key, base64url
    kid: str  # a short, stable id for records: ``passkey:`` + SHA-256 of the credential id
    rp_id: str
    origin: str
    sign_count: int
    enrolled_at: float
    endorsement: str  # the keystore's ledger key over ``passkeys.passkey_statement``
    removed_at: float | None = None
    last_used_at: float | None = None  # the last sign-in or answer it signed (not endorsed: it changes)


@dataclass(frozen=True, kw_only=True)
class WebSession:
    """A signed-in browser: who, the CSRF token its forms carry, until when."""

    name: str
    csrf: str
    created_at: float
    expires_at: float


def passkey_from_row(r: Sequence[Any]) -> PasskeyRecord:
    return PasskeyRecord(credential_id=r[0], name=r[1], display=r[2], public_key=r[3], kid=r[4], rp_id=r[5],
                         origin=r[6], sign_count=int(r[7]), enrolled_at=r[8], removed_at=r[9], endorsement=r[10],
                         last_used_at=r[11])


class _Sql(Protocol):
    def _tx(self) -> AbstractContextManager[Any]: ...

    def _rows(self, template: str, params: Sequence[Any] = ()) -> list[Any]: ...

    def _q(self, template: str) -> str: ...


class WebStore(Protocol):
    """What the inbox needs of a store beyond ``Store`` (every SQL store has it)."""

    def add_passkey(self, record: PasskeyRecord) -> bool: ...

    def list_passkeys(self, *, name: str | None = None, include_removed: bool = False) -> list[PasskeyRecord]: ...

    def get_passkey(self, credential_id: str) -> PasskeyRecord | None: ...

    def advance_sign_count(self, credential_id: str, sign_count: int, *, at: float) -> bool: ...

    def remove_passkeys(self, name: str, *, at: float) -> int: ...

    def add_invitation(self, token_hash: str, *, name: str, display: str, created_at: float,
                       expires_at: float) -> None: ...

    def use_invitation(self, token_hash: str, *, now: float) -> tuple[str, str] | None: ...

    def invitation(self, token_hash: str, *, now: float) -> tuple[str, str] | None: ...

    def add_web_session(self, token_hash: str, session: WebSession) -> None: ...

    def web_session(self, token_hash: str, *, now: float) -> WebSession | None: ...

    def end_web_session(self, token_hash: str, *, at: float) -> None: ...

    def add_challenge(self, challenge_id: str, *, purpose: str, subject: str, data: str, expires_at: float) -> None: ...

    def take_challenge(self, challenge_id: str, *, purpose: str, subject: str, now: float) -> str | None: ...


class WebRecords:
    """The store's statements for the web inbox (mixed into ``SqlStore``)."""

    # passkeys -----------------------------------------------------------------------------
    def add_passkey(self: _Sql, record: PasskeyRecord) -> bool:
        """Record a passkey unless its credential id is recorded; return whether it was added."""
        with self._tx() as tx:
            cur = tx.execute(self._q(f"INSERT INTO sg_passkeys ({PASSKEY_COLUMNS}) VALUES "
                                     "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (credential_id) DO NOTHING"),
                             (record.credential_id, record.name, record.display, record.public_key, record.kid,
                              record.rp_id, record.origin, record.sign_count, record.enrolled_at, record.removed_at,
                              record.endorsement, record.last_used_at))
            return bool(cur.rowcount == 1)

    def list_passkeys(self: _Sql, *, name: str | None = None, include_removed: bool = False) -> list[PasskeyRecord]:
        sql = f"SELECT {PASSKEY_COLUMNS} FROM sg_passkeys WHERE 1 = 1"
        params: list[Any] = []
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        if not include_removed:
            sql += " AND removed_at IS NULL"
        return [passkey_from_row(r) for r in self._rows(sql + " ORDER BY id", params)]

    def get_passkey(self: _Sql, credential_id: str) -> PasskeyRecord | None:
        rows = self._rows(f"SELECT {PASSKEY_COLUMNS} FROM sg_passkeys WHERE credential_id = ?", (credential_id,))
        return passkey_from_row(rows[0]) if rows else None

    def advance_sign_count(self: _Sql, credential_id: str, sign_count: int, *, at: float) -> bool:
        """Move a live passkey's sign count to ``sign_count`` if that is ahead of it (an
        authenticator that keeps no count always says 0: accepted while the count is 0),
        and note the use ``at`` that time."""
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_passkeys SET sign_count = ?, last_used_at = ? WHERE credential_id = ? "
                                     "AND removed_at IS NULL AND (sign_count < ? OR (? = 0 AND sign_count = 0))"),
                             (sign_count, at, credential_id, sign_count, sign_count))
            return bool(cur.rowcount == 1)

    def remove_passkeys(self: _Sql, name: str, *, at: float) -> int:
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_passkeys SET removed_at = ? WHERE name = ? AND removed_at IS NULL"),
                             (at, name))
            return int(cur.rowcount)

    # invitations --------------------------------------------------------------------------
    def add_invitation(self: _Sql, token_hash: str, *, name: str, display: str, created_at: float,
                       expires_at: float) -> None:
        with self._tx() as tx:
            tx.execute(self._q("INSERT INTO sg_invitations (token_hash, name, display, created_at, expires_at) "
                               "VALUES (?, ?, ?, ?, ?)"), (token_hash, name, display, created_at, expires_at))

    def invitation(self: _Sql, token_hash: str, *, now: float) -> tuple[str, str] | None:
        """The (name, display) an unused, unexpired invitation is for; ``None`` otherwise."""
        rows = self._rows("SELECT name, display FROM sg_invitations WHERE token_hash = ? AND used_at IS NULL "
                          "AND expires_at > ?", (token_hash, now))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def use_invitation(self: _Sql, token_hash: str, *, now: float) -> tuple[str, str] | None:
        """Spend an invitation, atomically: the (name, display) it was for, or ``None`` when it
        is unknown, spent or expired (two browsers racing with one link: one wins)."""
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_invitations SET used_at = ? WHERE token_hash = ? "
                                     "AND used_at IS NULL AND expires_at > ?"), (now, token_hash, now))
            if cur.rowcount != 1:
                return None
            row = tx.execute(self._q("SELECT name, display FROM sg_invitations WHERE token_hash = ?"),
                             (token_hash,)).fetchone()
            return (str(row[0]), str(row[1]))

    # sessions -----------------------------------------------------------------------------
    def add_web_session(self: _Sql, token_hash: str, session: WebSession) -> None:
        with self._tx() as tx:
            tx.execute(self._q("INSERT INTO sg_web_sessions (token_hash, name, csrf, created_at, expires_at) "
                               "VALUES (?, ?, ?, ?, ?)"),
                       (token_hash, session.name, session.csrf, session.created_at, session.expires_at))

    def web_session(self: _Sql, token_hash: str, *, now: float) -> WebSession | None:
        rows = self._rows("SELECT name, csrf, created_at, expires_at FROM sg_web_sessions WHERE token_hash = ? "
                          "AND ended_at IS NULL AND expires_at > ?", (token_hash, now))
        if not rows:
            return None
        r = rows[0]
        return WebSession(name=str(r[0]), csrf=str(r[1]), created_at=float(r[2]), expires_at=float(r[3]))

    def end_web_session(self: _Sql, token_hash: str, *, at: float) -> None:
        with self._tx() as tx:
            tx.execute(self._q("UPDATE sg_web_sessions SET ended_at = ? WHERE token_hash = ? AND ended_at IS NULL"),
                       (at, token_hash))

    # challenges ---------------------------------------------------------------------------
    def add_challenge(self: _Sql, challenge_id: str, *, purpose: str, subject: str, data: str,
                      expires_at: float) -> None:
        with self._tx() as tx:
            tx.execute(self._q("INSERT INTO sg_webauthn_challenges (id, purpose, subject, data, expires_at) "
                               "VALUES (?, ?, ?, ?, ?)"), (challenge_id, purpose, subject, data, expires_at))

    def take_challenge(self: _Sql, challenge_id: str, *, purpose: str, subject: str, now: float) -> str | None:
        """Spend a challenge, atomically: its data, or ``None`` when it is unknown, spent,
        expired, or was made for another purpose or subject."""
        with self._tx() as tx:
            cur = tx.execute(self._q("UPDATE sg_webauthn_challenges SET used_at = ? WHERE id = ? AND purpose = ? "
                                     "AND subject = ? AND used_at IS NULL AND expires_at > ?"),
                             (now, challenge_id, purpose, subject, now))
            if cur.rowcount != 1:
                return None
            row = tx.execute(self._q("SELECT data FROM sg_webauthn_challenges WHERE id = ?"),
                             (challenge_id,)).fetchone()
            return str(row[0])
