"""One run as a tree: who did what, under which grant, decided by which policy, approved by whom.

``build_trace`` reads the run's ledger records, its grants and its approvals from the
store and returns a JSON-ready dict (the ``--json`` form); ``render_trace`` draws that
dict as a Unicode tree for a terminal. Timings are offsets from the run's start.

The ledger is the source of events; the store adds what the ledger does not keep: each
grant's consumed uses and revocation, and each approval's current status and votes
(approvals answered through the CLI have no ``approval_decided`` record). A step's status
is derived from its last call (see ``_step_status``); a ``step_ended`` record written after
it that says the step failed or was denied overrides it and gives the reason.
Nothing here reads tokens or keys: the ledger and the store's grant rows hold none.
Text that others wrote (planners, tools, approvers) is drawn through ``printable``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from .approvals import ApprovalRequest
from .clock import SystemClock
from .display import printable_lines
from .errors import ConfigError
from .ledger import Ledger
from .store import GrantRecord, Store

Tree = tuple[str, list["Tree"]]

_CALL_KINDS = ("decision", "tool_call")
_CREDENTIAL_KINDS = ("secret_issued", "secret_refused", "secret_revoked", "token_exchanged")  # by handle


def build_trace(store: Store, run_id: str, *, now: float | None = None) -> dict[str, Any]:
    """The run ``run_id`` as a JSON-serialisable dict with stable keys.

    ``now`` judges whether pending approvals have expired (default: the wall clock).

    Raises:
        ConfigError: the store knows no run ``run_id``.
    """
    now = SystemClock().now() if now is None else now
    run = store.get_run(run_id)
    records = Ledger(store, clock=SystemClock()).records(run_id)
    if run is None and not records:
        raise ConfigError(f"unknown run {run_id!r}")
    started = next((r for r in records if r["kind"] == "run_started"), None)
    start = started["at"] if started else (run.created_at if run else records[0]["at"])

    def ms(at: float | None) -> float | None:
        return None if at is None else round((at - start) * 1000, 3)

    grants = {g.jti: g for g in store.grants_for_run(run_id)}
    approvals = {a.id: a for a in (ApprovalRequest.model_validate_json(p)
                                   for p in store.list_approvals(run_id=run_id))}
    plans = [r for r in records if r["kind"] == "plan"]
    # The plan the run ended on: the last valid one (a re-plan revises it), else the first.
    plan = next((r for r in reversed(plans) if r.get("valid")), plans[0] if plans else None)
    lifecycle = [r for r in records if r["kind"] in ("run_paused", "run_resumed", "run_ended")]
    status = run.status if run else (lifecycle[-1]["status"] if lifecycle and "status" in lifecycle[-1]
                                     else "unknown")
    end = _end_of(records, lifecycle)
    return {
        "run": {
            "run_id": run_id,
            "workflow": run.workflow if run else (started or {}).get("workflow"),
            "target": run.target if run else (started or {}).get("target"),
            "initiator": run.initiator if run else (started or {}).get("initiator"),
            "status": status,
            "started_at": start,
            "started_at_iso": iso(start),
            "ended_at": end,
            "duration_ms": ms(end),
            "paused_ms": _paused_ms(lifecycle),
            "policy_version": (started or {}).get("policy_version"),
            "task_digest": (started or {}).get("task_digest"),
        },
        "planner": {
            "spiffe_id": (plan or started or {}).get("planner"),
            "plan": None if plan is None else {
                "at_ms": ms(plan["at"]),
                "valid": bool(plan.get("valid")),
                "digest": plan.get("plan_digest"),
                "error": plan.get("error"),
                "steps": [{"id": s["id"], "tool": s["tool"], "depends_on": list(s.get("depends_on") or []),
                           "purpose": s.get("purpose") or ""}
                          for s in plan.get("steps") or []],
            },
            "revisions": [{"revision": r.get("revision"), "at_ms": ms(r["at"]), "valid": bool(r.get("valid")),
                           "error": r.get("error"), "failures": list(r.get("failures") or []),
                           "widened": list(r.get("widened") or [])}
                          for r in plans if r.get("revision")],
        },
        "steps": _steps(records, plan, grants, approvals, ms, now),
        "run_events": [_run_event(r, ms) for r in records
                       if r["kind"] in ("run_paused", "run_resumed", "run_ended")
                       or (r["kind"] == "grant_revoked" and r.get("grant_id") is None)],
        "ledger": {"records": len(records),
                   "first_seq": records[0]["seq"] if records else None,
                   "last_seq": records[-1]["seq"] if records else None},
    }


def _end_of(records: Sequence[Mapping[str, Any]], lifecycle: Sequence[Mapping[str, Any]]) -> float | None:
    if lifecycle and lifecycle[-1]["kind"] in ("run_paused", "run_ended"):
        return float(lifecycle[-1]["at"])
    return float(records[-1]["at"]) if records else None  # still running, or crashed


def _paused_ms(lifecycle: Sequence[Mapping[str, Any]]) -> float:
    """Time between each pause and the resume that followed it (a human's part, mostly)."""
    total, paused_at = 0.0, None
    for r in lifecycle:
        if r["kind"] == "run_paused":
            paused_at = r["at"]
        elif r["kind"] == "run_resumed" and paused_at is not None:
            total += r["at"] - paused_at
            paused_at = None
    return round(total * 1000, 3)


def _steps(records: Sequence[Mapping[str, Any]], plan: Mapping[str, Any] | None,
           grants: Mapping[str, GrantRecord], approvals: Mapping[str, ApprovalRequest],
           ms: Any, now: float) -> list[dict[str, Any]]:
    planned = [(s["id"], s["tool"], list(s.get("depends_on") or [])) for s in (plan or {}).get("steps") or []]
    known = {sid for sid, _, _ in planned}
    # A step the ledger mentions but the plan record does not: an iteration of a repeated
    # step (``send[0]``) goes right after its step, which it stands for; anything else last.
    for r in records:
        sid = r.get("step_id")
        if sid and sid not in known:
            known.add(sid)
            base = sid.split("[", 1)[0]
            # The step itself, or, once its first iteration has taken its place, that iteration.
            at = next((i for i, (p, _, _) in enumerate(planned)
                       if p == base or p.startswith(base + "[")), None)
            if at is None or not sid.endswith("]"):
                planned.append((sid, r.get("tool", "?"), []))
                continue
            deps = planned[at][2]
            if planned[at][0] == base:
                if not any(other.get("step_id") == base for other in records):
                    del planned[at]  # a repeated step's own id has no records: its iterations do
                else:
                    at += 1
            # Iterations may run side by side, so the ledger's order is not theirs: the item
            # index is.
            while at < len(planned) and planned[at][0].startswith(base + "[") \
                    and _item_index(planned[at][0]) < _item_index(sid):
                at += 1
            planned.insert(at, (sid, r.get("tool", "?"), deps))
    return [_step(sid, tool, deps, [r for r in records if r.get("step_id") == sid],
                  grants, approvals, ms, now) for sid, tool, deps in planned]


def _item_index(step_id: str) -> int:
    index = step_id.rsplit("[", 1)[-1].rstrip("]")
    return int(index) if index.isdigit() else -1


def _step(step_id: str, tool: str, depends_on: list[str], records: Sequence[Mapping[str, Any]],
          grants: Mapping[str, GrantRecord], approvals: Mapping[str, ApprovalRequest],
          ms: Any, now: float) -> dict[str, Any]:
    items: list[tuple[int, dict[str, Any]]] = []
    by_grant: dict[str, dict[str, Any]] = {}
    by_approval: dict[str, dict[str, Any]] = {}
    spiffe_id = None
    live: dict[str, Any] | None = None  # the step's grant between its mint and its revocation
    for r in records:
        kind = r["kind"]
        if kind == "grant_minted":
            spiffe_id = spiffe_id or r.get("spiffe_id")
            node = live = _grant(r, grants.get(r["grant_id"]), ms)
            by_grant[r["grant_id"]] = node
            items.append((r["seq"], node))
        elif kind == "grant_revoked":
            if live is not None and live["grant_id"] == r.get("grant_id"):
                live = None
        elif kind in _CALL_KINDS:
            event = _decision(r, ms) if kind == "decision" else _tool_call(r, ms)
            spiffe_id = spiffe_id or r.get("spiffe_id")
            # A call whose grant the gateway refused (wrong tool, forged, expired) names no
            # grant; the executor could only have presented the step's live one.
            owner = by_grant.get(r.get("grant_id") or "") or live
            if owner is not None:
                owner["events"].append(event)
            else:
                items.append((r["seq"], event))
        elif kind in _CREDENTIAL_KINDS:
            event = _credential(r, ms)
            holder = by_grant.get(r.get("grant_id") or "")  # issued under a grant; revoked after it
            if holder is not None:
                holder["events"].append(event)
            else:
                items.append((r["seq"], event))
        elif kind == "approval_requested":
            node = _approval(r, approvals.get(r["approval_id"]), ms, now)
            by_approval[r["approval_id"]] = node
            items.append((r["seq"], node))
        elif kind == "approval_decided":
            asked = by_approval.get(r["approval_id"])
            if asked is not None:
                if asked["answers_source"] != "ledger":  # the ledger's own records replace the store's
                    asked["answers"], asked["answers_source"] = [], "ledger"
                asked["answers"].append({"approver": r.get("approver"), "answer": r.get("answer"),
                                        "reason": r.get("reason") or "", "at_ms": ms(r["at"])})
        elif kind == "approval_consumed":
            asked = by_approval.get(r["approval_id"])
            if asked is not None:
                asked["consumed_ms"], asked["consumed_grant_id"] = ms(r["at"]), r.get("grant_id")
            owner = by_grant.get(r.get("grant_id") or "")
            if owner is not None:
                owner["events"].append({"type": "approval_consumed", "seq": r["seq"], "at_ms": ms(r["at"]),
                                        "approval_id": r["approval_id"]})
    for jti, g in grants.items():  # a grant the store knows but the ledger lost: still shown
        if g.step_id == step_id and jti not in by_grant:
            node = _grant({"grant_id": jti, "tool": g.tool, "seq": None, "at": g.issued_at,
                           "spiffe_id": g.subject}, g, ms)
            items.append((10**12, node))
    ordered = [node for _, node in sorted(items, key=lambda item: item[0])]
    status, reason = _step_status(tool, records, approvals, now), None
    ended = _step_ended(records)
    if ended is not None:
        status, reason = str(ended["status"]), str(ended.get("reason") or "") or None
    return {
        "step_id": step_id,
        "tool": tool,
        "depends_on": depends_on,
        "spiffe_id": spiffe_id,
        "status": status,
        "reason": reason,
        "items": ordered,
    }


def _step_ended(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The step's ``step_ended`` record, if it is the last word on a failed or denied step:
    written after every call and approval request of the step (the runtime writes it as it
    revokes the step's grant, so it also covers an executor that raised after its calls)."""
    last = None
    for r in records:
        if r["kind"] in (*_CALL_KINDS, "approval_requested", "grant_minted"):
            last = None
        elif r["kind"] == "step_ended":
            last = r
    if last is None or last.get("status") not in ("failed", "denied"):
        return None
    return last


def _grant(r: Mapping[str, Any], stored: GrantRecord | None, ms: Any) -> dict[str, Any]:
    expires_at = r.get("expires_at", stored.expires_at if stored else None)
    issued_at = stored.issued_at if stored else r["at"]  # the ledger record is written just after
    return {
        "type": "grant",
        "seq": r.get("seq"),
        "at_ms": ms(r["at"]),
        "grant_id": r["grant_id"],
        "tool": r.get("tool"),
        "spiffe_id": r.get("spiffe_id"),
        "expires_at": expires_at,
        "ttl_s": None if expires_at is None else round(expires_at - issued_at, 3),
        "max_uses": r.get("max_uses", stored.max_uses if stored else None),
        "uses": stored.uses if stored else None,
        "constraints": dict(r.get("constraints") or {}),
        "delegation": _delegation(r.get("act")),
        "revoked_ms": ms(stored.revoked_at) if stored else None,
        "revoke_reason": stored.revoke_reason if stored else None,
        "events": [],
    }


def _delegation(act: Any) -> list[str]:
    """RFC 8693 ``act`` nesting, outermost = latest delegator; returned oldest first."""
    chain: list[str] = []
    while isinstance(act, Mapping) and act.get("sub"):
        chain.append(str(act["sub"]))
        act = act.get("act")
    return list(reversed(chain))


def _decision(r: Mapping[str, Any], ms: Any) -> dict[str, Any]:
    return {"type": "decision", "seq": r["seq"], "at_ms": ms(r["at"]), "tool": r.get("tool"),
            "grant_id": r.get("grant_id"), "outcome": r.get("decision"),
            "policy_ids": list(r.get("policy_ids") or []), "reasons": list(r.get("reasons") or []),
            "attempt": r.get("attempt"), "arguments_digest": r.get("arguments_digest")}


def _tool_call(r: Mapping[str, Any], ms: Any) -> dict[str, Any]:
    return {"type": "tool_call", "seq": r["seq"], "at_ms": ms(r["at"]), "tool": r.get("tool"),
            "grant_id": r.get("grant_id"), "status": r.get("status"), "attempt": r.get("attempt"),
            "duration_ms": r.get("duration_ms"), "arguments_digest": r.get("arguments_digest"),
            "result_digest": r.get("result_digest"), "error_type": r.get("error_type"),
            "error": r.get("error")}


def _approval(r: Mapping[str, Any], stored: ApprovalRequest | None, ms: Any, now: float) -> dict[str, Any]:
    answers: list[dict[str, Any]] = []
    if stored is not None:
        answers = [{"approver": v.approver, "answer": "approve", "reason": v.reason, "at_ms": ms(v.at)}
                   for v in stored.approvals]
        if stored.denial is not None:
            d = stored.denial
            answers.append({"approver": d.approver, "answer": "deny", "reason": d.reason, "at_ms": ms(d.at)})
    return {
        "type": "approval",
        "seq": r["seq"],
        "at_ms": ms(r["at"]),
        "approval_id": r["approval_id"],
        "tool": r.get("tool"),
        "digest": r.get("digest"),
        "policy_ids": list(r.get("policy_ids") or []),
        "required_approvals": r.get("required_approvals"),
        "status": stored.effective_status(now) if stored else "unknown",
        "expires_ms": ms(stored.expires_at) if stored else None,
        "answers": answers,
        "answers_source": "store",
        "counter_proposal": bool(stored and stored.proposed_arguments is not None),
        "consumed_ms": None,
        "consumed_grant_id": None,
    }


def _run_event(r: Mapping[str, Any], ms: Any) -> dict[str, Any]:
    base = {"type": r["kind"], "seq": r["seq"], "at_ms": ms(r["at"])}
    if r["kind"] == "grant_revoked":
        return {**base, "count": r.get("count"), "reason": r.get("reason")}
    if r["kind"] == "run_resumed":
        return {**base, "interrupted": r.get("interrupted")}
    return {**base, "status": r.get("status"), "error": r.get("error")}


def _step_status(tool: str, records: Sequence[Mapping[str, Any]],
                 approvals: Mapping[str, ApprovalRequest], now: float) -> str:
    """What the step came to, read from the ledger as the runtime decides it.

    The last call decides (a step completes when its last call was a successful call
    of its own tool), unless an approval was requested after that call: then the
    approval's status does. An executor that raised after a successful call left no call
    record saying so: the step's ``step_ended`` record tells (see ``_step_ended``).
    """
    if not any(r["kind"] == "grant_minted" for r in records):
        return "not_started"
    calls = [r for r in records if r["kind"] in _CALL_KINDS]
    asked = [r for r in records if r["kind"] == "approval_requested"]
    if asked and (not calls or asked[-1]["seq"] > calls[-1]["seq"]):
        approval = approvals.get(asked[-1]["approval_id"])
        state = approval.effective_status(now) if approval else "pending"
        return {"pending": "awaiting_approval", "approved": "approved_not_resumed",
                "consumed": "interrupted"}.get(state, "denied")
    if not calls:
        return "failed"  # the executor made no call
    last = calls[-1]
    if last["kind"] == "tool_call":
        return "completed" if last.get("status") == "ok" and last.get("tool") == tool else "failed"
    if last.get("decision") == "deny":
        return "denied"
    return "interrupted"  # allowed, but no tool call recorded after it


# rendering ----------------------------------------------------------------------------
def render_trace(trace: Mapping[str, Any]) -> str:
    """Draw a ``build_trace`` dict as a tree with Unicode box-drawing characters."""
    run = trace["run"]
    head = (f"run {run['run_id']}  workflow {run['workflow']}  {run['status']}  "
            f"initiator {run['initiator']}")
    took = f"started {run['started_at_iso']}  took {duration(run['duration_ms'])}"
    if run["paused_ms"]:
        took += f" ({duration(run['paused_ms'])} paused)"
    children: list[Tree] = [(took, [])]
    if run.get("policy_version"):
        children.append((f"policy version {run['policy_version']}", []))
    children.append(_render_planner(trace["planner"]))
    children.extend(_render_step(s) for s in trace["steps"])
    for e in trace["run_events"]:
        children.append((_render_run_event(e), []))
    return printable_lines(tree_lines((head, children)))


def _render_planner(planner: Mapping[str, Any]) -> Tree:
    plan = planner.get("plan")
    kids: list[Tree] = []
    if plan is None:
        kids.append(("no plan recorded", []))
    elif not plan["valid"]:
        kids.append((f"{offset(plan['at_ms'])}  plan rejected: {plan['error']}", []))
    else:
        width = max((len(s["id"]) for s in plan["steps"]), default=0)
        steps: list[Tree] = [(f"{s['id']:<{width}}  {s['tool']}"
                              + (f"  after {', '.join(s['depends_on'])}" if s["depends_on"] else "")
                              + (f"  purpose: {s['purpose']}" if s.get("purpose") else ""), [])
                             for s in plan["steps"]]
        kids.append((f"{offset(plan['at_ms'])}  plan  {len(plan['steps'])} step(s)  digest {_short(plan['digest'])}",
                     steps))
    for r in planner.get("revisions") or []:
        asked = ", ".join(f"{f['step_id']} ({f['kind']}{', ' + f['argument'] if f.get('argument') else ''})"
                          for f in r["failures"]) or "-"
        outcome = (f"widened {', '.join(r['widened'])}" if r["widened"] else "within the original scope") \
            if r["valid"] else f"rejected: {r['error']}"
        kids.append((f"{offset(r['at_ms'])}  re-plan {r['revision']}  asked by {asked}  {outcome}", []))
    return (f"planner  {planner.get('spiffe_id') or '?'}  (no tool access)", kids)


def _render_step(step: Mapping[str, Any]) -> Tree:
    kids: list[Tree] = [(f"identity  {step['spiffe_id'] or '(none: never started)'}", [])]
    for item in step["items"]:
        if item["type"] == "grant":
            kids.append(_render_grant(item))
        elif item["type"] == "approval":
            kids.append(_render_approval(item))
        else:
            kids.append(_render_call(item))
    why = f": {step['reason']}" if step.get("reason") else ""
    return (f"step {step['step_id']}  {step['tool']}  {step['status']}{why}", kids)


def _render_grant(g: Mapping[str, Any]) -> Tree:
    uses = "?" if g["uses"] is None else g["uses"]
    label = (f"{offset(g['at_ms'])}  grant {g['grant_id']}  {g['tool']}  ttl {_seconds(g['ttl_s'])}  "
             f"uses {uses}/{g['max_uses']}")
    kids: list[Tree] = []
    if g["constraints"]:
        kids.append(("scope  " + "; ".join(f"{k} {describe_constraint(v)}"
                                           for k, v in sorted(g["constraints"].items())), []))
    if g["delegation"]:
        kids.append(("on behalf of  " + " → ".join(g["delegation"]), []))
    kids.extend(_render_call(e) for e in g["events"])
    if g["revoked_ms"] is not None:
        kids.append((f"{offset(g['revoked_ms'])}  revoked: {g['revoke_reason']}", []))
    else:
        kids.append(("NOT REVOKED", []))
    return (label, kids)


def _credential(r: Mapping[str, Any], ms: Any) -> dict[str, Any]:
    """A downstream credential's issue, refusal, revocation or exchange: its handle, never a secret."""
    return {"type": "credential", "what": r["kind"], "seq": r["seq"], "at_ms": ms(r["at"]), "handle": r.get("handle"),
            "principal": r.get("principal") or r.get("audience"), "broker": r.get("broker"),
            "kind": r.get("secret_kind"), "name": r.get("name"), "reason": r.get("reason")}


def _render_credential(e: Mapping[str, Any]) -> Tree:
    at = offset(e["at_ms"])
    if e["what"] == "secret_issued":
        return (f"{at}  credential {e['name']} issued  {e['kind']} ({e['broker']})  {e['principal']}  "
                f"[{e['handle']}]", [])
    if e["what"] == "secret_refused":
        return (f"{at}  credential {e['name']} refused  ({e['broker']})  [{e['handle']}]", [(e["reason"] or "", [])])
    if e["what"] == "token_exchanged":
        return (f"{at}  token exchanged for {e['principal']}  [{e['handle']}]", [])
    return (f"{at}  credential revoked  {e['principal'] or ''}  [{e['handle']}]: {e['reason']}", [])


def _render_call(e: Mapping[str, Any]) -> Tree:
    if e["type"] == "credential":
        return _render_credential(e)
    at = offset(e["at_ms"])
    if e["type"] == "decision":
        ids = ", ".join(e["policy_ids"]) or "-"
        label = f"{at}  decision {e['outcome']}  {e['tool']}  attempt {e['attempt']}  [{ids}]"
        if e["grant_id"] is None:
            label += "  (grant refused)"
        reasons: list[Tree] = [] if e["outcome"] == "allow" else [(r, []) for r in e["reasons"]]
        return (label, reasons)
    if e["type"] == "tool_call":
        took = "?" if e["duration_ms"] is None else f"{e['duration_ms']:.3g} ms"
        failure = e.get("error") or (f"{e['error_type']}" if e.get("error_type") else None)
        return (f"{at}  tool call {e['status']}  {e['tool']}  attempt {e['attempt']}  {took}",
                [(failure, [])] if e["status"] != "ok" and failure else [])
    return (f"{at}  approval {e['approval_id']} consumed", [])


def _render_approval(a: Mapping[str, Any]) -> Tree:
    label = (f"{offset(a['at_ms'])}  approval {a['approval_id']}  {a['tool']}  {a['status']}  "
             f"[{', '.join(a['policy_ids'])}]  needs {a['required_approvals']}")
    kids: list[Tree] = []
    for v in a["answers"]:
        verb = "approved" if v["answer"] == "approve" else "denied"
        why = f": {v['reason']}" if v["reason"] else ""
        kids.append((f"{offset(v['at_ms'])}  {verb} by {v['approver']}{why}", []))
    if a["answers"] and a["answers_source"] != "ledger":
        kids.append(("(answers from the approval store: the ledger has no approval_decided record)", []))
    if a["counter_proposal"]:
        kids.append(("counter-proposal: different arguments, decided anew", []))
    if a["consumed_ms"] is not None:
        kids.append((f"{offset(a['consumed_ms'])}  consumed by grant {a['consumed_grant_id']}", []))
    elif a["status"] in ("pending", "approved") and a["expires_ms"] is not None:
        kids.append((f"expires {offset(a['expires_ms'])}", []))
    return (label, kids)


def _render_run_event(e: Mapping[str, Any]) -> str:
    at = offset(e["at_ms"])
    if e["type"] == "grant_revoked":
        return f"{at}  revoked {e['count']} remaining grant(s): {e['reason']}"
    if e["type"] == "run_resumed":
        return f"{at}  resumed" + (" after an interruption" if e["interrupted"] else "")
    if e["type"] == "run_paused":
        return f"{at}  paused" + (f": {e['error']}" if e["error"] else "")
    return f"{at}  ended {e['status']}" + (f": {e['error']}" if e["error"] else "")


# small shared helpers (``usage_report`` draws with them too) ---------------------------
def tree_lines(node: Tree) -> list[str]:
    """Lines of a ``(label, children)`` tree drawn with ├─ └─ │."""
    label, children = node
    lines = [label]

    def walk(kids: Sequence[Tree], prefix: str) -> None:
        for i, (text, grandkids) in enumerate(kids):
            last = i == len(kids) - 1
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{text}")
            walk(grandkids, prefix + ("   " if last else "│  "))

    walk(children, "")
    return lines


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(ms: float | None) -> str:
    if ms is None:
        return "?"
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def offset(ms: float | None) -> str:
    return "+?" if ms is None else "+" + duration(ms)


def describe_constraint(c: Mapping[str, Any]) -> str:
    kind = c.get("kind")
    if kind == "exact":
        return f"= {json.dumps(c.get('value'))}"
    if kind == "one_of":
        return "one of " + json.dumps(list(c.get("values") or []))
    if kind == "prefix":
        return f"starts with {json.dumps(c.get('prefix'))}"
    if kind == "pattern":
        return f"matches {json.dumps(c.get('regex'))}"
    if kind == "range":
        return f"in {number(c.get('min'), '-∞')}..{number(c.get('max'), '∞')}"
    if kind == "from_step":
        return f"from step {c.get('step')}" + (f" at {c.get('path')}" if c.get("path") else "")
    if kind == "item":
        return "the iteration's item" + (f" at {c.get('path')}" if c.get("path") else "")
    return "any"


def number(value: Any, missing: str = "?") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _seconds(s: float | None) -> str:
    return "?" if s is None else f"{number(round(s, 3))} s"


def _short(digest: str | None) -> str:
    return (digest or "?")[:12]
