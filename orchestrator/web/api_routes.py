"""The inbox's JSON API, behind the same sign-in as the pages (for bots and other UIs).

Every endpoint needs the session cookie; every POST also the session's CSRF token in
``X-CSRF-Token`` (``GET /api/session`` tells it). Lists and pages never carry argument
values a tool declares secret.

- ``GET /api/session``: ``{"approver", "csrf"}``.
- ``GET /api/approvals[?status=pending|answered]``: the requests you may answer, newest first.
- ``GET /api/approvals/{id}``: one request in full (the call, why, the plan, what the run read).
- ``POST /api/approvals/{id}/answer/begin`` ``{"decision": "approve"|"deny", "reason",
  "propose"?}``: WebAuthn request options whose challenge binds this answer to this call,
  and the ``nonce`` to send back.
- ``POST /api/approvals/{id}/answer/finish`` ``{"decision", "reason", "propose"?, "nonce",
  "credential"}``: records the answer with its assertion; on PostgreSQL queues the resume.
- ``POST /api/runs/{run_id}/resume``: resume an answered run here (SQLite stores).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..approvers import Decision
from ..errors import ApprovalError, ScopegraphError
from ..passkeys import b64url, unb64url
from .auth_routes import assertion_from, read_json
from .inbox import Inbox
from .security import CSRF_HEADER, RateLimiter, Sessions, SignedIn, csrf_ok, json_error, same_origin

Endpoint = Callable[[Request, SignedIn], Awaitable[Response]]


def api_routes(inbox: Inbox, sessions: Sessions, *, answer_limit: RateLimiter) -> list[BaseRoute]:
    """The JSON API's routes."""
    import webauthn
    from webauthn.helpers import options_to_json
    from webauthn.helpers.structs import PublicKeyCredentialDescriptor, UserVerificationRequirement

    def authenticated(endpoint: Endpoint, *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            who = await run_in_threadpool(sessions.current, request)
            if who is None:
                return json_error("sign in first", 401)
            if post:
                if not same_origin(request, inbox.site.origin):
                    return json_error("cross-origin request refused", 403)
                if not csrf_ok(who, request.headers.get(CSRF_HEADER)):
                    return json_error("missing or wrong CSRF token", 403)
            return await endpoint(request, who)
        return handle

    async def session(request: Request, who: SignedIn) -> Response:
        return JSONResponse({"approver": who.name, "csrf": who.csrf})

    async def approvals(request: Request, who: SignedIn) -> Response:
        status = request.query_params.get("status")
        pending = {"pending": True, "answered": False}.get(status or "")
        if status not in (None, "pending", "answered"):
            return json_error("status is pending or answered", 400)
        found = await run_in_threadpool(inbox.visible, who.name, pending=pending)
        return JSONResponse([inbox.summary(a) for a in found])

    async def approval(request: Request, who: SignedIn) -> Response:
        try:
            a = await run_in_threadpool(inbox.get, request.path_params["approval_id"], who.name)
        except ApprovalError as exc:
            return json_error(str(exc), 404)
        return JSONResponse(await run_in_threadpool(inbox.detail, a))

    async def answer_body(request: Request) -> tuple[Decision, str, dict[str, Any] | None, dict[str, Any]]:
        body = await read_json(request)
        decision, reason, propose = body.get("decision"), body.get("reason", ""), body.get("propose")
        if decision not in ("approve", "deny"):
            raise ValueError("decision is approve or deny")
        if not isinstance(reason, str):
            raise ValueError("reason is a string")
        if propose is not None and (decision != "deny" or not isinstance(propose, dict)):
            raise ValueError("propose is a JSON object of arguments, with a denial only")
        return ("approve" if decision == "approve" else "deny"), reason, propose, body

    async def answer_begin(request: Request, who: SignedIn) -> Response:
        refused = answer_limit.refused(who.name, "too many answers from you in a minute")
        if refused is not None:
            return refused
        try:
            decision, reason, propose, _ = await answer_body(request)
        except ValueError as exc:
            return json_error(str(exc), 400)
        try:
            a = await run_in_threadpool(inbox.get, request.path_params["approval_id"], who.name)
            begun = await run_in_threadpool(
                lambda: inbox.begin_answer(a, who.name, decision=decision, reason=reason, propose=propose))
        except ApprovalError as exc:
            return json_error(str(exc), 409)
        options = webauthn.generate_authentication_options(
            rp_id=inbox.site.rp_id, challenge=begun["challenge"],
            user_verification=UserVerificationRequirement.REQUIRED,
            allow_credentials=[PublicKeyCredentialDescriptor(id=unb64url(c)) for c in begun["credential_ids"]])
        return JSONResponse({"nonce": begun["nonce"], "digest": a.digest, "challenge": b64url(begun["challenge"]),
                             "options": json.loads(options_to_json(options))})

    async def answer_finish(request: Request, who: SignedIn) -> Response:
        refused = answer_limit.refused(who.name, "too many answers from you in a minute")
        if refused is not None:
            return refused
        try:
            decision, reason, propose, body = await answer_body(request)
            nonce = body.get("nonce")
            if not isinstance(nonce, str):
                raise ValueError("missing nonce")
            assertion = assertion_from(body.get("credential"), nonce)
        except ValueError as exc:
            return json_error(str(exc).splitlines()[0][:200], 400)
        try:
            a = await run_in_threadpool(inbox.get, request.path_params["approval_id"], who.name)
            done = await run_in_threadpool(lambda: inbox.answer(a, who.name, decision=decision, reason=reason,
                                                                propose=propose, assertion=assertion))
        except ApprovalError as exc:
            return json_error(str(exc), 409)
        queued = done.status != "pending" and await run_in_threadpool(inbox.queue_resume, done.run_id)
        return JSONResponse({**inbox.summary(done), "resume_queued": queued,
                             "resumable_here": done.status != "pending" and not queued,
                             "answers": done.answers()})

    async def resume(request: Request, who: SignedIn) -> Response:
        run_id = request.path_params["run_id"]
        mine = await run_in_threadpool(lambda: [a for a in inbox.visible(who.name) if a.run_id == run_id])
        if not mine:
            return json_error(f"no run {run_id[:40]!r} for you", 404)
        try:
            status = await run_in_threadpool(inbox.resume, run_id)
        except ScopegraphError as exc:
            return json_error(str(exc), 409)
        return JSONResponse({"run_id": run_id, "status": status})

    return [
        Route("/api/session", authenticated(session), methods=["GET"]),
        Route("/api/approvals", authenticated(approvals), methods=["GET"]),
        Route("/api/approvals/{approval_id}", authenticated(approval), methods=["GET"]),
        Route("/api/approvals/{approval_id}/answer/begin", authenticated(answer_begin, post=True), methods=["POST"]),
        Route("/api/approvals/{approval_id}/answer/finish", authenticated(answer_finish, post=True),
              methods=["POST"]),
        Route("/api/runs/{run_id}/resume", authenticated(resume, post=True), methods=["POST"]),
    ]
