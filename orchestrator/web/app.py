"""The app factory: route groups in, one Starlette app out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route


async def _healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


def create_app(*groups: Sequence[BaseRoute], extra: Iterable[BaseRoute] = (),
               middleware: Sequence[Middleware] = ()) -> Starlette:
    """An ASGI app serving each group of routes (``token_routes(...)``, …) and ``/healthz``.

    Mount it inside another ASGI app with ``Mount("/auth", app=create_app(...))``: the
    URLs it reports (``/.well-known/oauth-authorization-server``) follow the mount point.
    """
    routes: list[BaseRoute] = [Route("/healthz", _healthz, methods=["GET"], name="healthz")]
    for group in groups:
        routes.extend(group)
    routes.extend(extra)
    return Starlette(routes=routes, middleware=list(middleware))
