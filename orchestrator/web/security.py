"""The inbox's web defences in one place: headers, sessions, CSRF, same-origin, rate limits.

- Every response carries a strict Content-Security-Policy (scripts, styles and fonts from
  this origin only, no inline code, no framing), ``nosniff``, a same-origin
  ``Referer`` only, and ``no-store``.
- A session is a random token in a cookie that is ``Secure``, ``HttpOnly`` and
  ``SameSite=Strict``; the store keeps only its SHA-256 with the approver's name and a
  CSRF token. Chromium counts ``http://localhost`` as a secure context, so a Secure
  cookie works there without TLS.
- Every state change (POST) must come from this origin (``Origin`` checked when the
  browser sends it, and it always does for a POST) and, once signed in, carry the
  session's CSRF token (form field ``csrf`` or header ``X-CSRF-Token``).
- Sign-in and answers are rate-limited per client address and per approver.
"""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..clock import Clock
from ..passkeys import token_hash
from ..store import Store
from ..store.web_records import WebSession, WebStore

SESSION_COOKIE = "sg_session"
SESSION_TTL = 8 * 3600.0
CSRF_HEADER = "x-csrf-token"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    # Not "no-referrer": with it Chromium sends "Origin: null" on form posts, which
    # ``same_origin`` refuses. Nothing secret is in a URL (an invitation is in the fragment).
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
}


class SecurityHeaders:
    """ASGI middleware: the headers above on every response (``no-store`` unless a static asset)."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.decode("latin-1").lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                if self.hsts:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


class RateLimiter:
    """At most ``limit`` events per ``window`` seconds per key (a sliding window, in memory).

    Monotonic time, not the app's clock: a test's fixed clock must not switch limits off.
    """

    def __init__(self, limit: int, window: float = 60.0, *, now: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self._now = limit, window, now
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str) -> bool:
        now = self._now()
        events = self._events.setdefault(key, deque())
        while events and events[0] <= now - self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def retry_after(self, key: str) -> int:
        """Whole seconds until ``key`` may act again (at least 1)."""
        events = self._events.get(key)
        if not events:
            return 1
        return max(1, math.ceil(events[0] + self.window - self._now()))

    def refused(self, key: str, too_many: str) -> Response | None:
        """``None`` when ``key`` may act now (counted); else a 429 saying ``too_many`` and
        when to try again, in words and in ``Retry-After``."""
        if self.allow(key):
            return None
        wait = self.retry_after(key)
        return json_error(f"{too_many}: try again in {wait} s", 429, headers={"Retry-After": str(wait)})


@dataclass(frozen=True, kw_only=True)
class SignedIn:
    """The approver a request comes from, and their session's CSRF token."""

    name: str
    csrf: str
    token_hash: str


class Sessions:
    """Browser sessions kept in the store (so several server processes share them)."""

    def __init__(self, store: Store, clock: Clock, *, ttl: float = SESSION_TTL) -> None:
        self.records = cast(WebStore, store)
        self.clock = clock
        self.ttl = ttl

    def start(self, name: str, response: Response) -> SignedIn:
        """Sign ``name`` in: a new session, its cookie set on ``response``."""
        token = secrets.token_urlsafe(32)
        now = self.clock.now()
        session = WebSession(name=name, csrf=secrets.token_urlsafe(24), created_at=now, expires_at=now + self.ttl)
        self.records.add_web_session(token_hash(token), session)
        response.set_cookie(SESSION_COOKIE, token, max_age=int(self.ttl), path="/", secure=True, httponly=True,
                            samesite="strict")
        return SignedIn(name=name, csrf=session.csrf, token_hash=token_hash(token))

    def current(self, request: Request) -> SignedIn | None:
        token = request.cookies.get(SESSION_COOKIE)
        if not token or len(token) > 256:
            return None
        found = self.records.web_session(token_hash(token), now=self.clock.now())
        if found is None:
            return None
        return SignedIn(name=found.name, csrf=found.csrf, token_hash=token_hash(token))

    def end(self, signed_in: SignedIn, response: Response) -> None:
        self.records.end_web_session(signed_in.token_hash, at=self.clock.now())
        response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")


def same_origin(request: Request, origin: str) -> bool:
    """Whether a state-changing request comes from the inbox's own pages.

    Browsers send ``Origin`` with every POST; a client that sends none (a bot with a
    session cookie) is held to the CSRF token alone."""
    sent = request.headers.get("origin")
    return sent is None or sent == origin


def csrf_ok(signed_in: SignedIn, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(str(given).encode(), signed_in.csrf.encode())


Handler = Callable[[Request], Awaitable[Response]]


def client_key(request: Request) -> str:
    return request.client.host if request.client is not None else "-"


def json_error(message: str, status: int, *, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def form_value(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None
