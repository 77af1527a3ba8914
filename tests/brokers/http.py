"""Serving ASGI apps on 127.0.0.1 with uvicorn for the HTTP tests, and a small downstream
service that checks the tokens it is shown: offline against the JWKS, then by introspection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def downstream_service(*, auth_url: str, audience: str, client_id: str, client_secret: str,
                       trust_domain: str) -> Starlette:
    """A resource server for ``audience``: ``GET /invoices`` with a Bearer token answers the
    customer the token's step was pinned to, if the token verifies and introspects active."""
    keys: dict[str, Any] = {}

    async def invoices(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return JSONResponse({"error": "no token"}, status_code=401)
        token = header[len("Bearer "):]
        async with httpx.AsyncClient() as client:
            if not keys:
                jwks = (await client.get(f"{auth_url}/.well-known/jwks.json",
                                         params={"trust_domain": trust_domain})).json()
                keys.update({k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys})
            try:  # offline: signature, audience, lifetime
                kid = jwt.get_unverified_header(token)["kid"]
                claims = jwt.decode(token, keys[kid].key, algorithms=["EdDSA"], audience=audience,
                                    issuer=f"spiffe://{trust_domain}")
            except (jwt.PyJWTError, KeyError) as exc:
                return JSONResponse({"error": f"token does not verify: {type(exc).__name__}"}, status_code=401)
            # online: revocation and use counts, as the store knows them now
            info = (await client.post(f"{auth_url}/oauth/introspect", data={"token": token},
                                      auth=(client_id, client_secret))).json()
        if not info.get("active"):
            return JSONResponse({"error": "token is not active"}, status_code=401)
        customer = claims["scopegraph"]["constraints"]["customer"]["value"]
        return JSONResponse({"customer": customer, "uses": info["uses"], "act": info["act"], "sub": info["sub"]})

    return Starlette(routes=[Route("/invoices", invoices, methods=["GET"])])
