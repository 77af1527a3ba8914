"""``GET /api/events``: approval events as server-sent events, for the signed-in approver only.

Each event is one ``ApprovalEventFeed`` event (``request.created``, ``request.answered``,
``request.expired``; no argument values, no reasons) about a request this approver may
answer (``Inbox.may_answer``); others' requests never show, not even their ids. The SSE
``id`` is the feed's cursor, so a browser that reconnects (``Last-Event-ID``) misses nothing.
A page is rendered with the feed's cursor of that moment and opens its stream with
``?since=CURSOR``: what happens between rendering the page and connecting still arrives.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from ..approval_events import ApprovalEvent, ApprovalEventFeed
from ..errors import ApprovalError, ConfigError
from .inbox import Inbox
from .security import Sessions, json_error


def event_routes(inbox: Inbox, sessions: Sessions, feed: ApprovalEventFeed) -> list[BaseRoute]:
    """The SSE route over one feed shared by every reader (each has its own cursor)."""

    async def events(request: Request) -> Response:
        who = await run_in_threadpool(sessions.current, request)
        if who is None:
            return json_error("sign in first", 401)
        start = request.headers.get("last-event-id") or request.query_params.get("since") or None
        try:
            cursor = start if start is not None else await run_in_threadpool(feed.head)
            await run_in_threadpool(feed.since, cursor)  # a malformed cursor is refused here, not mid-stream
        except ConfigError:
            return json_error("malformed Last-Event-ID or since", 400)
        visible: dict[str, bool] = {}

        def may_see(event: ApprovalEvent) -> bool:
            if event.approval_id not in visible:
                try:
                    inbox.get(event.approval_id, who.name)
                    visible[event.approval_id] = True
                except ApprovalError:
                    visible[event.approval_id] = False
            return visible[event.approval_id]

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            async for event in feed.follow(cursor):
                if await request.is_disconnected():
                    return
                if await run_in_threadpool(may_see, event):
                    yield f"id: {event.cursor}\nevent: {event.kind}\ndata: {json.dumps(event.as_json())}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return [Route("/api/events", events, methods=["GET"])]
