"""The witness file: signed, chained heads outside the store; rollback, truncation and edits reported."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from scopegraph.errors import StoreError
from scopegraph.keys import FileKeystore
from scopegraph.witness import GENESIS, WitnessedHead, WitnessFile, default_witness_path


def _h(n: int) -> str:
    """A stand-in for the hash of ledger record ``n``."""
    return hashlib.sha256(f"record {n}".encode()).hexdigest()


@pytest.fixture
def keystore(tmp_path: Path) -> FileKeystore:
    return FileKeystore(tmp_path / "keys")


@pytest.fixture
def witness(tmp_path: Path, keystore: FileKeystore) -> WitnessFile:
    signer = keystore.signer("ledger")
    path = tmp_path / "witness.jsonl"
    for n, records in enumerate((3, 5, 8), start=1):
        WitnessFile(path).append(records=records, head=_h(records), at=1000.0 + n, signer=signer)
    return WitnessFile(path, keys=keystore.verification_keys("ledger"))


def _head(records: int, witness_seq: int | None) -> WitnessedHead:
    return WitnessedHead(records=records, hash=_h(records), witness_seq=witness_seq)


def _lines(witness: WitnessFile) -> list[str]:
    return witness.path.read_text().splitlines(keepends=True)


def test_entries_are_signed_chained_and_verify(witness: WitnessFile, keystore: FileKeystore) -> None:
    log = witness.read()
    assert log.problem is None and [e.records for e in log.entries] == [3, 5, 8]
    assert [e.seq for e in log.entries] == [1, 2, 3] and log.entries[0].prev == GENESIS
    assert log.entries[1].prev == hashlib.sha256(_lines(witness)[0].rstrip("\n").encode()).hexdigest()
    assert {e.kid for e in log.entries} == {keystore.signer("ledger").kid}
    first = json.loads(_lines(witness)[0])
    assert first["type"] == "scopegraph.witness.v1" and set(first) == {
        "type", "seq", "records", "head", "at", "prev", "kid", "sig"}
    report = witness.verify_against(_head(8, 3), ledger_hashes={n: _h(n) for n in range(1, 9)})
    assert report.ok and report.problems == () and report.newest_seq == 3 and report.newest_records == 8


def test_a_store_head_ahead_of_the_witness_with_its_entry_verifies(witness: WitnessFile,
                                                                   keystore: FileKeystore) -> None:
    entry = WitnessFile(witness.path).append(records=12, head=_h(12), at=2000.0, signer=keystore.signer("ledger"))
    assert entry.seq == 4
    assert witness.verify_against(_head(12, 4)).ok


def test_witnessing_the_newest_head_again_adds_nothing(witness: WitnessFile, keystore: FileKeystore) -> None:
    before = witness.path.read_bytes()
    entry = witness.append(records=8, head=_h(8), at=3000.0, signer=keystore.signer("ledger"))
    assert entry.seq == 3 and witness.path.read_bytes() == before


# break-it ----------------------------------------------------------------------------------
def test_a_restored_older_head_is_reported(witness: WitnessFile) -> None:
    report = witness.verify_against(_head(5, 2))
    assert not report.ok
    assert report.problems == ("the store's head covers 5 records but the witness saw 8 (entry 3): "
                               "the ledger was rolled back",)


def test_deleting_the_witness_last_lines_is_reported(witness: WitnessFile) -> None:
    witness.path.write_text("".join(_lines(witness)[:1]))
    report = witness.verify_against(_head(8, 3))
    assert not report.ok and report.entries == 1
    assert report.problems == ("the store's head was witnessed as entry 3 but the witness ends at entry 1: "
                               "its last lines were deleted",)
    witness.path.write_text("")
    assert "the witness ends at entry 0" in witness.verify_against(_head(8, 3)).problems[0]


def test_deleting_or_reordering_lines_in_the_middle_is_reported(witness: WitnessFile) -> None:
    lines = _lines(witness)
    witness.path.write_text(lines[0] + lines[2])
    assert witness.verify_against(_head(8, 3)).problems[0] == (
        "witness line 2 is entry 3, expected 2: entries were deleted or reordered")
    witness.path.write_text(lines[1] + lines[0] + lines[2])
    assert "witness line 1 is entry 2, expected 1" in witness.verify_against(_head(8, 3)).problems[0]


def test_an_edited_line_is_reported(witness: WitnessFile) -> None:
    lines = _lines(witness)
    entry = json.loads(lines[1])
    entry["records"] = 6  # still canonical JSON, but no longer what was signed
    edited = json.dumps(entry, sort_keys=True, separators=(",", ":")) + "\n"
    witness.path.write_text(lines[0] + edited + lines[2])
    report = witness.verify_against(_head(8, 3))
    assert report.problems[0] == "witness entry 2 has a bad signature: it was edited" and report.entries == 1
    witness.path.write_text(lines[0] + lines[1].replace(",", ", ", 1) + lines[2])
    assert witness.read().problem == "witness line 2 is not in canonical form: it was edited"


def test_a_re_signed_replacement_line_breaks_the_chain(tmp_path: Path, keystore: FileKeystore) -> None:
    """Even with the ledger key, replacing a line breaks the next line's ``prev``."""
    signer = keystore.signer("ledger")
    honest = WitnessFile(tmp_path / "honest.jsonl", keys=[signer.verification_key])
    for records in (3, 5, 8):
        honest.append(records=records, head=_h(records), at=1.0, signer=signer)
    forged = WitnessFile(tmp_path / "forged.jsonl", keys=[signer.verification_key])
    forged.append(records=3, head=_h(3), at=1.0, signer=signer)
    forged.append(records=5, head="f" * 64, at=1.0, signer=signer)  # a different second head, genuinely signed
    lines = _lines(honest)
    honest.path.write_text(lines[0] + _lines(forged)[1] + lines[2])
    assert honest.read().problem == (
        "witness entry 3 does not follow the entry before it: a line was edited or removed")


def test_entries_signed_by_an_unknown_key_are_reported(witness: WitnessFile, tmp_path: Path) -> None:
    stranger = FileKeystore(tmp_path / "other-keys")
    outsider = WitnessFile(witness.path, keys=stranger.verification_keys("ledger") or
                           [stranger.signer("ledger").verification_key])
    assert "is signed by key" in (outsider.read().problem or "")
    assert "not a known ledger key" in outsider.verify_against(_head(8, 3)).problems[0]


def test_entries_verify_after_the_ledger_key_is_rotated(witness: WitnessFile, keystore: FileKeystore) -> None:
    keystore.rotate("ledger")
    WitnessFile(witness.path).append(records=9, head=_h(9), at=4000.0, signer=keystore.signer("ledger"))
    rotated = WitnessFile(witness.path, keys=keystore.verification_keys("ledger"))
    log = rotated.read()
    assert log.problem is None and len({e.kid for e in log.entries}) == 2
    only_new = WitnessFile(witness.path, keys=keystore.verification_keys("ledger")[:1])
    assert only_new.read().problem is not None  # the old entries need the previous public key


def test_a_rewritten_ledger_is_reported_against_the_witness(witness: WitnessFile) -> None:
    rewritten = {n: _h(n) for n in range(1, 9)} | {5: "e" * 64}
    report = witness.verify_against(_head(8, 3), ledger_hashes=rewritten)
    assert report.problems == ("ledger record 5 differs from the head witnessed in entry 2: "
                               "the ledger was rewritten",)
    cut = {n: _h(n) for n in range(1, 6)}
    assert "covers record 8, which the ledger no longer has" in witness.verify_against(
        _head(8, 3), ledger_hashes=cut).problems[0]
    assert "differs from the witnessed head" in witness.verify_against(
        WitnessedHead(records=8, hash="d" * 64, witness_seq=3)).problems[0]


def test_a_wiped_store_and_an_unwitnessed_head_are_reported(witness: WitnessFile) -> None:
    assert "the store has no signed head but the witness saw 8 records" in witness.verify_against(None).problems[0]
    assert witness.verify_against(_head(10, None)).problems == (
        "the store's head (record 10) was never witnessed",)
    assert WitnessFile(witness.path.with_name("absent.jsonl")).verify_against(_head(3, None)).ok


def test_appending_refuses_an_older_or_rewritten_head(witness: WitnessFile, keystore: FileKeystore) -> None:
    signer = keystore.signer("ledger")
    with pytest.raises(StoreError, match=r"covers 5 records but the witness saw 8 \(entry 3\): .*rolled back"):
        witness.append(records=5, head=_h(5), at=1.0, signer=signer)
    with pytest.raises(StoreError, match="differs from the one the witness saw"):
        witness.append(records=8, head="c" * 64, at=1.0, signer=signer)
    with pytest.raises(StoreError, match="must be signed with a 'ledger' key, not a 'grant' key"):
        witness.append(records=9, head=_h(9), at=1.0, signer=keystore.signer("grant"))


def test_a_damaged_or_incomplete_last_line_stops_appends(witness: WitnessFile, keystore: FileKeystore) -> None:
    with open(witness.path, "ab") as f:
        f.write(b'{"type":"scopegraph.witness.v1","seq":4')
    assert witness.read().problem == "witness line 4 is incomplete (no newline)"
    with pytest.raises(StoreError, match="is incomplete"):
        witness.append(records=9, head=_h(9), at=1.0, signer=keystore.signer("ledger"))
    witness.path.write_text("".join(_lines(witness)[:3]) + "not json\n")
    with pytest.raises(StoreError, match="is damaged"):
        witness.append(records=9, head=_h(9), at=1.0, signer=keystore.signer("ledger"))


def test_a_witness_others_can_write_is_refused(witness: WitnessFile, keystore: FileKeystore) -> None:
    os.chmod(witness.path, 0o666)
    with pytest.raises(StoreError, match=rf"witness {witness.path} has mode 0666"):
        witness.append(records=9, head=_h(9), at=1.0, signer=keystore.signer("ledger"))


def test_the_witness_path_comes_from_the_environment(tmp_path: Path) -> None:
    assert default_witness_path(tmp_path, {}) == tmp_path / "witness.jsonl"
    assert default_witness_path(tmp_path, {"SCOPEGRAPH_WITNESS": "/srv/w.jsonl"}) == Path("/srv/w.jsonl")


# One ``WitnessFile`` keeps appending (the runtime's): it remembers the last line it wrote.
# What others do to the file in between must still be seen, as it is without that memory.

def test_an_appender_sees_heads_another_writer_witnessed_since(tmp_path: Path, keystore: FileKeystore) -> None:
    signer = keystore.signer("ledger")
    path = tmp_path / "witness.jsonl"
    mine, theirs = WitnessFile(path), WitnessFile(path)
    mine.append(records=5, head=_h(5), at=1.0, signer=signer)
    theirs.append(records=9, head=_h(9), at=2.0, signer=signer)
    with pytest.raises(StoreError, match=r"covers 7 records but the witness saw 9 \(entry 2\)"):
        mine.append(records=7, head=_h(7), at=3.0, signer=signer)
    entry = mine.append(records=12, head=_h(12), at=4.0, signer=signer)
    assert (entry.seq, entry.prev) == (3, hashlib.sha256(_lines(mine)[1].rstrip("\n").encode()).hexdigest())
    assert WitnessFile(path, keys=keystore.verification_keys("ledger")).read().problem is None


def test_an_appender_sees_its_last_line_removed_or_rewritten(tmp_path: Path, keystore: FileKeystore) -> None:
    signer = keystore.signer("ledger")
    path = tmp_path / "witness.jsonl"
    mine = WitnessFile(path)
    mine.append(records=5, head=_h(5), at=1.0, signer=signer)
    mine.append(records=9, head=_h(9), at=2.0, signer=signer)
    first, second = _lines(mine)
    path.write_text(first)  # its last line deleted: the next entry follows the first again
    entry = mine.append(records=10, head=_h(10), at=3.0, signer=signer)
    assert entry.seq == 2 and entry.prev == hashlib.sha256(first.rstrip("\n").encode()).hexdigest()
    # The last line rewritten to the same length, its times put back: the change time moves.
    before = os.stat(path)
    edited = _lines(mine)[1].replace('"records":10', '"records":99')
    assert len(edited) == len(_lines(mine)[1])
    path.write_text(first + edited)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(StoreError, match=r"witness saw 99 \(entry 2\)"):  # read again, not remembered
        mine.append(records=11, head=_h(11), at=4.0, signer=signer)
