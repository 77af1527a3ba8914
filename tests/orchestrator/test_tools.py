"""Tools: schema from the signature, validation on every call, sync and async, bad declarations."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from scopegraph import Risk, Runtime, Tool, ToolRegistry, Workflow, tool
from scopegraph.errors import ToolArgumentsError, ToolError, UnknownToolError

from ..helpers import assert_all_revoked


@tool(risk="write", labels=["pii", "confidential"])
def file_expense(employee: str, amount: int, ratio: float = 1.0, urgent: bool = False,
                 tags: list[str] | None = None) -> dict[str, Any]:
    """File an expense claim.

    More text.
    """
    return {"employee": employee, "amount": amount}


# declaration -----------------------------------------------------------------------------
def test_tool_records_name_risk_labels_and_description() -> None:
    assert isinstance(file_expense, Tool)
    assert file_expense.name == "file_expense"
    assert file_expense.risk is Risk.WRITE
    assert file_expense.labels == frozenset({"pii", "confidential"})
    assert file_expense.description.startswith("File an expense claim.")
    assert file_expense.is_async is False
    assert file_expense.accepts_confidential is False


def test_bare_decorator_and_name_override() -> None:
    @tool
    def plain(x: int) -> int:
        return x

    @tool(name="mail.send-v2", risk=Risk.EGRESS, accepts_confidential=True)
    def send(to: str) -> str:
        return to

    assert plain.name == "plain" and plain.risk is Risk.READ and plain.labels == frozenset()
    assert send.name == "mail.send-v2" and send.risk is Risk.EGRESS and send.accepts_confidential


def test_schema_comes_from_the_signature() -> None:
    schema = file_expense.json_schema()
    assert set(schema["properties"]) == {"employee", "amount", "ratio", "urgent", "tags"}
    assert sorted(schema["required"]) == ["amount", "employee"]
    assert schema["properties"]["employee"]["type"] == "string"
    assert schema["properties"]["amount"]["type"] == "integer"
    assert schema["properties"]["urgent"]["type"] == "boolean"
    assert file_expense.argument_names() == ["employee", "amount", "ratio", "urgent", "tags"]


def test_arguments_are_validated_and_normalised() -> None:
    out = file_expense.validate_arguments({"employee": "e-17", "amount": "4250"})
    assert out == {"employee": "e-17", "amount": 4250, "ratio": 1.0, "urgent": False, "tags": None}


@pytest.mark.parametrize(("arguments", "where"), [
    ({"employee": "e-17"}, "amount"),
    ({"employee": "e-17", "amount": "lots"}, "amount"),
    ({"employee": "e-17", "amount": 1, "shell": "rm -rf /"}, "shell"),
    ({"employee": ["e-17"], "amount": 1}, "employee"),
    ({"employee": "e-17", "amount": 1, "tags": "not-a-list"}, "tags"),
])
def test_bad_arguments_are_refused_naming_the_tool_and_argument(arguments: dict[str, Any], where: str) -> None:
    with pytest.raises(ToolArgumentsError) as err:
        file_expense.validate_arguments(arguments)
    message = str(err.value)
    assert "'file_expense'" in message and where in message and "\n" not in message


@pytest.mark.parametrize("name", ["has space", "path/name", "semi;colon", "ünïcode", "tab\tname", "new\nline"])
def test_bad_tool_names_are_refused(name: str) -> None:
    def f(x: int) -> int:
        return x

    with pytest.raises(ToolError, match="invalid tool name"):
        tool(f, name=name)


def test_a_lambda_needs_a_name() -> None:
    with pytest.raises(ToolError, match="'<lambda>'"):
        tool(lambda x: x)


def test_star_arguments_are_refused() -> None:
    def f(*args: Any) -> None: ...

    def g(x: int, **kwargs: Any) -> None: ...

    with pytest.raises(ToolError, match=r"\*args or \*\*kwargs"):
        tool(f)
    with pytest.raises(ToolError, match=r"\*args or \*\*kwargs"):
        tool(g)


def test_unknown_risk_tier_is_a_tool_error() -> None:
    """A bad declaration belongs to the error tree (ToolError), like every other one."""
    def f(x: int) -> int:
        return x

    with pytest.raises(ToolError):
        tool(f, risk="delete")


# registry ----------------------------------------------------------------------------------
def test_registry_refuses_duplicates_and_non_tools() -> None:
    with pytest.raises(ToolError, match="registered twice"):
        ToolRegistry([file_expense, file_expense])
    with pytest.raises(ToolError, match="declare it with @tool"):
        ToolRegistry([lambda: None])  # type: ignore[list-item]


def test_registry_lookup_of_an_unknown_tool() -> None:
    registry = ToolRegistry([file_expense])
    assert registry.get_tool("file_expense") is file_expense
    with pytest.raises(UnknownToolError, match="'nope'"):
        registry.get_tool("nope")
    with pytest.raises(UnknownToolError):
        registry["nope"]
    assert list(registry) == ["file_expense"] and len(registry) == 1


def test_registry_honours_the_mapping_protocol_for_unknown_names() -> None:
    """``ToolRegistry`` is a ``Mapping``: ``in`` and ``.get`` answer, they do not raise."""
    registry = ToolRegistry([file_expense])
    assert "file_expense" in registry
    assert "nope" not in registry
    assert registry.get("nope") is None


def test_catalogue_shows_schemas_but_no_handles() -> None:
    catalogue = ToolRegistry([file_expense]).catalogue()
    text = json.dumps(catalogue)  # plain data only: no functions, no tokens
    entry = catalogue[0]
    assert entry["name"] == "file_expense" and entry["risk"] == "write"
    assert entry["labels"] == ["confidential", "pii"]
    assert "amount" in entry["arguments"]["properties"]
    assert "function" not in text


# sync and async tools through a run ----------------------------------------------------------
calls: list[str] = []


@tool(risk="read")
async def fetch_async(url: str) -> dict[str, Any]:
    """An async tool."""
    calls.append(f"async:{url}")
    return {"url": url, "body": "hello"}


@tool(risk="read")
def measure(body: str) -> dict[str, Any]:
    calls.append(f"sync:{body}")
    return {"length": len(body)}


def test_sync_and_async_tools_run_through_the_gateway(
    make_workflow: Callable[..., Workflow], make_runtime: Callable[..., Runtime]
) -> None:
    calls.clear()
    assert fetch_async.is_async and not measure.is_async
    plan = {"steps": [
        {"id": "get", "tool": "fetch_async",
         "constraints": {"url": {"kind": "exact", "value": "https://intra/doc"}}},
        {"id": "len", "tool": "measure", "depends_on": ["get"],
         "constraints": {"body": {"kind": "any"}}},
    ]}
    rt = make_runtime(make_workflow(plan, tools=[fetch_async, measure]))
    report = rt.run("measure the doc", run_id="tools1")
    assert report.status == "completed", report.summary()
    assert calls == ["async:https://intra/doc", "sync:hello"]
    assert [s.status for s in report.steps] == ["completed", "completed"]
    assert_all_revoked(rt, "tools1", at_least=2)
