"""What the inbox shows and does, apart from HTTP: which requests an approver may see, what a
request page gathers, answering with a passkey, and resuming a run.

An approver sees a request only when they may answer it: they are on its allowed list
and did not start its run (names compared as principals, ``approvers.normalize_name``).
Everything shown comes from the request and the ledger; argument values a tool declares
secret are masked (``ApprovalRequest.shown_arguments``), as everywhere else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..approvals import ApprovalRequest, ApprovalService, check_proposal, principal_name, step_constraints
from ..approvers import Decision
from ..clock import Clock
from ..errors import ApprovalError, ConfigError, ScopegraphError, StoreError, UnknownToolError
from ..ledger import Ledger
from ..passkeys import PasskeyAssertion, PasskeyRegistry, answer_challenge
from ..store import Store
from ..trust import TrustRoots

MAX_REASON = 2000


@dataclass(frozen=True, kw_only=True)
class Site:
    """Where the inbox is, as browsers see it: its origin and WebAuthn relying-party id."""

    origin: str  # e.g. http://localhost:8700 or https://approvals.example.org
    rp_id: str  # the origin's host name (WebAuthn refuses IP addresses)
    rp_name: str = "scopegraph approvals"


@dataclass(kw_only=True)
class Inbox:
    """The inbox over one store: approvals, passkeys, ledger and trust roots."""

    store: Store
    store_url: str
    trust: TrustRoots
    clock: Clock
    site: Site
    ledger: Ledger = field(init=False)
    service: ApprovalService = field(init=False)
    passkeys: PasskeyRegistry = field(init=False)

    def __post_init__(self) -> None:
        from ..enrolment import ApproverRegistry

        self.ledger = Ledger(self.store, clock=self.clock, trust=self.trust)
        approvers = ApproverRegistry(self.store, self.trust, clock=self.clock, ledger=self.ledger)
        self.service = ApprovalService(self.store, clock=self.clock, ledger=self.ledger, approvers=approvers)
        self.passkeys = PasskeyRegistry(self.store, self.trust, clock=self.clock, ledger=self.ledger)

    # who sees what ------------------------------------------------------------------------
    @staticmethod
    def may_answer(a: ApprovalRequest, name: str) -> bool:
        """Whether ``name`` is allowed on ``a`` and did not start its run."""
        who = principal_name(name)
        return who != principal_name(a.initiator) and who in {principal_name(x) for x in a.allowed_approvers}

    def visible(self, name: str, *, pending: bool | None = None) -> list[ApprovalRequest]:
        """The requests ``name`` may answer, newest first; only pending (or only not) on request."""
        now = self.clock.now()
        found = [a for a in self.service.list() if self.may_answer(a, name)]
        if pending is not None:
            found = [a for a in found if (a.effective_status(now) == "pending") == pending]
        # Newest first; requests made at the same instant, the later stored first.
        return sorted(reversed(found), key=lambda a: a.created_at, reverse=True)

    def get(self, approval_id: str, name: str) -> ApprovalRequest:
        """The request ``approval_id`` if ``name`` may see it.

        Raises:
            ApprovalError: no such request, or not one for ``name`` (said the same way, so
                nobody learns which ids exist).
        """
        try:
            a = self.service.get(approval_id)
        except ApprovalError:
            a = None
        if a is None or not self.may_answer(a, name):
            raise ApprovalError(f"no approval request {approval_id[:40]!r} for you")
        return a

    # summaries and pages ------------------------------------------------------------------
    def summary(self, a: ApprovalRequest) -> dict[str, Any]:
        """What the inbox lists (and the JSON API returns) of a request: no argument values."""
        now = self.clock.now()
        state = a.effective_status(now)
        return {"id": a.id, "tool": a.tool, "risk": a.risk, "workflow": a.workflow, "run_id": a.run_id,
                "step_id": a.step_id, "status": state, "created_at": a.created_at, "expires_at": a.expires_at,
                "expires_in": max(0.0, a.expires_at - now) if state in ("pending", "approved") else 0.0,
                "required_approvals": a.required_approvals, "approvals": len({principal_name(v) for v in a.approvers}),
                "still_needed": a.still_needed, "initiator": a.initiator}

    def detail(self, a: ApprovalRequest) -> dict[str, Any]:
        """Everything a request page shows: the exact call, why, the plan around it, what the
        run has read, the answers so far. Secret argument values are masked."""
        records = self.ledger.records(a.run_id)
        plan = next((r for r in reversed(records) if r["kind"] == "plan" and r.get("valid")), None)
        provenance = _provenance(self.ledger, a)
        arguments = [{"name": k, "value": json.dumps(v, ensure_ascii=False, sort_keys=True),
                      "secret": k in a.secret_arguments, **provenance.get(k, {"source": "?", "labels": []})}
                     for k, v in a.shown_arguments().items()]
        reads = [{"tool": r.get("tool"), "step_id": r.get("step_id"), "outcome": r.get("outcome") or r.get("status"),
                  "labels": r.get("labels") or r.get("data_labels") or []}
                 for r in records if r["kind"] == "tool_call"]
        steps = [{**s, "current": s.get("id") == a.step_id} for s in (plan or {}).get("steps", [])]
        return {**self.summary(a), "arguments": arguments, "purpose": a.purpose, "reasons": a.reasons,
                "policy_ids": a.policy_ids, "data_labels": a.data_labels, "digest": a.digest,
                "requester": a.requester, "allowed_approvers": a.allowed_approvers, "plan": steps, "reads": reads,
                "answers": a.answers()}

    # answering ----------------------------------------------------------------------------
    def begin_answer(self, a: ApprovalRequest, name: str, *, decision: Decision, reason: str,
                     propose: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check an answer can be given, then make the challenge its passkey must sign.

        Raises:
            ApprovalError: the request is not pending, the reason is missing or too long,
                the proposal is refused, or ``name`` has no passkey.
        """
        if a.effective_status(self.clock.now()) != "pending":
            raise ApprovalError(f"approval {a.id!r} is {a.effective_status(self.clock.now())}; only a pending "
                                "request can be answered")
        _check_reason(decision, reason)
        if propose is not None:
            self.check_proposal(a, propose)
        credentials = self.passkeys.passkeys(name)
        if not credentials:
            raise ApprovalError("you have no passkey enrolled: ask for an invitation (scopegraph approvers invite)")
        nonce = self.passkeys.new_answer_nonce(a.id, name)
        challenge = answer_challenge(approval_id=a.id, digest=a.digest, decision=decision, approver=name,
                                     reason=reason, nonce=nonce)
        return {"nonce": nonce, "challenge": challenge, "credential_ids": [c.credential_id for c in credentials]}

    def answer(self, a: ApprovalRequest, name: str, *, decision: Decision, reason: str,
               propose: Mapping[str, Any] | None, assertion: PasskeyAssertion) -> ApprovalRequest:
        """Record the answer, its passkey assertion checked (``ApprovalService``); queue the
        run's resume when workers serve the store.

        Raises:
            ApprovalError: as ``ApprovalService.approve`` / ``deny``.
        """
        _check_reason(decision, reason)
        if decision == "approve":
            return self.service.approve(a.id, approver=name, reason=reason, passkey=assertion)
        if propose is not None:
            self.check_proposal(a, propose)
        return self.service.deny(a.id, approver=name, reason=reason, propose=propose, passkey=assertion)

    def check_proposal(self, a: ApprovalRequest, propose: Mapping[str, Any]) -> None:
        """Raises:
        ApprovalError: the proposal does not fit the tool's schema or the step's constraints.
        """
        from ..loader import load_workflow

        tool = None
        record = self.store.get_run(a.run_id)
        try:
            if record is not None:
                tool = load_workflow(record.target).registry.get_tool(a.tool)
        except (ConfigError, UnknownToolError):
            tool = None  # checked by names only here; the run checks the types when it resumes
        check_proposal(a, propose, tool=tool, constraints=step_constraints(self.ledger, a.run_id, a.step_id))

    # after an answer ----------------------------------------------------------------------
    def queue_resume(self, run_id: str) -> bool:
        """On a PostgreSQL store served by workers, queue the run's resume."""
        from ..workers import enqueue_resume

        try:
            return enqueue_resume(self.store_url, run_id)
        except StoreError:
            return False  # workers also find answered runs by polling the store

    def resume(self, run_id: str) -> str:
        """Resume ``run_id`` here (a SQLite store has no workers); return its status.

        Raises:
            ScopegraphError: the run is unknown, or its workflow cannot be loaded.
        """
        from ..loader import load_workflow
        from ..runtime import Runtime

        record = self.store.get_run(run_id)
        if record is None:
            raise ApprovalError(f"unknown run {run_id[:40]!r}")
        try:
            with Runtime(load_workflow(record.target), store=self.store_url, target=record.target,
                         clock=self.clock) as rt:
                return str(rt.resume(run_id).status)
        except ScopegraphError:
            raise
        except Exception as exc:  # the workflow's own code failed: say so without its details
            raise ApprovalError(f"run {run_id!r} could not be resumed here ({type(exc).__name__})") from None


def _check_reason(decision: Decision, reason: str) -> None:
    if len(reason) > MAX_REASON:
        raise ApprovalError(f"a reason is at most {MAX_REASON} characters")
    if decision == "deny" and not reason.strip():
        raise ApprovalError("a denial needs a reason")


def _provenance(ledger: Ledger, a: ApprovalRequest) -> dict[str, dict[str, Any]]:
    """Where each argument came from, as far as the ledger tells: fixed by the plan (the
    step's grant pins it), or chosen by the executor, carrying the labels of everything the
    run had read (``provenance``: taint is coarse on purpose)."""
    from ..provenance import fixed_by_plan

    constraints = step_constraints(ledger, a.run_id, a.step_id) or {}
    return {name: ({"source": "plan", "labels": []} if fixed_by_plan(constraints.get(name))
                   else {"source": "executor", "labels": list(a.data_labels)})
            for name in a.arguments}
