"""Token exchange (RFC 8693) and introspection (RFC 7662) for HTTP services.

A tool server that holds a live step grant exchanges it for a short-lived token for
one downstream audience (an API, a service): ``sub`` is the step's SPIFFE ID, ``scope``
the step's tool (``tool:<name>``), ``act`` the delegation chain that led to the step
(initiator → planner → executor), and the grant's constraints ride along under
``scopegraph``. The token lives at most ``ttl`` seconds and never past its grant. It is
a JWT (``typ: at+jwt``, RFC 9068) signed with the trust domain's key, so its audience can
verify it offline against the JWKS; its audience may never be ``tool:…``, so it can never
pass for a grant at our gateway.

Introspection is how a downstream service (or an MCP server holding a grant) learns at
once what the store knows: a token is active only while it is unexpired, unrevoked,
under its ``max_uses``, and its grant is live (a grant is revoked when its step ends, so
its tokens die with the step). Each introspection that finds an exchanged token active
counts one use of it: a resource server introspects once per request it serves, so
``max_uses`` bounds the requests a token can buy. Introspecting a step grant reads its
state and uses without taking one (the gateway counts a grant's uses).

Who may introspect: registered clients (``IntrospectionClient``), each authenticated by
a client secret (HTTP Basic or ``client_secret_post``) and allowed only the audiences it
serves; a token for another audience is reported ``{"active": false}``. Who may
exchange: whoever holds a live grant (it is the credential; RFC 8693 needs no other),
for the audiences the server registered for the grant's tool.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from .. import tracing as tr
from ..clock import Clock, SystemClock
from ..credentials import Grant, GrantIssuer
from ..errors import GrantError, IdentityError, ScopegraphError, TokenRequestError
from ..identity import TrustDomain
from ..keys.signing import sign_jwt
from ..ledger import Ledger
from ..store import Store
from ..store.secrets import SecretRecord
from ..trust import TrustRoots
from .service import TOKEN_BROKER

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
GRANT_TOKEN_TYPE = "urn:scopegraph:params:oauth:token-type:grant"  # a step grant as subject_token
SUBJECT_TOKEN_TYPES = (GRANT_TOKEN_TYPE, JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE)
ACCESS_TOKEN_TYP = "at+jwt"
DEFAULT_TOKEN_TTL = 60.0
DEFAULT_TOKEN_MAX_USES = 10
ANY_TOOL = "*"
_RESERVED_AUDIENCES = ("tool:", "spiffe://")  # our own gateway's and identities' audiences


@dataclass(frozen=True, kw_only=True)
class ExchangedToken:
    """A downstream token, fresh from an exchange. The token is reachable only by ``danger_token``."""

    handle: str  # the token's ``jti``
    audience: str
    scope: str
    issued_at: float
    expires_at: float
    grant_id: str
    _token: str = field(repr=False, compare=False)

    def danger_token(self) -> str:
        """The signed token. Never log or trace it."""
        return self._token

    def danger_response(self, now: float) -> dict[str, Any]:
        """The RFC 8693 response body (it carries the token)."""
        return {"access_token": self._token, "issued_token_type": ACCESS_TOKEN_TYPE, "token_type": "Bearer",
                "expires_in": max(0, int(self.expires_at - now)), "scope": self.scope}


@dataclass(frozen=True, kw_only=True)
class IntrospectionClient:
    """A resource server allowed to introspect tokens of its ``audiences``."""

    client_id: str
    audiences: frozenset[str]
    _secret_digest: bytes = field(repr=False)

    @classmethod
    def with_secret(cls, client_id: str, secret: str, audiences: Iterable[str]) -> IntrospectionClient:
        if not client_id or not secret:
            raise ValueError("an introspection client needs an id and a non-empty secret")
        if isinstance(audiences, str):
            raise ValueError("audiences is a list of audiences, not one string")
        return cls(client_id=client_id, audiences=frozenset(audiences), _secret_digest=_digest(secret))

    def authenticates(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(secret), self._secret_digest)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


class TokenService:
    """Exchanges live step grants for downstream tokens, and introspects both.

    ``audiences`` maps each audience a token may be issued for to the tools whose grants
    may be exchanged for it (``"*"``: any tool). ``trust_domains`` limits the grant
    issuers accepted (default: every trust domain whose key the store holds).

    Raises:
        ValueError: a bad TTL, use count, audience or client list.
    """

    def __init__(self, store: Store, *, audiences: Mapping[str, Iterable[str]],
                 clients: Iterable[IntrospectionClient] = (), trust_domains: Iterable[str] | None = None,
                 clock: Clock | None = None, ttl: float = DEFAULT_TOKEN_TTL,
                 max_uses: int = DEFAULT_TOKEN_MAX_USES) -> None:
        if not 0 < ttl <= 900:
            raise ValueError(f"token TTL {ttl!r} s must be above 0 and at most 900 s")
        if max_uses < 1:
            raise ValueError(f"token max_uses {max_uses!r} must be at least 1")
        self.store = store
        self.clock = clock or SystemClock()
        self.ledger = Ledger(store, clock=self.clock)
        self.ttl = ttl
        self.max_uses = max_uses
        self.audiences: dict[str, frozenset[str]] = {}
        for audience, tools in audiences.items():
            if not audience or audience.startswith(_RESERVED_AUDIENCES):
                raise ValueError(f"audience {audience!r} cannot be registered: tool: and spiffe:// are ours")
            if isinstance(tools, str):
                raise ValueError(f"the tools of audience {audience!r} are a list, not one string")
            self.audiences[audience] = frozenset(tools)
        self.clients: dict[str, IntrospectionClient] = {}
        for client in clients:
            if client.client_id in self.clients:
                raise ValueError(f"introspection client {client.client_id!r} is registered twice")
            self.clients[client.client_id] = client
        self.trust_domains = None if trust_domains is None else frozenset(trust_domains)
        self._issuers: dict[str, GrantIssuer] = {}
        self._trust: TrustRoots | None = None
        self._lock = threading.Lock()

    # exchange ---------------------------------------------------------------------------------
    def exchange(self, *, subject_token: str, subject_token_type: str, audience: str,
                 scope: str | None = None, requested_token_type: str | None = None) -> ExchangedToken:
        """Exchange a live step grant for a token for ``audience``.

        Raises:
            TokenRequestError: the request is refused; ``code`` says why in OAuth's words.
        """
        if subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise TokenRequestError("invalid_request", f"unsupported subject_token_type {subject_token_type!r}")
        if requested_token_type not in (None, "", ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE):
            raise TokenRequestError("invalid_request", f"unsupported requested_token_type {requested_token_type!r}")
        if not audience:
            raise TokenRequestError("invalid_request", "name exactly one audience")
        if audience.startswith(_RESERVED_AUDIENCES) or audience not in self.audiences:
            raise TokenRequestError("invalid_target", f"audience {audience!r} is not registered for token exchange")
        grant = self._live_grant(subject_token)
        allowed = self.audiences[audience]
        if ANY_TOOL not in allowed and grant.tool not in allowed:
            raise TokenRequestError("invalid_target", f"a grant for tool {grant.tool!r} may not be exchanged "
                                                      f"for audience {audience!r}")
        granted_scope = f"tool:{grant.tool}"
        if scope and scope.split() != [granted_scope]:
            raise TokenRequestError("invalid_scope", f"the grant's scope is {granted_scope!r}; nothing else")
        return self._mint(grant, audience, granted_scope)

    def _mint(self, grant: Grant, audience: str, scope: str) -> ExchangedToken:
        domain = self._issuer(grant.subject.trust_domain).domain
        now = self.clock.now()
        expires_at = min(now + self.ttl, grant.expires_at)
        if expires_at <= now:
            raise TokenRequestError("invalid_grant", f"grant {grant.jti!r} expired")
        jti = f"tok_{uuid.uuid4().hex}"
        claims = {
            "iss": domain.issuer, "sub": str(grant.subject), "aud": audience, "client_id": str(grant.subject),
            "iat": now, "nbf": now, "exp": expires_at, "jti": jti, "scope": scope, "act": dict(grant.act),
            "scopegraph": {"run": grant.run_id, "step": grant.step_id, "wf": grant.workflow, "grant": grant.jti,
                           "constraints": {k: (c.model_dump() if hasattr(c, "model_dump") else c)
                                           for k, c in grant.constraints.items()}},
        }
        attrs = {tr.SECRET_HANDLE: jti, tr.TOKEN_AUDIENCE: audience, tr.GRANT_ID: grant.jti,
                 tr.STEP_ID: grant.step_id, tr.RUN_ID: grant.run_id, tr.SPIFFE_ID: str(grant.subject)}
        with tr.span(tr.TOKEN_EXCHANGE, attrs):
            token = _sign_access_token(domain, claims)
            with self.store.atomic():
                self.store.add_secret(SecretRecord(  # type: ignore[attr-defined]
                    handle=jti, run_id=grant.run_id, step_id=grant.step_id, tool=grant.tool,
                    workflow=grant.workflow, name=audience, broker=TOKEN_BROKER, kind="ephemeral",
                    principal=audience, grant_id=grant.jti, issued_at=now, expires_at=expires_at,
                    max_uses=self.max_uses, state="issued"))
                self.ledger.append("token_exchanged", grant.run_id, step_id=grant.step_id, tool=grant.tool,
                                   handle=jti, grant_id=grant.jti, audience=audience, scope=scope,
                                   expires_at=expires_at, max_uses=self.max_uses)
        return ExchangedToken(handle=jti, audience=audience, scope=scope, issued_at=now, expires_at=expires_at,
                              grant_id=grant.jti, _token=token)

    def _live_grant(self, token: str) -> Grant:
        """The verified grant ``token`` is, if the store says it is live."""
        claims = _parse_unverified(token) or {}
        tool = claims["scope"].get("tool") if isinstance(claims.get("scope"), dict) else None
        if not isinstance(tool, str):
            raise TokenRequestError("invalid_grant", "the subject_token is not a step grant")
        issuer = self._issuer_for(claims.get("iss"))
        if issuer is None:
            raise TokenRequestError("invalid_grant", "the subject_token's issuer is not a trust domain served here")
        try:
            grant = issuer.verify(token, tool=tool)
        except GrantError as exc:
            raise TokenRequestError("invalid_grant", str(exc)) from None
        state = self.store.grant_state(grant.jti)
        if state != "ok":
            raise TokenRequestError("invalid_grant", f"grant {grant.jti!r} is {state}")
        return grant

    # introspection ----------------------------------------------------------------------------
    def authenticate(self, client_id: str, secret: str) -> IntrospectionClient | None:
        """The registered client with this id and secret, or ``None`` (compared in constant time)."""
        client = self.clients.get(client_id)
        if client is None:
            _digest(secret)  # the same work as a known client: no timing hint that the id exists
            return None
        return client if client.authenticates(secret) else None

    def introspect(self, token: str, *, client: IntrospectionClient) -> dict[str, Any]:
        """RFC 7662: what the store knows of ``token`` now, for an authenticated ``client``.

        An inactive, unknown, forged or foreign token is ``{"active": false}`` and nothing more.
        """
        inactive: dict[str, Any] = {"active": False}
        claims = _parse_unverified(token)
        if claims is None:
            return inactive
        issuer = self._issuer_for(claims.get("iss"))
        if issuer is None:
            return inactive
        if isinstance(claims.get("scope"), dict):  # a step grant
            return self._introspect_grant(token, claims, issuer, client) or inactive
        return self._introspect_token(token, issuer, client) or inactive

    def _introspect_token(self, token: str, issuer: GrantIssuer, client: IntrospectionClient) -> dict[str, Any] | None:
        try:
            if jwt.get_unverified_header(token).get("typ") != ACCESS_TOKEN_TYP:
                return None
            key = issuer.domain.grant_key(token)  # the kid it names, among current and previous keys
            if key is None:
                return None
            claims = jwt.decode(token, key.public_key, algorithms=[key.algorithm],
                                issuer=issuer.domain.issuer, options={
                                    "verify_aud": False, "verify_exp": False, "verify_nbf": False,
                                    "verify_iat": False, "require": ["exp", "iat", "sub", "jti", "aud"]})
        except jwt.PyJWTError:
            return None
        if claims["aud"] not in client.audiences:
            return None  # not this resource server's to know about
        now = self.clock.now()
        if now >= float(claims["exp"]) or now < float(claims.get("nbf", claims["iat"])) - 5:
            return None
        record = self.store.get_secret(claims["jti"])  # type: ignore[attr-defined]
        if record is None or record.broker != TOKEN_BROKER or record.grant_id is None:
            return None
        if self.store.grant_state(record.grant_id) != "ok":
            return None  # the step ended (its grant was revoked) or the grant is spent
        if self.store.use_secret(record.handle) != "ok":  # type: ignore[attr-defined]
            return None
        counted = self.store.get_secret(record.handle)  # type: ignore[attr-defined]
        uses = counted.uses if counted is not None else record.uses + 1
        return {"active": True, "token_type": "Bearer", "scope": claims.get("scope"),
                "client_id": claims.get("client_id"), "sub": claims["sub"], "aud": claims["aud"],
                "iss": claims["iss"], "exp": claims["exp"], "iat": claims["iat"], "nbf": claims.get("nbf"),
                "jti": claims["jti"], "act": claims.get("act"), "uses": uses, "max_uses": record.max_uses,
                "scopegraph": claims.get("scopegraph")}

    def _introspect_grant(self, token: str, claims: Mapping[str, Any], issuer: GrantIssuer,
                          client: IntrospectionClient) -> dict[str, Any] | None:
        tool = claims["scope"].get("tool")
        if not isinstance(tool, str) or f"tool:{tool}" not in client.audiences:
            return None
        try:
            grant = issuer.verify(token, tool=tool)
        except GrantError:
            return None
        if self.store.grant_state(grant.jti) != "ok":
            return None
        record = next((g for g in self.store.grants_for_run(grant.run_id) if g.jti == grant.jti), None)
        return {"active": True, "token_type": "Bearer", "scope": f"tool:{grant.tool}",
                "client_id": str(grant.subject), "sub": str(grant.subject), "aud": f"tool:{grant.tool}",
                "iss": issuer.domain.issuer, "exp": grant.expires_at, "iat": grant.issued_at, "jti": grant.jti,
                "act": dict(grant.act), "uses": record.uses if record else None, "max_uses": grant.max_uses,
                "scopegraph": {"run": grant.run_id, "step": grant.step_id, "wf": grant.workflow}}

    # trust domains ----------------------------------------------------------------------------
    def jwks(self, trust_domain: str) -> dict[str, Any] | None:
        """The public keys of ``trust_domain`` as a JWKS, if it is served here."""
        issuer = self._issuer_for(f"spiffe://{trust_domain}")
        return issuer.domain.bundle().jwks() if issuer is not None else None

    def _issuer_for(self, iss: object) -> GrantIssuer | None:
        if not isinstance(iss, str) or not iss.startswith("spiffe://"):
            return None
        name = iss[len("spiffe://"):]
        if self.trust_domains is not None and name not in self.trust_domains:
            return None
        try:
            return self._issuer(name)
        except (IdentityError, TokenRequestError):
            return None

    def _trust_roots(self) -> TrustRoots:
        """The store's trust roots, opened once: an existing keystore only (serving never makes keys)."""
        if self._trust is None:
            try:
                self._trust = TrustRoots.open(self.store, clock=self.clock, create=False)
            except ScopegraphError as exc:
                raise TokenRequestError("invalid_grant", f"this store's trust roots cannot be opened: {exc}") from None
        return self._trust

    def _issuer(self, name: str) -> GrantIssuer:
        with self._lock:
            issuer = self._issuers.get(name)
            if issuer is None:
                issuer = GrantIssuer(TrustDomain(name, trust=self._trust_roots(), clock=self.clock), self.store,
                                     clock=self.clock)
                self._issuers[name] = issuer
        return issuer


def _parse_unverified(token: object) -> dict[str, Any] | None:
    """The claims of a JWT, signature NOT checked: only to find its issuer and kind."""
    if not isinstance(token, str) or not token or len(token) > 16384:
        return None
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def _sign_access_token(domain: TrustDomain, claims: dict[str, Any]) -> str:
    """An RFC 9068 JWT access token signed with the trust domain's key."""
    return sign_jwt(domain.trust.signer("grant"), claims, headers={"typ": ACCESS_TOKEN_TYP})
