"""A feed of what happens to approval requests: created, answered, expired.

Events are derived from what the store already holds, read-only and without a table of
their own. The ledger gives the order: every request has its ``approval_requested`` record
and every answer its ``approval_decided`` one (``audit verify`` checks the store against
them), and the ledger's ``seq`` is handed out under the chain tip's lock, so records become
visible in ``seq`` order on SQLite and PostgreSQL alike. A cursor after ``seq`` therefore
misses nothing. The approval rows' own ``seq`` would not do: a PostgreSQL identity is taken
before the commit, so a smaller number can appear after a larger one, and an answer
changes a row without changing its number.

Expiry is time passing, not a write. A request is announced as expired once the feed's
clock is ``expiry_settle`` seconds past its expiry while its row still says ``pending`` (the
settle lets an answer given just before the expiry finish committing first). Which
expiries were announced is part of the cursor (see ``_Cursor``), so a client that resumes
from any event's cursor gets every later event once.

Within one read, the ledger's events come first (in commit order), then the expiries the
read noticed (by expiry time): an expiry never comes before its request's creation or
answers. Events carry no argument values, reasons or signatures: tool, ids and times only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .approvals import ApprovalRequest
from .clock import Clock, SystemClock
from .errors import ConfigError
from .store import LedgerRow, Store
from .timestamps import iso

EventKind = Literal["request.created", "request.answered", "request.expired"]
_KINDS = ("approval_requested", "approval_decided")
_CURSOR_PREFIX = "c1."
_ALL_IDS = "~"  # sorts after every approval id ("apr_" and hex): "every request expiring at T"


@dataclass(frozen=True, kw_only=True)
class ApprovalEvent:
    """One thing that happened to one approval request.

    ``kind``: ``request.created``, ``request.answered`` (one per answer: a two-person request
    has two) or ``request.expired``. ``at``: when it happened (seconds since the epoch; for an
    expiry, the request's expiry time). ``cursor``: pass it back to get the events after this one.
    An answer also says who gave it (``approver``), how (``answer``: ``approve`` or ``deny``) and
    the request's status after it (``status``: ``pending`` while more approvers are needed).
    """

    kind: str
    approval_id: str
    run_id: str
    tool: str
    at: float
    cursor: str
    approver: str | None = None
    answer: str | None = None
    status: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The event as JSON (what SSE and webhooks send): no argument values, no reasons."""
        out: dict[str, Any] = {"kind": self.kind, "approval_id": self.approval_id, "run_id": self.run_id,
                               "tool": self.tool, "at": self.at, "at_iso": iso(self.at)}
        if self.kind == "request.answered":
            out.update(approver=self.approver, answer=self.answer, status=self.status)
        out["cursor"] = self.cursor
        return out


@dataclass(frozen=True)
class _Step:
    """Expiries announced: of every request created at ledger ``seq`` or before whose
    ``(expires_at, id)`` is at most ``(expires_at, last_id)``."""

    seq: int
    expires_at: float
    last_id: str

    def covers(self, created_seq: int, key: tuple[float, str]) -> bool:
        return created_seq <= self.seq and key <= (self.expires_at, self.last_id)


@dataclass(frozen=True)
class _Cursor:
    """Where a reader stands: every ledger event up to ``seq``, and the expiries ``steps`` cover.

    The expiries announced form a staircase of at most a few steps: a read announces the
    expiries of the requests known so far in expiry order, while the requests it learned of
    in the same read expire "earlier" than some it announced before; after a whole read
    the staircase is one step again.
    """

    seq: int
    steps: tuple[_Step, ...]

    def covered(self, created_seq: int, key: tuple[float, str]) -> bool:
        return any(step.covers(created_seq, key) for step in self.steps)

    def with_step(self, step: _Step) -> _Cursor:
        steps = [s for s in self.steps if not (s.seq <= step.seq and (s.expires_at, s.last_id)
                                               <= (step.expires_at, step.last_id))]
        return _Cursor(self.seq, tuple(sorted([*steps, step], key=lambda s: s.seq)))

    def encode(self) -> str:
        raw = json.dumps([self.seq, [[s.seq, s.expires_at, s.last_id] for s in self.steps]], separators=(",", ":"))
        return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: str | None) -> _Cursor:
        """Raises:
            ConfigError: ``cursor`` is not one this feed gave out.
        """
        if cursor is None:
            return cls(0, ())
        try:
            if not cursor.startswith(_CURSOR_PREFIX) or len(cursor) > 4096:
                raise ValueError
            body = cursor[len(_CURSOR_PREFIX):]
            seq, steps = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            parsed = tuple(_Step(int(s), float(t), str(i)) for s, t, i in steps)
            if not isinstance(seq, int) or seq < 0 or any(s.seq < 0 for s in parsed):
                raise ValueError
        except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
            shown = cursor if len(cursor) <= 80 else cursor[:80] + "…"
            raise ConfigError(f"malformed approval event cursor {shown!r}") from None
        return cls(seq, parsed)


@dataclass(frozen=True)
class _Known:
    """What the feed remembers of a request from its ``approval_requested`` record."""

    created_seq: int
    run_id: str
    tool: str
    expires_at: float


class ApprovalEventFeed:
    """Approval events from a store, by cursor (``since``) or as they happen (``follow``).

    One feed may serve many readers at once (each with its own cursor); it remembers, for
    every request it has seen, its tool, run and expiry, which it learns from the ledger
    once and then only from the records appended since.
    """

    def __init__(self, store: Store, *, clock: Clock | None = None, poll_interval: float = 0.5,
                 expiry_settle: float = 1.0) -> None:
        self.store = store
        self.clock: Clock = clock or SystemClock()
        self.poll_interval = poll_interval
        self.expiry_settle = expiry_settle
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}
        self._final: set[str] = set()  # answered for good (approved or denied): never expires
        self._read_upto = 0  # ledger records up to here are in ``_known``

    def head(self) -> str:
        """A cursor at the present: the events after it are those that happen from now on."""
        last = self.store.ledger_last()
        return _Cursor(0 if last is None else last[0], ()).with_step(
            _Step(0 if last is None else last[0], self._expiry_horizon(()), _ALL_IDS)).encode()

    def since(self, cursor: str | None) -> list[ApprovalEvent]:
        """Every event after ``cursor`` (``None``: from the first), each with its own cursor.

        Raises:
            ConfigError: a malformed cursor. StoreError: the store cannot be read.
        """
        start = _Cursor.decode(cursor)
        with self._lock:
            rows = self.store.ledger_rows_after(min(start.seq, self._read_upto), kinds=_KINDS)
            for row in rows:
                if row.seq > self._read_upto:
                    self._learn(row)
            if rows:
                self._read_upto = max(self._read_upto, rows[-1].seq)
            fresh = [r for r in rows if r.seq > start.seq]
            end_seq = max(start.seq, fresh[-1].seq if fresh else start.seq)
            horizon = self._expiry_horizon(start.steps)
            expiring = self._expired(start, end_seq, horizon)

        events: list[ApprovalEvent] = []
        position = start
        for row in fresh:
            position = _Cursor(row.seq, position.steps)
            event = self._event(row, position.encode())
            if event is not None:
                events.append(event)
        position = _Cursor(end_seq, position.steps)
        for approval_id, known in expiring:
            position = position.with_step(_Step(end_seq, known.expires_at, approval_id))
            events.append(ApprovalEvent(kind="request.expired", approval_id=approval_id, run_id=known.run_id,
                                        tool=known.tool, at=known.expires_at, cursor=position.encode()))
        return events

    async def follow(self, cursor: str | None = None) -> AsyncIterator[ApprovalEvent]:
        """The events after ``cursor`` (``None``: from the first; ``head()``: from now), then
        each new one as it happens, polling the store every ``poll_interval`` seconds; ends
        only when the consumer stops iterating (or the task is cancelled)."""
        while True:
            events = await asyncio.to_thread(self.since, cursor)
            for event in events:
                cursor = event.cursor
                yield event
            if not events:
                await asyncio.sleep(self.poll_interval)

    # inside ``since`` ----------------------------------------------------------------------
    def _expiry_horizon(self, steps: Sequence[_Step]) -> float:
        # Never behind a horizon already given out: a clock set back must not take a step back.
        return max([self.clock.now() - self.expiry_settle, *(s.expires_at for s in steps)])

    def _learn(self, row: LedgerRow) -> None:
        data = _data(row)
        approval_id = data.get("approval_id")
        if not isinstance(approval_id, str):
            return
        if row.kind == "approval_requested" and approval_id not in self._known:
            expires_at = data.get("expires_at")
            self._known[approval_id] = _Known(
                created_seq=row.seq, run_id=row.run_id, tool=str(data.get("tool", "")),
                expires_at=float(expires_at) if isinstance(expires_at, (int, float)) else float("inf"))
        elif row.kind == "approval_decided" and data.get("status") in ("approved", "denied", "consumed"):
            self._final.add(approval_id)

    def _expired(self, start: _Cursor, end_seq: int, horizon: float) -> list[tuple[str, _Known]]:
        """Requests created up to ``end_seq``, expired by ``horizon``, still pending, not announced yet."""
        due = sorted(((known.expires_at, approval_id), known) for approval_id, known in self._known.items()
                     if known.created_seq <= end_seq and known.expires_at <= horizon
                     and approval_id not in self._final
                     and not start.covered(known.created_seq, (known.expires_at, approval_id)))
        out: list[tuple[str, _Known]] = []
        for (_, approval_id), known in due:
            stored = self.store.get_approval(approval_id)
            # The row, not the ledger, has the last word: it is where answers are checked.
            if stored is not None and ApprovalRequest.model_validate_json(stored).status == "pending":
                out.append((approval_id, known))
            else:
                self._final.add(approval_id)
        return out

    def _event(self, row: LedgerRow, cursor: str) -> ApprovalEvent | None:
        data = _data(row)
        approval_id = data.get("approval_id")
        if not isinstance(approval_id, str):
            return None
        known = self._known.get(approval_id)
        tool = known.tool if known is not None else _stored_tool(self.store, approval_id)
        if row.kind == "approval_requested":
            return ApprovalEvent(kind="request.created", approval_id=approval_id, run_id=row.run_id, tool=tool,
                                 at=row.at, cursor=cursor)
        return ApprovalEvent(kind="request.answered", approval_id=approval_id, run_id=row.run_id, tool=tool,
                             at=row.at, cursor=cursor, approver=_text(data.get("approver")),
                             answer=_text(data.get("answer")), status=_text(data.get("status")))


def _data(row: LedgerRow) -> Mapping[str, Any]:
    try:
        data = json.loads(row.data)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _stored_tool(store: Store, approval_id: str) -> str:
    """The tool of a request the ledger never announced (its record is missing): from its row."""
    stored = store.get_approval(approval_id)
    return ApprovalRequest.model_validate_json(stored).tool if stored is not None else ""
