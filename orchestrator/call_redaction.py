"""What the gateway records of a call, kept free of the secrets the call held.

A call holds two kinds of secret: the values of its tool's secret arguments (as given,
and as the tool saw them after validation: ``"0042"`` → 42) and the downstream
credentials issued to its tool for the step (see ``scopegraph.brokers``). A tool's
error, a denial's reasons and a span's failure message all pass through here before
anything keeps them; ``redaction.scrub`` does the matching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .call_checks import recordable
from .calls import MAX_ERROR_CHARS, TOKEN_PATTERN
from .policy import Decision
from .redaction import scrub, secret_values
from .tools import ToolRegistry

if TYPE_CHECKING:
    from .brokers.service import SecretService


class CallRedactor:
    """Scrubs what is recorded of a call to one of ``tools``."""

    __slots__ = ("tools", "secrets")

    def __init__(self, tools: ToolRegistry, secrets: SecretService | None) -> None:
        self.tools = tools
        self.secrets = secrets  # the broker service whose issued credentials are scrubbed too

    def pairs(self, tool_name: str, *argument_sets: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """The ``(name, value)`` of every secret a call of ``tool_name`` with these arguments held."""
        tool = self.tools.get(tool_name) if isinstance(tool_name, str) else None
        # The secrets of the credentials it holds are scrubbed like secret arguments.
        held = self.secrets.scrub_pairs() if tool is not None and tool.credentials and self.secrets else []
        if tool is None or not tool.secrets:
            return held
        sets = list(argument_sets)
        for arguments in argument_sets:  # the values as the tool saw them, too (``"0042"`` → 42)
            try:
                sets.append(tool.validate_arguments(arguments))
            except Exception:  # invalid: the tool never saw them, the raw values are all there is
                continue
        return secret_values(tool.secrets, *sets) + held

    def text(self, tool_name: str, text: str, *argument_sets: Mapping[str, Any]) -> str:
        """``text`` without the values of the call's secrets."""
        secrets = self.pairs(tool_name, *argument_sets)
        return scrub(text, secrets) if secrets else text

    def decision(self, tool_name: str, decision: Decision, arguments: Mapping[str, Any]) -> Decision:
        """A denial whose reasons cannot carry a secret argument's value, and can be recorded."""
        secrets = self.pairs(tool_name, arguments)
        return replace(decision, reasons=tuple(recordable(scrub(r, secrets) if secrets else r)
                                               for r in decision.reasons))

    def failure(self, tool_name: str, error_type: str, exc: object, *argument_sets: Mapping[str, Any]) -> str:
        """A failed call's error: the tool, the exception's type and its scrubbed message.

        Scrubbed before it is shortened, so a cut cannot leave part of a secret behind. A
        token in it (a tool that holds the step's grant may quote its own request) goes too.
        """
        try:
            message = str(exc)
        except Exception:  # an exception whose ``__str__`` raises: its type must do
            message = ""
        message = recordable(self.text(tool_name, message, *argument_sets))
        # Tokens are looked for in a bounded window (the pattern backtracks): any token
        # cut off at its edge lies past the final cut below.
        message = TOKEN_PATTERN.sub("[token]", message[:MAX_ERROR_CHARS + 4096])
        if len(message) > MAX_ERROR_CHARS:
            message = message[:MAX_ERROR_CHARS] + "…"
        return f"tool {tool_name!r} failed: {error_type}" + (f": {message}" if message else "")
