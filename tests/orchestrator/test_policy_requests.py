"""What a Cedar request carries (issue 11): only the context and principal attributes the
policies read, found once when they load, and decisions that do not change for it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from scopegraph import tool
from scopegraph.identity import SpiffeId
from scopegraph.policy import CallRequest, CedarPolicyEngine
from scopegraph.tools import ToolRegistry


@tool(risk="read")
def count(n: int, note: str = "") -> int:
    """Count to n."""
    return n


REGISTRY = ToolRegistry([count])
PRINCIPAL = SpiffeId.parse("spiffe://scopegraph.local/wf/wf1/run/r1/step/s2/executor")


def engine(tmp_path: Path, extra: str | None = None) -> CedarPolicyEngine:
    paths = []
    if extra is not None:
        (tmp_path / "extra.cedar").write_text(extra)
        paths.append(tmp_path / "extra.cedar")
    return CedarPolicyEngine.from_paths(paths, REGISTRY, baseline=True)


def request(n: int, *, step_id: str = "s2", attempt: int = 1) -> CallRequest:
    return CallRequest(principal=PRINCIPAL, role="executor", workflow="wf1", run_id="r1", step_id=step_id,
                       tool=REGISTRY.get_tool("count"), arguments={"n": n}, attempt=attempt)


def test_the_baseline_request_carries_only_what_the_baseline_reads(tmp_path: Path) -> None:
    context = engine(tmp_path)._context(request(3), False, 0)
    assert set(context) == {"in_plan", "role", "risk", "approved", "data_labels", "untrusted_destinations",
                            "destinations_in_plan", "widened", "untrusted_contents", "destinations_in_user_data",
                            "egress"}
    baseline = resources.files("scopegraph.policies").joinpath("baseline.cedar").read_text()
    for key in context:
        assert f"context.{key}" in baseline


@pytest.mark.parametrize(("extra", "denied", "allowed"), [
    # a context attribute the baseline does not read
    ('@id("no-second-try")\nforbid (principal, action, resource) when { context.attempt > 1 };',
     request(3, attempt=2), request(3)),
    # an argument, and a principal attribute the baseline does not read
    ('@id("small-counts")\nforbid (principal, action, resource)\n'
     'when { context.arguments has n && context.arguments.n > 10 };',
     request(11), request(10)),
    ('@id("not-step-s9")\nforbid (principal, action, resource) when { principal.step_id == "s9" };',
     request(3, step_id="s9"), request(3)),
])
def test_an_attribute_a_policy_reads_reaches_it(tmp_path: Path, extra: str, denied: CallRequest,
                                                 allowed: CallRequest) -> None:
    policies = engine(tmp_path, extra)
    refused = policies.decide(denied)
    assert refused.outcome == "deny" and len(refused.policy_ids) == 1
    assert policies.decide(allowed).outcome == "allow"


def test_a_value_cedar_cannot_hold_denies_even_when_no_policy_reads_it(tmp_path: Path) -> None:
    decision = engine(tmp_path).decide(request(10**30))
    assert decision.outcome == "deny" and decision.policy_ids == ("policy-error",)
