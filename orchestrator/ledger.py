"""The audit ledger: append-only, hash-chained, with a signed head.

Every hop writes a record: run started / paused / resumed / ended, plan, grant minted,
decision, approval requested / decided / consumed, tool call (digests of arguments and
result, never their content), grant revoked, and each step's outcome. Each record holds the previous record's hash;
the chain head is signed with a trust domain's key when a run ends or pauses. ``verify``
walks the chain and names the first record that was edited, deleted, reordered, or
cut off after the signed head.
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
from .store import LedgerHead, Store

GENESIS = "0" * 64

RecordKind = Literal[
    "run_started", "run_ended", "run_paused", "run_resumed", "plan", "grant_minted", "decision",
    "approval_requested", "approval_decided", "approval_consumed", "tool_call", "grant_revoked",
    "step_ended", "delegation_plan",
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
        elif rows:
            return _bad(len(rows), None, "the ledger has records but no signed head", 1)
        elif self.store.list_runs():
            return _bad(0, None, "the ledger is empty but the store has runs: it was wiped", None)
        if run_id is not None and not any(r.run_id == run_id for r in rows):
            return _bad(len(rows), signed_seq, f"no ledger records for run {run_id!r}", None)
        return VerifyResult(ok=True, records=len(rows), signed_seq=signed_seq,
                            unsigned=len(rows) - (signed_seq or 0))

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
