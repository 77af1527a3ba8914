"""Policy-as-code: Cedar decisions on every tool call.

This is the only module that imports ``cedarpy``; its types never leave it. Policy
files are parsed and validated against the schema once, at load; an invalid file stops
the load with an error naming the problem and where it is (``file:line:column``). Each
decision evaluates the cached policy set against a request built from the call, the
grant and the run.

Three outcomes: ``allow``; ``deny``; ``needs_approval`` when every policy that denied
is an ``@escalate`` forbid and the same request with an approval would be allowed. An
escalating forbid may say ``@approvals("2")`` to require two distinct approvers (its
``unless`` clause should then test ``context.approval_count >= 2``).
Cedar evaluation errors fail closed: the call is denied.

The context carries each argument's role (``destination``, ``content``, ``secret``) with
its provenance. A call whose string arguments change under Unicode NFKC normalisation
is decided twice, as given and normalised; if the two decisions differ it is denied.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import cedarpy

from . import policy_text
from .errors import PolicyError
from .identity import SpiffeId
from .provenance import FIXED_SOURCES, Origin
from .tools import Tool, ToolRegistry

Outcome = Literal["allow", "deny", "needs_approval"]
DEFAULT_DENY_ID = "default-deny"
UNICODE_POLICY_ID = "scopegraph:unicode"  # decided differently once normalised: denied
SCHEMA_FILE = "schema.cedarschema"
BASELINE_FILE = "baseline.cedar"


@dataclass(frozen=True, kw_only=True)
class Decision:
    """The answer to one call: outcome, why, and which policies decided."""

    outcome: Outcome
    reasons: tuple[str, ...] = ()
    policy_ids: tuple[str, ...] = ()
    required_approvals: int = 0  # distinct approvers a ``needs_approval`` call needs

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"

    @classmethod
    def deny(cls, reason: str, *policy_ids: str) -> Decision:
        return cls(outcome="deny", reasons=(reason,), policy_ids=policy_ids)


@dataclass(frozen=True, kw_only=True)
class CallRequest:
    """The facts a decision is made on."""

    principal: SpiffeId
    role: str
    workflow: str
    run_id: str
    step_id: str
    tool: Tool
    arguments: Mapping[str, Any]
    data_labels: frozenset[str] = frozenset()
    in_plan: bool = True
    attempt: int = 1
    approved: bool = False
    approval_count: int = 0
    # Where each argument came from (see ``provenance``); an argument missing here is
    # treated as chosen by the executor from everything the run has read.
    provenance: Mapping[str, Origin] = field(default_factory=dict)
    widened: bool = False  # the step was added or loosened by a re-plan
    extra: Mapping[str, Any] = field(default_factory=dict)


class PolicyEngine(Protocol):
    """Decides calls. ``version`` changes whenever the policies or schema change."""

    version: str

    def decide(self, request: CallRequest) -> Decision: ...


@dataclass(frozen=True)
class _PolicyMeta:
    id: str
    escalate: bool
    reason: str
    approvals: int  # from @approvals("N") on an @escalate forbid; default 1


class CedarPolicyEngine:
    """A ``PolicyEngine`` over Cedar policy files, validated against the schema."""

    def __init__(self, sources: Sequence[tuple[str, str]], schema_text: str, tools: ToolRegistry) -> None:
        """``sources`` are ``(file name, Cedar text)`` pairs; names appear in errors."""
        self._argument_types, self._conflicts = _argument_types(tools)
        self._argument_names = sorted({a for name in tools for a in tools[name].argument_names()})
        self.schema_text = schema_text + "\n" + _arguments_schema(self._argument_types, self._argument_names)
        try:
            self._schema = cedarpy.Schema.from_str(self.schema_text)
        except ValueError as exc:
            raise PolicyError(f"invalid Cedar schema: {_first_line(exc)}") from None
        seen: dict[str, str] = {}
        for name, text in sources:
            try:
                parsed = cedarpy.PolicySet.from_str(text)
            except ValueError as exc:
                message = _first_line(exc)
                at = policy_text.syntax_error_offset(text, message, _parse_error)
                raise PolicyError(f"invalid policy file {_at(name, text, at)}: {message}") from None
            statements = policy_text.statements(text)
            result = cedarpy.validate_policies(text, self._schema)
            if not result.validation_passed:
                first = result.errors[0]
                pid = result.id_annotations_by_policy_id.get(first.policy_id, first.policy_id)
                message = _VALIDATOR_PREFIX.sub("", _first_line(first.error))
                statement = _statement(statements, first.policy_id)
                at = policy_text.fragment_offset(statement, message) if statement else 0
                raise PolicyError(f"invalid policy file {_at(name, text, at)}: policy {pid!r}: {message}")
            for positional, node in parsed.to_pst().static_policies.items():
                statement = _statement(statements, positional)
                start = statement[0].start if statement else 0
                pid = node.annotations.get("id")
                if not pid:
                    raise PolicyError(f"invalid policy file {_at(name, text, start)}: "
                                      "every policy needs an @id annotation")
                for arg in sorted(_argument_references(node) - set(self._argument_types)):
                    # Cedar would type ``context.arguments has X`` as false and the policy
                    # would silently never apply: refuse it instead.
                    why = (f"tools disagree on its type ({self._conflicts[arg]})" if arg in self._conflicts
                           else "no tool of the workflow takes it with a type Cedar can check")
                    at = _argument_offset(statement, arg) if statement else start
                    raise PolicyError(f"invalid policy file {_at(name, text, at)}: policy {pid!r} tests argument "
                                      f"{arg!r}, but {why}")
                if pid in seen:
                    hint = (" (the shipped baseline is included unless baseline=False)"
                            if seen[pid] == BASELINE_FILE else "")
                    raise PolicyError(f"invalid policy file {_at(name, text, start)}: @id {pid!r} is also "
                                      f"used in {seen[pid]!r}{hint}")
                seen[pid] = name
        if not sources:
            raise PolicyError("no policy files given")
        combined = "\n".join(text for _, text in sources)
        self._policies = cedarpy.PolicySet.from_str(combined)
        self._meta: dict[str, _PolicyMeta] = {}
        tree = self._policies.to_pst()  # the combined set's syntax tree, read once for all below
        for positional, node in tree.static_policies.items():
            ann = node.annotations
            try:
                approvals = int(ann.get("approvals") or 1)
            except ValueError:
                approvals = 0
            if approvals < 1:
                raise PolicyError(f"policy {ann['id']!r}: @approvals must be a whole number of at least 1")
            self._meta[positional] = _PolicyMeta(
                id=ann["id"], escalate="escalate" in ann, reason=ann.get("reason") or ann["id"],
                approvals=approvals,
            )
        digest = hashlib.sha256(self.schema_text.encode())
        for name, text in sorted(sources):
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        self.version = digest.hexdigest()[:16]
        self.files = tuple(name for name, _ in sources)
        self._tool_entities: dict[str, cedarpy.Entities] = {}
        # What the policies read, found once: a request carries only that (Cedar parses
        # every context attribute it is given, used or not). ``None``: everything.
        nodes = list(tree.static_policies.values())
        self._context_keys = _attributes_read(nodes, "context")
        self._principal_keys = _attributes_read(nodes, "principal")
        self._reads_principal = self._principal_keys != frozenset()
        # Cedar's answer is a function of the request alone (no clock, no randomness, the
        # policies fixed for the engine's life): a request made again is answered from
        # here. Made again means the same tool, context and principal attributes read,
        # which is all a request holds only while no policy can tell one principal from
        # another by its id (``principal == …``, ``principal in …``, in the head or a
        # condition): with such a policy nothing is kept.
        self._repeatable = self._principal_keys is not None and not tree.templates and all(
            type(node.principal).__name__ in ("ScopeAny", "ScopeIs") for node in nodes)
        self._answers: dict[tuple[Any, ...], _Evaluation] = {}
        keys = self._context_keys
        self._context_fields = tuple((k, f) for k, f in _CONTEXT_FIELDS.items() if keys is None or k in keys)
        self._reads_provenance = keys is None or not keys.isdisjoint(_PROVENANCE_KEYS)
        self._entities: OrderedDict[tuple[str, ...], cedarpy.Entities] = OrderedDict()
        self._named: dict[tuple[str, ...], tuple[tuple[_PolicyMeta, ...], tuple[str, ...], tuple[str, ...]]] = {}

    @classmethod
    def from_paths(
        cls, paths: Iterable[str | Path] | None, tools: ToolRegistry, *, schema: str | Path | None = None,
        baseline: bool = False,
    ) -> CedarPolicyEngine:
        """Load ``*.cedar`` files from files or directories; ``None`` means the baseline alone.

        With ``baseline``, the shipped baseline comes first and ``paths`` add to it (see
        :func:`policy_sources`).

        Raises:
            PolicyError: a file is missing, unreadable, unparsable or fails validation.
        """
        sources = policy_sources(paths, baseline=baseline)
        if schema is not None:
            schema_text = _read(Path(schema))
        else:
            schema_text = resources.files("scopegraph.policies").joinpath(SCHEMA_FILE).read_text()
        return cls(sources, schema_text, tools)

    def decide(self, request: CallRequest) -> Decision:
        decision = self._decide(request)
        normal = _nfkc_arguments(request.arguments)
        if normal is None:
            return decision
        # A value that means one thing to policy and another once a tool or server
        # normalises it (full-width "．．", "＠") must not get the kinder of two decisions.
        again = self._decide(replace(request, arguments=normal))
        if (again.outcome, again.policy_ids) != (decision.outcome, decision.policy_ids):
            return Decision.deny("an argument is decided differently once Unicode-normalised (NFKC)",
                                 UNICODE_POLICY_ID)
        return decision

    def _decide(self, request: CallRequest) -> Decision:
        first = self._evaluate(request, approved=request.approved, approval_count=request.approval_count)
        if first.outcome != "deny" or request.approved or not first.escalations:
            return first.decision
        # Every denier is an @escalate forbid: would an approval by enough people lift them?
        second = self._evaluate(request, approved=True, approval_count=first.required_approvals)
        if second.outcome == "allow":
            return Decision(outcome="needs_approval", reasons=first.decision.reasons,
                            policy_ids=first.decision.policy_ids,
                            required_approvals=first.required_approvals)
        return second.decision

    # internals -------------------------------------------------------------------
    def _evaluate(self, request: CallRequest, *, approved: bool, approval_count: int) -> _Evaluation:
        try:
            context = self._context(request, approved, approval_count)
        except _Unrepresentable as exc:
            return _Evaluation.deny(str(exc), "policy-error")
        # As text: cedarpy would ``json.dumps`` a dict (and copy the request) per call; the
        # encoder here is made once and writes the same text.
        context_text = _context_json(context)
        key = (request.tool.name, context_text, *self._principal_attributes(request)) \
            if self._repeatable and self._keeps(request, context, context_text) else None
        if key is not None and (known := self._answers.get(key)) is not None:
            return known
        cedar_request = {
            "principal": {"type": "Scopegraph::Agent", "id": str(request.principal)},
            "action": {"type": "Scopegraph::Action", "id": "call"},
            "resource": {"type": "Scopegraph::Tool", "id": request.tool.name},
            "context": context_text,
        }
        try:
            result = cedarpy.is_authorized(cedar_request, self._policies, self._entities_for(request))
        except Exception as exc:  # cedarpy raises bare exceptions on malformed input
            return _Evaluation.deny(f"policy evaluation failed ({type(exc).__name__}); denied to fail closed",
                                    "policy-error")
        evaluation = self._evaluation(result)
        if key is not None:
            if len(self._answers) >= _ANSWERS_KEPT:
                self._answers.clear()  # a plain dict cleared when full: safe for parallel steps
            self._answers[key] = evaluation
        return evaluation

    @staticmethod
    def _keeps(request: CallRequest, context: Mapping[str, Any], text: str) -> bool:
        """Whether an answer to this request may be kept: not one whose context holds a
        secret argument's value (it would outlive its step here), nor a large one."""
        if len(text) > _ANSWER_CONTEXT_CHARS:
            return False
        arguments = context.get("arguments")
        return not (arguments and request.tool.secrets and not request.tool.secrets.isdisjoint(arguments))

    def _evaluation(self, result: Any) -> _Evaluation:
        """Cedar's result as an outcome, with the policies that made it."""
        diag = result.diagnostics
        if diag.errors:
            # Cedar's message quotes the values it was evaluating, which may be secret
            # arguments: name the failing policy only.
            return _Evaluation.deny(f"policy {self._policy_in(diag.errors[0])!r} failed to evaluate; "
                                    "denied to fail closed", "policy-error")
        found = tuple(diag.reasons)
        metas, ids, reasons = self._named.get(found) or self._names(found)
        if result.allowed:
            return _Evaluation(Decision(outcome="allow", reasons=reasons, policy_ids=ids), False, 0)
        if not metas:
            return _Evaluation.deny("no policy permits this call", DEFAULT_DENY_ID)
        escalations = all(m.escalate for m in metas)
        return _Evaluation(Decision(outcome="deny", reasons=reasons, policy_ids=ids), escalations,
                           max(m.approvals for m in metas))

    def _names(self, found: tuple[str, ...]) -> tuple[tuple[_PolicyMeta, ...], tuple[str, ...], tuple[str, ...]]:
        """The policies Cedar gave as reasons, their ids and their reasons: worked out once
        per set of reasons (the policies are fixed for the engine's life)."""
        # Cedar lists its reasons in no fixed order: sort, so one decision has one name.
        metas = tuple(sorted((self._meta[p] for p in found if p in self._meta), key=lambda m: m.id))
        named = metas, tuple(m.id for m in metas), tuple(m.reason for m in metas)
        if len(self._named) < _NAMES_KEPT:
            self._named[found] = named
        return named

    def _policy_in(self, error: str) -> str:
        match = re.search(r"policy `([^`]+)`", error)
        if match and match.group(1) in self._meta:
            return self._meta[match.group(1)].id
        return "unknown"

    def _context(self, request: CallRequest, approved: bool, approval_count: int) -> dict[str, Any]:
        keys = self._context_keys
        # Checked whether or not a policy reads them: a value Cedar cannot hold denies the call.
        arguments = self._cedar_arguments(request.arguments)
        context = {k: f(request, approved, approval_count, arguments) for k, f in self._context_fields}
        if self._reads_provenance:
            context.update(_provenance_fields(request, keys))
        if request.extra:
            context.update((k, v) for k, v in request.extra.items() if keys is None or k in keys)
        return context

    def _cedar_arguments(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The typed arguments Cedar sees.

        Raises:
            _Unrepresentable: a typed argument's value cannot be given to Cedar (a number
                beyond 64 bits, say). Leaving it out would let ``has`` checks pass it by.
        """
        out: dict[str, Any] = {}
        for name, value in arguments.items():
            kind = self._argument_types.get(name)
            if kind is None or value is None:
                continue
            if kind == "String" and isinstance(value, str):
                out[name] = value
            elif kind == "Long" and isinstance(value, int) and not isinstance(value, bool) \
                    and -(2**63) <= value < 2**63:
                out[name] = value
            elif kind == "Bool" and isinstance(value, bool):
                out[name] = value
            elif kind == "Set<String>" and isinstance(value, (list, tuple, set, frozenset)) \
                    and all(isinstance(v, str) for v in value):
                out[name] = sorted(value)
            else:
                raise _Unrepresentable(f"argument {name!r} has a value policy cannot evaluate as {kind}")
        return out

    def _principal_entity(self, request: CallRequest) -> dict[str, Any]:
        attrs = {"role": request.role, "workflow": request.workflow,
                 "run_id": request.run_id, "step_id": request.step_id}
        keys = self._principal_keys
        return {
            "uid": {"type": "Scopegraph::Agent", "id": str(request.principal)},
            "attrs": attrs if keys is None else {k: v for k, v in attrs.items() if k in keys},
            "parents": [],
        }

    def _principal_attributes(self, request: CallRequest) -> tuple[str, ...]:
        """The principal's attributes the policies read, in a fixed order (see ``_repeatable``)."""
        keys = self._principal_keys or frozenset()
        return tuple(v if k in keys else "" for k, v in (
            ("role", request.role), ("workflow", request.workflow), ("run_id", request.run_id),
            ("step_id", request.step_id)))

    def _entities_for(self, request: CallRequest) -> cedarpy.Entities:
        """The tool's entity and, if a policy reads the principal, the principal's: parsed
        once per tool, and once per principal while it keeps calling (a few kept)."""
        tool_entities = self._tool_entities_handle(request.tool)
        if not self._reads_principal:
            return tool_entities
        key = (request.tool.name, str(request.principal), request.role, request.workflow, request.run_id,
               request.step_id)
        cached = self._entities.get(key)
        if cached is None:
            cached = tool_entities.with_added_json_str(json.dumps([self._principal_entity(request)]))
            self._entities[key] = cached
            while len(self._entities) > _ENTITIES_KEPT:
                self._entities.popitem(last=False)
        return cached

    def _tool_entities_handle(self, tool: Tool) -> cedarpy.Entities:
        cached = self._tool_entities.get(tool.name)
        if cached is None:
            cached = cedarpy.Entities.from_json_str(json.dumps([{
                "uid": {"type": "Scopegraph::Tool", "id": tool.name},
                "attrs": {"risk": tool.risk.value, "labels": sorted(tool.labels),
                          "accepts_confidential": tool.accepts_confidential},
                "parents": [],
            }]))
            self._tool_entities[tool.name] = cached
        return cached


def policy_sources(paths: Iterable[str | Path] | None, *, baseline: bool = False) -> list[tuple[str, str]]:
    """The ``(file name, Cedar text)`` pairs a policy set is made of.

    ``paths`` are ``.cedar`` files or directories of them. ``None`` is the shipped
    baseline alone; with ``baseline``, the baseline comes first and ``paths`` add to it.
    Naming the shipped baseline file in ``paths`` as well does not load it twice.

    Raises:
        PolicyError: a file is missing, unreadable or not text, or a directory has no ``.cedar`` files.
    """
    sources: list[tuple[str, str]] = []
    for p in map(Path, paths or ()):
        if p.is_dir():
            files = sorted(p.glob("*.cedar"))
            if not files:
                raise PolicyError(f"policy directory {str(p)!r} has no .cedar files")
            sources.extend((str(f), _read(f)) for f in files)
        else:
            sources.append((str(p), _read(p)))
    if (paths is None or baseline) and not any(_is_shipped_baseline(name) for name, _ in sources):
        shipped = resources.files("scopegraph.policies").joinpath(BASELINE_FILE).read_text()
        sources.insert(0, (BASELINE_FILE, shipped))
    return sources


def _is_shipped_baseline(name: str) -> bool:
    shipped = resources.files("scopegraph.policies").joinpath(BASELINE_FILE)
    try:
        return Path(name).samefile(str(shipped))
    except OSError:
        return False


# where in a file a problem is ----------------------------------------------------------------
_VALIDATOR_PREFIX = re.compile(r"^for policy `[^`]*`, ")


def _at(name: str, text: str, offset: int) -> str:
    """``file:line:column`` of ``offset`` in the file ``name`` holding ``text``."""
    return f"{name}:{policy_text.where(text, offset)}"


def _parse_error(text: str) -> str | None:
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return _first_line(exc)
    return None


def _statement(statements: list[list[policy_text.Token]], positional: str) -> list[policy_text.Token] | None:
    """The tokens of Cedar's ``policyN``: the N-th statement of its file."""
    match = re.fullmatch(r"policy(\d+)", positional)
    if match and int(match.group(1)) < len(statements):
        return statements[int(match.group(1))]
    return None


def _argument_offset(statement: list[policy_text.Token], argument: str) -> int:
    for fragment in (f"arguments.{argument}", f"arguments has {argument}", argument):
        found = policy_text.find_sequence(statement, fragment)
        if found is not None:
            return found
    return statement[0].start


class _Unrepresentable(Exception):
    pass


@dataclass(frozen=True)
class _Evaluation:
    decision: Decision
    escalations: bool
    required_approvals: int

    @property
    def outcome(self) -> Outcome:
        return self.decision.outcome

    @classmethod
    def deny(cls, reason: str, policy_id: str) -> _Evaluation:
        return cls(Decision.deny(reason, policy_id), False, 0)


_CEDAR_TYPES = {"string": "String", "integer": "Long", "boolean": "Bool"}


def _argument_types(tools: ToolRegistry) -> tuple[dict[str, str], dict[str, str]]:
    """Map each argument name to the Cedar type all tools agree on.

    Returns the agreed types and, for names the tools disagree on, a description of
    the conflict; those names are left out of the schema (policies may not test them).
    """
    seen: dict[str, dict[str, str | None]] = {}
    for name in tools:
        props = tools[name].json_schema().get("properties", {})
        for arg, spec in props.items():
            seen.setdefault(arg, {})[name] = _cedar_type(spec)
    types: dict[str, str] = {}
    conflicts: dict[str, str] = {}
    for arg, by_tool in seen.items():
        kinds = set(by_tool.values())
        if len(kinds) == 1 and None not in kinds:
            types[arg] = kinds.pop()  # type: ignore[assignment]
        elif len(kinds) > 1:
            conflicts[arg] = ", ".join(f"{t}: {k or 'untyped'}" for t, k in sorted(by_tool.items()))
    return types, conflicts


_ENTITIES_KEPT = 64
_NAMES_KEPT = 256  # sets of reasons named once each; past that, named per decision
_ANSWERS_KEPT = 1024  # requests answered, kept to answer the same request again
_ANSWER_CONTEXT_CHARS = 4096  # a request with a longer context is answered, not kept
# The context attributes of every call, from (request, approved, approval_count, the typed
# arguments); an engine keeps those its policies read.
_CONTEXT_FIELDS: dict[str, Callable[[CallRequest, bool, int, dict[str, Any]], Any]] = {
    "widened": lambda r, a, n, args: r.widened,
    "tool": lambda r, a, n, args: r.tool.name,
    "risk": lambda r, a, n, args: r.tool.risk.value,
    "role": lambda r, a, n, args: r.role,
    "principal_id": lambda r, a, n, args: str(r.principal),
    "workflow": lambda r, a, n, args: r.workflow,
    "run_id": lambda r, a, n, args: r.run_id,
    "step_id": lambda r, a, n, args: r.step_id,
    "arguments": lambda r, a, n, args: args,
    "argument_names": lambda r, a, n, args: sorted(r.arguments),
    "data_labels": lambda r, a, n, args: sorted(r.data_labels),
    "in_plan": lambda r, a, n, args: r.in_plan,
    "attempt": lambda r, a, n, args: r.attempt,
    "approved": lambda r, a, n, args: a,
    "approval_count": lambda r, a, n, args: n if a else 0,
}
_context_json = json.JSONEncoder().encode  # what ``json.dumps(context)`` writes, its encoder made once
_PROVENANCE_KEYS = frozenset({"provenance", "destinations", "untrusted_destinations", "untrusted_arguments",
                              "destinations_in_plan", "destinations_in_user_data", "contents",
                              "untrusted_contents", "egress"})


def _provenance_fields(request: CallRequest, keys: frozenset[str] | None) -> dict[str, Any]:
    """The context attributes drawn from where each argument came from and what it is (its
    role): those of ``keys`` (all, if ``None``), each worked out only if it is read."""
    origins = {name: request.provenance.get(name) or Origin(source="executor", labels=request.data_labels)
               for name in request.arguments}
    tool = request.tool
    names = set(request.arguments)
    destinations = sorted(tool.destinations & names)
    contents = sorted(tool.contents & names)
    # Without declared destinations any argument may say where data goes: then the
    # destination is "in the plan" only if the plan fixed every argument.
    where = destinations or sorted(names)
    open_destinations = [n for n in where if origins[n].source not in FIXED_SOURCES]
    out: dict[str, Any] = {}
    if keys is None or "provenance" in keys:
        roles = tool.roles
        out["provenance"] = {name: {**o.as_context(), "role": roles.get(name, "")} for name, o in origins.items()}
    if keys is None or "destinations" in keys:
        out["destinations"] = destinations
    if keys is None or "untrusted_destinations" in keys:
        out["untrusted_destinations"] = [d for d in where if "untrusted" in origins[d].labels]
    if keys is None or "untrusted_arguments" in keys:
        out["untrusted_arguments"] = sorted(n for n, o in origins.items() if "untrusted" in o.labels)
    if keys is None or "destinations_in_plan" in keys:
        out["destinations_in_plan"] = not open_destinations
    if keys is None or "destinations_in_user_data" in keys:
        # Only declared destinations: without them no argument is known to be one.
        out["destinations_in_user_data"] = bool(destinations) and all(origins[n].user_data
                                                                      for n in open_destinations)
    if keys is None or "contents" in keys:
        out["contents"] = contents
    if keys is None or "untrusted_contents" in keys:
        out["untrusted_contents"] = [c for c in contents if "untrusted" in origins[c].labels]
    if keys is None or "egress" in keys:
        # A read tool given a destination (a URL, a host) sends data there: egress for it.
        out["egress"] = tool.risk.value == "egress" or (tool.risk.value == "read" and bool(destinations))
    return out


def _attributes_read(nodes: Iterable[Any], var: str) -> frozenset[str] | None:
    """The attributes of ``var`` (``context``, ``principal``…) that the policies read
    (``var.X``, ``var has X``); ``None`` if one uses ``var`` otherwise (as a whole)."""
    found: set[str] = set()
    whole = False

    def is_var(expr: Any) -> bool:
        return type(expr).__name__ == "Var" and getattr(expr, "name", None) == var

    def walk(obj: Any) -> None:
        nonlocal whole
        kind = type(obj).__name__
        if kind in ("GetAttr", "HasAttr") and is_var(obj.base):
            found.update([obj.attr] if kind == "GetAttr" else obj.attrs[:1])
            return
        if is_var(obj):
            whole = True
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif isinstance(obj, Mapping):
            for item in obj.values():
                walk(item)
        elif hasattr(obj, "__dataclass_fields__"):
            for f in obj.__dataclass_fields__:
                walk(getattr(obj, f))

    for node in nodes:
        walk(node)
    return None if whole else frozenset(found)


def _argument_references(node: Any) -> set[str]:
    """Names of ``context.arguments.X`` / ``context.arguments has X`` in a policy's syntax tree."""
    found: set[str] = set()

    def is_arguments(expr: Any) -> bool:
        return (type(expr).__name__ == "GetAttr" and getattr(expr, "attr", None) == "arguments"
                and type(expr.base).__name__ == "Var" and expr.base.name == "context")

    def walk(obj: Any) -> None:
        kind = type(obj).__name__
        if kind == "GetAttr" and is_arguments(obj.base):
            found.add(obj.attr)
        elif kind == "HasAttr" and is_arguments(obj.base):
            found.add(obj.attrs[0])
        if isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        elif hasattr(obj, "__dataclass_fields__"):
            for f in obj.__dataclass_fields__:
                walk(getattr(obj, f))

    walk(node)
    return found


def _cedar_type(spec: Mapping[str, Any]) -> str | None:
    if "anyOf" in spec:  # ``X | None``: Cedar sees the argument when it is given
        kinds = [_cedar_type(s) for s in spec["anyOf"] if s.get("type") != "null"]
        return kinds[0] if len(kinds) == 1 else None
    kind = spec.get("type")
    if kind in _CEDAR_TYPES:
        return _CEDAR_TYPES[kind]
    if kind == "array" and spec.get("items", {}).get("type") == "string":
        return "Set<String>"
    return None


def _arguments_schema(types: Mapping[str, str], names: Sequence[str]) -> str:
    attrs = ", ".join(f'"{name}"?: {kind}' for name, kind in sorted(types.items()))
    origins = ", ".join(f'"{name}"?: Scopegraph::Origin' for name in names)
    return ("namespace Scopegraph::Generated {\n  type Arguments = {" + attrs + "};\n"
            "  type Provenance = {" + origins + "};\n}\n")


def _nfkc_arguments(arguments: Mapping[str, Any]) -> dict[str, Any] | None:
    """``arguments`` with every string NFKC-normalised, or ``None`` if that changes nothing."""
    changed = False

    def normal(value: Any, depth: int = 0) -> Any:
        nonlocal changed
        if isinstance(value, str):
            if unicodedata.is_normalized("NFKC", value):
                return value
            changed = True
            return unicodedata.normalize("NFKC", value)
        if depth < 8 and isinstance(value, (list, tuple)):
            return type(value)(normal(v, depth + 1) for v in value)
        return value

    normalized = {name: normal(value) for name, value in arguments.items()}
    return normalized if changed else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PolicyError(f"invalid policy file {str(path)!r}: not UTF-8 text") from None


def _first_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
