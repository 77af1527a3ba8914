"""Grants: short-lived signed credentials scoped to one step and one tool.

A grant binds one step identity (``sub``) to one tool (``aud``), the step's argument
constraints, an expiry and a use count, with the delegation chain in ``act``
(initiator → planner → executor, RFC 8693 nesting: the outermost ``act`` is the most
recent delegator). The store keeps each grant's facts, never its token, and is the
authority on revocation and remaining uses. A delegated grant names its ancestors
(``parents``): each use of it takes a use of every ancestor too, so the calls made
across a delegation tree never exceed the root grant's ``max_uses``.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import jwt
from pydantic import TypeAdapter, ValidationError

from .clock import Clock
from .constraints import Constraint, narrows
from .errors import (
    ConfigError,
    GrantError,
    GrantExhaustedError,
    GrantExpiredError,
    GrantRevokedError,
    GrantScopeError,
    IdentityError,
)
from .identity import SpiffeId, TrustDomain
from .store import GrantRecord, Store

DEFAULT_TTL_SECONDS = 60.0
MAX_TTL_SECONDS = 900.0
CLOCK_SKEW_SECONDS = 5.0
DEFAULT_MAX_USES = 3

_CONSTRAINTS = TypeAdapter(dict[str, Constraint])
_SIGNED_CACHE_SIZE = 4096


def _needs_parse(constraints: Mapping[str, Any]) -> bool:
    return not all(hasattr(c, "allows") for c in constraints.values())


def audience_for(tool: str) -> str:
    return f"tool:{tool}"


@dataclass(frozen=True, kw_only=True)
class Grant:
    """A verified or freshly minted grant. The token is reachable only by ``danger_token``."""

    jti: str
    subject: SpiffeId
    tool: str
    run_id: str
    step_id: str
    workflow: str
    constraints: Mapping[str, Any]
    issued_at: float
    expires_at: float
    max_uses: int
    act: Mapping[str, Any]
    parents: tuple[str, ...] = ()  # the jti of each ancestor grant, nearest first (delegation)
    _token: str = field(repr=False, compare=False)

    def danger_token(self) -> str:
        """The signed token, to hand to a tool server. Never log or trace it."""
        return self._token


class GrantIssuer:
    """Mints, verifies and revokes grants for one trust domain."""

    def __init__(
        self,
        domain: TrustDomain,
        store: Store,
        *,
        clock: Clock,
        ttl: float = DEFAULT_TTL_SECONDS,
        max_uses: int = DEFAULT_MAX_USES,
    ) -> None:
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise ConfigError(f"grant TTL {ttl!r} s must be above 0 and at most {MAX_TTL_SECONDS:g} s")
        if max_uses < 1:
            raise ConfigError(f"grant max_uses {max_uses!r} must be at least 1")
        self.domain = domain
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.max_uses = max_uses
        # Tokens this issuer signed, by their exact text: presenting one again skips the
        # signature check (it cannot be forged into the cache), never the time, audience,
        # revocation or use checks. Bounded; entries leave when their grant is revoked.
        self._signed: OrderedDict[str, Grant] = OrderedDict()
        self._signed_lock = threading.Lock()
        # Grants minted with ``deferred=True`` whose row may not be in the store yet.
        self._unwritten: dict[str, GrantRecord] = {}
    def mint(
        self,
        *,
        subject: SpiffeId,
        tool: str,
        run_id: str,
        step_id: str,
        workflow: str,
        constraints: Mapping[str, Any],
        act: Mapping[str, Any],
        parent: Grant | None = None,
        deferred: bool = False,
    ) -> Grant:
        """Sign a grant for one step and record it; the store learns its facts, not its token.

        With ``deferred``, the grant's row is not written now but by ``write_unwritten``,
        inside the transaction of the grant's first use (or of its revocation): until then
        the store does not know the grant, so it is unusable (``consume_use`` finds no row
        and refuses it), and a crash before that write loses nothing that was used.

        With ``parent`` (delegation), the new grant must lie inside the parent's scope:
        same tool, every constraint narrowing the parent's, no argument the parent does
        not allow, and no life beyond the parent's; the parent must be live (not revoked,
        uses left). Each use of the new grant takes a use of the parent as well (see
        ``consume_use``). This is checked here, at the only place grants are made, not
        trusted to the caller.

        Raises:
            GrantScopeError: the delegated scope is wider than the parent's.
        """
        now = self.clock.now()
        expires_at = now + self.ttl
        if parent is not None:
            _check_subscope(tool, constraints, parent)
            # A revoked or spent parent has nothing to hand down. Minting spends nothing: the
            # child's calls spend the parent's uses, so delegating cannot multiply them.
            state = self.store.grant_state(parent.jti)
            if state != "ok":
                raise GrantScopeError(f"parent grant {parent.jti!r} is {state}: nothing to delegate")
            expires_at = min(expires_at, parent.expires_at)
            if expires_at <= now:
                raise GrantScopeError(f"parent grant {parent.jti!r} has expired: nothing to delegate")
        jti = uuid.uuid4().hex
        parents = (parent.jti, *parent.parents) if parent is not None else ()
        serial = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in constraints.items()}
        claims = {
            "iss": self.domain.issuer,
            "sub": str(subject),
            "aud": audience_for(tool),
            "iat": now,
            "nbf": now,
            "exp": expires_at,
            "jti": jti,
            "act": dict(act),
            "scope": {"tool": tool, "constraints": serial, "max_uses": self.max_uses},
            "run": run_id,
            "step": step_id,
            "wf": workflow,
            **({"parents": list(parents)} if parents else {}),
        }
        token = self.domain.sign(claims)
        record = GrantRecord(
            jti=jti, run_id=run_id, step_id=step_id, tool=tool, subject=str(subject),
            issued_at=now, expires_at=expires_at, max_uses=self.max_uses,
        )
        if deferred:
            with self._signed_lock:
                self._unwritten[jti] = record
        else:
            self.store.add_grant(record)
        grant = Grant(
            jti=jti, subject=subject, tool=tool, run_id=run_id, step_id=step_id, workflow=workflow,
            constraints=_CONSTRAINTS.validate_python(serial) if _needs_parse(constraints) else dict(constraints),
            issued_at=now, expires_at=expires_at,
            max_uses=self.max_uses, act=dict(act), parents=parents, _token=token,
        )
        with self._signed_lock:
            self._signed[token] = grant
            while len(self._signed) > _SIGNED_CACHE_SIZE:
                self._signed.popitem(last=False)
        return grant

    def verify(self, token: str, *, tool: str) -> Grant:
        """Check signature, issuer, audience and lifetime; return the grant's claims.

        Does not consult the store: call ``consume_use`` for revocation and uses.

        Raises:
            GrantError: the token is malformed, forged, for another tool, or not yet valid.
            GrantExpiredError: the token's expiry has passed (beyond the allowed skew).
        """
        if not isinstance(token, str) or not token:
            raise GrantError(f"no grant presented for tool {tool!r}")
        known = self._signed.get(token)
        if known is not None:
            return self._check_known(known, tool)
        try:
            key = self.domain.grant_key(token)  # by the token's kid: current and previous keys verify
        except IdentityError as exc:
            raise GrantError(f"grant is malformed: {exc}") from None
        if key is None:
            raise GrantError(f"grant signature does not verify: it names a key that is not a grant key "
                             f"of {self.domain.name!r}")
        try:
            claims = jwt.decode(
                token,
                key.public_key,
                algorithms=[key.algorithm],
                audience=audience_for(tool),
                issuer=self.domain.issuer,
                # Time is checked below against our clock, so tests can fix it.
                options={"require": ["exp", "iat", "nbf", "sub", "jti", "aud"],
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            raise GrantError(f"grant is not for tool {tool!r}") from None
        except jwt.InvalidSignatureError:
            raise GrantError("grant signature does not verify") from None
        except jwt.InvalidIssuerError:
            raise GrantError(f"grant was not issued by {self.domain.issuer!r}") from None
        except jwt.PyJWTError as exc:
            raise GrantError(f"grant is malformed: {exc}") from None
        now = self.clock.now()
        if now > float(claims["exp"]) + CLOCK_SKEW_SECONDS:
            raise GrantExpiredError(f"grant {claims['jti']!r} expired")
        if now + CLOCK_SKEW_SECONDS < float(claims["nbf"]):
            raise GrantError(f"grant {claims['jti']!r} is not valid yet")
        try:
            scope = claims["scope"]
            constraints = _CONSTRAINTS.validate_python(scope["constraints"])
            grant = Grant(
                jti=claims["jti"], subject=SpiffeId.parse(claims["sub"]), tool=scope["tool"],
                run_id=claims["run"], step_id=claims["step"], workflow=claims["wf"],
                constraints=constraints, issued_at=float(claims["iat"]),
                expires_at=float(claims["exp"]), max_uses=int(scope["max_uses"]),
                act=claims["act"], parents=tuple(str(p) for p in claims.get("parents") or ()), _token=token,
            )
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise GrantError(f"grant {claims.get('jti')!r} has malformed claims: {type(exc).__name__}") from None
        if grant.tool != tool:
            raise GrantError(f"grant is not for tool {tool!r}")
        return grant

    def _check_known(self, grant: Grant, tool: str) -> Grant:
        if grant.tool != tool:
            raise GrantError(f"grant is not for tool {tool!r}")
        now = self.clock.now()
        if now > grant.expires_at + CLOCK_SKEW_SECONDS:
            raise GrantExpiredError(f"grant {grant.jti!r} expired")
        if now + CLOCK_SKEW_SECONDS < grant.issued_at:
            raise GrantError(f"grant {grant.jti!r} is not valid yet")
        return grant

    def _forget(self, jti: str) -> None:
        with self._signed_lock:
            for token in [t for t, g in self._signed.items() if g.jti == jti]:
                del self._signed[token]
            self._unwritten.pop(jti, None)

    def write_unwritten(self, jti: str, *, taking_use: bool = False) -> bool:
        """Write the row of a grant minted with ``deferred=True``, in the caller's transaction.

        With ``taking_use``, the row is written with its first use taken (what
        ``consume_use`` would do next, and cannot refuse for a row just written).
        Returns whether this call wrote it (the caller then audits the mint in the same
        transaction, and has taken its use); ``False`` when it is written already or was
        never deferred.
        """
        with self._signed_lock:
            record = self._unwritten.get(jti)
        if record is None:
            return False
        if self.store.add_grant(replace(record, uses=1) if taking_use else record, if_absent=True):
            return True  # kept until seen in the store: this transaction may yet roll back
        with self._signed_lock:
            self._unwritten.pop(jti, None)
        return False

    def consume_use(self, grant: Grant) -> None:
        """Take one use of ``grant`` and of each of its ancestors, each atomically with its
        revocation check. A refused use may leave earlier ones taken: a refused call spends.

        Raises:
            GrantRevokedError: the grant, or an ancestor, was revoked.
            GrantExhaustedError: the grant, or an ancestor, has no uses left.
            GrantError: the store has never seen the grant or an ancestor.
        """
        for jti in (grant.jti, *grant.parents):
            state = self.store.consume_grant_use(jti)
            if state == "ok":
                continue
            which = f"grant {jti!r}" if jti == grant.jti else f"parent grant {jti!r} of grant {grant.jti!r}"
            if state == "revoked":
                raise GrantRevokedError(f"{which} is revoked")
            if state == "exhausted":
                raise GrantExhaustedError(f"{which} has no uses left")
            raise GrantError(f"{which} is unknown to the store")

    def revoke(self, jti: str, *, reason: str) -> bool:
        self._forget(jti)
        return self.store.revoke_grant(jti, reason=reason, at=self.clock.now())

    def forget_run(self, run_id: str) -> None:
        """Drop what this issuer holds of ``run_id``'s grants: their verified tokens, and
        deferred grants not written yet (which stay unknown to the store: unusable for good)."""
        with self._signed_lock:
            for token in [t for t, g in self._signed.items() if g.run_id == run_id]:
                del self._signed[token]
            for jti in [j for j, r in self._unwritten.items() if r.run_id == run_id]:
                del self._unwritten[jti]

    def revoke_run(self, run_id: str, *, reason: str) -> int:
        self.forget_run(run_id)
        return self.store.revoke_run(run_id, reason=reason, at=self.clock.now())


def _check_subscope(tool: str, constraints: Mapping[str, Any], parent: Grant) -> None:
    if tool != parent.tool:
        raise GrantScopeError(f"delegated grant for tool {tool!r} is outside its parent's scope "
                              f"(tool {parent.tool!r})")
    child = _CONSTRAINTS.validate_python(
        {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in constraints.items()})
    for name, constraint in child.items():
        if name not in parent.constraints:
            raise GrantScopeError(f"delegated grant constrains argument {name!r}, which its parent "
                                  "grant does not allow")
        if not narrows(constraint, parent.constraints[name]):
            raise GrantScopeError(f"delegated grant lets argument {name!r} be {constraint.describe()}, "
                                  f"wider than its parent's {parent.constraints[name].describe()}")
