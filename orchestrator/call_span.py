"""The ``execute_tool`` span of a call a host drives in two halves (``Session.check``, then
``execute`` or ``record``): one span from the check to the call's end, as a runtime
call's span wraps the whole call.

The span is opened in a copy of the caller's context, so it is never left current in the
host's own context between the two halves (a host may check several calls before running
any, or run them on other tasks). It is the parent of what scopegraph does for the call
(the decision, the tool's run or its record) only inside ``current``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from opentelemetry import trace

from . import tracing as tr
from .calls import CallResult
from .identity import SpiffeId


class HostCallSpan:
    """One call's ``execute_tool`` span, open until ``end``. Without an SDK it is nothing."""

    __slots__ = ("_context", "_opened", "span")

    def __init__(self, tool: str, *, run_id: str, step_id: str, principal: SpiffeId) -> None:
        self._context: contextvars.Context | None = None
        self._opened: AbstractContextManager[Any] | None = None
        self.span: Any = trace.INVALID_SPAN
        if not tr.enabled():
            return
        self._context = contextvars.copy_context()
        self._opened = tr.tool_call_span(tool, run_id=run_id, step_id=step_id, principal=principal)
        self.span = self._context.run(self._opened.__enter__)

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the span the parent of the spans opened inside (in the caller's context)."""
        if self._context is None:
            yield
            return
        # No exception recording: a tool's message may quote a secret argument (the gateway
        # records the scrubbed one on the tool's own span).
        with trace.use_span(self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            yield

    def end(self, result: CallResult | None, error: BaseException | None = None) -> None:
        """End the span with what came of the call (``None``: abandoned, its step ended
        before it ran); ``error`` escaped the call. Ending twice does nothing."""
        context, opened, self._context, self._opened = self._context, self._opened, None, None
        if context is None or opened is None:
            return
        if result is not None:
            tr.tool_call_ended(self.span, status=result.status, decision=result.decision.outcome,
                               policy_ids=result.decision.policy_ids, reasons=result.decision.reasons,
                               error_type=result.error_type)
        context.run(opened.__exit__, type(error) if error is not None else None, error, None)
