"""HTTP endpoints of token exchange (RFC 8693) and introspection (RFC 7662).

``POST /oauth/token`` takes ``application/x-www-form-urlencoded`` with
``grant_type=urn:ietf:params:oauth:grant-type:token-exchange``, ``subject_token`` (a live
step grant), ``subject_token_type`` and exactly one ``audience`` (optional ``scope``,
``requested_token_type``); it answers the RFC 8693 JSON, or ``400`` with an OAuth
``error``. No client authentication: the grant is the credential.

``POST /oauth/introspect`` takes ``token`` (and an optional ``token_type_hint``) from an
authenticated client: HTTP Basic (``client_secret_basic``) or ``client_id`` and
``client_secret`` in the body (``client_secret_post``); an unauthenticated caller gets
``401 invalid_client``.

``GET /.well-known/oauth-authorization-server`` (RFC 8414) names both endpoints and the
JWKS; ``GET /.well-known/jwks.json?trust_domain=NAME`` serves a trust domain's keys, so an
audience can verify exchanged tokens offline. Every answer carrying a token is
``Cache-Control: no-store``; no token ever reaches a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..brokers.tokens import ACCESS_TOKEN_TYPE, SUBJECT_TOKEN_TYPES, TOKEN_EXCHANGE_GRANT, TokenService
from ..errors import TokenRequestError

MAX_BODY_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class _BadRequest(Exception):
    def __init__(self, code: str, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.status, self.headers = code, status, dict(headers or {})


def _error(code: str, message: str, status: int = 400, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": code, "error_description": message}, status_code=status,
                        headers={**_NO_STORE, **(headers or {})})


async def _form(request: Request) -> dict[str, str]:
    """The request's form parameters; each at most once (RFC 6749 section 3.2)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise _BadRequest("invalid_request", "send application/x-www-form-urlencoded")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _BadRequest("invalid_request", f"the request body is over {MAX_BODY_BYTES} bytes", 413)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest("invalid_request", "the request body is not a valid form") from None
    form: dict[str, str] = {}
    for key, value in pairs:
        if key in form:
            raise _BadRequest("invalid_request", f"parameter {key!r} is given more than once")
        form[key] = value
    return form


def token_routes(service: TokenService, *, prefix: str = "/oauth") -> list[BaseRoute]:
    """The routes of token exchange, introspection, metadata and JWKS for ``service``."""

    async def token(request: Request) -> Response:
        try:
            form = await _form(request)
            if form.get("grant_type") != TOKEN_EXCHANGE_GRANT:
                raise _BadRequest("unsupported_grant_type", f"grant_type must be {TOKEN_EXCHANGE_GRANT}")
            for name in ("subject_token", "subject_token_type", "audience"):
                if not form.get(name):
                    raise _BadRequest("invalid_request", f"missing parameter {name!r}")
            if "resource" in form:
                raise _BadRequest("invalid_target", "name the downstream service by audience, not resource")
            exchanged = await run_in_threadpool(
                service.exchange, subject_token=form["subject_token"], subject_token_type=form["subject_token_type"],
                audience=form["audience"], scope=form.get("scope") or None,
                requested_token_type=form.get("requested_token_type") or None)
        except _BadRequest as exc:
            return _error(exc.code, str(exc), exc.status)
        except TokenRequestError as exc:
            return _error(exc.code, str(exc))
        return JSONResponse(exchanged.danger_response(service.clock.now()), headers=_NO_STORE)

    async def introspect(request: Request) -> Response:
        try:
            form = await _form(request)
            client = _client(service, request, form)
            if not form.get("token"):
                raise _BadRequest("invalid_request", "missing parameter 'token'")
            answer = await run_in_threadpool(service.introspect, form["token"], client=client)
        except _BadRequest as exc:
            return _error(exc.code, str(exc), exc.status, exc.headers)
        return JSONResponse(answer, headers=_NO_STORE)

    async def metadata(request: Request) -> Response:
        return JSONResponse({
            "token_endpoint": str(request.url_for("token_exchange")),
            "introspection_endpoint": str(request.url_for("token_introspection")),
            "jwks_uri": str(request.url_for("jwks")),
            "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
            "token_endpoint_auth_methods_supported": ["none"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopegraph_subject_token_types_supported": list(SUBJECT_TOKEN_TYPES),
            "scopegraph_issued_token_types_supported": [ACCESS_TOKEN_TYPE],
        })

    async def jwks(request: Request) -> Response:
        name = request.query_params.get("trust_domain", "")
        keys = await run_in_threadpool(service.jwks, name) if name else None
        if keys is None:
            return _error("invalid_request", "name a trust_domain served here", 404)
        return JSONResponse(keys)

    return [
        Route(f"{prefix}/token", token, methods=["POST"], name="token_exchange"),
        Route(f"{prefix}/introspect", introspect, methods=["POST"], name="token_introspection"),
        Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"], name="oauth_metadata"),
        Route("/.well-known/jwks.json", jwks, methods=["GET"], name="jwks"),
    ]


def _client(service: TokenService, request: Request, form: Mapping[str, str]) -> Any:
    """The authenticated introspection client (HTTP Basic, or id and secret in the body)."""
    challenge = {"WWW-Authenticate": 'Basic realm="scopegraph"'}
    header = request.headers.get("authorization", "")
    if header[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _BadRequest("invalid_client", "malformed Basic credentials", 401, challenge) from None
        raw_id, sep, raw_secret = decoded.partition(":")
        if not sep:
            raise _BadRequest("invalid_client", "malformed Basic credentials", 401, challenge)
        client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)  # RFC 6749 section 2.3.1
        if "client_secret" in form:
            raise _BadRequest("invalid_request", "authenticate one way, not two")
    elif form.get("client_id") and form.get("client_secret"):
        client_id, secret = form["client_id"], form["client_secret"]
    else:
        raise _BadRequest("invalid_client", "introspection needs client authentication", 401, challenge)
    client = service.authenticate(client_id, secret)
    if client is None:
        raise _BadRequest("invalid_client", "unknown client or wrong secret", 401, challenge)
    return client
