"""Cedar policy: decision tables over the shipped baseline, invalid files, failing closed.

Invariants 3 (every call decided against the policy) and 6 (invalid policy or an
evaluation error never allows).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, ToolRegistry, Workflow, policies, tool
from scopegraph.errors import PolicyError
from scopegraph.identity import SpiffeId
from scopegraph.policy import CallRequest, CedarPolicyEngine

BASELINE = Path(policies.__file__).parent / "baseline.cedar"
EXECUTOR = SpiffeId.parse("spiffe://example.org/wf/w/run/r1/step/s1/executor")
PLANNER = SpiffeId.parse("spiffe://example.org/wf/w/run/r1/planner")


@tool(risk="read", labels=["confidential"])
def read_doc(path: str) -> str:
    return path


@tool(risk="write")
def write_note(title: str, amount: int) -> str:
    return title


@tool(risk="egress")
def send_mail(to: str, body: str) -> str:
    return to


@tool(risk="egress", accepts_confidential=True)
def send_to_auditor(body: str) -> str:
    return body


TOOLS = ToolRegistry([read_doc, write_note, send_mail, send_to_auditor])


@pytest.fixture(scope="module")
def baseline() -> CedarPolicyEngine:
    return CedarPolicyEngine.from_paths(None, TOOLS)


def request(tool_name: str, *, role: str = "executor", labels: tuple[str, ...] = (), in_plan: bool = True,
            approved: bool = False, arguments: dict[str, Any] | None = None, attempt: int = 1) -> CallRequest:
    return CallRequest(
        principal=PLANNER if role == "planner" else EXECUTOR, role=role, workflow="w", run_id="r1",
        step_id="s1", tool=TOOLS[tool_name], arguments=arguments or {}, data_labels=frozenset(labels),
        in_plan=in_plan, attempt=attempt, approved=approved, approval_count=1 if approved else 0,
    )


C = ("confidential",)

# role, tool, labels, in_plan, approved → outcome, deciding policy ids (as a set)
DECISION_TABLE = [
    # reads inside the plan are allowed, whatever the run has read
    ("executor", "read_doc", (), True, False, "allow", {"allow-planned-calls"}),
    ("executor", "read_doc", C, True, False, "allow", {"allow-planned-calls"}),
    # nothing outside the plan: deny by default, approved or not
    ("executor", "read_doc", (), False, False, "deny", {"default-deny"}),
    ("executor", "read_doc", (), False, True, "deny", {"default-deny"}),
    ("executor", "write_note", (), False, False, "deny", {"default-deny"}),
    ("executor", "send_mail", (), False, True, "deny", {"default-deny"}),
    # writes need a human; an approved write is allowed
    ("executor", "write_note", (), True, False, "needs_approval", {"writes-need-approval"}),
    ("executor", "write_note", C, True, False, "needs_approval", {"writes-need-approval"}),
    ("executor", "write_note", (), True, True, "allow", {"allow-planned-calls"}),
    # egress needs a human
    ("executor", "send_mail", (), True, False, "needs_approval", {"egress-needs-approval"}),
    ("executor", "send_mail", (), True, True, "allow", {"allow-planned-calls"}),
    # egress after confidential data: denied outright, and an approval does not lift it
    ("executor", "send_mail", C, True, False, "deny", {"no-confidential-egress", "egress-needs-approval"}),
    ("executor", "send_mail", C, True, True, "deny", {"no-confidential-egress"}),
    ("executor", "send_mail", ("untrusted", "confidential"), True, True, "deny", {"no-confidential-egress"}),
    # ...unless the tool is trusted with confidential data
    ("executor", "send_to_auditor", C, True, False, "needs_approval", {"egress-needs-approval"}),
    ("executor", "send_to_auditor", C, True, True, "allow", {"allow-planned-calls"}),
    ("executor", "send_mail", ("untrusted",), True, False, "needs_approval", {"egress-needs-approval"}),
    # the planner never calls tools, even in plan and approved
    ("planner", "read_doc", (), True, False, "deny", {"planner-never-calls-tools"}),
    ("planner", "read_doc", (), True, True, "deny", {"planner-never-calls-tools"}),
    ("planner", "write_note", (), True, False, "deny", {"planner-never-calls-tools", "writes-need-approval"}),
    ("planner", "write_note", (), True, True, "deny", {"planner-never-calls-tools"}),
    ("planner", "send_mail", C, True, True, "deny", {"planner-never-calls-tools", "no-confidential-egress"}),
    # an unknown role is no executor
    ("auditor", "read_doc", (), True, True, "deny", {"planner-never-calls-tools"}),
]


@pytest.mark.parametrize(("role", "tool_name", "labels", "in_plan", "approved", "outcome", "policy_ids"),
                         DECISION_TABLE)
def test_baseline_decision_table(baseline: CedarPolicyEngine, role: str, tool_name: str, labels: tuple[str, ...],
                                 in_plan: bool, approved: bool, outcome: str, policy_ids: set[str]) -> None:
    decision = baseline.decide(request(tool_name, role=role, labels=labels, in_plan=in_plan, approved=approved))
    assert decision.outcome == outcome
    assert set(decision.policy_ids) == policy_ids
    assert decision.allowed is (outcome == "allow")
    assert decision.reasons, "every decision says why"


def test_decisions_carry_the_policy_reasons(baseline: CedarPolicyEngine) -> None:
    assert baseline.decide(request("write_note")).reasons == ("write calls need a human approval",)
    assert baseline.decide(request("read_doc", in_plan=False)).reasons == ("no policy permits this call",)


# custom policies over typed arguments ---------------------------------------------------------
def write_policy(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_custom_policies_see_typed_arguments(tmp_path: Path) -> None:
    big = write_policy(tmp_path, "amounts.cedar", """
@id("big-notes-need-approval")
@escalate
@reason("notes over 5000 need a human")
forbid (principal, action == Scopegraph::Action::"call", resource)
when { context.arguments has amount && context.arguments.amount > 5000 }
unless { context.approved };

@id("allow-approved-or-small-notes")
permit (principal, action == Scopegraph::Action::"call", resource == Scopegraph::Tool::"write_note")
when { principal.role == "executor" && context.in_plan };
""")
    engine = CedarPolicyEngine.from_paths([big], TOOLS)
    small = engine.decide(request("write_note", arguments={"title": "t", "amount": 10}))
    large = engine.decide(request("write_note", arguments={"title": "t", "amount": 5001}))
    approved = engine.decide(request("write_note", arguments={"title": "t", "amount": 5001}, approved=True))
    other_tool = engine.decide(request("read_doc", arguments={"path": "/x"}))
    assert (small.outcome, small.policy_ids) == ("allow", ("allow-approved-or-small-notes",))
    assert (large.outcome, large.policy_ids) == ("needs_approval", ("big-notes-need-approval",))
    assert approved.outcome == "allow"
    assert (other_tool.outcome, other_tool.policy_ids) == ("deny", ("default-deny",))


@tool(risk="read")
def pay(amount: int) -> str:
    return "paid"


@tool(risk="read")
def tag(amount: str) -> str:  # the same argument name with another type
    return amount


@tool(risk="read")
def pay_maybe(amount: int | None = None) -> str:
    return "paid"


@pytest.mark.parametrize(("tools", "payer"), [
    ([pay], pay),
    ([pay, tag], pay),          # another tool declares 'amount' as a string
    ([pay_maybe], pay_maybe),   # 'amount' is optional
], ids=["one-tool", "conflicting-types", "optional-argument"])
def test_a_policy_on_an_argument_is_never_silently_disabled(tmp_path: Path, tools: list[Any], payer: Any) -> None:
    """A forbid written against an argument must apply, or the policy must be refused at load."""
    limit = write_policy(tmp_path, "limit.cedar", """
@id("no-big-payments")
forbid (principal, action == Scopegraph::Action::"call", resource)
when { context.arguments has amount && context.arguments.amount > 5000 };
""")
    registry = ToolRegistry(tools)
    try:
        engine = CedarPolicyEngine.from_paths([BASELINE, limit], registry)
    except PolicyError as exc:
        assert str(limit) in str(exc)
        return
    decision = engine.decide(CallRequest(
        principal=EXECUTOR, role="executor", workflow="w", run_id="r1", step_id="s1", tool=payer,
        arguments={"amount": 9000}))
    assert decision.outcome == "deny", f"a 9000 payment was {decision.outcome}: {decision.policy_ids}"
    assert decision.policy_ids == ("no-big-payments",)


@pytest.mark.parametrize("amount", [5001, 2**63 - 1, 2**63, 10**30])
def test_an_argument_limit_cannot_be_dodged_with_a_huge_number(tmp_path: Path, amount: int) -> None:
    """Python ints are unbounded, Cedar's are 64-bit: a value Cedar cannot hold must not vanish."""
    limit = write_policy(tmp_path, "limit.cedar", """
@id("no-big-payments")
forbid (principal, action == Scopegraph::Action::"call", resource)
when { context.arguments has amount && context.arguments.amount > 5000 };
""")
    engine = CedarPolicyEngine.from_paths([BASELINE, limit], ToolRegistry([pay]))
    decision = engine.decide(CallRequest(
        principal=EXECUTOR, role="executor", workflow="w", run_id="r1", step_id="s1", tool=pay,
        arguments={"amount": amount}))
    assert decision.outcome == "deny", f"amount {amount} was {decision.outcome}: {decision.policy_ids}"


def test_an_evaluation_error_fails_closed(tmp_path: Path) -> None:
    overflow = write_policy(tmp_path, "overflow.cedar", """
@id("overflowing-forbid")
forbid (principal, action == Scopegraph::Action::"call", resource)
when { context.attempt > 1 && context.attempt * 9223372036854775807 > 0 };
""")
    engine = CedarPolicyEngine.from_paths([BASELINE, overflow], TOOLS)
    first = engine.decide(request("read_doc", attempt=1))
    assert first.outcome == "allow"  # the forbid does not apply and does not fail
    second = engine.decide(request("read_doc", attempt=2))
    assert second.outcome == "deny", "a forbid that errors must not let the permit through"
    assert second.policy_ids == ("policy-error",)


def test_version_tracks_policy_text(tmp_path: Path) -> None:
    extra = write_policy(tmp_path, "extra.cedar",
                         '@id("nothing")\nforbid (principal, action, resource) when { false };\n')
    a = CedarPolicyEngine.from_paths(None, TOOLS)
    b = CedarPolicyEngine.from_paths([BASELINE], TOOLS)
    c = CedarPolicyEngine.from_paths([BASELINE, extra], TOOLS)
    assert a.version == CedarPolicyEngine.from_paths(None, TOOLS).version
    assert len({a.version, c.version}) == 2
    assert b.version != c.version
    assert c.files == (str(BASELINE), str(extra))


def test_a_policy_directory_loads_every_cedar_file(tmp_path: Path) -> None:
    (tmp_path / "pols").mkdir()
    (tmp_path / "pols" / "baseline.cedar").write_text(BASELINE.read_text())
    (tmp_path / "pols" / "notes.txt").write_text("not a policy")
    engine = CedarPolicyEngine.from_paths([tmp_path / "pols"], TOOLS)
    assert engine.files == (str(tmp_path / "pols" / "baseline.cedar"),)
    assert engine.decide(request("read_doc")).outcome == "allow"


# invalid policy files: refused at load, naming the file and the problem ------------------------
INVALID = [
    ("syntax.cedar", 'permit (principal, action, resource', "unexpected end of input"),
    ("no-id.cedar", 'permit (principal, action == Scopegraph::Action::"call", resource);', "@id"),
    ("bad-attr.cedar", '@id("x")\npermit (principal, action == Scopegraph::Action::"call", resource)\n'
                       'when { context.no_such_thing == 1 };', "no_such_thing"),
    ("optional.cedar", '@id("y")\npermit (principal, action == Scopegraph::Action::"call", resource)\n'
                       'when { context.arguments.path == "/x" };', "arguments.path"),
    ("bad-entity.cedar", '@id("z")\npermit (principal is Scopegraph::Robot, action, resource);', "Robot"),
    ("dup.cedar", '@id("allow-planned-calls")\npermit (principal, action, resource);', "allow-planned-calls"),
]


@pytest.mark.parametrize(("name", "text", "problem"), INVALID)
def test_invalid_policy_file_is_refused_naming_it(tmp_path: Path, name: str, text: str, problem: str) -> None:
    bad = write_policy(tmp_path, name, text)
    with pytest.raises(PolicyError) as err:
        CedarPolicyEngine.from_paths([BASELINE, bad], TOOLS)
    message = str(err.value)
    assert str(bad) in message and problem in message
    assert "\n" not in message


def test_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="missing.cedar"):
        CedarPolicyEngine.from_paths([tmp_path / "missing.cedar"], TOOLS)


def test_a_policy_file_that_is_not_text_is_refused_naming_it(tmp_path: Path) -> None:
    binary = tmp_path / "binary.cedar"
    binary.write_bytes(b"\xff\xfe\x00\x80 not utf-8")
    with pytest.raises(PolicyError) as err:
        CedarPolicyEngine.from_paths([BASELINE, binary], TOOLS)
    assert str(binary) in str(err.value)


def test_empty_policy_directory_and_no_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="no .cedar files"):
        CedarPolicyEngine.from_paths([tmp_path / "empty"], TOOLS)
    with pytest.raises(PolicyError, match="no policy files"):
        CedarPolicyEngine.from_paths([], TOOLS)


def test_invalid_schema_is_refused(tmp_path: Path) -> None:
    schema = write_policy(tmp_path, "broken.cedarschema", "namespace Scopegraph { entity ")
    with pytest.raises(PolicyError, match="schema"):
        CedarPolicyEngine.from_paths([BASELINE], TOOLS, schema=schema)


def test_a_runtime_does_not_start_with_an_invalid_policy(
    tmp_path: Path, make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    bad = write_policy(tmp_path, "typo.cedar",
                       '@id("t")\npermit (principal, action, resource) when { context.in_plam };')
    with pytest.raises(PolicyError) as err:
        make_runtime(make_workflow(policies=[BASELINE, bad]))
    assert str(bad) in str(err.value) and "in_plam" in str(err.value)
