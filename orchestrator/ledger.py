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
from dataclasses import dataclass
from typing import Any, Literal

import jwt

from .canonical import canonical_json
from .clock import Clock
from .identity import TrustDomain, load_domain_public_key
from .store import LedgerHead, LedgerRow, Store

GENESIS = "0" * 64
_SIGNED_WITH = ("run_paused", "run_ended")  # kinds appended in the same write as a signed head
_UNSIGNED_STATUSES = ("queued", "running")  # runs that have not paused or ended (nothing signed)

RecordKind = Literal[
    "run_started", "run_ended", "run_paused", "run_resumed", "plan", "grant_minted", "decision",
    "approval_requested", "approval_decided", "approval_consumed", "tool_call", "grant_revoked",
    "step_ended", "delegation_plan",
    "secret_issued", "secret_revoked", "secret_refused", "token_exchanged",
]


def record_hash(*, seq: int, run_id: str, kind: str, at: float, data: str, prev_hash: str) -> str:
    """SHA-256 over the record's fields and its canonical JSON payload, hashed once as bytes."""
    header = f"scopegraph-ledger-v1\n{seq}\n{run_id}\n{kind}\n{at!r}\n{prev_hash}\n"
    return hashlib.sha256(header.encode() + data.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    ok: bool
    records: int
    signed_seq: int | None
    problem: str | None = None
    bad_seq: int | None = None
    unsigned: int = 0  # records after the signed head (a run in progress): chained, not yet signed

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
                "unsigned": self.unsigned, "problem": self.problem, "bad_seq": self.bad_seq}


class Ledger:
    """Appends and verifies audit records in the store."""

    def __init__(self, store: Store, *, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def append(self, kind: RecordKind, run_id: str, **data: Any) -> int:
        """Append one record; returns its sequence number. Data must hold no secret."""
        at = self.clock.now()
        payload = canonical_json(data)

        def seal(seq: int, prev_hash: str) -> str:
            return record_hash(seq=seq, run_id=run_id, kind=kind, at=at, data=payload, prev_hash=prev_hash)

        return self.store.append_ledger(run_id=run_id, kind=kind, at=at, data=payload, seal=seal)

    def sign_head(self, domain: TrustDomain) -> LedgerHead | None:
        """Sign the current chain head with ``domain``'s key and keep the signature."""
        last = self.store.ledger_last()
        if last is None:
            return None
        seq, head_hash = last
        signature = domain.sign({"iss": domain.issuer, "seq": seq, "hash": head_hash,
                                 "iat": self.clock.now()})
        head = LedgerHead(seq=seq, hash=head_hash, domain=domain.name, signature=signature)
        self.store.save_ledger_head(head)
        return head

    def resign_head(self) -> LedgerHead | None:
        """Sign the current head with the key that signed the last one.

        For writers that know no trust domain (the CLI answering an approval): without
        it, records appended after the last signature could be deleted unnoticed.
        """
        head = self.store.ledger_head()
        if head is None:
            return None
        return self.sign_head(TrustDomain(head.domain, self.store, clock=self.clock))

    def records(self, run_id: str | None = None) -> list[dict[str, Any]]:
        return [
            {"seq": r.seq, "run_id": r.run_id, "kind": r.kind, "at": r.at, **json.loads(r.data)}
            for r in self.store.ledger_rows(run_id=run_id)
        ]

    def verify(self, run_id: str | None = None) -> VerifyResult:
        """Check the whole chain and the signed head.

        With ``run_id``, the chain is still checked end to end (a run's records are
        only as trustworthy as the chain they sit in) and the run must have records.
        """
        rows = self.store.ledger_rows()
        prev = GENESIS
        expected_seq = 1
        hashes: dict[int, str] = {}
        for row in rows:
            if row.seq != expected_seq:
                missing = "missing" if row.seq > expected_seq else "out of order"
                return _bad(len(rows), None, f"record {expected_seq} is {missing}", expected_seq)
            if row.prev_hash != prev:
                return _bad(len(rows), None, f"record {row.seq} does not follow record {row.seq - 1}", row.seq)
            want = record_hash(seq=row.seq, run_id=row.run_id, kind=row.kind, at=row.at,
                               data=row.data, prev_hash=row.prev_hash)
            if want != row.hash:
                return _bad(len(rows), None, f"record {row.seq} ({row.kind}) was altered", row.seq)
            hashes[row.seq] = row.hash
            prev = row.hash
            expected_seq += 1
        head = self.store.ledger_head()
        signed_seq = None
        if head is not None:
            problem = self._check_head(head, hashes)
            if problem:
                bad = head.seq if head.seq in hashes else len(rows) + 1
                return _bad(len(rows), head.seq, problem, bad)
            signed_seq = head.seq
        else:
            problem = self._missing_head(rows)
            if problem:
                return _bad(len(rows), None, problem, 1 if rows else None)
        if run_id is not None and not any(r.run_id == run_id for r in rows):
            return _bad(len(rows), signed_seq, f"no ledger records for run {run_id!r}", None)
        return VerifyResult(ok=True, records=len(rows), signed_seq=signed_seq,
                            unsigned=len(rows) - (signed_seq or 0))

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

    def _check_head(self, head: LedgerHead, hashes: dict[int, str]) -> str | None:
        key = load_domain_public_key(self.store, head.domain)
        if key is None:
            return f"the signed head names unknown trust domain {head.domain!r}"
        try:
            claims = jwt.decode(head.signature, key, algorithms=["EdDSA"],
                                options={"verify_exp": False, "verify_iat": False, "verify_aud": False})
        except jwt.PyJWTError:
            return "the signature on the ledger head does not verify"
        if claims.get("seq") != head.seq or claims.get("hash") != head.hash:
            return "the ledger head does not match its signature"
        if head.seq not in hashes:
            return f"the ledger was truncated: the signed head is record {head.seq}, the ledger ends at {len(hashes)}"
        if hashes[head.seq] != head.hash:
            return f"record {head.seq} differs from the signed head"
        return None


def _bad(records: int, signed: int | None, problem: str, seq: int | None) -> VerifyResult:
    return VerifyResult(ok=False, records=records, signed_seq=signed, problem=problem, bad_seq=seq)
