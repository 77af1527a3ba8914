"""A planner on any LangChain chat model: the task and the catalogue in, a checked ``Plan`` out.

The model sees what a ``PlanningContext`` holds: the trusted task, the tool catalogue
and, on a re-plan, the plan so far with structured failures. It never sees tool output,
because the context carries none. Its answer is checked with ``ctx.validate``, exactly
as the runtime will check it; a rejected answer goes back to the model with the reason,
a bounded number of times, and then the run fails with a clear ``PlanError``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.utils.json_schema import dereference_refs
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from scopegraph.errors import ConfigError, PlanError, ScopegraphError
from scopegraph.plan import Plan
from scopegraph.roles import PlanningContext

from ._llm import function_spec, json_object_from_text, message_text, to_json
from .model_spans import model_call_config

PLAN_FUNCTION = "submit_plan"

_SYSTEM = """\
You are the planner of a scopegraph workflow. You turn a task into a plan: steps, each calling one tool \
from the catalogue, with constraints on the tool's arguments. You never call tools and never see their \
output. A separate executor carries out each step with a credential limited to that step's tool and \
constraints: anything the plan does not allow will be refused.

Rules:
- Use only tools from the catalogue, one tool per step. Step ids are 1-64 letters, digits, '_' or '-'.
- Constrain every argument a step will pass: an argument without a constraint cannot be passed at all, \
and every required argument needs one.
- Prefer exact values ({"kind": "exact", "value": ...}) for destinations (recipients, URLs, accounts, \
paths: the catalogue lists each tool's argument roles) and for anything the task fixes. Use one_of, prefix, \
pattern (RE2 syntax, full match) or range for a value the task only bounds.
- When a value is one an earlier step will return ("the largest file", "the IBAN on the bill"), bind it: \
{"kind": "from_step", "step": "<that step's id>", "path": "files[*].id"}; the step must be in depends_on. \
A path names keys with '.', list items with [N], every item with [*]; "" is the whole result.
- Use {"kind": "any"} only when the executor must choose a value no earlier result holds.
- To do the same call for each item of a list, repeat the step: "for_each": {"items": [...], "max": N} for a \
list the task gives, or {"step": "<id>", "path": "<path to the list>", "max": N} for a list an earlier step \
returns (in depends_on); N bounds the count, at most 100. Pin an argument to the item with {"kind": "item"}, \
or to a field of it with {"kind": "item", "path": "email"}.
- A step that needs another step's result lists that step in depends_on; independent steps may run at once.
- Plan only what the task asks for. The higher a tool's risk tier (read < write < egress), the tighter \
its constraints; write and egress calls may wait for a human approval."""

_REPLAN = """\
This is a re-plan: some steps of the previous plan could not be done inside their scope.
Previous plan:
{plan}
Completed steps (keep each exactly as it is: same id, tool, constraints and depends_on):
{completed}
Failures (kind: out_of_scope = the constraint on `argument` is too narrow; needs_other_tool = the step \
needs `needs_tool` instead; denied = policy `policy_ids` refused the call; tool_failed = the tool failed):
{failures}
Revise the plan so the task can be done, widening a constraint only as far as the task justifies."""

_ANSWER_STRUCTURED = f"Submit the plan by calling {PLAN_FUNCTION}."
_ANSWER_TEXT = "Reply with only the plan: one JSON object that matches this JSON Schema:\n{schema}"


class LLMPlanner:
    """Plans with a LangChain chat model through structured output; implements ``Planner``.

    A model with tool calling answers through ``with_structured_output`` (a call of
    ``submit_plan``); any other chat model is asked for a JSON object in its text reply.
    ``max_attempts`` bounds the answers asked for, re-asks included; ``instructions``
    are appended to the system prompt (domain rules, house conventions).
    """

    def __init__(self, model: BaseChatModel, *, max_attempts: int = 3, instructions: str | None = None) -> None:
        if max_attempts < 1:
            raise ConfigError(f"max_attempts {max_attempts!r} must be at least 1")
        self.model = model
        self.max_attempts = max_attempts
        self.instructions = instructions

    def plan(self, ctx: PlanningContext) -> Plan:
        """Ask the model for a plan until ``ctx.validate`` accepts one.

        Raises:
            PlanError: no valid plan after ``max_attempts`` answers (names the last problem),
                or the model call itself failed (names the exception type only: a provider's
                message may carry request details, and run errors reach the ledger).
        """
        ask, structured = self._asker()
        conversation = planning_messages(ctx, instructions=self.instructions, structured=structured)
        retrying = Retrying(stop=stop_after_attempt(self.max_attempts), retry=retry_if_exception_type(PlanError),
                            reraise=True)
        try:
            return retrying(self._attempt, ctx, ask, conversation)
        except PlanError as exc:
            raise PlanError(f"planner produced no valid plan after {self.max_attempts} attempts: {exc}") from None
        except _ModelFailed as failed:  # not retried: the provider client has its own retries
            cause = failed.__cause__
            raise PlanError(f"planner model call failed: {type(cause).__name__}") from cause

    def _asker(self) -> tuple[Callable[[list[BaseMessage]], tuple[AIMessage, Any]], bool]:
        """How to ask: structured output when the model offers it, else a JSON text reply."""
        try:
            runnable = self.model.with_structured_output(plan_function(), include_raw=True,
                                                         method="function_calling")
        except NotImplementedError:
            return self._ask_text, False

        def ask(messages: list[BaseMessage]) -> tuple[AIMessage, Any]:
            out = runnable.invoke(messages, config=model_call_config())
            assert isinstance(out, dict)
            raw = out["raw"]
            if out.get("parsed") is not None:
                return raw, out["parsed"]
            if out.get("parsing_error") is not None:
                raise _Rejected(raw, f"the {PLAN_FUNCTION} arguments could not be read as a plan")
            if message_text(raw).strip():  # answered in text instead of calling the function
                return raw, _from_text(raw)
            raise _Rejected(raw, f"the reply did not call {PLAN_FUNCTION}")

        return ask, True

    def _ask_text(self, messages: list[BaseMessage]) -> tuple[AIMessage, Any]:
        reply = self.model.invoke(messages, config=model_call_config())
        assert isinstance(reply, AIMessage)
        return reply, _from_text(reply)

    def _attempt(self, ctx: PlanningContext, ask: Callable[[list[BaseMessage]], tuple[AIMessage, Any]],
                 conversation: list[BaseMessage]) -> Plan:
        """One answer: valid, or the reason it was rejected is appended for the next one."""
        try:
            reply, data = ask(conversation)
        except _Rejected as rejected:
            conversation.extend(_feedback(rejected.reply, rejected.reason))
            raise PlanError(rejected.reason) from None
        except ScopegraphError:
            raise
        except Exception as exc:
            raise _ModelFailed() from exc
        try:
            return ctx.validate(data)
        except PlanError as exc:
            conversation.extend(_feedback(reply, str(exc)))
            raise


class _ModelFailed(Exception):
    """The model call raised (network, quota, provider error): its cause is the exception."""


class _Rejected(Exception):
    def __init__(self, reply: AIMessage, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


def _from_text(reply: AIMessage) -> Any:
    try:
        return json_object_from_text(message_text(reply))
    except PlanError as exc:
        raise _Rejected(reply, str(exc)) from None


def _feedback(reply: AIMessage, reason: str) -> list[BaseMessage]:
    """The rejected reply, an answer to each of its tool calls, and the reason in words."""
    messages: list[BaseMessage] = [reply]
    messages += [ToolMessage(content=f"rejected: {reason}", tool_call_id=call["id"] or "")
                 for call in reply.tool_calls]
    messages.append(HumanMessage(content=f"That plan was rejected: {reason}. Send a corrected plan."))
    return messages


def planning_messages(ctx: PlanningContext, *, instructions: str | None = None,
                      structured: bool = True) -> list[BaseMessage]:
    """The conversation a planner model starts from: only the task, the catalogue and re-plan facts."""
    system = _SYSTEM if not instructions else f"{_SYSTEM}\n\n{instructions}"
    parts = [f"Task:\n{ctx.task}", f"Tool catalogue (JSON):\n{to_json(list(ctx.catalogue))}"]
    if ctx.previous_plan is not None or ctx.failures:
        parts.append(_REPLAN.format(
            plan=to_json(ctx.previous_plan.model_dump(mode="json")) if ctx.previous_plan else "none",
            completed=to_json(list(ctx.completed)),
            failures=to_json([f.as_dict() for f in ctx.failures]),
        ))
    parts.append(_ANSWER_STRUCTURED if structured else _ANSWER_TEXT.format(schema=to_json(plan_schema())))
    return [SystemMessage(content=system), HumanMessage(content="\n\n".join(parts))]


def plan_schema() -> dict[str, Any]:
    """``Plan``'s JSON Schema with references inlined and no ``discriminator`` keywords,
    which several providers refuse in function parameters."""
    return copy.deepcopy(_plan_schema())


@cache
def _plan_schema() -> dict[str, Any]:
    schema = dereference_refs(Plan.model_json_schema())
    schema.pop("$defs", None)
    return _without_discriminators(schema)


def plan_function() -> dict[str, Any]:
    """The function a tool-calling model calls to submit its plan."""
    return function_spec(PLAN_FUNCTION, "Submit the plan for the task: its steps, in order.", plan_schema())


def _without_discriminators(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_discriminators(v) for k, v in node.items()
                if not (k == "discriminator" and isinstance(v, dict) and "propertyName" in v)}
    if isinstance(node, list):
        return [_without_discriminators(v) for v in node]
    return node

