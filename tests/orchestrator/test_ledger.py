"""The audit ledger: every hop recorded, hash-chained, head signed; tampering found (issue 4, point 4).

Real runs write a real ledger into SQLite in ``tmp_path``; the tests then edit the
database file directly with ``sqlite3``, as an attacker with write access to the store
would, and check that ``Ledger.verify`` and ``scopegraph audit verify`` name the first
bad record (exit 1) while an intact ledger verifies (exit 0).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scopegraph import Runtime, Workflow, tool
from scopegraph.agents import DirectExecutor
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.identity import TrustDomain
from scopegraph.keys import FileKeystore
from scopegraph.ledger import GENESIS, Ledger, VerifyResult, record_hash_v2
from scopegraph.roles import StepContext
from scopegraph.store import SqliteStore

from ..helpers import READ_PLAN, STANDARD_TOOLS

JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.")

NOTE_PLAN = {"steps": [
    {"id": "note", "tool": "write_note", "purpose": "write the note",
     "constraints": {"title": {"kind": "exact", "value": "quarterly"},
                     "amount": {"kind": "range", "min": 1, "max": 100}}},
]}

ARGUMENT_MARK = "arg-value-5b1f0c"
RESULT_MARK = "result-value-9e77d2"


@tool
def stash(label: str, body: str) -> dict[str, Any]:
    """Store a body under a label; echoes a receipt."""
    return {"receipt": RESULT_MARK, "size": len(body)}


class TokenKeeper(DirectExecutor):
    """A direct executor that remembers the step's credentials, to look for them later."""

    def __init__(self, seen: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen = seen

    def execute(self, ctx: StepContext) -> Any:
        self.seen.append(ctx.tools._ToolHandle__token)  # type: ignore[attr-defined]
        self.seen.append(ctx.svid.danger_jwt())
        return super().execute(ctx)


# fixtures --------------------------------------------------------------------------------
@dataclass
class Audited:
    store_url: str
    path: Path
    runs: list[str]


@pytest.fixture
def audited(store_url: str, store_path: Path, clock: FixedClock,
            make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> Audited:
    """A ledger written by real runs: one completed, one paused, approved and resumed."""
    rt = make_runtime(make_workflow(READ_PLAN))
    assert rt.run("read", initiator="alice", run_id="read1").status == "completed"
    notes = make_workflow(NOTE_PLAN, approvers=["bob"],
                          executor=DirectExecutor(builders={"write_note": lambda ctx: {"amount": 7}}))
    rt2 = make_runtime(notes)
    paused = rt2.run("note", initiator="alice", run_id="note1")
    assert paused.status == "paused"
    clock.advance(5)
    rt2.approvals.approve(paused.approvals[0]["id"], approver="bob")
    assert make_runtime(notes).resume("note1").status == "completed"
    for r in (rt, rt2):
        r.close()
    return Audited(store_url=store_url, path=store_path, runs=["read1", "note1"])


@pytest.fixture
def db(audited: Audited) -> Iterator[sqlite3.Connection]:
    """A direct connection to the store file: the attacker's."""
    with closing(sqlite3.connect(str(audited.path), isolation_level=None)) as conn:
        yield conn


def verify(path: Path, run_id: str | None = None) -> VerifyResult:
    store = SqliteStore(path)
    try:
        return Ledger(store, clock=FixedClock()).verify(run_id)
    finally:
        store.close()


def audit_cli(capsys: pytest.CaptureFixture[str], store_url: str, *extra: str) -> tuple[int, str, str]:
    code = main(["--store", store_url, "audit", "verify", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT seq, run_id, kind, at, data, prev_hash, hash FROM sg_ledger ORDER BY seq").fetchall()


def _rehash(conn: sqlite3.Connection, seq: int, data: str, prev: str) -> str:
    _, run_id, kind, at, *_ = conn.execute(
        "SELECT seq, run_id, kind, at FROM sg_ledger WHERE seq = ?", (seq,)).fetchone()
    new = record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=json.loads(data), prev_hash=prev)
    conn.execute("UPDATE sg_ledger SET data = ?, prev_hash = ?, hash = ? WHERE seq = ?", (data, prev, new, seq))
    return new


def _forge(data: str) -> str:
    """A decision record rewritten to say the call was allowed by a policy that never ran."""
    record = json.loads(data)
    assert record["decision"] in ("allow", "deny", "needs_approval")
    record.update(decision="allow" if record["decision"] != "allow" else "deny", policy_ids=["forged"])
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _middle_decision(conn: sqlite3.Connection) -> int:
    seqs = [r[0] for r in conn.execute("SELECT seq FROM sg_ledger WHERE kind = 'decision' ORDER BY seq")]
    return int(seqs[len(seqs) // 2])


# intact ----------------------------------------------------------------------------------
def test_intact_ledger_verifies_and_the_cli_says_so(audited: Audited, db: sqlite3.Connection,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows(db)
    result = verify(audited.path)
    assert result.ok and result.problem is None and result.bad_seq is None
    assert result.records == len(rows) and result.signed_seq == rows[-1][0]
    code, out, err = audit_cli(capsys, audited.store_url)
    assert code == 0 and err == ""
    assert out.strip() == f"ok: {len(rows)} records, hash chain intact, head signed at record {rows[-1][0]}"
    code, out, _ = audit_cli(capsys, audited.store_url, "--run", "note1", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


def test_every_hop_of_a_run_is_a_record_in_one_chain(audited: Audited, db: sqlite3.Connection) -> None:
    rows = _rows(db)
    prev = GENESIS
    for seq, run_id, kind, at, data, prev_hash, hsh in rows:
        assert prev_hash == prev, f"record {seq} does not point at its predecessor"
        assert hsh == record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, data=json.loads(data),
                                     prev_hash=prev_hash)
        prev = hsh
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    kinds = [r[2] for r in rows if r[1] == "note1"]
    assert kinds == [
        "run_started", "plan", "grant_minted", "decision", "approval_requested", "grant_revoked",
        "step_ended", "run_paused", "approval_decided", "run_resumed", "grant_minted",
        "approval_consumed", "decision", "tool_call", "grant_revoked", "step_ended", "run_ended",
    ]
    read_kinds = [r[2] for r in rows if r[1] == "read1"]
    assert read_kinds.count("tool_call") == read_kinds.count("grant_minted") == 2
    assert read_kinds[0] == "run_started" and read_kinds[-1] == "run_ended"


def test_the_signed_head_is_signed_by_the_keystores_ledger_key(audited: Audited, db: sqlite3.Connection) -> None:
    seq, hsh, kid, signature = db.execute("SELECT seq, hash, kid, signature FROM sg_ledger_head").fetchone()
    keystore = FileKeystore(audited.path.parent / "keys")
    [public] = [k for k in keystore.verification_keys("ledger") if k.kid == kid]
    assert jwt.get_unverified_header(signature)["kid"] == kid
    claims = jwt.decode(signature, public.public_key, algorithms=["EdDSA"],
                        options={"verify_aud": False, "verify_iat": False})
    assert claims["seq"] == seq and claims["hash"] == hsh
    last = _rows(db)[-1]
    assert (seq, hsh) == (last[0], last[6]), "the head is the last record once the runs ended"


# tampering -------------------------------------------------------------------------------
def _edit_data(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = _middle_decision(conn)
    (data,) = conn.execute("SELECT data FROM sg_ledger WHERE seq = ?", (seq,)).fetchone()
    conn.execute("UPDATE sg_ledger SET data = ? WHERE seq = ?", (_forge(data), seq))
    return seq, f"record {seq} (decision) was altered"


def _edit_data_and_hash(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = _middle_decision(conn)
    data, prev = conn.execute("SELECT data, prev_hash FROM sg_ledger WHERE seq = ?", (seq,)).fetchone()
    _rehash(conn, seq, _forge(data), prev)
    return seq + 1, f"record {seq + 1} does not follow record {seq}"


def _edit_timestamp(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = _middle_decision(conn)
    conn.execute("UPDATE sg_ledger SET at = at - 3600 WHERE seq = ?", (seq,))
    return seq, f"record {seq} (decision) was altered"


def _edit_run_id(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = _middle_decision(conn)
    conn.execute("UPDATE sg_ledger SET run_id = 'someone-else' WHERE seq = ?", (seq,))
    return seq, f"record {seq} (decision) was altered"


def _delete_middle(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = _middle_decision(conn)
    conn.execute("DELETE FROM sg_ledger WHERE seq = ?", (seq,))
    return seq, f"record {seq} is missing"


def _delete_and_renumber(conn: sqlite3.Connection) -> tuple[int, str]:
    # Close the gap the deletion left: the sequence looks whole, the hashes do not.
    seq = _middle_decision(conn)
    conn.execute("DELETE FROM sg_ledger WHERE seq = ?", (seq,))
    conn.execute("UPDATE sg_ledger SET seq = -(seq - 1) WHERE seq > ?", (seq,))
    conn.execute("UPDATE sg_ledger SET seq = -seq WHERE seq < 0")
    return seq, f"record {seq}"


def _swap(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = _middle_decision(conn)
    conn.execute("UPDATE sg_ledger SET seq = -1 WHERE seq = ?", (seq,))
    conn.execute("UPDATE sg_ledger SET seq = ? WHERE seq = ?", (seq, seq + 1))
    conn.execute("UPDATE sg_ledger SET seq = ? WHERE seq = -1", (seq + 1,))
    return seq, f"record {seq} does not follow record {seq - 1}"


def _truncate_tail(conn: sqlite3.Connection) -> tuple[int, str]:
    last = conn.execute("SELECT MAX(seq) FROM sg_ledger").fetchone()[0]
    conn.execute("DELETE FROM sg_ledger WHERE seq > ?", (last - 4,))
    return last - 3, f"the ledger was truncated: the signed head is record {last}, the ledger ends at {last - 4}"


def _rewrite_whole_tail(conn: sqlite3.Connection) -> tuple[int, str]:
    # A careful forger re-chains every later record: only the signed head can tell.
    seq = _middle_decision(conn)
    rows = [r for r in _rows(conn) if r[0] >= seq]
    prev = rows[0][5]
    for r in rows:
        data = _forge(r[4]) if r[0] == seq else r[4]
        prev = _rehash(conn, r[0], data, prev)
    last = rows[-1][0]
    return last, f"record {last} differs from the signed head"


def _forged_head_signature(conn: sqlite3.Connection) -> tuple[int, str]:
    seq, hsh = conn.execute("SELECT seq, hash FROM sg_ledger_head").fetchone()
    forged = jwt.encode({"seq": seq, "hash": hsh}, Ed25519PrivateKey.generate(), algorithm="EdDSA")
    conn.execute("UPDATE sg_ledger_head SET signature = ?", (forged,))
    return seq, "the signature on the ledger head does not verify"


def _garbage_head_signature(conn: sqlite3.Connection) -> tuple[int, str]:
    seq = conn.execute("SELECT seq FROM sg_ledger_head").fetchone()[0]
    conn.execute("UPDATE sg_ledger_head SET signature = 'not-a-signature'")
    return seq, "the signature on the ledger head does not verify"


def _head_moved_back(conn: sqlite3.Connection) -> tuple[int, str]:
    # Pretend the head was signed earlier, to cut records off after it undetected.
    seq, hsh = conn.execute("SELECT seq, hash FROM sg_ledger WHERE seq = 5").fetchone()
    conn.execute("UPDATE sg_ledger_head SET seq = ?, hash = ?", (seq, hsh))
    conn.execute("DELETE FROM sg_ledger WHERE seq > 5")
    return seq, "the ledger head does not match its signature"


def _head_deleted(conn: sqlite3.Connection) -> tuple[int, str]:
    conn.execute("DELETE FROM sg_ledger_head")
    return 1, "the ledger has records but no signed head"


TAMPERS: dict[str, Callable[[sqlite3.Connection], tuple[int, str]]] = {
    "edited data": _edit_data,
    "edited data and hash": _edit_data_and_hash,
    "edited timestamp": _edit_timestamp,
    "edited run id": _edit_run_id,
    "deleted middle record": _delete_middle,
    "deleted and renumbered": _delete_and_renumber,
    "swapped two records": _swap,
    "truncated tail": _truncate_tail,
    "rewritten tail": _rewrite_whole_tail,
    "forged head signature": _forged_head_signature,
    "garbage head signature": _garbage_head_signature,
    "head moved back": _head_moved_back,
    "head deleted": _head_deleted,
}


@pytest.mark.parametrize("tamper", list(TAMPERS), ids=list(TAMPERS))
def test_tampering_is_caught_and_the_first_bad_record_named(
        tamper: str, audited: Audited, db: sqlite3.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    bad_seq, problem = TAMPERS[tamper](db)
    result = verify(audited.path)
    assert not result.ok
    assert result.bad_seq == bad_seq, result
    assert result.problem is not None and result.problem.startswith(problem), result.problem

    code, out, err = audit_cli(capsys, audited.store_url)
    assert code == 1, out
    assert err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    assert problem in lines[0]

    code, out, _ = audit_cli(capsys, audited.store_url, "--json")
    assert code == 1
    assert json.loads(out) == {**result.to_dict()}

    # Scoping the check to one run does not hide tampering elsewhere in the chain.
    code, out, _ = audit_cli(capsys, audited.store_url, "--run", "read1")
    assert code == 1 and problem in out


def test_moving_the_head_forward_over_unsigned_records_is_caught(
        audited: Audited, db: sqlite3.Connection, clock: FixedClock, store_url: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Records appended after the last signature (here: a paused run's approval answered)
    # are not covered yet; claiming they are, with the old signature, must fail.
    store = SqliteStore(audited.path)
    try:
        ledger = Ledger(store, clock=clock)
        head = store.ledger_head()
        assert head is not None
        ledger.append("approval_decided", "note1", approval_id="apr_x", approver="bob")
        ledger.append("approval_decided", "note1", approval_id="apr_y", approver="bob")
        assert ledger.verify().ok, "an unsigned tail on its own is not tampering"
    finally:
        store.close()
    seq, hsh = db.execute("SELECT seq, hash FROM sg_ledger ORDER BY seq DESC LIMIT 1").fetchone()
    db.execute("UPDATE sg_ledger_head SET seq = ?, hash = ?", (seq, hsh))
    result = verify(audited.path)
    assert not result.ok and result.bad_seq == seq
    assert result.problem == "the ledger head does not match its signature"
    code, out, _ = audit_cli(capsys, store_url)
    assert code == 1 and len(out.strip().splitlines()) == 1


def test_deleting_an_answered_approval_before_the_run_resumes_is_caught(
        store_url: str, store_path: Path, clock: FixedClock, make_workflow: Callable[..., Workflow],
        make_runtime: Callable[..., Runtime], capsys: pytest.CaptureFixture[str]) -> None:
    # ``scopegraph approve`` appends who approved; until the run resumes, nothing signs it.
    # Cutting that record off the tail must not leave a ledger that verifies: the
    # approval would vanish from the audit trail once the resumed run signs a new head.
    notes = make_workflow(NOTE_PLAN, approvers=["bob"],
                          executor=DirectExecutor(builders={"write_note": lambda ctx: {"amount": 7}}))
    rt = make_runtime(notes)
    paused = rt.run("note", initiator="alice", run_id="cut1")
    assert paused.status == "paused"
    rt.close()
    assert main(["--store", store_url, "approve", paused.approvals[0]["id"], "--as", "bob"]) == 0
    capsys.readouterr()
    with closing(sqlite3.connect(str(store_path), isolation_level=None)) as conn:
        (seq, kind), = conn.execute("SELECT seq, kind FROM sg_ledger ORDER BY seq DESC LIMIT 1").fetchall()
        assert kind == "approval_decided"
        conn.execute("DELETE FROM sg_ledger WHERE seq = ?", (seq,))
    result = verify(store_path)
    assert not result.ok, "the approver's record was cut off the ledger and it still verifies"
    assert result.bad_seq == seq


def test_a_wiped_ledger_of_a_store_that_has_runs_does_not_verify(
        audited: Audited, db: sqlite3.Connection, capsys: pytest.CaptureFixture[str]) -> None:
    # Truncation all the way: every record and the head gone while the runs remain.
    db.execute("DELETE FROM sg_ledger")
    db.execute("DELETE FROM sg_ledger_head")
    result = verify(audited.path)
    assert not result.ok, f"an emptied ledger verifies: {result}"
    code, _, _ = audit_cli(capsys, audited.store_url)
    assert code == 1


# --run -----------------------------------------------------------------------------------
def test_run_option_with_an_unknown_run_fails_in_one_line(audited: Audited,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = audit_cli(capsys, audited.store_url, "--run", "no-such-run")
    assert code == 2  # bad input, not tampering (issue 10)
    text = (out + err).strip()
    assert len(text.splitlines()) == 1 and "no-such-run" in text and "Traceback" not in text
    assert "no such run" in text and "TAMPERED" not in text
    code, out, err = audit_cli(capsys, audited.store_url, "--run", "no-such-run", "--json")
    assert code == 2 and out == "" and "no such run" in err
    assert verify(audited.path, "note1").ok and verify(audited.path, "read1").ok


def test_audit_verify_on_a_fresh_store_is_ok_with_no_records(store_url: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    SqliteStore(store_url[len("sqlite:///"):]).close()  # `audit verify` only reads: it creates no store
    code, out, _ = audit_cli(capsys, store_url, "--json")
    assert code == 0
    assert json.loads(out) == {"ok": True, "records": 0, "signed_seq": None, "unsigned": 0,
                               "problem": None, "bad_seq": None,
                               # issue 12: every problem, the witness checked against, signed answers
                               "problems": [], "witness_entries": 0, "signed_answers": 0}


# concurrency -----------------------------------------------------------------------------
def test_concurrent_appends_from_threads_and_connections_keep_one_chain(store_path: Path,
                                                                        clock: FixedClock) -> None:
    shared = SqliteStore(store_path)
    stores = [shared] + [SqliteStore(store_path) for _ in range(3)]  # one connection each, like processes
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(n: int) -> None:
        ledger = Ledger(stores[n % len(stores)], clock=clock)
        try:
            start.wait()
            for i in range(25):
                ledger.append("decision", f"run{n}", step_id=f"s{i}", writer=n, i=i)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not errors, errors
        Ledger(shared, clock=clock).sign_head(TrustDomain("scopegraph.local", shared, clock=clock))
        result = Ledger(shared, clock=clock).verify()
        assert result.ok, result
        assert result.records == 200 and result.signed_seq == 200
        records = Ledger(shared, clock=clock).records()
        assert sorted((r["writer"], r["i"]) for r in records) == [(n, i) for n in range(8) for i in range(25)]
    finally:
        for s in stores:
            s.close()


# nothing secret in the ledger ------------------------------------------------------------
def test_records_hold_digests_never_argument_values_results_or_tokens(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    seen: list[str] = []
    plan = {"steps": [{"id": "s", "tool": "stash", "purpose": "stash it",
                       "constraints": {"label": {"kind": "prefix", "prefix": "/inbox/"},
                                       "body": {"kind": "any"}}}]}
    executor = TokenKeeper(seen, builders={"stash": lambda ctx: {"label": f"/inbox/{ARGUMENT_MARK}",
                                                                  "body": ARGUMENT_MARK * 3}})
    rt = make_runtime(make_workflow(plan, tools=[*STANDARD_TOOLS, stash], executor=executor))
    report = rt.run("stash", run_id="dig1")
    assert report.status == "completed", report.summary()
    records = rt.ledger.records("dig1")
    text = json.dumps(records)
    assert ARGUMENT_MARK not in text
    assert RESULT_MARK not in text
    assert len(seen) == 2
    for secret in seen:
        assert secret not in text
        assert secret.split(".")[2] not in text
    assert not JWT.search(text)

    arguments = {"label": f"/inbox/{ARGUMENT_MARK}", "body": ARGUMENT_MARK * 3}
    want_args = hashlib.sha256(json.dumps({"arguments": arguments}, sort_keys=True,
                                          separators=(",", ":")).encode()).hexdigest()
    result = {"receipt": RESULT_MARK, "size": len(ARGUMENT_MARK) * 3}
    want_result = hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()
    (decision,) = [r for r in records if r["kind"] == "decision"]
    (call,) = [r for r in records if r["kind"] == "tool_call"]
    assert decision["arguments_digest"] == call["arguments_digest"] == want_args
    assert call["result_digest"] == want_result
    assert call["grant_id"] == decision["grant_id"] == report.steps[0].grant_id
