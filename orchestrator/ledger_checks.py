"""What ``audit verify`` checks beyond the hash chain: the store agrees with its ledger, and
every approver's answer carries a signature that verifies offline.

The store against the ledger: a run that started has its ``run_started`` record; an
approval request has its ``approval_requested`` record and each of its answers an
``approval_decided`` one; an enrolled approver has the ledger record of the enrolment, and
one the ledger says was removed is not enrolled again by an edit of the store. Rows
deleted together with their records are caught by the witness instead (the chain's head
moves back).

Answers: each ``approval_decided`` record that carries a signature is checked against the
enrolment of its key (by ``kid``; the enrolment must be vouched for by the keystore),
over the exact answer (``approvers.answer_message``). From the first enrolment in the
chain on, while anyone is enrolled, an unsigned answer is a problem too, as is one to a
request that asked for signed answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from .approvals import ApprovalRequest
from .approvers import normalize_name, verify_answer
from .errors import ApprovalError, ConfigError
from .store import Store
from .store.web_records import WebStore
from .trust import TrustRoots

Parsed = tuple[int, str, str, dict[str, Any]]  # seq, run_id, kind, data


def check_store_against_ledger(store: Store, records: Sequence[Parsed]) -> list[str]:
    """Rows of the store whose records the ledger lacks, named."""
    problems: list[str] = []
    started = {run_id for _, run_id, kind, _ in records if kind == "run_started"}
    for run in store.list_runs():
        if run.status != "queued" and run.run_id not in started:
            problems.append(f"run {run.run_id!r} ({run.status}) is in the store but its run_started record "
                            "is missing from the ledger")
    requested = {d.get("approval_id") for _, _, kind, d in records if kind == "approval_requested"}
    decided = {(d.get("approval_id"), d.get("approver"), d.get("answer"))
               for _, _, kind, d in records if kind == "approval_decided"}
    for payload in store.list_approvals():
        a = ApprovalRequest.model_validate_json(payload)
        if a.id not in requested:
            problems.append(f"approval {a.id!r} is in the store but its approval_requested record is missing "
                            "from the ledger")
        for given in a.answers():
            if (a.id, given["approver"], given["answer"]) not in decided:
                problems.append(f"the answer ({given['answer']}) of {given['approver']!r} to approval {a.id!r} "
                                "is in the store but not in the ledger")
    history: dict[tuple[str, str], str] = {}
    for _, _, kind, d in records:
        if kind == "approver_enrolled":
            history[(str(d.get("approver")), str(d.get("kid")))] = "enrolled"
        elif kind == "approver_removed":
            for key in [k for k in history if k[0] == d.get("approver")]:
                history[key] = "removed"
    for passkey in cast(WebStore, store).list_passkeys():
        state = history.get((passkey.name, passkey.kid))
        if state is None:
            problems.append(f"passkey {passkey.kid} of {passkey.display!r} is enrolled in the store but the ledger "
                            "has no record of the enrolment")
        elif state == "removed":
            problems.append(f"{passkey.display!r} was removed (see the ledger) but the store lists passkey "
                            f"{passkey.kid} as enrolled again")
    for row in store.list_approvers():
        state = history.get((row.name, row.kid))
        if state is None:
            problems.append(f"approver {row.display!r} (key {row.kid}) is enrolled in the store but the ledger "
                            "has no record of the enrolment")
        elif state == "removed":
            problems.append(f"approver {row.display!r} was removed (see the ledger) but the store lists them "
                            "as enrolled again")
    return problems


def check_answers(store: Store, trust: TrustRoots, records: Sequence[Parsed]) -> tuple[list[str], int]:
    """Problems with the approvers' answers in the ledger, and how many signed answers verified."""
    from .enrolment import ApproverRegistry
    from .passkeys import PasskeyRegistry

    registry = ApproverRegistry(store, trust)
    rows = store.list_approvers(include_removed=True)
    passkeys = PasskeyRegistry(store, trust)
    counts: dict[str, int] = {}  # the last sign count each passkey's answers carried, in ledger order
    nonces: set[str] = set()
    problems: list[str] = []
    verified = 0
    enrolled: set[str] = set()
    signed_requests = {d.get("approval_id") for _, _, kind, d in records
                       if kind == "approval_requested" and d.get("signed_answers")}
    for seq, _, kind, d in records:
        if kind == "approver_enrolled":
            enrolled.add(str(d.get("approver")))
            continue
        if kind == "approver_removed":
            enrolled.discard(str(d.get("approver")))
            continue
        if kind != "approval_decided":
            continue
        who, aid = d.get("approver"), d.get("approval_id")
        if d.get("passkey") is not None:
            problem = _check_passkey_answer(seq, d, passkeys, counts, nonces)
            if problem:
                problems.append(problem)
            else:
                verified += 1
            continue
        signature = d.get("signature")
        if not signature:
            if enrolled or aid in signed_requests:
                problems.append(f"record {seq}: the answer of {who!r} to {aid!r} is not signed, though answers "
                                "had to be")
            continue
        answer = d.get("answer")
        if answer not in ("approve", "deny"):
            problems.append(f"record {seq}: the signed answer to {aid!r} is neither approve nor deny")
            continue
        candidates = registry.by_kid(str(d.get("kid")), rows)
        if not candidates:
            problems.append(f"record {seq}: the answer of {who!r} to {aid!r} is signed by key {d.get('kid')!r}, "
                            "which no approver was enrolled with")
            continue
        try:
            name = normalize_name(str(who))
            match = next((c for c in candidates if c.approver.name == name), candidates[0])
            verify_answer(match.approver, str(signature), approval_id=str(aid), digest=str(d.get("digest")),
                          decision="approve" if answer == "approve" else "deny", approver=str(who),
                          reason=str(d.get("reason") or ""))
        except (ApprovalError, ConfigError, ValueError) as exc:
            problems.append(f"record {seq}: {exc}")
            continue
        verified += 1
    return problems, verified


def _check_passkey_answer(seq: int, d: dict[str, Any], passkeys: Any, counts: dict[str, int],
                          nonces: set[str]) -> str | None:
    """A problem with a passkey answer in record ``seq``, or ``None`` when it verifies offline:
    an enrolled, vouched-for passkey (removed ones too: past answers stay valid), the
    challenge recomputed from the answer and its nonce, rpId, origin, signature, and a sign
    count ahead of that passkey's previous answer."""
    from .passkeys import check_passkey_answer

    evidence = d.get("passkey")
    credential = evidence.get("credential_id") if isinstance(evidence, dict) else None
    record = passkeys.records.get_passkey(str(credential)) if credential else None
    aid = d.get("approval_id")
    if record is None or not passkeys.endorsed(record):
        return (f"record {seq}: the answer of {d.get('approver')!r} to {aid!r} is signed by a passkey that no "
                "approver was enrolled with by this store's keystore")
    try:
        counts[record.credential_id] = check_passkey_answer(
            record, d, previous_count=counts.get(record.credential_id, 0), seen_nonces=nonces)
    except ApprovalError as exc:
        return f"record {seq}: {exc}"
    return None
