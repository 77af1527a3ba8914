"""The approval inbox as one route group: pages, passkey sign-in, the JSON API, live events."""

from __future__ import annotations

from starlette.routing import BaseRoute

from ..approval_events import ApprovalEventFeed
from .api_routes import api_routes
from .auth_routes import auth_routes
from .events import event_routes
from .inbox import Inbox
from .page_routes import page_routes
from .security import RateLimiter, Sessions

LOGIN_ATTEMPTS_PER_MINUTE = 20  # per client address: each sign-in or enrolment takes two
ANSWERS_PER_MINUTE = 30  # per approver: each answer takes two


def inbox_routes(inbox: Inbox, *, login_limit: RateLimiter | None = None,
                 answer_limit: RateLimiter | None = None) -> list[BaseRoute]:
    """Every route of the inbox over ``inbox`` (serve it behind ``security.SecurityHeaders``)."""
    sessions = Sessions(inbox.store, inbox.clock)
    feed = ApprovalEventFeed(inbox.store, clock=inbox.clock, poll_interval=0.5)
    routes: list[BaseRoute] = []
    routes += auth_routes(inbox, sessions, login_limit=login_limit or RateLimiter(LOGIN_ATTEMPTS_PER_MINUTE))
    routes += api_routes(inbox, sessions, answer_limit=answer_limit or RateLimiter(ANSWERS_PER_MINUTE))
    routes += event_routes(inbox, sessions, feed)
    routes += page_routes(inbox, sessions, feed)
    return routes

