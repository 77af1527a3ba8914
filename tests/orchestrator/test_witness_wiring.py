"""A ledger that cannot be rolled back (issue 12, point 3), on SQLite and PostgreSQL.

Every signed head is appended to the witness beside the store before the store keeps it;
``audit verify`` checks the store's head against the newest witnessed one, that the runs
table and the ledger agree, and names what is missing; ``--witness FILE`` checks against
an offline copy; each entry is also a span event when telemetry is configured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow
from scopegraph.cli import main
from scopegraph.clock import FixedClock
from scopegraph.ledger import Ledger
from scopegraph.tracing import WITNESS_EVENT
from scopegraph.witness import WitnessFile
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url  # noqa: F401
from tests.otel_capture import Capture, otel  # noqa: F401

from .trust_helpers import Where, where

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def at(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    return where(request, tmp_path)


@pytest.fixture
def two_runs(at: Where, clock: FixedClock, make_workflow: Callable[..., Workflow]) -> Iterator[dict[str, Any]]:
    """Two completed runs; what the store held after the first (head row, tip) is kept aside."""
    with Runtime(make_workflow(), store=at.url, clock=clock) as rt:
        assert rt.run("read", initiator="alice", run_id="first").status == "completed"
        head = at.sql("SELECT seq, hash, domain, signature, kid, witness_seq FROM sg_ledger_head")[0]
        tip = at.sql("SELECT seq, hash FROM sg_ledger_tip")[0]
        lines = at.witness.read_text()
        assert rt.run("read", initiator="alice", run_id="second").status == "completed"
    yield {"head": head, "tip": tip, "witness_lines": lines}


def roll_back(at: Where, kept: dict[str, Any], *, runs_too: bool) -> None:
    """Put back the genuinely signed head of the first run, after deleting the records behind it."""
    seq, hsh, domain, signature, kid, witness_seq = kept["head"]
    at.sql("DELETE FROM sg_ledger WHERE seq > ?", (seq,))
    at.sql("UPDATE sg_ledger_tip SET seq = ?, hash = ?", kept["tip"])
    at.sql("UPDATE sg_ledger_head SET seq = ?, hash = ?, domain = ?, signature = ?, kid = ?, witness_seq = ?",
           (seq, hsh, domain, signature, kid, witness_seq))
    if runs_too:
        at.sql("DELETE FROM sg_runs WHERE run_id = 'second'")


def audit(capsys: pytest.CaptureFixture[str], at: Where, *extra: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = main(["--store", at.url, "audit", "verify", "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_every_signed_head_is_witnessed_first(at: Where, two_runs: dict[str, Any],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    [(seq, hsh, witness_seq)] = at.sql("SELECT seq, hash, witness_seq FROM sg_ledger_head")
    entries = [json.loads(line) for line in at.witness.read_text().splitlines()]
    assert len(entries) == 2  # each run's end signs a head
    assert entries[-1]["seq"] == witness_seq and entries[-1]["records"] == seq and entries[-1]["head"] == hsh
    assert [e["records"] for e in entries] == sorted(e["records"] for e in entries)
    code, verdict = audit(capsys, at)
    assert code == 0 and verdict["ok"] and verdict["witness_entries"] == len(entries), verdict


@pytest.mark.parametrize("runs_too", [False, True], ids=["records deleted", "records and run deleted"])
def test_a_restored_older_head_is_reported(at: Where, two_runs: dict[str, Any], runs_too: bool,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    roll_back(at, two_runs, runs_too=runs_too)
    # The chain and the restored head are genuine: only the witness (and the runs) tell.
    code, verdict = audit(capsys, at)
    assert code == 1 and not verdict["ok"]
    assert any("the ledger was rolled back" in p for p in verdict["problems"]), verdict["problems"]
    if not runs_too:
        assert any("run 'second' (completed) is in the store but its run_started record is missing" in p
                   for p in verdict["problems"]), verdict["problems"]
    code = main(["--store", at.url, "audit", "verify"])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("TAMPERED: witness ") and len(out.strip().splitlines()) == 1


def test_deleting_the_witness_last_lines_is_reported(at: Where, two_runs: dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    lines = at.witness.read_text().splitlines(keepends=True)
    at.witness.write_text("".join(lines[:-2]))
    code, verdict = audit(capsys, at)
    assert code == 1
    assert any("its last lines were deleted" in p for p in verdict["problems"]), verdict["problems"]


def test_an_offline_copy_of_the_witness_catches_a_rollback_of_store_and_witness_together(
        at: Where, two_runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "offsite-witness.jsonl"
    shutil.copyfile(at.witness, copy)
    # Someone who can write both rolls both back, consistently:
    roll_back(at, two_runs, runs_too=True)
    at.witness.write_text(two_runs["witness_lines"])
    code, verdict = audit(capsys, at)
    assert code == 0 and verdict["ok"], verdict  # the local pair agrees: one machine cannot tell
    code, verdict = audit(capsys, at, "--witness", str(copy))
    assert code == 1 and any("rolled back" in p for p in verdict["problems"]), verdict
    assert main(["--store", at.url, "audit", "verify", "--witness", str(tmp_path / "missing.jsonl")]) == 2


def test_a_run_the_ledger_does_not_know_is_named(at: Where, two_runs: dict[str, Any],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    at.sql("INSERT INTO sg_runs (run_id, workflow, target, initiator, status, created_at, updated_at) "
           "VALUES ('ghost', 'testwf', 'm:wf', 'alice', 'completed', 1, 1)")
    code, verdict = audit(capsys, at)
    assert code == 1 and verdict["problems"] == [
        "run 'ghost' (completed) is in the store but its run_started record is missing from the ledger"]


def test_the_witness_path_is_configurable(tmp_path: Path, clock: FixedClock, monkeypatch: pytest.MonkeyPatch,
                                          make_workflow: Callable[..., Workflow],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "mounted" / "witness.jsonl"
    monkeypatch.setenv("SCOPEGRAPH_WITNESS", str(elsewhere))
    url = f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}"
    with Runtime(make_workflow(), store=url, clock=clock) as rt:
        assert rt.run("read", initiator="alice").status == "completed"
    assert elsewhere.is_file() and not (tmp_path / "store" / "scopegraph.witness.jsonl").exists()
    assert main(["--store", url, "audit", "verify"]) == 0
    monkeypatch.delenv("SCOPEGRAPH_WITNESS")
    assert main(["--store", url, "audit", "verify"]) == 1  # the default witness is empty: its head unwitnessed
    assert "last lines were deleted" in capsys.readouterr().out


def test_each_witness_entry_is_also_a_span_event(otel: Capture, store_url: str, clock: FixedClock,  # noqa: F811
                                                make_workflow: Callable[..., Workflow], store_path: Path) -> None:
    with Runtime(make_workflow(), store=store_url, clock=clock) as rt:
        assert rt.run("read", initiator="alice").status == "completed"
    events = [e for s in otel.spans() for e in s.events if e.name == WITNESS_EVENT]
    lines = [json.loads(line) for line in (store_path.parent / "scopegraph.witness.jsonl").read_text().splitlines()]
    assert [e.attributes["scopegraph.witness.seq"] for e in events] == [line["seq"] for line in lines]
    last = events[-1].attributes
    assert (last["scopegraph.witness.head"], last["scopegraph.witness.sig"], last["scopegraph.witness.kid"]) == (
        lines[-1]["head"], lines[-1]["sig"], lines[-1]["kid"])


CHILD = """
import sys
from scopegraph.clock import SystemClock
from scopegraph.ledger import Ledger
from scopegraph.store import open_store
store = open_store(sys.argv[1])
ledger = Ledger(store, clock=SystemClock())
for i in range(10):
    with store.atomic():
        ledger.append("decision", "w" + sys.argv[2], step_id=str(i))
        ledger.sign_head()
store.close()
"""


def test_processes_signing_heads_at_once_keep_one_witness_in_order(at: Where) -> None:
    procs = [subprocess.Popen([sys.executable, "-W", "error", "-c", CHILD, at.url, str(n)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    log = WitnessFile(at.witness, keys=_ledger_keys(at)).read()
    assert log.problem is None and len(log.entries) == 40
    assert [e.records for e in log.entries] == list(range(1, 41))


def _ledger_keys(at: Where) -> Any:
    from scopegraph.store import open_store
    from scopegraph.trust import TrustRoots

    store = open_store(at.url)
    try:
        return TrustRoots.for_reading(store).verification_keys("ledger")
    finally:
        store.close()


def test_ledger_verify_without_the_witness_skips_it(at: Where, two_runs: dict[str, Any]) -> None:
    at.witness.unlink()
    from scopegraph.store import open_store

    store = open_store(at.url)
    try:
        assert not Ledger(store, clock=FixedClock()).verify().ok
        assert Ledger(store, clock=FixedClock()).verify(check_witness=False).ok
    finally:
        store.close()


def test_outside_a_run_a_witness_entry_is_a_log_record(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An enrolment (no span current) signs a head: its witness entry goes to the ``scopegraph.witness``
    logger, which OpenTelemetry's logging handler exports when the application installs one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from scopegraph.tracing import WITNESS_LOGGER

    url = f"sqlite:///{tmp_path / 'store' / 'scopegraph.db'}"
    pem = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with caplog.at_level("INFO", logger=WITNESS_LOGGER):
        assert main(["--store", url, "approvers", "add", "bob", "--key", pem]) == 0
    [record] = [r for r in caplog.records if r.name == WITNESS_LOGGER]
    [line] = [json.loads(x) for x in (tmp_path / "store" / "scopegraph.witness.jsonl").read_text().splitlines()]
    assert getattr(record, "scopegraph.witness.sig") == line["sig"]
    assert getattr(record, "scopegraph.witness.seq") == line["seq"] == 1
