"""What the LLM planner and executor share: function specs, data quoting, reading replies.

Tool output reaches a model only through ``quote_data``: JSON inside a ``<data>`` or
``<untrusted>`` tag whose ``<`` and ``>`` are JSON-escaped, so a tool cannot close the
tag and write outside it.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.messages import BaseMessage

from scopegraph.errors import PlanError

UNTRUSTED = "untrusted"

_FUNCTION_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(?P<body>.*?)\n?```\s*$", re.DOTALL)


def function_name(tool: str) -> str:
    """A tool name as model providers accept a function name (no dots, at most 64 characters)."""
    return _FUNCTION_NAME_BAD.sub("_", tool)[:64]


def function_spec(name: str, description: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI-style function tool, the format every LangChain ``bind_tools`` accepts."""
    return {"type": "function", "function": {"name": name, "description": description,
                                             "parameters": dict(parameters)}}


def to_json(value: Any) -> str:
    """``value`` as JSON on one line; what JSON cannot hold is written as its ``str``."""
    return json.dumps(value, ensure_ascii=False, default=str)


def quote_data(value: Any, *, source: str, labels: Iterable[str] = ()) -> str:
    """Tool output as data for a model: JSON in a tag naming where it came from.

    Output labelled ``untrusted`` goes in ``<untrusted>``, the rest in ``<data>``; both
    are declared data in the executor's instructions. ``<``, ``>`` and ``&`` are escaped
    inside the JSON (``\\u003c``…), which keeps its meaning but cannot end the tag.
    """
    label_set = sorted(set(labels))
    tag = UNTRUSTED if UNTRUSTED in label_set else "data"
    body = to_json(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    attrs = f'source="{html.escape(source)}" labels="{html.escape(",".join(label_set))}"'
    return f"<{tag} {attrs}>\n{body}\n</{tag}>"


def message_text(message: BaseMessage) -> str:
    """The text of a reply, whether its content is a string or a list of content blocks."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = [b if isinstance(b, str) else str(b.get("text", "")) for b in content
             if isinstance(b, str) or (isinstance(b, Mapping) and b.get("type") == "text")]
    return "".join(parts)


def json_object_from_text(text: str) -> dict[str, Any]:
    """The JSON object in a text reply, with or without a ```json fence around it.

    Raises:
        PlanError: the reply holds no JSON object.
    """
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group("body").strip()
    elif not body.startswith("{") and "{" in body and "}" in body:
        body = body[body.index("{"):body.rindex("}") + 1]  # prose around the object
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise PlanError(f"reply is not a JSON object: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(data, dict):
        raise PlanError(f"reply is JSON but not an object: got {type(data).__name__}")
    return data
