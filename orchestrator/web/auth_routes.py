"""Enrolment by invitation and sign-in with a passkey (WebAuthn), as JSON endpoints the
pages' script calls.

``POST /auth/enrol/begin`` ``{"token"}`` → registration options for the invited approver;
``POST /auth/enrol/finish`` ``{"token", "challenge_id", "credential"}`` spends the
invitation, enrols the passkey and signs in. ``POST /auth/login/begin`` → options for a
discoverable passkey; ``POST /auth/login/finish`` ``{"challenge_id", "credential"}``
signs in. Every challenge is single-use and short-lived; user verification is required.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import ApprovalError
from ..passkeys import PasskeyAssertion, b64url, passkey_kid, token_hash, unb64url, verify_assertion
from .inbox import Inbox
from .security import RateLimiter, Sessions, client_key, json_error, same_origin

CHALLENGE_TTL = 5 * 60.0
MAX_JSON_BYTES = 64 * 1024


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (``application/json`` only, so no plain form can post it).

    Raises:
        ValueError: another content type, too large, or not a JSON object.
    """
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ValueError("send application/json")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise ValueError("the request body is too large")
    try:
        value = json.loads(body or b"null")
    except ValueError:
        raise ValueError("the request body is not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("the request body must be a JSON object")
    return value


def assertion_from(credential: Any, nonce: str) -> PasskeyAssertion:
    """A browser's ``PublicKeyCredential`` (JSON form) as a ``PasskeyAssertion``.

    Raises:
        ValueError: fields missing or malformed.
    """
    if not isinstance(credential, dict) or not isinstance(credential.get("response"), dict):
        raise ValueError("the credential is malformed")
    response = credential["response"]
    return PasskeyAssertion.model_validate({
        "credential_id": credential.get("id"), "authenticator_data": response.get("authenticatorData"),
        "client_data_json": response.get("clientDataJSON"), "signature": response.get("signature"),
        "user_handle": response.get("userHandle") or None, "nonce": nonce})


def auth_routes(inbox: Inbox, sessions: Sessions, *, login_limit: RateLimiter) -> list[BaseRoute]:
    """The enrolment and sign-in endpoints."""
    import webauthn
    from webauthn.helpers import options_to_json
    from webauthn.helpers.exceptions import WebAuthnException
    from webauthn.helpers.structs import (
        AuthenticatorSelectionCriteria,
        PublicKeyCredentialDescriptor,
        ResidentKeyRequirement,
        UserVerificationRequirement,
    )

    site = inbox.site
    records = inbox.passkeys.records

    def limited(request: Request) -> Response | None:
        if not same_origin(request, site.origin):
            return json_error("cross-origin request refused", 403)
        return login_limit.refused(client_key(request), "too many sign-in attempts from your address")

    async def limited_json(request: Request) -> dict[str, Any] | Response:
        """The request's JSON object, or the refusal: cross-origin, rate-limited or malformed."""
        refused = limited(request)
        if refused is not None:
            return refused
        try:
            return await read_json(request)
        except ValueError as exc:
            return json_error(str(exc), 400)

    def new_challenge(purpose: str, subject: str) -> tuple[str, bytes]:
        challenge_id, challenge = secrets.token_urlsafe(18), secrets.token_bytes(32)
        records.add_challenge(challenge_id, purpose=purpose, subject=subject, data=b64url(challenge),
                              expires_at=inbox.clock.now() + CHALLENGE_TTL)
        return challenge_id, challenge

    def take(challenge_id: Any, purpose: str, subject: str) -> bytes | None:
        if not isinstance(challenge_id, str) or len(challenge_id) > 64:
            return None
        found = records.take_challenge(challenge_id, purpose=purpose, subject=subject, now=inbox.clock.now())
        return unb64url(found) if found is not None else None

    async def enrol_begin(request: Request) -> Response:
        body = await limited_json(request)
        if isinstance(body, Response):
            return body
        token = body.get("token")
        whom = await run_in_threadpool(inbox.passkeys.invited, token) if isinstance(token, str) else None
        if whom is None:
            return json_error("this invitation is unknown, used or expired: ask for a new one", 400)
        name, display = whom

        def begin() -> tuple[str, bytes, list[Any]]:
            challenge_id, challenge = new_challenge("enrol", token_hash(str(token)))
            return challenge_id, challenge, records.list_passkeys(name=name)

        challenge_id, challenge, existing = await run_in_threadpool(begin)
        options = webauthn.generate_registration_options(
            rp_id=site.rp_id, rp_name=site.rp_name, user_name=name, user_display_name=display,
            user_id=name.encode("utf-8")[:64], challenge=challenge,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED, user_verification=UserVerificationRequirement.REQUIRED),
            exclude_credentials=[PublicKeyCredentialDescriptor(id=unb64url(p.credential_id)) for p in existing])
        return JSONResponse({"challenge_id": challenge_id, "name": display,
                             "options": json.loads(options_to_json(options))})

    async def enrol_finish(request: Request) -> Response:
        body = await limited_json(request)
        if isinstance(body, Response):
            return body
        token = body.get("token")
        if not isinstance(token, str):
            return json_error("missing invitation token", 400)
        challenge = await run_in_threadpool(take, body.get("challenge_id"), "enrol", token_hash(token))
        if challenge is None:
            return json_error("the enrolment challenge is unknown, used or expired: reload the page", 400)
        credential = body.get("credential")
        if not isinstance(credential, dict):
            return json_error("missing credential", 400)
        try:
            verified = webauthn.verify_registration_response(
                credential=credential, expected_challenge=challenge, expected_rp_id=site.rp_id,
                expected_origin=site.origin, require_user_verification=True)
        except (WebAuthnException, ValueError, TypeError, KeyError) as exc:
            return json_error(f"the passkey was refused: {str(exc).splitlines()[0][:200] if str(exc) else 'invalid'}",
                              400)
        try:
            record = await run_in_threadpool(
                inbox.passkeys.enrol, token, credential_id=b64url(verified.credential_id),
                public_key=b64url(verified.credential_public_key), sign_count=verified.sign_count,
                rp_id=site.rp_id, origin=site.origin)
        except ApprovalError as exc:
            return json_error(str(exc), 400)
        response = JSONResponse({"ok": True, "name": record.display, "kid": record.kid, "next": "/"})
        await run_in_threadpool(sessions.start, record.name, response)
        return response

    async def login_begin(request: Request) -> Response:
        refused = limited(request)
        if refused is not None:
            return refused
        challenge_id, challenge = await run_in_threadpool(new_challenge, "login", "-")
        options = webauthn.generate_authentication_options(
            rp_id=site.rp_id, challenge=challenge, user_verification=UserVerificationRequirement.REQUIRED)
        return JSONResponse({"challenge_id": challenge_id, "options": json.loads(options_to_json(options))})

    async def login_finish(request: Request) -> Response:
        refused = limited(request)
        if refused is not None:
            return refused
        try:
            body = await read_json(request)
            credential = body.get("credential")
            assertion = assertion_from(credential, "login-" + "0" * 16)  # shape check; the nonce is unused
        except ValueError as exc:
            return json_error(str(exc).splitlines()[0][:200], 400)
        challenge = await run_in_threadpool(take, body.get("challenge_id"), "login", "-")
        if challenge is None:
            return json_error("the sign-in challenge is unknown, used or expired: try again", 400)

        def check() -> str:
            record = inbox.passkeys.live(assertion.credential_id)
            count = verify_assertion(record, assertion, challenge=challenge, current_sign_count=record.sign_count)
            if not records.advance_sign_count(record.credential_id, count, at=inbox.clock.now()):
                raise ApprovalError(f"the sign count of passkey {record.kid} did not move forward")
            return record.name

        try:
            name = await run_in_threadpool(check)
        except ApprovalError:
            # One answer for every failure: nobody learns which credentials are enrolled.
            return json_error(f"sign-in refused for passkey {passkey_kid(assertion.credential_id)}", 403)
        response = JSONResponse({"ok": True, "name": name, "next": "/"})
        await run_in_threadpool(sessions.start, name, response)
        return response

    return [
        Route("/auth/enrol/begin", enrol_begin, methods=["POST"]),
        Route("/auth/enrol/finish", enrol_finish, methods=["POST"]),
        Route("/auth/login/begin", login_begin, methods=["POST"]),
        Route("/auth/login/finish", login_finish, methods=["POST"]),
    ]
