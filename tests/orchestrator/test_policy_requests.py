"""What a Cedar request carries (issue 11): only the context and principal attributes the
policies read, found once when they load, and decisions that do not change for it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import cedarpy
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


# Answers kept (issue 11): Cedar's answer depends on the request alone, so the same request
# is answered again without it. "The same" must cover everything a policy can see.

@tool(risk="read", roles={"token": "secret"})
def fetch(url: str, token: str) -> str:
    """Fetch with a token."""
    return url


SECRET_REGISTRY = ToolRegistry([count, fetch])
OTHER = SpiffeId.parse("spiffe://scopegraph.local/wf/wf1/run/r1/step/s2/intruder")


class CedarCalls:
    """Counts the requests that reach Cedar (the real evaluation still answers each)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = cedarpy.is_authorized

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(cedarpy, "is_authorized", counted)


def test_a_request_made_again_is_answered_without_cedar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policies = engine(tmp_path)
    cedar = CedarCalls(monkeypatch)
    first = policies.decide(request(3))
    # Another step, other arguments: nothing the baseline reads differs, so neither does the answer.
    assert [policies.decide(r) for r in (request(3), request(3, step_id="s7"), request(4))] == [first] * 3
    assert (first.outcome, cedar.count) == ("allow", 1)
    assert policies.decide(request(3, attempt=2)) == first and cedar.count == 1  # attempt is not read
    out_of_plan = CallRequest(principal=PRINCIPAL, role="executor", workflow="wf1", run_id="r1", step_id="s2",
                              tool=REGISTRY.get_tool("count"), arguments={"n": 3}, in_plan=False)
    assert policies.decide(out_of_plan).outcome == "deny" and cedar.count == 2  # context differs: asked


@pytest.mark.parametrize("extra", [
    f'@id("not-the-intruder")\nforbid (principal == Scopegraph::Agent::"{OTHER}", action, resource);',
    f'@id("not-the-intruder")\nforbid (principal in Scopegraph::Agent::"{OTHER}", action, resource);',
    f'@id("not-the-intruder")\nforbid (principal, action, resource)\n'
    f'when {{ principal == Scopegraph::Agent::"{OTHER}" }};',
])
def test_principals_a_policy_tells_apart_by_id_are_never_answered_alike(tmp_path: Path, extra: str) -> None:
    policies = engine(tmp_path, extra)
    same_attributes = CallRequest(principal=OTHER, role="executor", workflow="wf1", run_id="r1", step_id="s2",
                                  tool=REGISTRY.get_tool("count"), arguments={"n": 3})
    assert policies.decide(request(3)).outcome == "allow"
    refused = policies.decide(same_attributes)
    assert (refused.outcome, refused.policy_ids) == ("deny", ("not-the-intruder",))


def test_a_request_holding_a_secret_argument_is_answered_but_not_kept(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "urls.cedar").write_text('@id("no-evil")\nforbid (principal, action, resource)\n'
                                         'when { context.arguments has url && context.arguments.url == "evil" };')
    policies = CedarPolicyEngine.from_paths([tmp_path / "urls.cedar"], SECRET_REGISTRY, baseline=True)
    cedar = CedarCalls(monkeypatch)
    call = CallRequest(principal=PRINCIPAL, role="executor", workflow="wf1", run_id="r1", step_id="s2",
                       tool=SECRET_REGISTRY.get_tool("fetch"), arguments={"url": "ok", "token": "t0ps3cret"})
    assert [policies.decide(call).outcome for _ in range(2)] == ["allow", "allow"] and cedar.count == 2
    assert all("t0ps3cret" not in "".join(key) for key in policies._answers)
