"""scopegraph's HTTP side: one ASGI app made of route groups, mountable in any ASGI app.

``create_app(token_routes(service))`` serves token exchange and introspection (see
``scopegraph.brokers.tokens``); other groups (an approval inbox) join the same app the
same way. ``scopegraph serve`` runs it with uvicorn.
"""

from __future__ import annotations

from .app import create_app
from .token_routes import token_routes

__all__ = ["create_app", "token_routes"]
