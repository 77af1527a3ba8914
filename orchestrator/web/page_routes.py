"""The inbox's pages: server-rendered (Jinja2, autoescaped), one small local script.

``/`` the pending requests you may answer; ``/history`` the answered ones;
``/requests/{id}`` one request; ``/login`` and ``/enrol`` (the invitation's token is in
the link's fragment, so it never reaches a log or a ``Referer``). Forms that change
state (``/logout``, the resume button) carry the session's CSRF token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..approval_events import ApprovalEventFeed
from ..approvals import shown
from ..errors import ApprovalError, ScopegraphError
from ..prompt import relative
from ..timestamps import iso
from .inbox import Inbox
from .security import Sessions, SignedIn, csrf_ok, form_value, same_origin

HERE = Path(__file__).parent


def templates() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["shown"] = lambda text: shown(str(text))  # others' words: no bidi or control characters
    env.filters["iso"] = iso
    env.filters["relative"] = relative
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False, sort_keys=True)
    return env


def page_routes(inbox: Inbox, sessions: Sessions, feed: ApprovalEventFeed) -> list[BaseRoute]:
    """The pages and the static assets."""
    env = templates()

    def render(name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**{"since": "", **values}), status_code=status)

    def error(who: SignedIn | None, message: str, status: int) -> HTMLResponse:
        return render("error.html", status, who=who, message=message, active="")

    async def signed_in(request: Request) -> SignedIn | None:
        return await run_in_threadpool(sessions.current, request)

    async def inbox_page(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        since = await run_in_threadpool(feed.head)  # before reading: nothing falls between page and stream
        found = await run_in_threadpool(inbox.visible, who.name, pending=True)
        return render("inbox.html", who=who, items=[inbox.summary(a) for a in found], active="inbox", since=since)

    async def history_page(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        since = await run_in_threadpool(feed.head)
        found = await run_in_threadpool(inbox.visible, who.name, pending=False)
        return render("history.html", who=who, items=[{**inbox.summary(a), "answers": a.answers()} for a in found],
                      active="history", since=since)

    async def request_page(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        since = await run_in_threadpool(feed.head)
        try:
            a = await run_in_threadpool(inbox.get, request.path_params["approval_id"], who.name)
        except ApprovalError as exc:
            return error(who, str(exc), 404)
        view = await run_in_threadpool(inbox.detail, a)
        already = any(g["approver"] == who.name for g in view["answers"])
        return render("request.html", who=who, a=view, answered_by_me=already, active="inbox",
                      workers=inbox.store_url.startswith(("postgresql://", "postgres://")),
                      notice=request.query_params.get("resumed", ""), since=since)

    async def resume_form(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return error(None, "sign in first", 401)
        form = await request.form()
        if not same_origin(request, inbox.site.origin) or not csrf_ok(who, form_value(form, "csrf")):
            return error(who, "this form is not from your session (CSRF check failed): nothing was done", 403)
        approval_id = form_value(form, "approval_id") or ""
        try:
            a = await run_in_threadpool(inbox.get, approval_id, who.name)
            status = await run_in_threadpool(inbox.resume, a.run_id)
        except ScopegraphError as exc:
            return error(who, str(exc), 409)
        return RedirectResponse(f"/requests/{a.id}?resumed={status}", status_code=303)

    async def logout(request: Request) -> Response:
        who = await signed_in(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        form = await request.form()
        if not same_origin(request, inbox.site.origin) or not csrf_ok(who, form_value(form, "csrf")):
            return error(who, "this form is not from your session (CSRF check failed): nothing was done", 403)
        response = RedirectResponse("/login", status_code=303)
        await run_in_threadpool(sessions.end, who, response)
        return response

    async def login_page(request: Request) -> Response:
        return render("login.html", who=None, active="login")

    async def enrol_page(request: Request) -> Response:
        return render("enrol.html", who=None, active="enrol")

    return [
        Route("/", inbox_page, methods=["GET"]),
        Route("/history", history_page, methods=["GET"]),
        Route("/requests/{approval_id}", request_page, methods=["GET"]),
        Route("/resume", resume_form, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/enrol", enrol_page, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
