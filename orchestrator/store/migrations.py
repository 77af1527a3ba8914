"""The store's schema, as numbered steps every SQL store applies in order.

A step is written once, in the words of ``dialect`` (``${float}``, ``${blob}``…), applied
at most once per database, and recorded in ``sg_schema_migrations``; a step is never edited
after a release ships it: a change is a new step. Each backend applies the steps a database
lacks inside one transaction that only one process at a time can hold (SQLite: ``BEGIN
IMMEDIATE``; PostgreSQL: an advisory lock), so processes opening a fresh database at once
do not race, and a step that fails leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import StoreError
from .dialect import Dialect

GENESIS_HASH = "0" * 64


@dataclass(frozen=True, kw_only=True)
class Migration:
    """One numbered step of the schema; applied once, in order, never edited afterwards."""

    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(version=1, name="initial tables", sql=f"""
CREATE TABLE sg_keys (
    name TEXT PRIMARY KEY, private_pem ${{blob}} NOT NULL, created_at ${{float}} NOT NULL);
CREATE TABLE sg_grants (
    jti TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    subject TEXT NOT NULL, issued_at ${{float}} NOT NULL, expires_at ${{float}} NOT NULL,
    max_uses ${{int}} NOT NULL, uses ${{int}} NOT NULL DEFAULT 0,
    revoked_at ${{float}}, revoke_reason TEXT);
CREATE INDEX sg_grants_run ON sg_grants (run_id);
CREATE TABLE sg_uses (
    id ${{id_pk}}, jti TEXT NOT NULL, run_id TEXT NOT NULL,
    step_id TEXT NOT NULL, tool TEXT NOT NULL, attempt ${{int}} NOT NULL, outcome TEXT NOT NULL,
    decision TEXT NOT NULL, policy_ids TEXT NOT NULL, at ${{float}} NOT NULL,
    observed TEXT NOT NULL DEFAULT '{{}}');
CREATE INDEX sg_uses_run ON sg_uses (run_id, id);
CREATE TABLE sg_approvals (
    id TEXT PRIMARY KEY, run_id TEXT NOT NULL, payload TEXT NOT NULL, seq ${{serial}});
CREATE INDEX sg_approvals_run ON sg_approvals (run_id, seq);
CREATE TABLE sg_calls (
    key TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    status TEXT NOT NULL, result TEXT, started_at ${{float}} NOT NULL, finished_at ${{float}});
CREATE TABLE sg_ledger (
    seq ${{int}} PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL, at ${{float}} NOT NULL,
    data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX sg_ledger_run ON sg_ledger (run_id, seq);
CREATE TABLE sg_ledger_tip (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq ${{int}} NOT NULL, hash TEXT NOT NULL);
INSERT INTO sg_ledger_tip (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}');
CREATE TABLE sg_ledger_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq ${{int}} NOT NULL, hash TEXT NOT NULL,
    domain TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE sg_runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, target TEXT NOT NULL,
    initiator TEXT NOT NULL, status TEXT NOT NULL, created_at ${{float}} NOT NULL,
    updated_at ${{float}} NOT NULL, lease_owner TEXT, lease_until ${{float}});
CREATE INDEX sg_runs_workflow ON sg_runs (workflow, created_at);
"""),
    Migration(version=2, name="downstream credentials", sql="""
CREATE TABLE sg_secrets (
    handle TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL, tool TEXT NOT NULL,
    workflow TEXT NOT NULL, name TEXT NOT NULL, broker TEXT NOT NULL, kind TEXT NOT NULL,
    principal TEXT NOT NULL, grant_id TEXT, issued_at ${float} NOT NULL, expires_at ${float},
    max_uses ${int}, uses ${int} NOT NULL DEFAULT 0, state TEXT NOT NULL,
    revoked_at ${float}, revoke_reason TEXT);
CREATE INDEX sg_secrets_run ON sg_secrets (run_id, step_id);
CREATE INDEX sg_secrets_state ON sg_secrets (state);
"""),
    # Issue 12: the store keeps public keys only (private keys live in a keystore), the
    # approvers enrolled with their public keys, and which key and witness entry a head has.
    Migration(version=3, name="trust roots outside the store", sql="""
CREATE TABLE sg_trust_keys (
    purpose TEXT NOT NULL, kid TEXT NOT NULL, generation ${int} NOT NULL, public_jwk TEXT NOT NULL,
    origin TEXT NOT NULL, created_at ${float} NOT NULL, retired_at ${float}, endorsement TEXT,
    PRIMARY KEY (purpose, kid));
CREATE TABLE sg_approvers (
    id ${id_pk}, name TEXT NOT NULL, display TEXT NOT NULL, public_pem TEXT NOT NULL, kid TEXT NOT NULL,
    enrolled_at ${float} NOT NULL, removed_at ${float}, endorsement TEXT NOT NULL);
CREATE UNIQUE INDEX sg_approvers_enrolled ON sg_approvers (name) WHERE removed_at IS NULL;
ALTER TABLE sg_ledger_head ADD COLUMN kid TEXT;
ALTER TABLE sg_ledger_head ADD COLUMN witness_seq ${int};
"""),
    # Issue 15: the web inbox. Approvers' passkeys (public keys, endorsed like enrolments),
    # one-time invitations to enrol one (only a hash of the link's token), browser
    # sessions (a hash of the cookie), and single-use WebAuthn challenges.
    Migration(version=4, name="web inbox: passkeys, invitations, sessions", sql="""
CREATE TABLE sg_passkeys (
    id ${id_pk}, credential_id TEXT NOT NULL UNIQUE, name TEXT NOT NULL, display TEXT NOT NULL,
    public_key TEXT NOT NULL, kid TEXT NOT NULL, rp_id TEXT NOT NULL, origin TEXT NOT NULL,
    sign_count ${int} NOT NULL, enrolled_at ${float} NOT NULL, removed_at ${float}, endorsement TEXT NOT NULL);
CREATE INDEX sg_passkeys_name ON sg_passkeys (name);
CREATE TABLE sg_invitations (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, display TEXT NOT NULL, created_at ${float} NOT NULL,
    expires_at ${float} NOT NULL, used_at ${float});
CREATE TABLE sg_web_sessions (
    token_hash TEXT PRIMARY KEY, name TEXT NOT NULL, csrf TEXT NOT NULL, created_at ${float} NOT NULL,
    expires_at ${float} NOT NULL, ended_at ${float});
CREATE TABLE sg_webauthn_challenges (
    id TEXT PRIMARY KEY, purpose TEXT NOT NULL, subject TEXT NOT NULL, data TEXT NOT NULL,
    expires_at ${float} NOT NULL, used_at ${float});
"""),
    # When each passkey last signed something (a sign-in or an answer), for ``approvers list``.
    Migration(version=5, name="passkeys: last use", sql="""
ALTER TABLE sg_passkeys ADD COLUMN last_used_at ${float};
"""),
)

VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS sg_schema_migrations (version INTEGER PRIMARY KEY, "
                 "name TEXT NOT NULL, applied_at ${timestamp} NOT NULL DEFAULT CURRENT_TIMESTAMP)")


class Connection(Protocol):
    """What applying a step needs of a DB-API connection (``sqlite3`` or ``psycopg``)."""

    def execute(self, sql: Any, params: Any = ...) -> Any: ...


def applied_versions(conn: Connection, dialect: Dialect) -> set[int]:
    """The steps ``sg_schema_migrations`` records (it is created if missing)."""
    conn.execute(dialect.ddl(VERSION_TABLE))
    return {int(r[0]) for r in conn.execute("SELECT version FROM sg_schema_migrations").fetchall()}


def apply_migrations(conn: Connection, dialect: Dialect, migrations: Sequence[Migration]) -> list[int]:
    """Apply the steps of ``migrations`` this database lacks, in order; return their versions.

    The caller holds the transaction and the lock that make this the only migrator.

    Raises:
        StoreError: the database holds a schema newer than ``migrations`` knows.
    """
    applied = applied_versions(conn, dialect)
    known = migrations[-1].version
    if applied and max(applied) > known:
        raise StoreError(f"the store's schema is at version {max(applied)}, newer than this "
                         f"scopegraph knows ({known}); upgrade scopegraph")
    applied_now: list[int] = []
    for step in migrations:
        if step.version in applied:
            continue
        for statement in dialect.script(dialect.ddl(step.sql)):
            conn.execute(statement)
        conn.execute(dialect.sql("INSERT INTO sg_schema_migrations (version, name) VALUES (?, ?)"),
                     (step.version, step.name))
        applied_now.append(step.version)
    return applied_now
