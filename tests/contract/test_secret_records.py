"""Downstream credential records honour one contract on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from scopegraph.store import Store
from scopegraph.store.secrets import SecretRecord

from .conftest import Backend
from .test_store_contract import T0, grant, race, run


def secret(handle: str, *, run_id: str = "run-1", step_id: str = "s1", max_uses: int | None = None,
           **kw: Any) -> SecretRecord:
    return SecretRecord(handle=handle, run_id=run_id, step_id=step_id, tool="report", workflow="wf", name="db",
                        broker="postgres", kind="ephemeral", principal=f"sgr_{handle}", grant_id="g-1",
                        issued_at=T0, max_uses=max_uses, **kw)


def test_a_credential_is_recorded_issuing_then_issued_then_revoked(store: Any) -> None:
    store.add_secret(secret("h1"))
    assert store.get_secret("h1").state == "issuing" and store.get_secret("h1").live
    assert store.mark_secret_issued("h1", principal="sgr_role", expires_at=T0 + 60) is True
    got = store.get_secret("h1")
    assert (got.state, got.expires_at, got.issued_at, got.principal) == ("issued", T0 + 60, T0, "sgr_role")
    assert store.revoke_secret("h1", reason="step ended", at=T0 + 1) is True
    assert store.revoke_secret("h1", reason="again", at=T0 + 2) is False  # once
    got = store.get_secret("h1")
    assert (got.state, got.revoked_at, got.revoke_reason, got.live) == ("revoked", T0 + 1, "step ended", False)
    # A credential revoked while it was being made is not resurrected by its maker.
    store.add_secret(secret("h2"))
    store.revoke_secret("h2", reason="run ended", at=T0)
    assert store.mark_secret_issued("h2", principal="x", expires_at=None) is False
    assert store.get_secret("h2").state == "revoked"
    assert store.get_secret("nope") is None


def test_uses_are_counted_up_to_max_uses_and_never_after_revocation(store: Any) -> None:
    store.add_secret(secret("t1", max_uses=2))
    assert store.use_secret("t1") == "revoked"  # not issued yet: not usable
    store.mark_secret_issued("t1", principal="aud", expires_at=T0 + 60)
    assert [store.use_secret("t1") for _ in range(3)] == ["ok", "ok", "exhausted"]
    assert store.get_secret("t1").uses == 2
    store.add_secret(secret("t2"))
    store.mark_secret_issued("t2", principal="aud", expires_at=None)
    assert [store.use_secret("t2") for _ in range(5)] == ["ok"] * 5  # no bound
    store.revoke_secret("t2", reason="x", at=T0)
    assert store.use_secret("t2") == "revoked" and store.use_secret("missing") == "unknown"


def test_racing_users_of_a_credential_take_exactly_its_uses(backend: Backend) -> None:
    first = backend.open()
    first.add_secret(secret("t1", max_uses=3))  # type: ignore[attr-defined]
    first.mark_secret_issued("t1", principal="aud", expires_at=None)  # type: ignore[attr-defined]
    stores = [backend.open() for _ in range(6)]
    results = race(6, lambda i: stores[i].use_secret("t1"))  # type: ignore[attr-defined]
    assert sorted(results) == ["exhausted"] * 3 + ["ok"] * 3


def test_live_credentials_of_a_step_include_its_delegated_children_only(store: Any) -> None:
    for handle, step in [("a", "s1"), ("b", "s1.c1"), ("c", "s10"), ("d", "s1_x"), ("e", "s2")]:
        store.add_secret(secret(handle, step_id=step))
    store.add_secret(secret("f", run_id="run-2", step_id="s1"))
    assert [r.handle for r in store.live_secrets("run-1", "s1")] == ["a", "b"]
    assert [r.handle for r in store.live_secrets("run-1")] == ["a", "b", "c", "d", "e"]
    store.revoke_secret("b", reason="x", at=T0)
    assert [r.handle for r in store.live_secrets("run-1", "s1")] == ["a"]
    assert [r.handle for r in store.secrets_for_run("run-2")] == ["f"]


def test_sweep_candidates_say_whether_their_step_still_runs(store: Store) -> None:
    s: Any = store
    store.upsert_run(run("run-1"))
    store.acquire_run("run-1", owner="host:1:x", until=T0 + 3600, now=T0, owner_alive=lambda o: True)
    store.add_grant(grant("g-live", run_id="run-1", step_id="s1"))
    store.add_grant(grant("g-old", run_id="run-1", step_id="s2"))
    store.revoke_grant("g-old", reason="step ended", at=T0)
    for handle, step in [("h1", "s1"), ("h2", "s2")]:
        s.add_secret(secret(handle, step_id=step))
    s.add_secret(secret("h3", run_id="run-gone", step_id="s1"))
    s.add_secret(secret("h4", step_id="s1"))
    s.revoke_secret("h4", reason="x", at=T0)
    found = {c.record.handle: c for c in s.secret_sweep_candidates(now=T0 + 1)}
    assert set(found) == {"h1", "h2", "h3"}  # revoked ones are not candidates
    assert (found["h1"].live_grants, found["h1"].lease_owner, found["h1"].lease_until) == (1, "host:1:x", T0 + 3600)
    assert found["h2"].live_grants == 0
    assert (found["h3"].live_grants, found["h3"].lease_owner) == (0, None)
    # An expired grant is no longer live.
    assert {c.record.handle: c.live_grants for c in s.secret_sweep_candidates(now=T0 + 61)}["h1"] == 0
