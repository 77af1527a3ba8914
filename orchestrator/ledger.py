"""The audit ledger: append-only, hash-chained, with a signed head.

Every hop writes a record: run started / paused / resumed / ended, plan, grant minted,
decision, approval requested / decided / consumed, tool call (digests of arguments and
result, never their content; a failed call's error message, secrets scrubbed), grant
revoked, and each step's outcome. Each record holds the previous record's hash;
the chain head is signed with a trust domain's key when a run ends or pauses. ``verify``
walks the chain and names the first record that was edited, deleted, reordered, or
cut off after the signed head.

Records after the last signed head (the unsigned tail) are those of runs that have not
paused or ended since: a run in progress, or one cut off by a crash or a store outage.
They are chained but not signed yet, and reported as such, not as tampering; the next
pause or end signs them. A store whose only runs were cut off has no signed head at
all: that is an unsigned tail from the first record. Only a head that should exist is
missing on purpose: when a record that is written together with a signature
(``run_paused``, ``run_ended``) is in the chain, or the store has a run that paused or
ended.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jwt

from . import tracing as tr
from .canonical import jcs, plain_float, python_json_is_jcs, sorted_json
from .clock import Clock
from .keys import sign_jwt
from .store import LedgerHead, LedgerRow, Store
from .witness import WitnessedHead, WitnessEntry, WitnessFile

if TYPE_CHECKING:
    from .identity import TrustDomain
    from .trust import TrustRoots

GENESIS = "0" * 64
LEDGER_RECORD_V2 = "scopegraph.ledger-record.v2"
_MAX_EXACT_INT = 2**53 - 1
_SIGNED_WITH = ("run_paused", "run_ended")  # kinds appended in the same write as a signed head
_UNSIGNED_STATUSES = ("queued", "running")  # runs that have not paused or ended (nothing signed)

RecordKind = Literal[
    "run_started", "run_ended", "run_paused", "run_resumed", "plan", "grant_minted", "decision",
    "approval_requested", "approval_decided", "approval_consumed", "tool_call", "grant_revoked",
    "step_ended", "delegation_plan", "approver_enrolled", "approver_removed", "keys_rotated",
    "secret_issued", "secret_revoked", "secret_refused", "token_exchanged", "approver_invited",
]
LEDGER_RUN = "-"  # the run id of records that belong to no run (enrolments, key rotations)


def record_hash(*, seq: int, run_id: str, kind: str, at: float, data: str, prev_hash: str) -> str:
    """Version 1 (records written before RFC 8785): SHA-256 over the record's fields and its
    Python-canonical JSON payload. Kept so that stored records keep verifying."""
    header = f"scopegraph-ledger-v1\n{seq}\n{run_id}\n{kind}\n{at!r}\n{prev_hash}\n"
    return hashlib.sha256(header.encode() + data.encode()).hexdigest()


def record_hash_v2(*, seq: int, run_id: str, kind: str, at: float, data: Any, prev_hash: str) -> str:
    """Version 2: SHA-256 over the RFC 8785 (JCS) form of the typed record, which a verifier in
    any language can recompute::

        {"type": "scopegraph.ledger-record.v2", "seq": …, "run_id": …, "kind": …, "at": …,
         "prev": "<previous record's hash>", "data": {…the record's payload…}}

    Raises:
        ValueError: ``data`` is not JSON that RFC 8785 can hold.
    """
    return _record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, payload=jcs_bytes(data), prev_hash=prev_hash)


def _record_hash_v2(*, seq: int, run_id: str, kind: str, at: float, payload: bytes, prev_hash: str) -> str:
    # The record's JCS form, with its payload's JCS bytes put in whole (members in JCS order).
    if type(kind) is str and type(prev_hash) is str and type(run_id) is str and type(seq) is int \
            and 0 <= seq <= _MAX_EXACT_INT:
        # The usual record (plain ASCII header strings, a whole sequence number): what
        # ``_scalar_bytes`` writes for each, in one check of the three strings together.
        # A string joined with '"' quotes stays plain ASCII only if each part does.
        text = f'"{kind}","prev":"{prev_hash}","run_id":"{run_id}","seq":{seq}'
        if text.isascii() and text.isprintable() and "\\" not in text and text.count('"') == 12:
            return hashlib.sha256(b"".join((
                b'{"at":', _scalar_bytes(at), b',"data":', payload, b',"kind":', text.encode("ascii"),
                _LEDGER_RECORD_V2_TAIL))).hexdigest()
    return hashlib.sha256(b"".join((
        b'{"at":', _scalar_bytes(at), b',"data":', payload, b',"kind":', _scalar_bytes(kind),
        b',"prev":', _scalar_bytes(prev_hash), b',"run_id":', _scalar_bytes(run_id),
        b',"seq":', _scalar_bytes(seq), _LEDGER_RECORD_V2_TAIL))).hexdigest()


def _scalar_bytes(value: Any) -> bytes:
    """``jcs(value)`` of a record's header field (a string, a whole number, a timestamp)."""
    kind = type(value)
    if kind is str and value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return b'"' + value.encode("ascii") + b'"'  # nothing to escape: JSON's quotes around it
    if kind is str and python_json_is_jcs(value):
        return sorted_json(value).encode("utf-8")
    if (kind is int and -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT) or (kind is float and plain_float(value)):
        return repr(value).encode("ascii")  # what Python's JSON writes for them
    return jcs(value)


def jcs_bytes(value: Any) -> bytes:
    """``canonical.jcs(value)``: RFC 8785 bytes of a record's payload.

    Raises:
        ValueError: as ``canonical.jcs``.
    """
    return jcs(value)


def payload_text(data: Any) -> str:
    """A record's payload as stored and hashed: ``jcs(jcs_safe(data))`` as text. The usual
    payload needs no rewriting (``jcs_safe`` would leave it as it is): it is written by
    Python's JSON encoder after one check.

    Raises:
        TypeError: as ``jcs_safe``.
    """
    if python_json_is_jcs(data):
        return sorted_json(data)
    return jcs(jcs_safe(data)).decode("utf-8")


_LEDGER_RECORD_V2_TAIL = b',"type":"' + LEDGER_RECORD_V2.encode() + b'"}'


def jcs_safe(value: Any) -> Any:
    """``value`` with what RFC 8785 cannot hold written as text: a lone surrogate escaped, an
    integer beyond 2**53-1 or a non-finite number as its decimal text, tuples as lists."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if abs(value) <= _MAX_EXACT_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(jcs_safe(k)): jcs_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jcs_safe(v) for v in value]
    raise TypeError(f"a ledger record cannot hold a {type(value).__name__}")


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    ok: bool
    records: int
    signed_seq: int | None
    problem: str | None = None
    bad_seq: int | None = None
    unsigned: int = 0  # records after the signed head (a run in progress): chained, not yet signed
    problems: tuple[str, ...] = ()  # every problem found (``problem`` is the first)
    witness_entries: int | None = None  # entries of the witness checked against (None: none checked)
    signed_answers: int = 0  # approvers' answers whose signatures were checked
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for a person: what was verified, or the first problem found."""
        if not self.ok:
            return f"TAMPERED: {self.problem}"
        if not self.records:
            return "ok: the ledger is empty"
        if self.signed_seq is None:
            return (f"ok: {self.records} records, hash chain intact, no signed head yet: {self.unsigned} "
                    "record(s) after the last signed head (runs that have not paused or ended, "
                    "e.g. cut off by an outage)")
        tail = f" ({self.unsigned} newer record(s) chained, not yet signed)" if self.unsigned else ""
        return f"ok: {self.records} records, hash chain intact, head signed at record {self.signed_seq}{tail}"

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "signed_seq": self.signed_seq,
                "unsigned": self.unsigned, "problem": self.problem, "bad_seq": self.bad_seq,
                "problems": list(self.problems) or ([self.problem] if self.problem else []),
                "witness_entries": self.witness_entries, "signed_answers": self.signed_answers}


class Ledger:
    """Appends and verifies audit records in the store."""

    def __init__(self, store: Store, *, clock: Clock, trust: TrustRoots | None = None) -> None:
        """``trust`` signs and verifies heads and keeps the witness; without it, the store's
        configured keystore is opened when a head is signed or verified."""
        self.store = store
        self.clock = clock
        self.trust = trust

    def append(self, kind: RecordKind, run_id: str, **data: Any) -> int:
        """Append one record; returns its sequence number. Data must hold no secret."""
        at = self.clock.now()
        text = payload_text(data)
        payload = text.encode("utf-8")

        def seal(seq: int, prev_hash: str) -> str:
            return _record_hash_v2(seq=seq, run_id=run_id, kind=kind, at=at, payload=payload, prev_hash=prev_hash)

        return self.store.append_ledger(run_id=run_id, kind=kind, at=at, data=text, seal=seal)

    def trust_roots(self, *, create: bool = True) -> TrustRoots:
        """The trust roots heads are signed and verified with: the ones given, or the store's
        configured keystore (``create=False``: for verifying, making nothing it does not need)."""
        if self.trust is None:
            from .trust import TrustRoots

            if not create:  # verifying: makes nothing it does not need
                return TrustRoots.for_reading(self.store, clock=self.clock)
            self.trust = TrustRoots.open(self.store, clock=self.clock)
        return self.trust

    def sign_head(self, domain: TrustDomain | None = None) -> LedgerHead | None:
        """Witness the current chain head, then sign it with the ledger key and keep the signature.

        The witness entry comes first: a head the store keeps has always been witnessed, and
        its signature covers the entry's number, so deleting the witness's last lines shows.

        Raises:
            StoreError: the witness refuses the head (older than, or different from, one it
                saw: the ledger was rolled back or rewritten) or cannot be written.
            KeystoreError: the keystore cannot sign.
        """
        trust = domain.trust if domain is not None else self.trust_roots()
        with self.store.atomic():  # one signer at a time (SQLite); the tip as this transaction sees it
            last = self.store.ledger_last()
            if last is None:
                return None
            seq, head_hash = last
            if domain is not None:
                name, issuer = domain.name, domain.issuer
            else:
                previous = self.store.ledger_head()
                name = previous.domain if previous is not None else ""
                issuer = f"spiffe://{name}"
            signer = trust.signer("ledger")
            now = self.clock.now()
            entry = trust.witness_appender().append(records=seq, head=head_hash, at=now, signer=signer)
            signature = sign_jwt(signer, {"iss": issuer, "seq": seq, "hash": head_hash, "iat": now,
                                          "wit": entry.seq})
            head = LedgerHead(seq=seq, hash=head_hash, domain=name, signature=signature, kid=signer.kid,
                              witness_seq=entry.seq)
            self.store.save_ledger_head(head)
        _witness_event(entry, trust.witness_path)
        return head

    def resign_head(self) -> LedgerHead | None:
        """Sign the current head again (after the last signed one), with the current ledger key.

        For writers that know no trust domain (the CLI answering an approval): without
        it, records appended after the last signature could be deleted unnoticed.
        """
        if self.store.ledger_head() is None:
            return None
        return self.sign_head(None)

    def records(self, run_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {"seq": r.seq, "run_id": r.run_id, "kind": r.kind, "at": r.at, **json.loads(r.data)}
            for r in self.store.ledger_rows(run_id=run_id)
        ]

    def verify(self, run_id: str | None = None, *, witness: WitnessFile | Path | str | None = None,
               check_witness: bool = True) -> VerifyResult:
        """Check the whole chain, the signed head, the witness, the store against the ledger,
        and every signed answer.

        With ``run_id``, the chain is still checked end to end (a run's records are
        only as trustworthy as the chain they sit in) and the run must have records.
        ``witness`` is a witness file to check against (an offline copy); by default the
        store's own. The first problem is ``problem``; every one is in ``problems``.
        """
        rows = self.store.ledger_rows()
        prev = GENESIS
        expected_seq = 1
        hashes: dict[int, str] = {}
        v2_from: int | None = None
        for row in rows:
            if row.seq != expected_seq:
                missing = "missing" if row.seq > expected_seq else "out of order"
                return _bad(len(rows), None, f"record {expected_seq} is {missing}", expected_seq)
            if row.prev_hash != prev:
                return _bad(len(rows), None, f"record {row.seq} does not follow record {row.seq - 1}", row.seq)
            version = _record_version(row)
            if version == 1 and v2_from is not None:
                version = 0  # a version-1 record after version-2 ones was not written by us
            if version == 0:
                return _bad(len(rows), None, f"record {row.seq} ({row.kind}) was altered", row.seq)
            if version == 2 and v2_from is None:
                v2_from = row.seq
            hashes[row.seq] = row.hash
            prev = row.hash
            expected_seq += 1
        trust = self.trust_roots(create=False)
        head = self.store.ledger_head()
        signed_seq = None
        if head is not None:
            problem = self._check_head(head, hashes, trust)
            if problem:
                bad = head.seq if head.seq in hashes else len(rows) + 1
                return _bad(len(rows), head.seq, problem, bad)
            signed_seq = head.seq
        else:
            problem = self._missing_head(rows)
            if problem:
                return _bad(len(rows), None, problem, 1 if rows else None)
        problems: list[str] = []
        witness_entries = None
        if check_witness:
            file = witness if isinstance(witness, WitnessFile) else (
                WitnessFile(witness, keys=trust.witness().keys) if witness is not None else trust.witness())
            report = file.verify_against(
                None if head is None else WitnessedHead(records=head.seq, hash=head.hash,
                                                        witness_seq=head.witness_seq),
                ledger_hashes=hashes)
            problems.extend(f"witness {file.path}: {p}" for p in report.problems)
            witness_entries = report.entries
        from .ledger_checks import check_answers, check_store_against_ledger

        parsed = [(r.seq, r.run_id, r.kind, json.loads(r.data)) for r in rows]
        problems.extend(check_store_against_ledger(self.store, parsed))
        answer_problems, signed_answers = check_answers(self.store, trust, parsed)
        problems.extend(answer_problems)
        if run_id is not None and not any(r.run_id == run_id for r in rows):
            problems.append(f"no ledger records for run {run_id!r}")
        if problems:
            return VerifyResult(ok=False, records=len(rows), signed_seq=signed_seq, problem=problems[0],
                                problems=tuple(problems), witness_entries=witness_entries,
                                unsigned=len(rows) - (signed_seq or 0))
        return VerifyResult(ok=True, records=len(rows), signed_seq=signed_seq,
                            unsigned=len(rows) - (signed_seq or 0), witness_entries=witness_entries,
                            signed_answers=signed_answers)

    def _missing_head(self, rows: list[LedgerRow]) -> str | None:
        """Whether a ledger without a signed head lost it: something in the chain or the
        store says a head was signed. Otherwise every record is an unsigned tail."""
        sealed = next((r for r in rows if r.kind in _SIGNED_WITH), None)
        if sealed is not None:
            return (f"the ledger has records but no signed head, though record {sealed.seq} "
                    f"({sealed.kind}) was signed when it was written")
        runs = self.store.list_runs()
        settled = next((r for r in runs if r.status not in _UNSIGNED_STATUSES), None)
        if not rows and any(r.status != "queued" for r in runs):  # a started run has records
            return "the ledger is empty but the store has runs: it was wiped"
        if settled is not None:
            return (f"the ledger has records but no signed head, though run {settled.run_id!r} "
                    f"is {settled.status}, which signs it")
        return None

    def _check_head(self, head: LedgerHead, hashes: dict[int, str], trust: TrustRoots) -> str | None:
        keys = trust.head_keys(head.kid, head.seq)
        if not keys:
            return f"the signed head names key {head.kid!r}, which is not a ledger key of this store's keystore"
        claims = None
        for key in keys:
            try:
                claims = jwt.decode(head.signature, key.public_key, algorithms=[key.algorithm],
                                    options={"verify_exp": False, "verify_iat": False, "verify_aud": False})
            except jwt.PyJWTError:
                continue
            break
        if claims is None:
            return "the signature on the ledger head does not verify"
        if claims.get("seq") != head.seq or claims.get("hash") != head.hash:
            return "the ledger head does not match its signature"
        if head.kid is not None and claims.get("wit") != head.witness_seq:
            return "the ledger head's witness entry does not match its signature"
        if head.seq not in hashes:
            return f"the ledger was truncated: the signed head is record {head.seq}, the ledger ends at {len(hashes)}"
        if hashes[head.seq] != head.hash:
            return f"record {head.seq} differs from the signed head"
        return None


def _record_version(row: LedgerRow) -> int:
    """Which layout made ``row``'s hash: 2 (RFC 8785), 1 (before it), or 0 (neither: altered)."""
    try:
        data = json.loads(row.data)
        if record_hash_v2(seq=row.seq, run_id=row.run_id, kind=row.kind, at=row.at, data=data,
                          prev_hash=row.prev_hash) == row.hash:
            return 2
    except ValueError:
        pass
    if record_hash(seq=row.seq, run_id=row.run_id, kind=row.kind, at=row.at, data=row.data,
                   prev_hash=row.prev_hash) == row.hash:
        return 1
    return 0


def _witness_event(entry: WitnessEntry, path: Path) -> None:
    """A copy of the witness entry for the operator's telemetry backend (a span event)."""
    tr.witness_event(seq=entry.seq, records=entry.records, head=entry.head, kid=entry.kid, sig=entry.sig,
                     at=entry.at, prev=entry.prev, path=str(path))


def _bad(records: int, signed: int | None, problem: str, seq: int | None) -> VerifyResult:
    return VerifyResult(ok=False, records=records, signed_seq=signed, problem=problem, bad_seq=seq)
