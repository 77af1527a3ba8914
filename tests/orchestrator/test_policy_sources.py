"""Which policies a workflow runs under, and where a bad one is wrong (issue 10, points 4 and 8).

``Workflow(policies=[...])`` adds files to the shipped baseline; ``baseline=False`` replaces
it. An invalid file is refused with ``file:line:column`` of the problem. TTLs and waits
that are not finite numbers of seconds are refused where they are configured.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from scopegraph import Runtime, Workflow, policies
from scopegraph.errors import ConfigError, PolicyError
from scopegraph.gateway import RetrySettings
from scopegraph.policy import CedarPolicyEngine
from scopegraph.tools import ToolRegistry

from ..helpers import STANDARD_TOOLS

BASELINE = Path(policies.__file__).parent / "baseline.cedar"
TOOLS = ToolRegistry(STANDARD_TOOLS)
NOTHING = '@id("forbid-nothing")\nforbid (principal, action, resource) when { false };\n'
ALLOW_ALL = '@id("allow-all")\npermit (principal, action, resource);\n'
WRITE_PLAN = {"steps": [{"id": "note", "tool": "write_note", "purpose": "write the note",
                         "constraints": {"title": {"kind": "exact", "value": "t"},
                                         "amount": {"kind": "exact", "value": 5}}}]}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# adds to the baseline, or replaces it ---------------------------------------------------------
def test_workflow_policies_add_to_the_baseline(tmp_path: Path, make_workflow: Callable[..., Workflow],
                                               make_runtime: Callable[..., Runtime]) -> None:
    extra = write(tmp_path, "extra.cedar", ALLOW_ALL)
    rt = make_runtime(make_workflow(WRITE_PLAN, policies=[extra]))
    assert isinstance(rt.policy, CedarPolicyEngine)
    assert rt.policy.files == ("baseline.cedar", str(extra))
    # the baseline still holds: a write waits for a human even though allow-all permits it
    report = rt.run("file it", initiator="alice")
    assert report.status == "paused", report.summary()
    (step,) = [s for s in report.steps if s.status == "awaiting_approval"]
    assert "writes-need-approval" in step.policy_ids


def test_baseline_false_replaces_the_baseline(tmp_path: Path, make_workflow: Callable[..., Workflow],
                                              make_runtime: Callable[..., Runtime]) -> None:
    extra = write(tmp_path, "extra.cedar", ALLOW_ALL)
    rt = make_runtime(make_workflow(WRITE_PLAN, policies=[extra], baseline=False))
    assert isinstance(rt.policy, CedarPolicyEngine)
    assert rt.policy.files == (str(extra),)
    report = rt.run("file it", initiator="alice")
    assert report.status == "completed", report.summary()


def test_naming_the_shipped_baseline_as_well_loads_it_once(tmp_path: Path) -> None:
    extra = write(tmp_path, "extra.cedar", NOTHING)
    engine = CedarPolicyEngine.from_paths([BASELINE, extra], TOOLS, baseline=True)
    assert engine.files == (str(BASELINE), str(extra))
    assert engine.version == CedarPolicyEngine.from_paths([BASELINE, extra], TOOLS).version


def test_a_clash_with_the_implicit_baseline_says_how_to_leave_it_out(tmp_path: Path) -> None:
    clash = write(tmp_path, "mine.cedar", '@id("allow-planned-calls")\npermit (principal, action, resource);\n')
    with pytest.raises(PolicyError) as err:
        CedarPolicyEngine.from_paths([clash], TOOLS, baseline=True)
    assert f"{clash}:1:1" in str(err.value) and "baseline=False" in str(err.value)


def test_baseline_false_without_policies_is_refused(make_workflow: Callable[..., Workflow]) -> None:
    with pytest.raises(ConfigError, match="baseline=False"):
        make_workflow(baseline=False)
    with pytest.raises(ConfigError, match="list"):
        make_workflow(policies="policies/")


# file:line:column -----------------------------------------------------------------------------
LOCATED = [
    ("syntax.cedar", '@id("a")\npermit (principal, action, resource)\nwhen { context.in_plan == };\n', "3:27",
     "unexpected token `}`"),
    ("eof.cedar", 'permit (principal, action, resource', "1:36", "unexpected end of input"),
    ("lexer.cedar", '@id("a")\npermit (principal, action, resource) when { context.x # 1 };', "2:55", "invalid token"),
    ("second.cedar", NOTHING + '\n@id("b")\npermit (principal, action, resource)\nwhen { nope(1) };', "6:8",
     "nope"),
    ("attr.cedar", NOTHING + '@id("x")\npermit (principal, action, resource)\nwhen { context.no_such_thing };',
     "5:16", "no_such_thing"),
    ("entity.cedar", '@id("z")\npermit (principal is Scopegraph::Robot, action, resource);', "2:22", "Robot"),
    ("types.cedar", '@id("t")\npermit (principal, action, resource)\nwhen { context.attempt like "1*" };',
     "1:1", "policy 't'"),
    ("no-id.cedar", NOTHING + '\n\n  permit (principal, action, resource);', "5:3", "@id"),
    ("argument.cedar", '@id("a")\npermit (principal, action, resource)\nwhen { context.arguments has secret };',
     "3:16", "'secret'"),
    ("dup.cedar", NOTHING + NOTHING, "3:1", "forbid-nothing"),
]


@pytest.mark.parametrize(("name", "text", "where", "problem"), LOCATED)
def test_an_invalid_policy_names_file_line_and_column(tmp_path: Path, name: str, text: str, where: str,
                                                      problem: str) -> None:
    bad = write(tmp_path, name, text)
    with pytest.raises(PolicyError) as err:
        CedarPolicyEngine.from_paths([bad], TOOLS, baseline=True)
    message = str(err.value)
    assert f"{bad}:{where}: " in message, message
    assert problem in message and "\n" not in message


# finite, positive durations -----------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("setting", "value"), [
    ("grant_ttl", NAN), ("grant_ttl", INF), ("grant_ttl", -1), ("grant_ttl", 0), ("grant_ttl", 901),
    ("approval_ttl", NAN), ("approval_ttl", INF), ("approval_ttl", -INF), ("approval_ttl", -5), ("approval_ttl", 0),
    ("grant_max_uses", 0), ("max_replans", -1),
    ("retry", RetrySettings(wait_initial=NAN)), ("retry", RetrySettings(wait_max=INF)),
    ("retry", RetrySettings(wait_max=-1)), ("retry", RetrySettings(attempts=0)),
])
def test_bad_durations_and_counts_are_refused_where_configured(make_workflow: Callable[..., Workflow],
                                                               setting: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        make_workflow(**{setting: value})
    message = str(err.value)
    assert "\n" not in message
    assert (setting if setting != "retry" else "retry ") in message


@pytest.mark.parametrize(("setting", "value"), [
    ("stalled_after", NAN), ("stalled_after", INF), ("stalled_after", 0), ("stalled_after", -2),
    ("poll", NAN), ("poll", -1), ("concurrency", 0), ("concurrency", -1),
])
def test_a_worker_refuses_bad_durations_and_counts(setting: str, value: Any) -> None:
    from scopegraph.workers import Worker

    with pytest.raises(ConfigError) as err:  # refused before any connection is made
        Worker("postgresql://127.0.0.1:1/none", **{setting: value})
    assert setting in str(err.value)
