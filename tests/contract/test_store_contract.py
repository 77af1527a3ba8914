"""The contract every ``Store`` must honour, run against SQLite and PostgreSQL alike.

Each test gets a fresh store (``backend``): a new SQLite file, or a new PostgreSQL
schema. "Another process" is simulated by another store object on the same data (its
own connections); the ledger test also crosses a real process boundary.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from scopegraph.canonical import canonical_json
from scopegraph.errors import StoreError
from scopegraph.ledger import GENESIS, record_hash
from scopegraph.store import (
    CallRecord,
    GrantRecord,
    LedgerHead,
    LedgerRow,
    RunRecord,
    Store,
    UseRecord,
    open_store,
)

from .conftest import Backend

WORKER = Path(__file__).with_name("store_worker.py")
T0 = 1_800_000_000.123456  # a float with digits to lose, if a store rounded times
T = TypeVar("T")


# builders -----------------------------------------------------------------------------------
def grant(jti: str, *, run_id: str = "run-1", step_id: str = "s1", max_uses: int = 3,
          issued_at: float = T0) -> GrantRecord:
    return GrantRecord(jti=jti, run_id=run_id, step_id=step_id, tool="read_doc",
                       subject=f"spiffe://t.local/wf/w/run/{run_id}/step/{step_id}/executor",
                       issued_at=issued_at, expires_at=issued_at + 60, max_uses=max_uses)


def run(run_id: str, *, workflow: str = "wf", status: str = "running", created_at: float = T0) -> RunRecord:
    return RunRecord(run_id=run_id, workflow=workflow, target="mod:wf", initiator="alice", status=status,
                     created_at=created_at, updated_at=created_at)


def use(jti: str, attempt: int, *, run_id: str = "run-1", observed: dict[str, Any] | None = None) -> UseRecord:
    return UseRecord(jti=jti, run_id=run_id, step_id="s1", tool="read_doc", attempt=attempt, outcome="ok",
                     decision="allow", policy_ids=("allow-planned", "baseline"), at=T0 + attempt,
                     observed=observed or {})


def append(store: Store, run_id: str = "run-1", kind: str = "decision", *, at: float = T0,
           **data: Any) -> int:
    """Append a record sealed the way ``Ledger`` seals it."""
    payload = canonical_json(data)

    def seal(seq: int, prev: str) -> str:
        return record_hash(seq=seq, run_id=run_id, kind=kind, at=at, data=payload, prev_hash=prev)

    return store.append_ledger(run_id=run_id, kind=kind, at=at, data=payload, seal=seal)


def assert_one_chain(rows: list[LedgerRow]) -> None:
    """seq 1..N without gaps, each record chained to the one before and hashing true."""
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    prev = GENESIS
    for r in rows:
        assert r.prev_hash == prev, f"record {r.seq} does not follow record {r.seq - 1}"
        assert r.hash == record_hash(seq=r.seq, run_id=r.run_id, kind=r.kind, at=r.at, data=r.data,
                                     prev_hash=r.prev_hash), f"record {r.seq} does not hash to its hash"
        prev = r.hash


def race(n: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(0..n-1)`` in ``n`` threads released together; re-raise the first failure."""
    start = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def go(i: int) -> None:
        try:
            start.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a racing thread hung"
    if errors:
        raise errors[0]
    return results


# keys ---------------------------------------------------------------------------------------
def test_the_store_has_no_way_to_save_a_private_key(store: Store) -> None:
    # Private keys live in a keystore; the store only reads a 0.1.0 store's key to move it out.
    assert not hasattr(store, "save_signing_key")
    assert store.load_signing_key("domain") is None


# grants and their uses ----------------------------------------------------------------------
def test_exactly_max_uses_succeed_then_the_grant_is_exhausted(store: Store) -> None:
    store.add_grant(grant("g1", max_uses=3))
    assert store.grant_state("g1") == "ok"
    assert [store.consume_grant_use("g1") for _ in range(3)] == ["ok", "ok", "ok"]
    assert store.consume_grant_use("g1") == "exhausted"
    assert store.grant_state("g1") == "exhausted"
    [record] = store.grants_for_run("run-1")
    assert record.uses == 3 and record.max_uses == 3 and record.revoked_at is None


def test_concurrent_consumers_take_exactly_max_uses(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    stores[0].add_grant(grant("g1", max_uses=5))
    outcomes = race(16, lambda i: stores[i % 4].consume_grant_use("g1"))
    assert sorted(outcomes) == ["exhausted"] * 11 + ["ok"] * 5
    assert stores[0].grants_for_run("run-1")[0].uses == 5


def test_a_revoked_grant_is_refused_and_revocation_happens_once(store: Store) -> None:
    store.add_grant(grant("g1"))
    assert store.consume_grant_use("g1") == "ok"
    assert store.revoke_grant("g1", reason="step ended", at=T0 + 5) is True
    assert store.revoke_grant("g1", reason="again", at=T0 + 6) is False
    assert store.consume_grant_use("g1") == "revoked"
    assert store.grant_state("g1") == "revoked"
    [record] = store.grants_for_run("run-1")
    assert (record.revoked_at, record.revoke_reason, record.uses) == (T0 + 5, "step ended", 1)


def test_an_exhausted_grant_that_is_revoked_reports_revoked(store: Store) -> None:
    store.add_grant(grant("g1", max_uses=1))
    assert store.consume_grant_use("g1") == "ok"
    store.revoke_grant("g1", reason="done", at=T0)
    assert store.consume_grant_use("g1") == "revoked"
    assert store.grant_state("g1") == "revoked"


def test_an_unknown_grant_is_unknown(store: Store) -> None:
    assert store.consume_grant_use("nope") == "unknown"
    assert store.grant_state("nope") == "unknown"
    assert store.revoke_grant("nope", reason="x", at=T0) is False
    assert store.grants_for_run("run-1") == []


def test_a_grant_id_is_never_stored_twice(store: Store) -> None:
    store.add_grant(grant("g1", max_uses=1))
    with pytest.raises(StoreError):
        store.add_grant(grant("g1", max_uses=99))
    assert store.grants_for_run("run-1")[0].max_uses == 1


def test_revoke_run_revokes_only_that_runs_live_grants_and_counts_them(store: Store) -> None:
    for jti in ("a1", "a2", "a3"):
        store.add_grant(grant(jti, run_id="run-a"))
    store.add_grant(grant("b1", run_id="run-b"))
    store.revoke_grant("a2", reason="step ended", at=T0)
    assert store.revoke_run("run-a", reason="run completed", at=T0 + 1) == 2
    assert store.revoke_run("run-a", reason="run completed", at=T0 + 2) == 0
    assert store.revoke_run("nope", reason="x", at=T0) == 0
    by_jti = {g.jti: g for g in store.grants_for_run("run-a")}
    assert by_jti["a2"].revoke_reason == "step ended"  # an earlier revocation is not rewritten
    assert (by_jti["a1"].revoked_at, by_jti["a1"].revoke_reason) == (T0 + 1, "run completed")
    assert store.grant_state("b1") == "ok"


def test_concurrent_run_revocations_revoke_each_grant_once(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    for i in range(20):
        stores[0].add_grant(grant(f"g{i:02}"))
    counts = race(4, lambda i: stores[i].revoke_run("run-1", reason=f"by {i}", at=T0 + i))
    assert sum(counts) == 20


def test_grants_for_run_are_in_issue_order(store: Store) -> None:
    store.add_grant(grant("late", issued_at=T0 + 10))
    store.add_grant(grant("early", issued_at=T0))
    store.add_grant(grant("other-run", run_id="run-2"))
    assert [g.jti for g in store.grants_for_run("run-1")] == ["early", "late"]
    assert store.grants_for_run("run-1")[0] == grant("early")


# uses ---------------------------------------------------------------------------------------
def test_uses_keep_their_order_fields_and_observed_values(store: Store) -> None:
    store.record_use(use("g1", 1, observed={"amount": 4250, "ratio": 0.25}))
    store.record_use(use("g1", 2))
    store.record_use(use("g9", 1, run_id="run-2"))
    first, second = store.uses_for_run("run-1")
    assert first == use("g1", 1, observed={"amount": 4250, "ratio": 0.25})
    assert first.policy_ids == ("allow-planned", "baseline")
    assert second.attempt == 2 and second.observed == {}
    assert [u.jti for u in store.uses_for_run("run-2")] == ["g9"]
    assert store.uses_for_run("nope") == []


# approvals ----------------------------------------------------------------------------------
def test_an_approval_is_added_once_and_listed_in_order(store: Store) -> None:
    assert store.add_approval("apr_1", "run-1", '{"v": 1}') == '{"v": 1}'
    assert store.add_approval("apr_1", "run-1", '{"v": "other"}') == '{"v": 1}'
    store.add_approval("apr_2", "run-2", '{"v": 2}')
    store.add_approval("apr_3", "run-1", '{"v": 3}')
    assert store.get_approval("apr_1") == '{"v": 1}'
    assert store.get_approval("nope") is None
    assert store.list_approvals() == ['{"v": 1}', '{"v": 2}', '{"v": 3}']
    assert store.list_approvals(run_id="run-1") == ['{"v": 1}', '{"v": 3}']
    assert store.list_approvals(run_id="nope") == []


def test_update_approval_replaces_the_payload_with_what_mutate_returns(store: Store) -> None:
    store.add_approval("apr_1", "run-1", "pending")
    seen: list[str] = []

    def approve(payload: str) -> str:
        seen.append(payload)
        return "approved"

    assert store.update_approval("apr_1", approve) == "approved"
    assert seen == ["pending"]
    assert store.get_approval("apr_1") == "approved"


def test_update_of_an_unknown_approval_returns_none_without_calling_mutate(store: Store) -> None:
    called: list[str] = []
    assert store.update_approval("nope", lambda p: called.append(p) or p) is None
    assert called == []


class Refused(Exception):
    pass


def test_a_mutate_that_raises_writes_nothing_and_leaves_the_row_free(backend: Backend) -> None:
    store, other = backend.open(), backend.open()
    store.add_approval("apr_1", "run-1", "pending")

    def refuse(payload: str) -> str:
        raise Refused("not now")

    with pytest.raises(Refused):
        store.update_approval("apr_1", refuse)
    assert store.get_approval("apr_1") == "pending"
    # No lock outlives the refusal: another store updates the row at once.
    assert other.update_approval("apr_1", lambda p: "approved") == "approved"


def test_racing_consumers_of_one_approval_exactly_one_wins(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    stores[0].add_approval("apr_1", "run-1", "approved")

    def consume(i: int) -> bool:
        def mutate(payload: str) -> str:
            if payload != "approved":
                raise Refused(f"already {payload}")
            time.sleep(0.01)  # widen the window between the read and the write
            return f"consumed by {i}"

        try:
            stores[i % 4].update_approval("apr_1", mutate)
        except Refused:
            return False
        return True

    wins = race(8, consume)
    assert wins.count(True) == 1
    assert stores[1].get_approval("apr_1") == f"consumed by {wins.index(True)}"


# idempotent calls ---------------------------------------------------------------------------
def test_a_call_key_begins_once_and_later_begins_see_how_it_ended(store: Store) -> None:
    assert store.begin_call("k#1", run_id="run-1", step_id="s1", tool="read_doc", at=T0) is None
    assert store.begin_call("k#1", run_id="run-1", step_id="s1", tool="read_doc", at=T0 + 1) == \
        CallRecord(key="k#1", status="started", result=None)
    store.finish_call("k#1", status="ok", result='{"x": 1}', at=T0 + 2)
    assert store.begin_call("k#1", run_id="run-1", step_id="s1", tool="read_doc", at=T0 + 3) == \
        CallRecord(key="k#1", status="ok", result='{"x": 1}')
    assert store.begin_call("k#2", run_id="run-1", step_id="s1", tool="read_doc", at=T0) is None


def test_racing_begins_of_one_key_start_it_once(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    got = race(8, lambda i: stores[i % 4].begin_call("k#1", run_id="r", step_id="s", tool="t", at=T0))
    assert got.count(None) == 1
    assert all(r == CallRecord(key="k#1", status="started", result=None) for r in got if r is not None)


# ledger -------------------------------------------------------------------------------------
def test_the_ledger_is_one_chain_from_genesis(store: Store) -> None:
    assert store.ledger_last() is None
    seen: list[tuple[int, str]] = []

    def seal(seq: int, prev: str) -> str:
        seen.append((seq, prev))
        return record_hash(seq=seq, run_id="run-1", kind="plan", at=T0, data="{}", prev_hash=prev)

    assert store.append_ledger(run_id="run-1", kind="plan", at=T0, data="{}", seal=seal) == 1
    assert seen == [(1, GENESIS)]
    assert append(store, "run-2", step="a") == 2
    assert append(store, "run-1", at=time.time(), step="b") == 3
    rows = store.ledger_rows()
    assert_one_chain(rows)  # times come back exactly: the hashes cover them
    assert store.ledger_last() == (3, rows[-1].hash)
    assert [r.seq for r in store.ledger_rows(run_id="run-1")] == [1, 3]
    assert store.ledger_rows(run_id="nope") == []
    assert rows[1] == LedgerRow(seq=2, run_id="run-2", kind="decision", at=T0, data='{"step":"a"}',
                                prev_hash=rows[0].hash, hash=rows[1].hash)


def test_a_seal_that_raises_appends_nothing(store: Store) -> None:
    append(store, step="a")

    def broken(seq: int, prev: str) -> str:
        raise Refused("no hash")

    with pytest.raises(Refused):
        store.append_ledger(run_id="run-1", kind="plan", at=T0, data="{}", seal=broken)
    assert append(store, step="b") == 2
    assert_one_chain(store.ledger_rows())


def test_appenders_in_many_threads_and_connections_keep_one_chain(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    race(8, lambda i: [append(stores[i % 4], f"writer-{i}", at=time.time(), i=n) for n in range(25)])
    rows = stores[0].ledger_rows()
    assert len(rows) == 200
    assert_one_chain(rows)
    assert {r.run_id for r in rows} == {f"writer-{i}" for i in range(8)}


def test_appenders_in_two_processes_keep_one_chain(backend: Backend, tmp_path: Path) -> None:
    backend.open()  # the schema exists before the processes race to append
    count = 150
    workers, logs = [], []
    try:
        for i in range(2):
            logs.append((tmp_path / f"appender-{i}.err").open("w"))
            workers.append(subprocess.Popen(
                [sys.executable, "-P", "-W", "error", str(WORKER), "append", backend.url, f"process-{i}",
                 str(count)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[-1], text=True,
            ))
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        start_at = time.time() + 0.3
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(f"{start_at!r}\n")
            w.stdin.close()
        outputs = []
        for w in workers:
            assert w.stdout is not None
            outputs.append(w.stdout.read())
            w.stdout.close()
            w.wait(timeout=120)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
            for pipe in (w.stdin, w.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        for log in logs:
            log.close()
    errors = [(tmp_path / f"appender-{i}.err").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], errors
    assert [o.strip() for o in outputs] == ["done", "done"]
    rows = backend.open().ledger_rows()
    assert len(rows) == 2 * count
    assert_one_chain(rows)
    writers = [r.run_id for r in rows]
    assert writers.count("process-0") == writers.count("process-1") == count


def test_the_signed_head_never_moves_backwards(store: Store) -> None:
    assert store.ledger_head() is None
    store.save_ledger_head(LedgerHead(seq=5, hash="h5", domain="d", signature="sig5"))
    store.save_ledger_head(LedgerHead(seq=3, hash="h3", domain="d", signature="sig3"))
    assert store.ledger_head() == LedgerHead(seq=5, hash="h5", domain="d", signature="sig5")
    store.save_ledger_head(LedgerHead(seq=5, hash="h5", domain="d", signature="sig5-again"))
    assert store.ledger_head() == LedgerHead(seq=5, hash="h5", domain="d", signature="sig5-again")
    store.save_ledger_head(LedgerHead(seq=7, hash="h7", domain="e", signature="sig7"))
    assert store.ledger_head() == LedgerHead(seq=7, hash="h7", domain="e", signature="sig7")


# runs and leases ----------------------------------------------------------------------------
def test_runs_are_upserted_read_and_listed(store: Store) -> None:
    assert store.get_run("run-1") is None
    store.upsert_run(run("run-2", workflow="other", created_at=T0 + 1))
    store.upsert_run(run("run-1"))
    assert store.get_run("run-1") == run("run-1")
    # An upsert of a known run changes its status and time, never who or what started it.
    store.upsert_run(RunRecord(run_id="run-1", workflow="changed", target="changed", initiator="mallory",
                               status="paused", created_at=T0 + 99, updated_at=T0 + 5))
    assert store.get_run("run-1") == RunRecord(run_id="run-1", workflow="wf", target="mod:wf",
                                               initiator="alice", status="paused", created_at=T0,
                                               updated_at=T0 + 5)
    store.set_run_status("run-1", "completed", at=T0 + 6)
    got = store.get_run("run-1")
    assert got is not None and (got.status, got.updated_at) == ("completed", T0 + 6)
    store.set_run_status("nope", "completed", at=T0)  # a no-op, not an error
    assert [r.run_id for r in store.list_runs()] == ["run-1", "run-2"]
    assert [r.run_id for r in store.list_runs(workflow="other")] == ["run-2"]
    assert store.list_runs(workflow="nope") == []


def test_a_lease_is_refused_while_a_live_owner_holds_it(store: Store) -> None:
    store.upsert_run(run("run-1"))
    asked: list[str] = []

    def alive(owner: str) -> bool:
        asked.append(owner)
        return True

    assert store.acquire_run("run-1", owner="A", until=T0 + 60, now=T0, owner_alive=alive) is None
    assert store.acquire_run("run-1", owner="B", until=T0 + 70, now=T0 + 1, owner_alive=alive) == "A"
    assert asked == ["A"]
    # The holder may renew; a release by someone else changes nothing.
    assert store.acquire_run("run-1", owner="A", until=T0 + 90, now=T0 + 2, owner_alive=alive) is None
    store.release_run("run-1", owner="B")
    assert store.acquire_run("run-1", owner="B", until=T0 + 70, now=T0 + 3, owner_alive=alive) == "A"
    store.release_run("run-1", owner="A")
    assert store.acquire_run("run-1", owner="B", until=T0 + 70, now=T0 + 4, owner_alive=alive) is None
    assert store.acquire_run("run-1", owner="A", until=T0 + 70, now=T0 + 5, owner_alive=alive) == "B"


def test_a_lease_of_a_dead_owner_or_past_its_time_is_taken_over(store: Store) -> None:
    store.upsert_run(run("run-1"))
    assert store.acquire_run("run-1", owner="A", until=T0 + 60, now=T0, owner_alive=lambda o: True) is None
    assert store.acquire_run("run-1", owner="B", until=T0 + 60, now=T0 + 1,
                             owner_alive=lambda o: o != "A") is None
    assert store.acquire_run("run-1", owner="A", until=T0 + 60, now=T0 + 2, owner_alive=lambda o: True) == "B"
    assert store.acquire_run("run-1", owner="C", until=T0 + 200, now=T0 + 61,
                             owner_alive=lambda o: True) is None  # B's lease ran out


def test_a_lease_on_an_unknown_run_guards_nothing(store: Store) -> None:
    assert store.acquire_run("nope", owner="A", until=T0 + 60, now=T0, owner_alive=lambda o: True) is None
    assert store.get_run("nope") is None


def test_racing_lease_takers_one_wins(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    stores[0].upsert_run(run("run-1"))
    holders = race(8, lambda i: stores[i % 4].acquire_run(
        "run-1", owner=f"owner-{i}", until=T0 + 60, now=T0, owner_alive=lambda o: True))
    assert holders.count(None) == 1
    winner = f"owner-{holders.index(None)}"
    assert all(h == winner for h in holders if h is not None)


# atomic -------------------------------------------------------------------------------------
def write_everything(store: Store) -> None:
    store.add_grant(grant("g1"))
    assert store.consume_grant_use("g0") == "ok"
    store.revoke_grant("g0", reason="step ended", at=T0)
    store.record_use(use("g1", 1))
    store.add_approval("apr_1", "run-1", "pending")
    store.update_approval("apr_0", lambda p: "consumed")
    assert store.begin_call("k#1", run_id="run-1", step_id="s1", tool="read_doc", at=T0) is None
    append(store, step="x")
    store.save_ledger_head(LedgerHead(seq=2, hash="h", domain="d", signature="s"))
    store.upsert_run(run("run-1"))
    store.set_run_status("run-0", "completed", at=T0 + 1)
    assert store.acquire_run("run-0", owner="A", until=T0 + 60, now=T0, owner_alive=lambda o: True) is None


def prepare(store: Store) -> None:
    store.add_grant(grant("g0", max_uses=1))
    store.add_approval("apr_0", "run-0", "approved")
    store.upsert_run(run("run-0"))
    append(store, step="before")


def nothing_written(store: Store) -> bool:
    return (store.grant_state("g1") == "unknown"
            and store.grant_state("g0") == "ok" and store.uses_for_run("run-1") == []
            and store.get_approval("apr_1") is None and store.get_approval("apr_0") == "approved"
            and len(store.ledger_rows()) == 1 and store.ledger_head() is None and store.get_run("run-1") is None
            and store.get_run("run-0") == run("run-0"))


def test_atomic_lands_every_write_together(backend: Backend) -> None:
    store, other = backend.open(), backend.open()
    prepare(store)
    with store.atomic():
        write_everything(store)
        assert store.get_run("run-1") is not None  # the transaction reads its own writes
        assert nothing_written(other)  # nobody else sees them before the commit
    assert not nothing_written(other)
    assert other.grant_state("g0") == "revoked" and other.get_approval("apr_0") == "consumed"
    assert other.get_run("run-1") == run("run-1")
    assert_one_chain(other.ledger_rows())


def test_atomic_rolls_every_write_back_on_an_exception(backend: Backend) -> None:
    store, other = backend.open(), backend.open()
    prepare(store)
    with pytest.raises(Refused):
        with store.atomic():
            write_everything(store)
            raise Refused("abort")
    assert nothing_written(store) and nothing_written(other)
    # The store works afterwards, and the chain goes on from the last committed record.
    assert append(store, step="after") == 2
    assert_one_chain(other.ledger_rows())
    assert store.acquire_run("run-0", owner="B", until=T0 + 60, now=T0, owner_alive=lambda o: True) is None


def test_nested_atomic_blocks_join_the_outermost(store: Store) -> None:
    with pytest.raises(Refused):
        with store.atomic():
            store.upsert_run(run("run-1"))
            with store.atomic():
                append(store, step="inner")
                with store.atomic():
                    store.add_grant(grant("g1"))
            assert store.grant_state("g1") == "ok"
            raise Refused("abort the outer block")
    assert store.get_run("run-1") is None and store.ledger_rows() == [] and store.grant_state("g1") == "unknown"


def test_a_nested_block_is_not_a_savepoint(store: Store) -> None:
    # What the gateway relies on: a denial raised after a use was taken, caught inside
    # the transaction, leaves that use taken when the transaction commits.
    store.add_grant(grant("g1", max_uses=1))
    with store.atomic():
        try:
            with store.atomic():
                assert store.consume_grant_use("g1") == "ok"
                raise Refused("denied after the use was taken")
        except Refused:
            pass
        append(store, step="denied")
    assert store.grant_state("g1") == "exhausted"
    assert len(store.ledger_rows()) == 1


def test_atomic_blocks_in_other_threads_do_not_join(backend: Backend) -> None:
    store = backend.open()
    inside, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def other_thread() -> None:
        try:
            inside.wait(timeout=30)
            with store.atomic():
                store.upsert_run(run("run-2"))  # its own transaction: commits on its own
        except BaseException as exc:
            failures.append(exc)
        finally:
            release.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with pytest.raises(Refused):
        with store.atomic():
            store.upsert_run(run("run-1"))
            inside.set()
            release.wait(timeout=0.5)  # the other thread may be waiting for us: don't wait long
            raise Refused("roll back only this thread's writes")
    t.join(timeout=30)
    assert not failures, failures
    assert store.get_run("run-1") is None
    assert store.get_run("run-2") == run("run-2")


# failures -----------------------------------------------------------------------------------
def test_an_unreachable_store_raises_store_error_in_one_line(backend: Backend) -> None:
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        open_store(backend.unreachable_url)
    assert time.monotonic() - started < 15
    message = str(caught.value)
    assert "\n" not in message and message
    assert "s3cret" not in message and "s3cret" not in repr(caught.value)


def test_a_closed_store_raises_store_error(backend: Backend) -> None:
    store = backend.open()
    store.close()
    with pytest.raises(StoreError):
        store.get_run("run-1")
    with pytest.raises(StoreError):
        store.upsert_run(run("run-1"))
    with pytest.raises(StoreError):
        with store.atomic():
            pass


def test_a_failed_write_inside_atomic_raises_store_error(backend: Backend) -> None:
    store = backend.open()
    store.add_grant(grant("g1"))
    inside: list[Exception] = []
    with pytest.raises(StoreError):  # the block as a whole fails either way
        with store.atomic():
            try:
                store.add_grant(grant("g1"))
            except Exception as exc:
                inside.append(exc)
                raise
    assert isinstance(inside[0], StoreError), f"{type(inside[0]).__name__} reached the caller"


# schema -------------------------------------------------------------------------------------
def test_reopening_a_store_keeps_its_data_and_schema(backend: Backend) -> None:
    first = backend.open()
    first.add_grant(grant("g1"))
    append(first, step="a")
    first.close()
    again = backend.open()
    assert again.grant_state("g1") == "ok"
    assert append(again, step="b") == 2
    assert_one_chain(again.ledger_rows())


def test_stores_opened_at_once_on_fresh_data_all_work(backend: Backend) -> None:
    opened = race(4, lambda i: backend.open())
    for i, s in enumerate(opened):
        append(s, f"opener-{i}")
    assert_one_chain(opened[0].ledger_rows())


def test_a_caught_failure_inside_atomic_still_writes_nothing(backend: Backend) -> None:
    """A failed statement dooms its transaction on every store, even if the caller carries on."""
    store = backend.open()
    store.add_grant(grant("g1"))
    with pytest.raises(StoreError):
        with store.atomic():
            store.add_grant(grant("g2"))
            try:
                store.add_grant(grant("g1"))  # a duplicate: this statement fails
            except StoreError:
                pass  # the caller ignores it; the transaction must not commit g2 anyway
    assert store.grant_state("g2") == "unknown"
    assert store.grant_state("g1") == "ok"
