"""One schema, one list of migrations, on every store; a store written by 0.1.0 migrates in place.

``fixtures/store-v0.1.0.db`` was written by scopegraph 0.1.0's own command line (see
``fixtures/README.md``): a run paused for approval, one approved and completed, one denied.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph import Runtime
from scopegraph.agents.demo import build_workflow
from scopegraph.approvals import ApprovalRequest
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.credentials import MAX_TTL_SECONDS
from scopegraph.errors import StoreError
from scopegraph.ledger import Ledger
from scopegraph.store import Store, open_store
from scopegraph.store import migrations as mig
from scopegraph.store import postgres as pg
from scopegraph.store import sqlite as sq
from scopegraph.store.sqlite import SqliteStore

from .conftest import Backend
from .test_store_contract import append, assert_one_chain, grant, race, run

FIXTURE = Path(__file__).with_name("fixtures") / "store-v0.1.0.db"
PAUSED = "9dc69a89bc49466384d69210186fb065"
COMPLETED = "d63017e77c5c490f8c120e2ac04485d8"
DENIED = "bc09e616f408470b97cf1890c157ca08"
DOMAIN_KEY = "trust-domain:demo.scopegraph.local"


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    """A copy of the store 0.1.0 wrote (the committed file is never opened in place)."""
    path = tmp_path / "old" / "scopegraph.db"
    path.parent.mkdir()
    shutil.copyfile(FIXTURE, path)
    return path


def sqlite_shape(path: Path) -> dict[str, Any]:
    """Tables with their columns and indexes with their columns, as SQLite describes them."""
    with closing(sqlite3.connect(str(path))) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'sg_%' ORDER BY name")]
        shape: dict[str, Any] = {}
        for t in tables:
            cols = [tuple(c[1:]) for c in conn.execute(f"PRAGMA table_info({t})")]
            indexes = {i[1]: [c[2] for c in conn.execute(f"PRAGMA index_info({i[1]})")]
                       for i in conn.execute(f"PRAGMA index_list({t})")}
            shape[t] = (cols, indexes)
        return shape


def ledger_tip(path: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(str(path))) as conn:
        return conn.execute("SELECT seq, hash FROM sg_ledger_tip").fetchall()


def statuses(store: Store) -> dict[str, str]:
    return {r.run_id: r.status for r in store.list_runs()}


# the store 0.1.0 wrote --------------------------------------------------------------------------
def test_the_fixture_is_what_0_1_0_wrote() -> None:
    # immutable: not even SQLite's -shm file is made beside the committed fixture
    with closing(sqlite3.connect(f"{FIXTURE.as_uri()}?immutable=1", uri=True)) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert conn.execute("SELECT value FROM sg_meta WHERE key = 'schema_version'").fetchone() == ("1",)
    assert "sg_schema_migrations" not in tables and {"checkpoints", "writes", "sg_ledger"} <= tables
    assert sorted(p.name for p in FIXTURE.parent.iterdir()) == ["README.md", FIXTURE.name]


def test_a_store_written_by_0_1_0_migrates_in_place_with_everything_intact(
        old_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tip_before = ledger_tip(old_store)
    store = SqliteStore(old_store)
    try:
        assert statuses(store) == {PAUSED: "paused", COMPLETED: "completed", DENIED: "denied"}
        answers = {a.run_id: a for a in (ApprovalRequest.model_validate_json(p) for p in store.list_approvals())}
        assert {r: a.status for r, a in answers.items()} == {
            PAUSED: "pending", COMPLETED: "consumed", DENIED: "denied"}
        assert answers[COMPLETED].approvers == ["bob"]
        rows = store.ledger_rows()
        assert len(rows) == 73 and store.ledger_last() == (73, rows[-1].hash)
        assert_one_chain(rows)
        assert store.load_signing_key(DOMAIN_KEY) is not None  # until a keystore is bound (see below)
        assert all(g.revoked_at is not None for r in statuses(store) for g in store.grants_for_run(r))
        assert len(store.uses_for_run(COMPLETED)) >= 4
    finally:
        store.close()
    assert ledger_tip(old_store) == tip_before  # the chain goes on where it ended
    # One version table, and the very shape a fresh store has.
    with closing(sqlite3.connect(str(old_store))) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = conn.execute("SELECT version, name FROM sg_schema_migrations").fetchall()
    assert "sg_meta" not in tables
    assert versions == [(m.version, m.name) for m in mig.MIGRATIONS]
    SqliteStore(tmp_path / "fresh.db").close()
    assert sqlite_shape(old_store) == sqlite_shape(tmp_path / "fresh.db")
    # The command line reads it as before.
    url = f"sqlite:///{old_store}"
    assert main(["--store", url, "audit", "verify"]) == 0
    assert capsys.readouterr().out.startswith("ok: 73 records, hash chain intact, head signed at record 73")
    assert main(["--store", url, "approvals", "list", "--all"]) == 0
    assert PAUSED in capsys.readouterr().out


def _key_forms(pem: bytes) -> list[bytes]:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    return [raw, raw.hex().encode(), base64.b64encode(raw).rstrip(b"="), *body]


def test_binding_a_keystore_moves_the_0_1_0_key_out_and_old_heads_still_verify(
        old_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 12: the key leaves the store (column emptied, no trace of it in the file); its public
    half stays, vouched for by the new keystore, so the head 0.1.0 signed still verifies."""
    with closing(sqlite3.connect(f"{old_store.as_uri()}?mode=ro", uri=True)) as conn:
        [(legacy_pem,)] = conn.execute("SELECT private_pem FROM sg_keys").fetchall()
    forms = _key_forms(bytes(legacy_pem))
    before = old_store.read_bytes()
    assert b"PRIVATE KEY" in before and all(f in before for f in forms[3:])  # the 0.1.0 file holds the PEM
    url = f"sqlite:///{old_store}"
    assert main(["--store", url, "audit", "verify"]) == 0  # the first command with a keystore moves the key
    assert capsys.readouterr().out.startswith("ok: 73 records, hash chain intact, head signed at record 73")
    with closing(sqlite3.connect(str(old_store))) as conn:
        assert [bytes(r[0]) for r in conn.execute("SELECT private_pem FROM sg_keys")] == [b""]
        rows = conn.execute("SELECT purpose, origin, retired_at IS NOT NULL FROM sg_trust_keys "
                            "ORDER BY origin, purpose").fetchall()
    assert rows == [("grant", "keystore", 0), ("ledger", "keystore", 0), ("svid", "keystore", 0),
                    ("grant", "migrated", 1), ("ledger", "migrated", 1)]
    files = b"".join(p.read_bytes() for p in old_store.parent.glob("scopegraph.db*"))
    assert b"PRIVATE KEY" not in files
    assert [f for f in forms if f in files] == []
    assert sorted(p.name for p in (old_store.parent / "keys").glob("*.key")) == [
        "grant.000001.key", "ledger.000001.key", "svid.000001.key"]  # new keys: the old one is not imported
    assert main(["--store", url, "keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["purpose"] for k in listed if k["state"].startswith("migrated")] == ["grant", "ledger"]
    # A key put back into the column later is not adopted: the store refuses to open.
    with closing(sqlite3.connect(str(old_store), isolation_level=None)) as conn:
        conn.execute("UPDATE sg_keys SET private_pem = ?", (bytes(legacy_pem),))
    assert main(["--store", url, "audit", "verify"]) == 2
    assert "refusing to open" in capsys.readouterr().err


def test_grants_the_0_1_0_key_signed_verify_only_until_they_could_have_expired(old_store: Path) -> None:
    with closing(sqlite3.connect(f"{old_store.as_uri()}?mode=ro", uri=True)) as conn:
        [(legacy_pem,)] = conn.execute("SELECT private_pem FROM sg_keys").fetchall()
    legacy = serialization.load_pem_private_key(bytes(legacy_pem), password=None)
    clock = FixedClock(1_800_000_000.0)
    with Runtime(build_workflow(), store=f"sqlite:///{old_store}", clock=clock) as rt:
        raw = legacy.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        token = jwt.encode({"iss": rt.domain.issuer, "sub": "spiffe://x/y", "aud": "tool:lookup_limit"},
                           legacy, algorithm="EdDSA", headers={"kid": hashlib.sha256(raw).hexdigest()[:16]})
        assert rt.domain.grant_key(token) is not None  # in flight when the key moved: still verifies
        clock.advance(MAX_TTL_SECONDS + 1)
        assert rt.domain.grant_key(token) is None  # past any grant's life: the old key verifies no grant


def test_a_run_paused_under_0_1_0_is_approved_and_resumed_to_completion(old_store: Path) -> None:
    url = f"sqlite:///{old_store}"
    with closing(sqlite3.connect(str(old_store))) as conn:
        (payload,) = conn.execute("SELECT payload FROM sg_approvals WHERE run_id = ?", (PAUSED,)).fetchone()
    pending = ApprovalRequest.model_validate_json(payload)
    clock = FixedClock(pending.created_at + 60)  # while the request is still open
    with Runtime(build_workflow(), store=url, clock=clock) as rt:
        rt.approvals.approve(pending.id, approver="bob")
        done = rt.resume(PAUSED)
        # The baseline has changed since 0.1.0 (issue 13), so the policy version the approval
        # names has too: it cannot be used, and the same call is asked about again.
        assert pending.policy_version != rt.policy.version
        assert done.status == "paused", done.summary()
        [again] = rt.approvals.list(run_id=PAUSED, status="pending")
        assert (again.tool, again.arguments, again.policy_version) == (
            pending.tool, pending.arguments, rt.policy.version)
        assert rt.approvals.get(pending.id).status == "approved"  # never consumed
        rt.approvals.approve(again.id, approver="bob")
        done = rt.resume(PAUSED)
        assert done.status == "completed", done.summary()
        assert {s.step_id: s.status for s in done.steps} == {
            "receipt": "completed", "limit": "completed", "file": "completed"}
        assert done.grants_minted == done.grants_revoked
        assert rt.approvals.get(again.id).status == "consumed"
        verdict = Ledger(rt.store, clock=clock).verify(run_id=PAUSED)
        assert verdict.ok, verdict.problem
        assert verdict.records > 73 and verdict.unsigned == 0
        assert rt.store.ledger_rows()[73].prev_hash == rt.store.ledger_rows()[72].hash
    assert main(["--store", url, "audit", "verify"]) == 0


def test_stores_opening_a_0_1_0_file_at_once_migrate_it_once(old_store: Path) -> None:
    opened = race(4, lambda i: SqliteStore(old_store))
    try:
        for i, s in enumerate(opened):
            append(s, f"opener-{i}")
        assert_one_chain(opened[0].ledger_rows())
        assert len(opened[0].ledger_rows()) == 77
    finally:
        for s in opened:
            s.close()
    with closing(sqlite3.connect(str(old_store))) as conn:
        applied = conn.execute("SELECT version FROM sg_schema_migrations").fetchall()
        assert applied == [(m.version,) for m in mig.MIGRATIONS]


def test_a_0_1_0_file_with_an_unknown_version_is_refused_untouched(old_store: Path) -> None:
    with closing(sqlite3.connect(str(old_store), isolation_level=None)) as conn:
        conn.execute("UPDATE sg_meta SET value = '7'")
    before = sqlite_shape(old_store)
    with pytest.raises(StoreError, match="unknown schema version '7'"):
        SqliteStore(old_store)
    assert sqlite_shape(old_store) == before


# one list of migrations, every backend --------------------------------------------------------
def with_step(monkeypatch: pytest.MonkeyPatch, step: mig.Migration) -> None:
    """Add ``step`` to the migrations every backend applies."""
    steps = (*mig.MIGRATIONS, step)
    for module in (mig, sq, pg):
        monkeypatch.setattr(module, "MIGRATIONS", steps)


def versions(backend: Backend) -> list[int]:
    if backend.name == "sqlite":
        with closing(sqlite3.connect(backend.url[len("sqlite:///"):])) as conn:
            return [r[0] for r in conn.execute("SELECT version FROM sg_schema_migrations ORDER BY version")]
    with psycopg.connect(backend.url, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM sg_schema_migrations ORDER BY version")]


def columns(backend: Backend, table: str) -> list[str]:
    if backend.name == "sqlite":
        with closing(sqlite3.connect(backend.url[len("sqlite:///"):])) as conn:
            return sorted(c[1] for c in conn.execute(f"PRAGMA table_info({table})"))
    with psycopg.connect(backend.url, autocommit=True) as conn:
        return sorted(r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = %s", (table,)))


def test_a_fresh_store_has_every_migration_and_the_same_tables_on_every_backend(backend: Backend) -> None:
    backend.open()
    assert versions(backend) == [m.version for m in mig.MIGRATIONS]
    assert columns(backend, "sg_uses") == sorted(
        ["id", "jti", "run_id", "step_id", "tool", "attempt", "outcome", "decision", "policy_ids", "at", "observed"])
    assert columns(backend, "sg_approvals") == ["id", "payload", "run_id", "seq"]
    assert columns(backend, "sg_runs") == sorted(["run_id", "workflow", "target", "initiator", "status",
                                                  "created_at", "updated_at", "lease_owner", "lease_until"])


def test_a_new_migration_written_once_upgrades_every_backend_once(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    old = backend.open()
    old.upsert_run(run("run-1"))
    append(old, step="before")
    with_step(monkeypatch, mig.Migration(
        version=len(mig.MIGRATIONS) + 1, name="run notes",
        sql="ALTER TABLE sg_runs ADD COLUMN note TEXT; CREATE INDEX sg_runs_note ON sg_runs (note);"))
    new = backend.open()
    backend.open()  # a second opener finds nothing left to do
    assert versions(backend) == [m.version for m in mig.MIGRATIONS]
    assert "note" in columns(backend, "sg_runs")
    assert new.get_run("run-1") == run("run-1")
    assert append(new, step="after") == 2


def test_a_failing_migration_leaves_every_backend_as_it_was(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    backend.open().add_grant(grant("g1"))
    before = versions(backend)
    with_step(monkeypatch, mig.Migration(version=len(mig.MIGRATIONS) + 1, name="broken",
                                         sql="ALTER TABLE sg_runs ADD COLUMN half_done TEXT; "
                                             "INSERT INTO no_such_table VALUES (1);"))
    with pytest.raises(StoreError, match="no_such_table"):
        backend.open()
    assert versions(backend) == before
    assert "half_done" not in columns(backend, "sg_runs")


def test_a_store_newer_than_the_code_is_refused_on_every_backend(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    with_step(monkeypatch, mig.Migration(version=len(mig.MIGRATIONS) + 1, name="future",
                                         sql="CREATE TABLE sg_future (id INTEGER PRIMARY KEY);"))
    backend.open()
    monkeypatch.undo()
    with pytest.raises(StoreError, match="newer than this scopegraph knows"):
        backend.open()


# transactions that hold several operations -------------------------------------------------------
def test_appends_in_one_transaction_are_one_chain_and_visible_only_after_commit(backend: Backend) -> None:
    store, other = backend.open(), backend.open()
    append(store, step="before")
    with store.atomic():
        assert [append(store, step=f"in-{i}") for i in range(3)] == [2, 3, 4]
        assert store.ledger_last() == (4, store.ledger_rows()[-1].hash)  # the transaction sees its own tip
        assert other.ledger_last() == (1, other.ledger_rows()[0].hash)
        store.add_grant(grant("g1"))
        store.upsert_run(run("run-1"))
    assert_one_chain(other.ledger_rows())
    assert other.ledger_last() == (4, other.ledger_rows()[-1].hash)
    assert append(other, step="after") == 5
    assert other.grant_state("g1") == "ok" and other.get_run("run-1") == run("run-1")


def test_a_transaction_of_several_appends_moves_the_ledger_tip_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    seen: list[str] = []
    store._conn.set_trace_callback(seen.append)  # what the database is asked, statement by statement
    try:
        with store.atomic():
            for i in range(5):
                append(store, step=f"s{i}")
            store.add_grant(grant("g1"))
        tip = [s for s in seen if "sg_ledger_tip" in s]
        assert len(tip) == 2 and tip[0].startswith("SELECT") and tip[1].startswith("UPDATE")
        assert [s.split()[0] for s in seen].count("COMMIT") == 1
    finally:
        store._conn.set_trace_callback(None)
        store.close()
    again = open_store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        assert_one_chain(again.ledger_rows())
    finally:
        again.close()
