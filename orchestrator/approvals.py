"""Single-action human approvals.

An ``ApprovalRequest`` is bound to the digest of one action: run, step, tool,
canonical arguments and the policy set's version. It can be approved (by approvers
the workflow allows, never the run's initiator, and by as many distinct people as
the escalating policies require), denied, or answered with a counter-proposal (which
is a denial plus new arguments, decided by policy again, needing its own approval).
An approved request authorizes exactly one execution of that digest, once, before it
expires: ``consume`` is atomic in the store.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .approvers import APPROVER_KEY_ENV, Decision, normalize_name, verify_answer
from .canonical import action_digest, action_digest_v2, sha256_hex
from .clock import Clock
from .constraints import Constraint
from .display import printable
from .errors import ApprovalError, ConfigError, ToolArgumentsError
from .ledger import Ledger
from .store import Store

if TYPE_CHECKING:
    from .enrolment import ApproverRegistry
    from .passkeys import PasskeyAssertion, PasskeyRegistry
    from .tools import Tool

ApprovalStatus = Literal["pending", "approved", "denied", "expired", "consumed"]
DEFAULT_APPROVAL_TTL_SECONDS = 15 * 60.0


class ApprovalVote(BaseModel):
    model_config = ConfigDict(frozen=True)

    approver: str
    reason: str = ""
    at: float
    signature: str | None = None  # the approver's signature over the answer (``approvers.answer_message``)
    kid: str | None = None  # the enrolled key it verifies with
    # A passkey answer: the WebAuthn assertion and its server nonce (``passkeys.check_answer``).
    passkey: dict[str, Any] | None = None


class ApprovalRequest(BaseModel):
    """What an approver sees and answers: one exact call, why it escalated, what the run touched."""

    model_config = ConfigDict(frozen=True)

    id: str
    run_id: str
    step_id: str
    workflow: str
    initiator: str
    requester: str  # the step's SPIFFE ID
    tool: str
    arguments: dict[str, Any]
    digest: str
    policy_version: str
    risk: str
    policy_ids: list[str]
    reasons: list[str]
    data_labels: list[str]
    purpose: str
    required_approvals: int = 1
    allowed_approvers: list[str]
    created_at: float
    expires_at: float
    status: Literal["pending", "approved", "denied", "consumed"] = "pending"
    approvals: list[ApprovalVote] = []
    denial: ApprovalVote | None = None
    proposed_arguments: dict[str, Any] | None = None
    decided_at: float | None = None
    consumed_at: float | None = None
    consumed_by: str | None = None  # the idempotency key of the one call that used it
    # Arguments the tool declares secret: kept here so the approved call can be replayed,
    # masked wherever the request is shown (``shown_arguments``, ``answers``).
    secret_arguments: list[str] = []
    # The host's id for the call it was made for (a model's tool-call id), when it gave one:
    # a host re-running after an interrupt finds the request for that call, not for any
    # call with the same digest.
    call_id: str | None = None

    def shown_arguments(self, arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``arguments`` (default: the request's) as people see them: secret values masked."""
        given = self.arguments if arguments is None else arguments
        return {k: (f"[secret:{k}]" if k in self.secret_arguments else v) for k, v in given.items()}

    digest_version: int = 1  # 1: ``canonical.action_digest`` (stored before v2); 2: ``action_digest_v2``
    signed_answers: bool = False  # the workflow requires every answer to be signed

    def effective_status(self, now: float) -> ApprovalStatus:
        """``expired`` once past expiry unless already consumed or denied."""
        if self.status in ("pending", "approved") and now >= self.expires_at:
            return "expired"
        return self.status

    @property
    def approvers(self) -> list[str]:
        return [v.approver for v in self.approvals]

    @property
    def still_needed(self) -> int:
        """How many more distinct approvers a pending request needs (0 once answered)."""
        if self.status != "pending":
            return 0
        return max(0, self.required_approvals - len({principal_name(v) for v in self.approvers}))

    def answers(self) -> list[dict[str, Any]]:
        """Every answer so far, in the order given: who, approve or deny, why, and for a
        denial the arguments it proposed instead (``None`` when it proposed none; secret
        values masked). A signed answer also names the key (``kid``) its signature
        verifies with."""
        given: list[dict[str, Any]] = [
            {"approver": v.approver, "answer": "approve", "reason": v.reason, "at": v.at, **_signed(v)}
            for v in self.approvals]
        if self.denial is not None:
            proposed = None if self.proposed_arguments is None else self.shown_arguments(self.proposed_arguments)
            given.append({"approver": self.denial.approver, "answer": "deny", "reason": self.denial.reason,
                          "at": self.denial.at, "proposed_arguments": proposed,
                          **_signed(self.denial)})
        return sorted(given, key=lambda g: g["at"])


def _signed(vote: ApprovalVote) -> dict[str, Any]:
    if vote.passkey:
        return {"signed": True, "kid": vote.kid, "method": "passkey"}
    return {"signed": True, "kid": vote.kid} if vote.signature else {}


def principal_name(name: str) -> str:
    """The principal a stored name denotes (``approvers.normalize_name``); a name stored before
    names were checked is still compared case- and width-blind, without its whitespace."""
    try:
        return normalize_name(name)
    except ConfigError:
        folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", str(name)).casefold())
        return "".join(ch for ch in folded if not ch.isspace() and unicodedata.category(ch)[0] != "C")


def action_digest_for(version: int, *, run_id: str, step_id: str, tool: str, arguments: Any,
                      policy_version: str) -> str:
    """The action digest in layout ``version`` (1: before RFC 8785; 2: ``action_digest_v2``).

    Raises:
        ApprovalError: an unknown layout version.
    """
    fields = {"run_id": run_id, "step_id": step_id, "tool": tool, "arguments": arguments,
              "policy_version": policy_version}
    if version == 2:
        return action_digest_v2(**fields)
    if version == 1:
        return action_digest(**fields)
    raise ApprovalError(f"unknown action digest version {version!r}")


def approval_id(run_id: str, step_id: str, digest: str, sequence: int = 0) -> str:
    """Deterministic, so a step re-run after a crash finds its request instead of a twin.

    ``sequence`` counts the step's earlier requests: asking again for the same call (say
    after a transient failure spent the first approval) makes a new request.
    """
    return "apr_" + sha256_hex(f"{run_id}\0{step_id}\0{digest}\0{sequence}")[:24]


@dataclass(frozen=True, kw_only=True)
class ApproverRule:
    """Who may approve: everyone in ``approvers``, or per tool / risk tier when given.

    A per-tool list wins over a per-risk list, which wins over ``approvers``.
    """

    approvers: frozenset[str] = frozenset()
    by_tool: Mapping[str, frozenset[str]] = field(default_factory=dict)
    by_risk: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, approvers: Iterable[str] | ApproverRule | None) -> ApproverRule:
        if isinstance(approvers, ApproverRule):
            return approvers
        return cls(approvers=frozenset(approvers or ()))

    def allowed_for(self, tool: str, risk: str) -> frozenset[str]:
        if tool in self.by_tool:
            return frozenset(self.by_tool[tool])
        if risk in self.by_risk:
            return frozenset(self.by_risk[risk])
        return self.approvers


class ApprovalService:
    """The one code path every way of answering goes through: prompt, CLI and Python API."""

    def __init__(self, store: Store, *, clock: Clock, ledger: Ledger | None = None,
                 approvers: ApproverRegistry | None = None) -> None:
        """``approvers`` finds the enrolled keys answers are checked with; without it, one is
        made (on the store's keystore) when the store has enrolled approvers."""
        self.store = store
        self.clock = clock
        self.ledger = ledger
        self.approvers = approvers

    def _audit(self, a: ApprovalRequest, vote: ApprovalVote, answer: str) -> None:
        if self.ledger is not None:
            signed: dict[str, Any] = {"signature": vote.signature, "kid": vote.kid} if vote.signature else {}
            if vote.passkey:
                signed = {"passkey": vote.passkey, "kid": vote.kid}
            self.ledger.append("approval_decided", a.run_id, approval_id=a.id, step_id=a.step_id,
                               approver=vote.approver, answer=answer, status=a.status, reason=vote.reason,
                               digest=a.digest, proposed=a.proposed_arguments is not None, **signed)
            # A human's answer is signed at once: it must not vanish before the run resumes.
            self.ledger.resign_head()

    def _registry(self) -> ApproverRegistry:
        if self.approvers is None:
            from .enrolment import ApproverRegistry
            from .trust import TrustRoots

            trust = self.ledger.trust_roots() if self.ledger is not None \
                else TrustRoots.open(self.store, clock=self.clock)
            self.approvers = ApproverRegistry(self.store, trust, clock=self.clock, ledger=self.ledger)
        return self.approvers

    def _passkeys(self) -> PasskeyRegistry:
        from .passkeys import PasskeyRegistry

        registry = self._registry()
        return PasskeyRegistry(self.store, registry.trust, clock=self.clock, ledger=self.ledger)

    def signatures_required(self, a: ApprovalRequest) -> bool:
        """Whether an answer to ``a`` must be signed: the workflow says so, or approvers are enrolled."""
        if a.signed_answers:
            return True
        if self.approvers is not None:
            return self.approvers.any_enrolled()
        from .enrolment import anyone_enrolled

        return anyone_enrolled(self.store)

    def _vote(self, a: ApprovalRequest, approver: str, decision: Decision, reason: str,
              signature: str | None, now: float, passkey: PasskeyAssertion | None = None) -> ApprovalVote:
        """The vote to record, its signature (or passkey assertion) checked against the
        approver's enrolled key (or passkey).

        Raises:
            ApprovalError: a signature is needed and missing, does not verify, is by another
                approver's key, or was given where nobody is enrolled to check it; or a
                passkey assertion is refused (``PasskeyRegistry.check_answer``).
        """
        name = principal_name(approver)
        if passkey is not None:
            if signature:
                raise ApprovalError(f"the answer to {a.id!r} carries both a signature and a passkey assertion")
            kid, evidence = self._passkeys().check_answer(approval_id=a.id, digest=a.digest, decision=decision,
                                                          approver=approver, reason=reason, assertion=passkey)
            return ApprovalVote(approver=name, reason=reason, at=now, kid=kid, passkey=evidence)
        if not self.signatures_required(a):
            if signature:
                raise ApprovalError(f"the answer to {a.id!r} is signed, but no approver is enrolled to check "
                                    "it with: enrol approvers first (scopegraph approvers add)")
            return ApprovalVote(approver=name, reason=reason, at=now)
        if not signature:
            raise ApprovalError(f"approval {a.id!r} needs a signed answer: sign it with {approver!r}'s "
                                f"enrolled key (--key PATH or {APPROVER_KEY_ENV})")
        enrolled = self._registry().find(approver)
        verify_answer(enrolled, signature, approval_id=a.id, digest=a.digest, decision=decision,
                      approver=approver, reason=reason)
        return ApprovalVote(approver=name, reason=reason, at=now, signature=signature, kid=enrolled.kid)

    def request(self, request: ApprovalRequest) -> ApprovalRequest:
        """Persist ``request`` unless a request of the same id exists; return the stored one."""
        stored = self.store.add_approval(request.id, request.run_id, request.model_dump_json())
        return ApprovalRequest.model_validate_json(stored)

    def get(self, approval_id: str) -> ApprovalRequest:
        """Raises:
        ApprovalError: no approval has that id.
        """
        found = self.store.get_approval(approval_id)
        if found is None:
            raise ApprovalError(f"unknown approval {approval_id!r}")
        return ApprovalRequest.model_validate_json(found)

    def list(self, *, run_id: str | None = None, status: str | None = None) -> list[ApprovalRequest]:
        now = self.clock.now()
        items = [ApprovalRequest.model_validate_json(p) for p in self.store.list_approvals(run_id=run_id)]
        return [a for a in items if status is None or a.effective_status(now) == status]

    def _update(self, approval_id: str, mutate: Callable[[ApprovalRequest], ApprovalRequest], *,
                parse_back: bool = False) -> ApprovalRequest:
        """Replace the stored request with ``mutate(request)``, atomically; return it.

        ``mutate`` updates it with ``model_copy``, which does not validate: where it puts in
        values that are not plain JSON (a caller's proposal), ``parse_back`` returns the
        request as stored instead. Otherwise the object written is returned as it is, its
        payload not validated a second time.
        """
        written: list[ApprovalRequest] = []

        def on_json(payload: str) -> str:
            written[:] = [mutate(ApprovalRequest.model_validate_json(payload))]
            return written[0].model_dump_json()

        updated = self.store.update_approval(approval_id, on_json)
        if updated is None:
            raise ApprovalError(f"unknown approval {approval_id!r}")
        return ApprovalRequest.model_validate_json(updated) if parse_back else written[-1]

    def approve(self, approval_id: str, *, approver: str, reason: str = "",
                signature: str | None = None, passkey: PasskeyAssertion | None = None) -> ApprovalRequest:
        """Record ``approver``'s approval; the request is approved once enough distinct people agree.

        ``signature`` is the approver's signature over the answer (``approvers.sign_answer``);
        it is required, and checked against their enrolled key, when approvers are enrolled
        or the workflow requires signed answers. ``passkey`` is a WebAuthn assertion over
        the answer instead (``passkeys.answer_challenge``), checked against their passkey.

        Raises:
            ApprovalError: unknown id, not pending, expired, approver not allowed, the
                initiator approving their own run (under any spelling), the same person
                approving twice, or a missing or bad signature.
        """
        now = self.clock.now()
        votes_cast: list[ApprovalVote] = []

        def mutate(a: ApprovalRequest) -> ApprovalRequest:
            self._check_can_answer(a, approver, now)
            if principal_name(approver) in {principal_name(v) for v in a.approvers}:
                raise ApprovalError(
                    f"{approver!r} has already approved {a.id!r}; a second approver must be someone else")
            vote = self._vote(a, approver, "approve", reason, signature, now, passkey)
            votes_cast[:] = [vote]
            votes = [*a.approvals, vote]
            done = len({principal_name(v.approver) for v in votes}) >= a.required_approvals
            return a.model_copy(update={
                "approvals": votes, "status": "approved" if done else "pending",
                "decided_at": now if done else None,
            })

        with self.store.atomic():  # the answer and its signed audit record land together
            updated = self._update(approval_id, mutate)
            self._audit(updated, votes_cast[0], "approve")
        return updated

    def deny(self, approval_id: str, *, approver: str, reason: str,
             propose: Mapping[str, Any] | None = None, signature: str | None = None,
             passkey: PasskeyAssertion | None = None) -> ApprovalRequest:
        """Deny the call; ``propose`` offers different arguments as a new action (decided and
        approved anew, so the signature covers the denial, not the proposal).

        Raises:
            ApprovalError: as for ``approve``, or an empty reason.
        """
        if not reason or not reason.strip():
            raise ApprovalError("a denial needs a reason")
        now = self.clock.now()
        votes_cast: list[ApprovalVote] = []

        def mutate(a: ApprovalRequest) -> ApprovalRequest:
            self._check_can_answer(a, approver, now)
            vote = self._vote(a, approver, "deny", reason, signature, now, passkey)
            votes_cast[:] = [vote]
            return a.model_copy(update={
                "status": "denied", "decided_at": now,
                "denial": vote,
                "proposed_arguments": dict(propose) if propose is not None else None,
            })

        with self.store.atomic():
            updated = self._update(approval_id, mutate, parse_back=propose is not None)
            self._audit(updated, votes_cast[0], "deny")
        return updated

    def consume_action(self, approval_id: str, *, run_id: str, step_id: str, tool: str, arguments: Any,
                       policy_version: str, consumer: str) -> ApprovalRequest:
        """``consume`` for the call actually made: its digest is computed in the layout the
        request was made with (stored requests keep version 1; new ones use version 2).

        Raises:
            ApprovalError: as for ``consume``.
        """
        a = self.get(approval_id)
        digest = action_digest_for(a.digest_version, run_id=run_id, step_id=step_id, tool=tool,
                                   arguments=arguments, policy_version=policy_version)
        return self.consume(approval_id, digest=digest, consumer=consumer)

    def consume(self, approval_id: str, *, digest: str, consumer: str) -> ApprovalRequest:
        """Use an approval for the one call it authorizes: atomically, exactly once.

        ``consumer`` is the idempotency key of the call. The same call resuming after a
        crash may present it again and is let through (its tool call is then replayed or
        run once, never twice); any other consumer is refused.

        Raises:
            ApprovalError: unknown, not approved, expired, already consumed, or for another action.
        """
        now = self.clock.now()

        def mutate(a: ApprovalRequest) -> ApprovalRequest:
            if a.digest != digest:
                raise ApprovalError(f"approval {a.id!r} is for a different action")
            state = a.effective_status(now)
            if state == "consumed":
                if a.consumed_by == consumer:
                    return a
                raise ApprovalError(f"approval {a.id!r} was already used")
            if state == "expired":
                raise ApprovalError(f"approval {a.id!r} expired")
            if state != "approved":
                raise ApprovalError(f"approval {a.id!r} is {state}, not approved")
            return a.model_copy(update={"status": "consumed", "consumed_at": now, "consumed_by": consumer})

        return self._update(approval_id, mutate)

    def _check_can_answer(self, a: ApprovalRequest, approver: str, now: float) -> None:
        if not approver or not approver.strip():
            raise ApprovalError("an approver name is required")
        try:
            name = normalize_name(approver)  # one spelling per person: NFKC, case-folded, no whitespace
        except ConfigError as exc:
            raise ApprovalError(str(exc)) from None
        state = a.effective_status(now)
        if state != "pending":
            raise ApprovalError(f"approval {a.id!r} is {state}; only a pending request can be answered")
        if name == principal_name(a.initiator):
            raise ApprovalError(f"{approver!r} started run {a.run_id!r} and may not approve its calls")
        # The allowed list was fixed from the workflow when the request was made, so any
        # process can answer it without loading the workflow's code.
        if name not in {principal_name(x) for x in a.allowed_approvers}:
            raise ApprovalError(f"{approver!r} is not an allowed approver for tool {a.tool!r}")


_CONSTRAINTS: TypeAdapter[dict[str, Constraint]] = TypeAdapter(dict[str, Constraint])


def step_constraints(ledger: Ledger, run_id: str, step_id: str) -> dict[str, Constraint] | None:
    """The constraints of the last grant minted for ``step_id``, from the audit ledger;
    ``None`` when the ledger holds no grant of that step."""
    found = None
    for record in ledger.records(run_id):
        if record["kind"] == "grant_minted" and record.get("step_id") == step_id:
            found = record.get("constraints")
    if found is None:
        return None
    try:
        return _CONSTRAINTS.validate_python(found)
    except ValidationError:
        return None


def check_proposal(request: ApprovalRequest, propose: Mapping[str, Any], *, tool: Tool | None,
                   constraints: Mapping[str, Constraint] | None) -> dict[str, Any]:
    """Check a counter-proposal before it is recorded: the call it makes (the request's
    arguments with the proposed ones put in) must fit the tool's schema and the step's
    constraints, and differ from the request. Returns that call, normalised.

    Without ``tool`` only the argument names are checked (against the request's call);
    without ``constraints`` nothing is checked against the step's scope. The run checks
    everything again when it makes the call: this catches a mistake while its author is
    still at the keyboard.

    Raises:
        ApprovalError: the proposal names an unknown argument, has a value of the wrong
            type, lies outside the step's constraints, or changes nothing.
    """
    prefix = f"the proposal for {request.id!r} is refused"
    merged = {**request.arguments, **propose}
    if tool is not None:
        try:
            merged = tool.validate_arguments(merged)
        except ToolArgumentsError as exc:
            raise ApprovalError(f"{prefix}: {exc}") from None
    else:
        unknown = sorted(set(propose) - set(request.arguments))
        if unknown:
            raise ApprovalError(f"{prefix}: tool {request.tool!r} takes no argument {unknown[0]!r}")
    if constraints is not None:
        for name in sorted(propose):
            if name not in constraints:
                raise ApprovalError(f"{prefix}: argument {name!r} is not in the scope of step {request.step_id!r}")
        for name, constraint in constraints.items():
            # The value stays out of the message, as in the gateway's scope denials.
            if name in merged and not constraint.allows(merged[name]):
                raise ApprovalError(f"{prefix}: argument {name!r} is outside the scope of step {request.step_id!r}: "
                                    f"it must be {constraint.describe()}")
    if _same_call(merged, request.arguments):
        raise ApprovalError(f"{prefix}: it proposes the same call as the request")
    return merged


def _same_call(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# Bidirectional overrides and isolates, and the marks: they can make text read
# differently from what it is (an approver's reason shown to the next approver).
def shown(text: str) -> str:
    """``text`` as it may be printed to a terminal: control and bidirectional characters escaped."""
    return printable(text)


def answer_text(given: Mapping[str, Any]) -> str:
    """One answer (an item of ``ApprovalRequest.answers()``) in words: who approved or
    denied, why, and what a denial proposed instead."""
    verb = "approved" if given["answer"] == "approve" else "denied"
    line = f"{verb} by {shown(given['approver'])}"
    if given.get("reason"):
        line += f": {shown(json.dumps(given['reason'], ensure_ascii=False))}"
    if given.get("proposed_arguments") is not None:
        line += f"; proposed {shown(json.dumps(given['proposed_arguments'], sort_keys=True))}"
    if given.get("signed"):
        line += f"  [signed, key {str(given.get('kid'))[:12]}…]"
    return line
