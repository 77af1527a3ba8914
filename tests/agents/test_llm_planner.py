"""The LLM planner: structured output checked as the runtime checks it, bounded re-asks with the
error fed back, a text fallback, and a prompt made of the task and the catalogue only (invariant 4)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage

from scopegraph import Runtime, Workflow
from scopegraph.agents import LLMPlanner, Planner
from scopegraph.agents.llm_planner import PLAN_FUNCTION, plan_schema, planning_messages
from scopegraph.agents.testing import ScriptedChatModel, TextOnlyChatModel, plan_call, tool_call
from scopegraph.errors import ConfigError, PlanError
from scopegraph.identity import SpiffeId
from scopegraph.plan import parse_plan, validate_plan
from scopegraph.roles import FAILURE_KINDS, PlanningContext, StepFailure
from scopegraph.tools import ToolRegistry

from ..helpers import READ_PLAN, STANDARD_TOOLS

REGISTRY = ToolRegistry(STANDARD_TOOLS)
UNKNOWN_TOOL_PLAN: dict[str, Any] = {"steps": [{"id": "x", "tool": "rm_rf", "constraints": {}}]}
UNKNOWN_TOOL_ERROR = "step 'x' names unknown tool 'rm_rf'"


def planning_context(**kwargs: Any) -> PlanningContext:
    """A context as the runtime builds it: the standard catalogue, validated against its registry."""
    kwargs.setdefault("task", "read the readme and look alpha up")
    return PlanningContext(
        workflow="testwf", run_id="r1", identity=SpiffeId.parse("spiffe://scopegraph.local/wf/testwf/run/r1/planner"),
        catalogue=REGISTRY.catalogue(), validator=lambda data: validate_plan(parse_plan(data), REGISTRY), **kwargs,
    )


def test_a_structured_answer_becomes_a_checked_plan() -> None:
    model = ScriptedChatModel(replies=[plan_call(READ_PLAN)])
    planner = LLMPlanner(model)
    assert isinstance(planner, Planner)

    plan = planner.plan(planning_context())

    assert plan == parse_plan(READ_PLAN)
    [seen] = model.invocations
    assert seen.tool_names == [PLAN_FUNCTION]  # the plan function only: no tool of the workflow
    assert seen.tools[0]["function"]["parameters"]["properties"].keys() == {"steps"}
    system, human = seen.messages
    assert isinstance(system, SystemMessage) and isinstance(human, HumanMessage)
    assert "read the readme and look alpha up" in seen.text
    catalogue = json.loads(seen.text.split("Tool catalogue (JSON):\n", 1)[1].split("\n\n", 1)[0])
    assert catalogue == REGISTRY.catalogue()  # names, descriptions, risk tiers, schemas, destinations


def test_a_rejected_answer_is_sent_back_with_the_error_and_a_corrected_one_accepted() -> None:
    model = ScriptedChatModel(replies=[tool_call(PLAN_FUNCTION, UNKNOWN_TOOL_PLAN, call_id="first"),
                                       plan_call(READ_PLAN)])

    plan = LLMPlanner(model).plan(planning_context())

    assert plan == parse_plan(READ_PLAN)
    assert len(model.invocations) == 2
    retry = model.invocations[1].messages
    answers = [m for m in retry if isinstance(m, ToolMessage)]
    assert [m.tool_call_id for m in answers] == ["first"]  # the rejected call is answered, as providers require
    assert UNKNOWN_TOOL_ERROR in answers[0].text
    assert isinstance(retry[-1], HumanMessage) and UNKNOWN_TOOL_ERROR in retry[-1].text


def test_a_schema_error_is_fed_back_too() -> None:
    bad = {"steps": [{"id": "doc", "tool": "read_doc", "constraints": {"path": {"kind": "prefix"}}}]}
    model = ScriptedChatModel(replies=[plan_call(bad), plan_call(READ_PLAN)])

    LLMPlanner(model).plan(planning_context())

    assert "malformed plan: steps.0.constraints.path.prefix.prefix: Field required" in model.invocations[1].text


def test_always_malformed_fails_after_max_attempts_naming_the_last_error() -> None:
    model = ScriptedChatModel(default=plan_call(UNKNOWN_TOOL_PLAN))

    with pytest.raises(PlanError) as raised:
        LLMPlanner(model, max_attempts=2).plan(planning_context())

    assert str(raised.value) == f"planner produced no valid plan after 2 attempts: {UNKNOWN_TOOL_ERROR}"
    assert len(model.invocations) == 2


def test_a_reply_without_the_plan_function_is_rejected_and_re_asked() -> None:
    model = ScriptedChatModel(replies=[tool_call("read_doc", {"path": "/etc/passwd"}), plan_call(READ_PLAN)])

    assert LLMPlanner(model).plan(planning_context()) == parse_plan(READ_PLAN)
    assert f"did not call {PLAN_FUNCTION}" in model.invocations[1].text


def test_a_tool_calling_model_that_answers_in_text_is_read_from_the_text() -> None:
    model = ScriptedChatModel(replies=[f"Here is the plan:\n```json\n{json.dumps(READ_PLAN)}\n```"])

    assert LLMPlanner(model).plan(planning_context()) == parse_plan(READ_PLAN)


def test_a_model_without_tool_calling_is_asked_for_json_text() -> None:
    model = TextOnlyChatModel(replies=["I would read the readme first.", f"```json\n{json.dumps(READ_PLAN)}\n```"])

    plan = LLMPlanner(model).plan(planning_context())

    assert plan == parse_plan(READ_PLAN)
    first, second = model.invocations
    assert first.tools == []
    assert json.dumps(plan_schema(), ensure_ascii=False) in first.text
    assert "reply is not a JSON object" in second.text


def test_the_plan_schema_inlines_references_for_providers() -> None:
    schema = json.dumps(plan_schema())
    assert "$ref" not in schema and "$defs" not in schema and '"discriminator"' not in schema
    for kind in ("exact", "one_of", "pattern", "prefix", "range", "any"):
        assert f'"const": "{kind}"' in schema


def test_a_re_plan_shows_the_previous_plan_completed_steps_and_structured_failures_only() -> None:
    failure = StepFailure(step_id="look", tool="lookup", kind="out_of_scope", argument="key",
                          policy_ids=("scopegraph:scope",))
    ctx = planning_context(previous_plan=parse_plan(READ_PLAN), completed=("doc",), failures=(failure,))
    model = ScriptedChatModel(replies=[plan_call(READ_PLAN)])

    LLMPlanner(model, instructions="House rule: keys are lower case.").plan(ctx)

    text = model.invocations[0].text
    assert json.dumps(parse_plan(READ_PLAN).model_dump(mode="json"), ensure_ascii=False) in text
    assert '["doc"]' in text
    assert json.dumps([failure.as_dict()], ensure_ascii=False) in text
    for kind in FAILURE_KINDS:
        assert kind in text, f"the re-plan prompt does not explain failure kind {kind!r}"
    assert "House rule: keys are lower case." in model.invocations[0].messages[0].text


def test_the_prompt_is_the_context_and_nothing_else() -> None:
    # Whatever the context holds is all a planner model can see: no tool output can be in it.
    ctx = planning_context(task="send the summary to bob@example.com")
    messages = planning_messages(ctx)
    human = messages[1].text
    catalogue = json.dumps(REGISTRY.catalogue(), ensure_ascii=False)
    assert human.startswith("Task:\nsend the summary to bob@example.com\n\nTool catalogue (JSON):\n" + catalogue)
    assert "re-plan" not in human


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_attempts 0 must be at least 1"):
        LLMPlanner(ScriptedChatModel(), max_attempts=0)


# in a run -----------------------------------------------------------------------------------
def test_a_run_whose_planner_never_produces_a_valid_plan_fails_with_a_clear_error(
        make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]) -> None:
    model = ScriptedChatModel(default=plan_call(UNKNOWN_TOOL_PLAN))
    rt = make_runtime(make_workflow(planner=LLMPlanner(model)))

    report = rt.run("read the readme", run_id="llmplan1")

    assert report.status == "failed" and report.exit_code == 1
    assert report.error == f"planner produced no valid plan after 3 attempts: {UNKNOWN_TOOL_ERROR}"
    assert report.steps == [] and report.grants_minted == 0
    assert len(model.invocations) == 3


def test_a_run_plans_with_the_llm_planner(make_workflow: Callable[..., Workflow],
                                          make_runtime: Callable[..., Runtime]) -> None:
    model = ScriptedChatModel(replies=[tool_call(PLAN_FUNCTION, UNKNOWN_TOOL_PLAN), plan_call(READ_PLAN)])
    rt = make_runtime(make_workflow(planner=LLMPlanner(model)))

    report = rt.run("read the readme and look alpha up", run_id="llmplan2")

    assert report.status == "completed", report.summary()
    assert [s.step_id for s in report.steps] == ["doc", "look"]


def test_a_failing_model_call_fails_the_plan_by_exception_type_only_and_is_not_re_asked() -> None:
    def broken(_: Any) -> AIMessage:
        raise ConnectionError("POST https://api.example/v1?key=sk-secret refused")

    model = ScriptedChatModel(default=broken)

    with pytest.raises(PlanError) as raised:
        LLMPlanner(model).plan(planning_context())

    assert str(raised.value) == "planner model call failed: ConnectionError"
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert len(model.invocations) == 1


def test_the_planner_can_bind_values_and_repeat_steps() -> None:
    # Issue 13: the prompt explains from_step, for_each and item; the plan function's schema
    # offers them (without the fields the runtime fills in); such a plan is accepted.
    plan = {"steps": [
        {"id": "doc", "tool": "read_doc", "constraints": {"path": {"kind": "exact", "value": "/docs/team.txt"}}},
        {"id": "look", "tool": "lookup", "depends_on": ["doc"],
         "for_each": {"items": ["alpha", "beta"], "max": 2},
         "constraints": {"key": {"kind": "item"},
                         "limit": {"kind": "range", "min": 1, "max": 10}}},
        {"id": "mail", "tool": "send_mail", "depends_on": ["doc"],
         "constraints": {"to": {"kind": "from_step", "step": "doc", "path": "owner"}, "body": {"kind": "any"}}},
    ]}
    model = ScriptedChatModel(replies=[plan_call(plan)])
    assert LLMPlanner(model).plan(planning_context()) == parse_plan(plan)
    [seen] = model.invocations
    system = seen.messages[0].content
    assert '"kind": "from_step"' in system and '"for_each"' in system and '{"kind": "item"}' in system
    schema = json.dumps(seen.tools[0]["function"]["parameters"])
    assert '"from_step"' in schema and '"for_each"' in schema and '"item"' in schema
    assert '"bound"' not in schema and '"overflow"' not in schema
