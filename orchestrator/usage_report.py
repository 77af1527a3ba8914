"""Granted versus used, across every run in the store, and a proposed narrowing to review.

Per workflow, per plan step and its tool: grants minted and used (a grant is used when
the tool ran successfully under it at least once), tool executions per grant (once or
repeatedly: a distribution), grants never used and why, denials by the policy that
decided them, escalations, and approvals asked / approved / denied / expired /
consumed ("approved" counts every request that gathered its approvals, consumed or
not; "expired" every one past its expiry that was neither consumed nor denied). Then
proposals a person can review, each with its evidence:

* a step whose tool was granted but never ran successfully: remove the step from plans,
  or forbid the tool in that step (a Cedar ``forbid`` with ``@id("proposed-…")``);
* an integer argument under a ``range`` whose successful values stay well inside it
  (at least ``SLACK`` of the range's width left unused on a side): a ``forbid`` outside
  the observed bounds, and the narrower plan constraint. The upper bound drops to the
  observed maximum; the lower bound rises to the observed minimum only once two distinct
  values were seen, since a single value says nothing about the spread;
* ``one_of`` values never used: the narrower ``one_of`` and its ``forbid``.

Every Cedar text is checked with ``CedarPolicyEngine`` against the workflow's tools
(the ``workflows`` given, or loaded from the run's target) together with the workflow's
own policies, then probed: it must deny a value outside the proposal and not one inside.
When the workflow cannot be loaded, argument-typed proposals are only parsed, and the
report says so. Nothing here reads tokens or keys.

Each workflow also lists the downstream credentials its tools were issued, ephemeral or
static, how often, and proposes moving static ones behind a broker (``credential_report``).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import create_model

from .approvals import ApprovalRequest
from .call_checks import (
    digest_of as arguments_digest,  # the digest the ledger's decision/tool_call records hold
)
from .clock import SystemClock
from .credential_report import credential_usage, render_credentials
from .errors import PolicyError, ScopegraphError
from .identity import SpiffeId
from .ledger import Ledger
from .policy import SCHEMA_FILE, CallRequest, CedarPolicyEngine, policy_sources
from .store import GrantRecord, Store, UseRecord
from .tools import Risk, Tool, ToolRegistry
from .trace_view import iso, number, tree_lines
from .workflow import Workflow

SLACK = 0.10  # share of a range's width that must go unused on a side before it is narrowed
MAX_COMBINATIONS = 1024  # argument combinations tried when matching a call's digest

_ProbeCase = tuple[dict[str, Any], str, bool]  # arguments, step id, whether the proposal must deny
_CEDAR_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_CEDAR_RESERVED = {"true", "false", "if", "then", "else", "in", "like", "has", "is", "__cedar"}


def build_report(store: Store, workflow: str | None = None, *, now: float | None = None,
                 workflows: Iterable[Workflow] = ()) -> dict[str, Any]:
    """The usage report over every run in ``store`` (only ``workflow``'s when given).

    ``workflows`` are definitions to check proposals against; a workflow not given is
    loaded from its latest run's target when that is importable. ``now`` judges approval
    expiry (default: the wall clock).
    """
    now = SystemClock().now() if now is None else now
    given = {w.name: w for w in workflows}
    runs = store.list_runs(workflow=workflow)
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    wanted = {r.run_id for r in runs}
    for rec in Ledger(store, clock=SystemClock()).records():
        if rec["run_id"] in wanted:
            records[rec["run_id"]].append(rec)
    approvals: dict[str, list[ApprovalRequest]] = defaultdict(list)
    for payload in store.list_approvals():
        a = ApprovalRequest.model_validate_json(payload)
        if a.run_id in wanted:
            approvals[a.run_id].append(a)

    by_workflow: dict[str, _WorkflowStats] = {}
    for run in runs:
        wf = by_workflow.setdefault(run.workflow, _WorkflowStats(name=run.workflow))
        wf.add_run(run.run_id, run.status, run.target, records[run.run_id],
                   store.grants_for_run(run.run_id), store.uses_for_run(run.run_id),
                   approvals[run.run_id], now)
    out = []
    for name in sorted(by_workflow):
        stats = by_workflow[name]
        checker = _Checker.for_workflow(name, given.get(name), stats.latest_target)
        entry = stats.to_dict(checker)
        entry["credentials"] = credential_usage(store, stats.runs, checker.definition)  # ephemeral vs static
        out.append(entry)
    return {
        "generated_at": now,
        "generated_at_iso": iso(now),
        "workflow_filter": workflow,
        "runs": len(runs),
        "slack": SLACK,
        "workflows": out,
    }


# gathering -------------------------------------------------------------------------------
@dataclass
class _Row:
    """One (step id, tool) of one workflow, over all runs."""

    step_id: str
    tool: str
    runs_planned: set[str] = field(default_factory=set)
    runs_executed: set[str] = field(default_factory=set)
    dependents: set[str] = field(default_factory=set)
    grants: list[dict[str, Any]] = field(default_factory=list)
    calls_ok: int = 0
    calls_error: int = 0
    denials: Counter[str] = field(default_factory=Counter)
    denials_total: int = 0
    denied_tools: Counter[str] = field(default_factory=Counter)
    escalations: Counter[str] = field(default_factory=Counter)
    escalations_total: int = 0
    approvals: Counter[str] = field(default_factory=Counter)
    ok_calls: list[dict[str, Any]] = field(default_factory=list)  # constraints, observed, digest


@dataclass
class _WorkflowStats:
    name: str
    runs: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    latest_target: str | None = None
    rows: dict[tuple[str, str], _Row] = field(default_factory=dict)

    def row(self, step_id: str, tool: str) -> _Row:
        return self.rows.setdefault((step_id, tool), _Row(step_id=step_id, tool=tool))

    def add_run(self, run_id: str, status: str, target: str, records: Sequence[Mapping[str, Any]],
                grants: Sequence[GrantRecord], uses: Sequence[UseRecord], approvals: Sequence[ApprovalRequest],
                now: float) -> None:
        self.runs.append(run_id)
        self.statuses[status] += 1
        self.latest_target = target
        planned: dict[str, str] = {}
        for rec in records:
            if rec["kind"] == "plan" and rec.get("valid"):
                for s in rec.get("steps") or []:
                    planned[s["id"]] = s["tool"]
                for s in rec.get("steps") or []:
                    self.row(s["id"], s["tool"]).runs_planned.add(run_id)
                    for dep in s.get("depends_on") or []:
                        self.row(dep, planned.get(dep, "?")).dependents.add(s["id"])
        minted = {rec["grant_id"]: rec for rec in records if rec["kind"] == "grant_minted"}
        by_grant: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for rec in records:
            if rec["kind"] in ("decision", "tool_call") and rec.get("grant_id"):
                by_grant[rec["grant_id"]].append(rec)
        ok_uses = {(u.jti, u.attempt): dict(u.observed) for u in uses if u.outcome == "ok"}
        for g in grants:
            row = self.row(_plan_step(g.step_id), planned.get(_plan_step(g.step_id), g.tool))
            row.runs_executed.add(run_id)
            events = by_grant.get(g.jti, [])
            calls = [e for e in events if e["kind"] == "tool_call"]
            ok = [e for e in calls if e.get("status") == "ok"]
            constraints = dict((minted.get(g.jti) or {}).get("constraints") or {})
            row.grants.append({"grant_id": g.jti, "run_id": run_id, "executions": len(calls),
                               "used": bool(ok), "uses": g.uses, "max_uses": g.max_uses,
                               "why_unused": None if ok else _why_unused(events)})
            row.calls_ok += len(ok)
            row.calls_error += len(calls) - len(ok)
            for e in ok:
                row.ok_calls.append({"constraints": constraints,
                                     "observed": ok_uses.get((g.jti, int(e.get("attempt") or 0)), {}),
                                     "digest": e.get("arguments_digest")})
        for rec in records:
            if rec["kind"] != "decision":
                continue
            step = _plan_step(rec.get("step_id", "?"))
            row = self.row(step, planned.get(step, rec.get("tool", "?")))
            ids = list(rec.get("policy_ids") or []) or ["(none)"]
            if rec.get("decision") == "deny":
                row.denials_total += 1
                row.denials.update(ids)
                row.denied_tools[rec.get("tool", "?")] += 1
            elif rec.get("decision") == "needs_approval":
                row.escalations_total += 1
                row.escalations.update(ids)
        for a in approvals:
            row = self.row(_plan_step(a.step_id), planned.get(_plan_step(a.step_id), a.tool))
            row.approvals["asked"] += 1
            state = a.effective_status(now)
            if a.status in ("approved", "consumed"):
                row.approvals["approved"] += 1
            for key in ("denied", "expired", "consumed", "pending"):
                if state == key:
                    row.approvals[key] += 1

    def to_dict(self, checker: _Checker) -> dict[str, Any]:
        steps, proposals = [], []
        for row in self.rows.values():  # in the order plans first named them
            steps.append(_row_dict(row))
            proposals.extend(_proposals(self.name, row, checker))
        return {
            "workflow": self.name,
            "runs": len(self.runs),
            "runs_by_status": dict(sorted(self.statuses.items())),
            "validation": checker.describe(),
            "steps": steps,
            "proposals": proposals,
        }


def _why_unused(events: Sequence[Mapping[str, Any]]) -> str:
    if any(e["kind"] == "decision" and e.get("decision") == "needs_approval" for e in events):
        return "approval_requested"
    if any(e["kind"] == "tool_call" for e in events):
        return "tool_failed"
    if any(e["kind"] == "decision" and e.get("decision") == "deny" for e in events):
        return "denied"
    return "no_call"


def _row_dict(row: _Row) -> dict[str, Any]:
    executions = Counter(g["executions"] for g in row.grants)
    unused = [g for g in row.grants if not g["used"]]
    return {
        "step_id": row.step_id,
        "tool": row.tool,
        "runs_planned": len(row.runs_planned),
        "runs_executed": len(row.runs_executed),
        "grants": {
            "minted": len(row.grants),
            "used": len(row.grants) - len(unused),
            "never_used": len(unused),
            "never_used_why": dict(sorted(Counter(g["why_unused"] for g in unused).items())),
            "never_used_ids": [{"grant_id": g["grant_id"], "run_id": g["run_id"], "why": g["why_unused"]}
                               for g in unused],
            "executions_per_grant": {str(k): executions[k] for k in sorted(executions)},
            "used_once": sum(1 for g in row.grants if g["executions"] == 1),
            "used_repeatedly": sum(1 for g in row.grants if g["executions"] > 1),
            "max_uses_granted": max((g["max_uses"] for g in row.grants), default=None),
            "max_uses_consumed": max((g["uses"] for g in row.grants), default=None),
        },
        "calls": {"ok": row.calls_ok, "error": row.calls_error},
        "denials": {"total": row.denials_total, "by_policy": dict(sorted(row.denials.items())),
                    "by_tool": dict(sorted(row.denied_tools.items()))},
        "escalations": {"total": row.escalations_total, "by_policy": dict(sorted(row.escalations.items()))},
        "approvals": {k: row.approvals[k] for k in ("asked", "approved", "denied", "expired", "consumed", "pending")},
    }


# proposals ---------------------------------------------------------------------------------
def _proposals(wf: str, row: _Row, checker: _Checker) -> list[dict[str, Any]]:
    if not row.grants:
        return []
    used = [g for g in row.grants if g["used"]]
    if not used:
        return [_remove_step(wf, row, checker)]
    found: list[dict[str, Any]] = []
    names = sorted({n for c in row.ok_calls for n in c["constraints"]})
    for name in names:
        kinds = {c["constraints"].get(name, {}).get("kind") for c in row.ok_calls}
        if kinds == {"range"}:
            found.extend(_narrow_range(wf, row, name, checker))
        elif kinds == {"one_of"}:
            found.extend(_narrow_one_of(wf, row, name, checker))
    return found


def _remove_step(wf: str, row: _Row, checker: _Checker) -> dict[str, Any]:
    why = Counter(g["why_unused"] for g in row.grants)
    runs = len(row.runs_executed)
    pid = f"proposed-{wf}-{row.step_id}-{row.tool}-unused"
    reason = (f"step {row.step_id} of workflow {wf} was granted {row.tool} {len(row.grants)} time(s) "
              f"in {runs} run(s) and never ran it successfully")
    cedar = _forbid(pid, reason, wf, row.step_id, row.tool, None)
    probes: list[_ProbeCase] = [({}, row.step_id, True), ({}, "probe-other-step", False)]
    return {
        "id": pid, "kind": "remove_step", "workflow": wf, "step_id": row.step_id, "tool": row.tool,
        "argument": None,
        "summary": f"remove step {row.step_id} ({row.tool}) from plans, or forbid {row.tool} in it",
        "evidence": {"grants_minted": len(row.grants), "runs": runs, "successful_calls": 0,
                     "unused_because": dict(sorted(why.items())),
                     "denials_by_policy": dict(sorted(row.denials.items()))},
        "plan_change": {"op": "remove_step", "step_id": row.step_id, "tool": row.tool,
                        "dependents": sorted(row.dependents)},
        "cedar": cedar,
        "validation": checker.check(pid, cedar, row.step_id, row.tool, None, None, probes),
    }


def _narrow_range(wf: str, row: _Row, name: str, checker: _Checker) -> list[dict[str, Any]]:
    values = [c["observed"][name] for c in row.ok_calls
              if isinstance(c["observed"].get(name), (int, float)) and not isinstance(c["observed"][name], bool)]
    if not values or len(values) < len(row.ok_calls):
        return []  # some successful calls did not record the value: the evidence is incomplete
    granted = [c["constraints"][name] for c in row.ok_calls]
    gmin = None if any(g.get("min") is None for g in granted) else min(g["min"] for g in granted)
    gmax = None if any(g.get("max") is None for g in granted) else max(g["max"] for g in granted)
    lo, hi = min(values), max(values)
    integral = all(isinstance(v, int) for v in values)
    span = None if gmin is None or gmax is None else gmax - gmin
    new_max = hi if gmax is None or (span is not None and gmax - hi >= SLACK * span) else None
    distinct = len(set(values))
    new_min = None
    if distinct >= 2:
        new_min = lo if gmin is None or (span is not None and lo - gmin >= SLACK * span) else None
    if new_max is None and new_min is None:
        return []
    pmin = new_min if new_min is not None else gmin
    pmax = new_max if new_max is not None else gmax
    if integral:
        pmin = None if pmin is None else math.floor(pmin)
        pmax = None if pmax is None else math.ceil(pmax)
    before = {"kind": "range", "min": _num(gmin), "max": _num(gmax)}
    after = {"kind": "range", "min": _num(pmin), "max": _num(pmax)}
    pid = f"proposed-{wf}-{row.step_id}-{name}-range"
    evidence = {"successful_calls": len(values), "runs": len(row.runs_executed),
                "observed_min": _num(lo), "observed_max": _num(hi), "distinct_values": distinct,
                "granted_min": _num(gmin), "granted_max": _num(gmax),
                "lower_bound_kept": new_min is None}
    cedar, note = None, None
    probes: list[_ProbeCase] = []
    if integral and checker.cedar_type(row.tool, name, "Long"):
        reason = (f"{row.tool}.{name} in step {row.step_id} stayed within {number(lo)}..{number(hi)} over "
                  f"{len(values)} successful call(s); granted {number(gmin, '-∞')}..{number(gmax, '∞')}")
        test = _ref(name)
        bounds = [f"{test} < {pmin}" if pmin is not None else None, f"{test} > {pmax}" if pmax is not None else None]
        cedar = _forbid(pid, reason, wf, row.step_id, row.tool,
                        f"context.arguments has {_attr(name)} && ({' || '.join(b for b in bounds if b)})")
        if pmax is not None:
            probes += [({name: pmax + 1}, row.step_id, True), ({name: pmax}, row.step_id, False)]
        if pmin is not None:
            probes += [({name: pmin - 1}, row.step_id, True), ({name: pmin}, row.step_id, False)]
    else:
        note = f"argument {name!r} is not an integer Cedar can compare: only the plan change narrows it"
    summary = (f"narrow {row.tool}.{name} in step {row.step_id} to "
               f"{number(after['min'], '-∞')}..{number(after['max'], '∞')}")
    return [{
        "id": pid, "kind": "argument_range", "workflow": wf, "step_id": row.step_id, "tool": row.tool,
        "argument": name, "summary": summary, "evidence": evidence,
        "plan_change": {"op": "narrow_constraint", "step_id": row.step_id, "argument": name,
                        "from": before, "to": after},
        "cedar": cedar,
        "validation": (checker.check(pid, cedar, row.step_id, row.tool, name, "Long", probes)
                       if cedar else {"status": "skipped", "detail": note}),
    }]


def _narrow_one_of(wf: str, row: _Row, name: str, checker: _Checker) -> list[dict[str, Any]]:
    granted: list[Any] = []
    for c in row.ok_calls:
        for v in c["constraints"][name].get("values") or []:
            if not any(_same(v, g) for g in granted):
                granted.append(v)
    used, how = _used_values(row, name)
    if used is None:
        return []
    kept = [v for v in granted if any(_same(v, u) for u in used)]
    dropped = [v for v in granted if not any(_same(v, u) for u in used)]
    if not dropped or not kept:
        return []
    before = {"kind": "one_of", "values": granted}
    after = {"kind": "one_of", "values": kept}
    pid = f"proposed-{wf}-{row.step_id}-{name}-one-of"
    kind = _cedar_kind(kept + dropped)
    cedar, note = None, None
    probes: list[_ProbeCase] = []
    if kind is not None and checker.cedar_type(row.tool, name, kind):
        reason = (f"{row.tool}.{name} in step {row.step_id} used only {_listing(kept)} over "
                  f"{len(row.ok_calls)} successful call(s); granted {_listing(granted)}")
        listed = ", ".join(_cedar_literal(v) for v in kept)
        cedar = _forbid(pid, reason, wf, row.step_id, row.tool,
                        f"context.arguments has {_attr(name)} && !([{listed}].contains({_ref(name)}))")
        probes = [({name: dropped[0]}, row.step_id, True), ({name: kept[0]}, row.step_id, False)]
    else:
        note = f"the values of {name!r} are not one Cedar type: only the plan change narrows it"
    return [{
        "id": pid, "kind": "one_of", "workflow": wf, "step_id": row.step_id, "tool": row.tool,
        "argument": name,
        "summary": f"narrow {row.tool}.{name} in step {row.step_id} to one of {json.dumps(kept)}",
        "evidence": {"successful_calls": len(row.ok_calls), "runs": len(row.runs_executed),
                     "used": kept, "never_used": dropped, "matched_by": how},
        "plan_change": {"op": "narrow_constraint", "step_id": row.step_id, "argument": name,
                        "from": before, "to": after},
        "cedar": cedar,
        "validation": (checker.check(pid, cedar, row.step_id, row.tool, name, kind, probes)
                       if cedar else {"status": "skipped", "detail": note}),
    }]


def _used_values(row: _Row, name: str) -> tuple[list[Any] | None, str]:
    """The values of ``name`` in successful calls, or ``None`` if any call's value is unknown.

    Numbers and booleans are in the use records. Strings are not: they are recovered by
    matching the ledger's argument digest against the combinations the grant allowed.
    """
    used: list[Any] = []
    how = "use records"
    for call in row.ok_calls:
        value = call["observed"].get(name, _MISSING)
        if value is _MISSING:
            value = _match_digest(call, name)
            how = "argument digests"
        if value is _MISSING:
            return None, how
        used.append(value)
    return used, how


_MISSING = object()


def _match_digest(call: Mapping[str, Any], name: str) -> Any:
    options: list[tuple[str, list[Any]]] = []
    for arg, c in sorted(call["constraints"].items()):
        if c.get("kind") == "exact":
            options.append((arg, [c.get("value")]))
        elif c.get("kind") == "one_of":
            options.append((arg, list(c.get("values") or [])))
        elif arg in call["observed"]:
            options.append((arg, [call["observed"][arg]]))
        else:
            return _MISSING  # a free-text argument: the call cannot be reconstructed
    for arg, value in call["observed"].items():  # defaults the executor did not pass
        if arg not in call["constraints"]:
            options.append((arg, [value]))
    if math.prod(len(vals) for _, vals in options) > MAX_COMBINATIONS:
        return _MISSING
    names = [a for a, _ in options]
    for combo in itertools.product(*(vals for _, vals in options)):
        args = dict(zip(names, combo, strict=True))
        if arguments_digest(args) == call["digest"]:
            return args.get(name, _MISSING)
    return _MISSING


def _plan_step(step_id: str) -> str:
    """The plan step a task belongs to: an iteration ``send[2]`` counts for ``send``."""
    return _ITERATION.sub("", step_id)


_ITERATION = re.compile(r"\[\d+\]\Z")


# Cedar text ----------------------------------------------------------------------------------
def _forbid(pid: str, reason: str, wf: str, step_id: str, tool: str, condition: str | None) -> str:
    parts = [f"context.workflow == {_cedar_string(wf)}", f"context.step_id == {_cedar_string(step_id)}"]
    if condition:
        parts.append(condition)
    return (f"@id({_cedar_string(pid)})\n@reason({_cedar_string(reason)})\n"
            f"forbid (principal, action == Scopegraph::Action::\"call\", "
            f"resource == Scopegraph::Tool::{_cedar_string(tool)})\n"
            f"when {{ {' && '.join(parts)} }};\n")


def _attr(name: str) -> str:
    return name if _CEDAR_IDENT.match(name) and name not in _CEDAR_RESERVED else _cedar_string(name)


def _ref(name: str) -> str:
    return (f"context.arguments.{name}" if _CEDAR_IDENT.match(name) and name not in _CEDAR_RESERVED
            else f"context.arguments[{_cedar_string(name)}]")


def _cedar_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _cedar_kind(values: Sequence[Any]) -> str | None:
    if all(isinstance(v, bool) for v in values):
        return "Bool"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "Long"
    if all(isinstance(v, str) for v in values):
        return "String"
    return None


def _cedar_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _cedar_string(str(value))


# checking proposals ------------------------------------------------------------------------
_PY_TYPES = {"Long": int, "String": str, "Bool": bool}
_JSON_TYPES = {"Long": "integer", "String": "string", "Bool": "boolean"}


class _Checker:
    """Validates proposed policies against one workflow's schema, tools and policies."""

    def __init__(self, workflow: str, *, definition: Workflow | None, problem: str | None,
                 source: str | None) -> None:
        self.workflow = workflow
        self.definition = definition
        self.problem = problem
        self.source = source

    @classmethod
    def for_workflow(cls, name: str, given: Workflow | None, target: str | None) -> _Checker:
        if given is not None:
            return cls(name, definition=given, problem=None, source="given")
        if not target or ":" not in target:
            return cls(name, definition=None, source=target,
                       problem=f"its runs name no importable target (target {target!r})")
        from .loader import (
            load_workflow,  # imports user code: only when a report needs it
        )

        try:
            loaded = load_workflow(target)
        except Exception as exc:  # any import failure only limits validation
            return cls(name, definition=None, source=target, problem=f"loading {target!r} failed: {exc}")
        if loaded.name != name:
            return cls(name, definition=None, source=target,
                       problem=f"{target!r} now defines workflow {loaded.name!r}, not {name!r}")
        return cls(name, definition=loaded, problem=None, source=target)

    def describe(self) -> dict[str, Any]:
        if self.definition is not None:
            return {"status": "loaded", "source": self.source, "detail": None}
        return {"status": "unavailable", "source": self.source,
                "detail": f"workflow {self.workflow!r} could not be loaded: {self.problem}"}

    def cedar_type(self, tool: str, argument: str, kind: str) -> bool:
        """Whether the workflow's tool types ``argument`` as ``kind`` (unknown: assume so)."""
        if self.definition is None:
            return True
        registry = self.definition.registry
        if tool not in registry:
            return False
        spec = registry[tool].json_schema().get("properties", {}).get(argument, {})
        return bool(spec.get("type") == _JSON_TYPES[kind])

    def check(self, pid: str, cedar: str, step_id: str, tool: str, argument: str | None,
              kind: str | None, probes: Sequence[_ProbeCase]) -> dict[str, Any]:
        if self.definition is None:
            registry = _probe_registry(tool, argument, kind if argument else None)
            if argument is not None:
                try:
                    CedarPolicyEngine([("proposed.cedar", cedar)], _schema_text(None), registry)
                except ScopegraphError as exc:
                    return {"status": "invalid", "detail": str(exc)}
                return {"status": "skipped", "detail": (
                    "parsed only, not type-checked: the workflow's argument types are unknown "
                    "because it could not be loaded")}
            existing: list[tuple[str, str]] = []
            schema_path = None
        else:
            registry = self.definition.registry
            schema_path = self.definition.schema
            try:
                existing = policy_sources(self.definition.policies, baseline=self.definition.baseline)
            except (OSError, PolicyError):
                existing = []  # checked alone: the @id may still clash with an unreadable file
        try:
            CedarPolicyEngine([*existing, ("proposed.cedar", cedar)], _schema_text(schema_path), registry)
            alone = CedarPolicyEngine([("proposed.cedar", cedar)], _schema_text(schema_path), registry)
        except ScopegraphError as exc:
            return {"status": "invalid", "detail": str(exc)}
        for arguments, step, should_fire in probes:
            fired = pid in _probe(alone, self.workflow, step, registry[tool], arguments)
            if fired != should_fire:
                verb = "does not deny" if should_fire else "also denies"
                return {"status": "invalid", "detail": f"the policy {verb} {tool}({json.dumps(arguments)}) "
                                                       f"in step {step!r}"}
        if self.definition is None:
            against = "the shipped schema"
        elif existing:
            against = "the schema, the workflow's tools and its policies"
        else:
            against = "the schema and the workflow's tools"
        return {"status": "valid", "detail": f"checked against {against}, and by {len(probes)} probe call(s)"}


def _probe(engine: CedarPolicyEngine, workflow: str, step_id: str, tool: Tool,
           arguments: Mapping[str, Any]) -> tuple[str, ...]:
    principal = SpiffeId.parse(f"spiffe://report.invalid/wf/{workflow}/run/probe/step/{step_id}/executor")
    decision = engine.decide(CallRequest(principal=principal, role="executor", workflow=workflow,
                                         run_id="probe", step_id=step_id, tool=tool, arguments=arguments))
    return decision.policy_ids


def _probe_registry(tool: str, argument: str | None, kind: str | None) -> ToolRegistry:
    fields: dict[str, Any] = {}
    if argument is not None and kind is not None:
        fields[argument] = (_PY_TYPES[kind], ...)
    model = create_model("probe_arguments", **fields)
    return ToolRegistry([Tool(name=tool, description="", risk=Risk.READ, labels=frozenset(),
                              args_model=model, fn=lambda **_: None, is_async=False)])


def _schema_text(path: str | Path | None) -> str:
    if path is not None:
        return Path(path).read_text()
    return resources.files("scopegraph.policies").joinpath(SCHEMA_FILE).read_text()


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (
        isinstance(a, (int, float)) and isinstance(b, (int, float))
        and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _num(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# rendering ---------------------------------------------------------------------------------
def render_report(report: Mapping[str, Any]) -> str:
    """Draw a ``build_report`` dict for a terminal: one tree per workflow, then the proposals."""
    scope = f"workflow {report['workflow_filter']}" if report["workflow_filter"] else "all workflows"
    lines = [f"usage report  {scope}  {report['runs']} run(s)  generated {report['generated_at_iso']}"]
    if not report["workflows"]:
        lines.append("no runs in the store")
    for wf in report["workflows"]:
        statuses = ", ".join(f"{n} {s}" for s, n in wf["runs_by_status"].items())
        lines.append("")
        lines.extend(tree_lines((f"workflow {wf['workflow']}  {wf['runs']} run(s): {statuses}",
                                 [_render_row(s) for s in wf["steps"]])))
        lines.append("")
        lines.extend(_render_proposals(wf))
        lines.extend(render_credentials(wf["credentials"], wf["workflow"]))
    return "\n".join(lines)


def _render_row(s: Mapping[str, Any]) -> tuple[str, list[Any]]:
    g = s["grants"]
    kids: list[Any] = []
    never = f"never used {g['never_used']}"
    if g["never_used_why"]:
        never += " (" + ", ".join(f"{why} {n}" for why, n in g["never_used_why"].items()) + ")"
    kids.append((f"grants     minted {g['minted']}  used {g['used']}  {never}", []))
    if g["minted"]:
        dist = ", ".join(f"{k}× under {n}" for k, n in g["executions_per_grant"].items())
        kids.append((f"uses       once {g['used_once']}  repeated {g['used_repeatedly']}  "
                     f"(tool ran {dist} grant(s); at most {g['max_uses_consumed']} of "
                     f"{g['max_uses_granted']} allowed uses taken)", []))
    kids.append((f"calls      ok {s['calls']['ok']}  error {s['calls']['error']}", []))
    d = s["denials"]
    if d["total"]:
        by = ", ".join(f"{pid} {n}" for pid, n in d["by_policy"].items())
        tools = ", ".join(f"{t} {n}" for t, n in d["by_tool"].items())
        kids.append((f"denials    {d['total']}  by policy: {by}  by tool asked: {tools}", []))
    else:
        kids.append(("denials    none", []))
    e = s["escalations"]
    if e["total"]:
        kids.append((f"escalated  {e['total']}  " + ", ".join(f"{p} {n}" for p, n in e["by_policy"].items()), []))
    a = s["approvals"]
    if a["asked"]:
        kids.append((f"approvals  asked {a['asked']}  approved {a['approved']}  denied {a['denied']}  "
                     f"expired {a['expired']}  consumed {a['consumed']}  pending {a['pending']}", []))
    else:
        kids.append(("approvals  none asked", []))
    runs = f"planned in {s['runs_planned']} run(s), ran in {s['runs_executed']}"
    return (f"step {s['step_id']}  {s['tool']}  ({runs})", kids)


def _render_proposals(wf: Mapping[str, Any]) -> list[str]:
    proposals = wf["proposals"]
    if not proposals:
        return [f"proposed narrowing for {wf['workflow']}: none; every grant was used within its scope"]
    lines = [f"proposed narrowing for {wf['workflow']} (review before applying; nothing is changed):"]
    if wf["validation"]["status"] != "loaded":
        lines.append(f"  note: {wf['validation']['detail']}")
    for i, p in enumerate(proposals, 1):
        lines.append(f"  {i}. {p['summary']}")
        lines.append(f"     evidence  {_evidence(p)}")
        change = p["plan_change"]
        if change["op"] == "remove_step":
            deps = change["dependents"]
            after = f"; update steps that depend on it: {', '.join(deps)}" if deps else ""
            lines.append(f"     plan      remove step {change['step_id']!r}{after}")
        else:
            lines.append(f"     plan      step {change['step_id']!r} argument {change['argument']!r}: "
                         f"{json.dumps(change['from'])} → {json.dumps(change['to'])}")
        v = p["validation"]
        lines.append(f"     cedar     {v['status']}: {v['detail']}")
        if p["cedar"]:
            lines.extend("       " + line for line in p["cedar"].rstrip("\n").splitlines())
    return lines


def _evidence(p: Mapping[str, Any]) -> str:
    e = p["evidence"]
    if p["kind"] == "remove_step":
        why = ", ".join(f"{k} {n}" for k, n in e["unused_because"].items())
        return f"{e['grants_minted']} grant(s) in {e['runs']} run(s), 0 successful calls ({why})"
    if p["kind"] == "argument_range":
        kept = "; lower bound kept (one value seen)" if e["lower_bound_kept"] and e["distinct_values"] < 2 else ""
        return (f"{e['successful_calls']} successful call(s) in {e['runs']} run(s); observed "
                f"{number(e['observed_min'])}..{number(e['observed_max'])} ({e['distinct_values']} distinct); "
                f"granted {number(e['granted_min'], '-∞')}..{number(e['granted_max'], '∞')}{kept}")
    return (f"{e['successful_calls']} successful call(s) in {e['runs']} run(s); used {json.dumps(e['used'])}, "
            f"never {json.dumps(e['never_used'])} (matched by {e['matched_by']})")
