"""The runtime's side of downstream credentials: issue after an allowed call, revoke at step end.

``SecretService`` holds the workflow's brokers by name. For a call the gateway allowed,
``credentials_for`` issues each credential the tool declares, once per step grant
(later calls of the step reuse it), counts a use of each, and hands them to the gateway
to pass to the tool. ``end_step`` revokes a step's credentials (its delegated children's
too) however it ended, ``end_run`` every credential of a run, and ``sweep`` those whose
step ended or was abandoned (its grants are revoked or expired, or nobody alive drives
its run): on start and on resume, so a crash leaves no live credential behind.

Every issue and revocation is a span and a ledger record carrying the credential's
handle, broker, kind and principal, never the secret. A credential is recorded in the
store before the broker makes it, so a crash in between still leaves something to sweep.
The secrets themselves live only in this process's memory, for as long as their step.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import tracing as tr
from ..clock import Clock
from ..credentials import Grant
from ..errors import ConfigError, SecretError, SecretRefusedError
from ..ledger import Ledger
from ..store.secrets import SecretRecord
from ..tools import Tool, ToolRegistry
from .base import Credential, Issued, SecretBroker, SecretKind, SecretSpec, StepScope
from .static import EnvSecretSource

TOKEN_BROKER = "token_exchange"  # tokens a TokenService exchanged: revoked by their record alone


class RecordOnlyBroker:
    """Credentials whose whole state is their record (exchanged tokens): revoking one is
    marking it revoked; there is nothing downstream to destroy."""

    kind: SecretKind = "ephemeral"

    def accepts(self, spec: SecretSpec) -> bool:
        return False

    def issue(self, spec: SecretSpec, scope: StepScope, *, handle: str) -> Issued:
        raise SecretError(f"broker {TOKEN_BROKER!r} issues tokens through token exchange only")

    def revoke(self, handle: str, principal: str) -> None:
        return None

    def leftovers(self) -> list[tuple[str, str]]:
        return []


def default_brokers() -> dict[str, SecretBroker]:
    """The brokers every runtime has: static secrets from the environment (``env``)."""
    return {"env": EnvSecretSource()}


@dataclass(frozen=True)
class _Live:
    handle: str
    run_id: str
    step_id: str
    param: str
    credential: Credential


class SecretService:
    """Issues, counts, revokes and sweeps the downstream credentials of one workflow's tools."""

    def __init__(self, *, brokers: Mapping[str, SecretBroker], store: Any, ledger: Ledger, clock: Clock,
                 workflow: str, metrics: tr.Metrics | None = None,
                 owner_alive: Callable[[str], bool] | None = None) -> None:
        self.brokers: dict[str, SecretBroker] = {TOKEN_BROKER: RecordOnlyBroker(), **default_brokers(),
                                                 **dict(brokers)}
        self.store = store
        self.ledger = ledger
        self.clock = clock
        self.workflow = workflow
        self.metrics = metrics or tr.Metrics()
        self.owner_alive = owner_alive or (lambda owner: True)
        self.active = False  # whether any tool declares a credential (if not, step ends cost nothing)
        self._live: dict[tuple[str, str], _Live] = {}  # (grant id, parameter) → credential
        self._lock = threading.Lock()

    def check_tools(self, tools: ToolRegistry) -> None:
        """Every credential a tool declares names a broker this service has, of the right kind.

        Raises:
            ConfigError: a declaration names no known broker, or one that cannot issue it.
        """
        for tool in tools.values():
            for spec in tool.credentials:
                broker = self.brokers.get(spec.broker)
                if broker is None:
                    known = ", ".join(sorted(b for b in self.brokers if b != TOKEN_BROKER))
                    raise ConfigError(f"tool {tool.name!r} needs broker {spec.broker!r} for {spec.param!r}, "
                                      f"which the workflow does not define (brokers: {known})")
                if not broker.accepts(spec):
                    raise ConfigError(f"tool {tool.name!r}: broker {spec.broker!r} cannot issue {spec.describe()}")
                self.active = True

    # issuing ----------------------------------------------------------------------------------
    def credentials_for(self, tool: Tool, grant: Grant) -> dict[str, Credential]:
        """The credentials ``tool`` declares, for the step of ``grant``: issued on the step's
        first allowed call, reused by its later calls; each call counts one use.

        Raises:
            SecretRefusedError: a broker refused (more than the step's scope implies).
            SecretError: a credential could not be issued or is no longer live.
        """
        out: dict[str, Credential] = {}
        for spec in tool.credentials:
            with self._lock:
                live = self._live.get((grant.jti, spec.param))
            if live is None:
                live = self._issue(tool, spec, grant)
            state = self.store.use_secret(live.handle)
            if state != "ok":
                raise SecretError(f"credential {live.handle!r} for {spec.param!r} is {state}")
            out[spec.param] = live.credential
        return out

    def _issue(self, tool: Tool, spec: SecretSpec, grant: Grant) -> _Live:
        broker = self.brokers[spec.broker]
        handle = f"sec_{uuid.uuid4().hex}"
        scope = StepScope.of(grant, risk=tool.risk.value)
        attrs = {tr.SECRET_HANDLE: handle, tr.SECRET_BROKER: spec.broker, tr.SECRET_KIND: broker.kind,
                 tr.SECRET_NAME: spec.param, tr.GEN_AI_TOOL_NAME: tool.name, tr.STEP_ID: grant.step_id,
                 tr.GRANT_ID: grant.jti}
        with tr.span(tr.SECRET_ISSUE, attrs) as s:
            # Recorded before it exists: a crash from here on leaves a record to sweep.
            self.store.add_secret(SecretRecord(
                handle=handle, run_id=grant.run_id, step_id=grant.step_id, tool=tool.name, workflow=grant.workflow,
                name=spec.param, broker=spec.broker, kind=broker.kind, principal="", grant_id=grant.jti,
                issued_at=self.clock.now(), expires_at=grant.expires_at))
            try:
                issued = broker.issue(spec, scope, handle=handle)
            except Exception as exc:
                refused = isinstance(exc, SecretRefusedError)
                reason = str(exc) if isinstance(exc, SecretError) else f"broker raised {type(exc).__name__}"
                with self.store.atomic():
                    self.store.revoke_secret(handle, reason="not issued", at=self.clock.now())
                    self.ledger.append("secret_refused", grant.run_id, step_id=grant.step_id, tool=tool.name,
                                       handle=handle, broker=spec.broker, secret_kind=broker.kind, name=spec.param,
                                       grant_id=grant.jti, refused=refused, reason=reason)
                if refused:
                    tr.record_denial(s, [f"scopegraph:secret:{spec.broker}"], reason)
                else:
                    tr.set_error(s, type(exc).__name__)
                if isinstance(exc, SecretError):
                    raise
                raise SecretError(f"broker {spec.broker!r} failed to issue {spec.param!r}: "
                                  f"{type(exc).__name__}") from None
            issued.credential.handle = handle
            s.set_attribute(tr.SECRET_PRINCIPAL, issued.principal)
            with self.store.atomic():
                recorded = self.store.mark_secret_issued(handle, principal=issued.principal,
                                                         expires_at=issued.expires_at)
                if recorded:
                    self.ledger.append("secret_issued", grant.run_id, step_id=grant.step_id, tool=tool.name,
                                       handle=handle, broker=spec.broker, secret_kind=broker.kind, name=spec.param,
                                       principal=issued.principal, grant_id=grant.jti,
                                       expires_at=issued.expires_at, granted=dict(issued.detail))
            if not recorded:  # the run ended meanwhile and revoked it: it must not outlive that
                self._destroy(broker, handle, issued.principal)
                raise SecretError(f"credential {handle!r} was revoked while it was being issued")
        self.metrics.secrets_issued.add(1, {"broker": spec.broker, "kind": broker.kind, "tool": tool.name})
        live = _Live(handle=handle, run_id=grant.run_id, step_id=grant.step_id, param=spec.param,
                     credential=issued.credential)
        with self._lock:
            self._live[(grant.jti, spec.param)] = live
        return live

    def scrub_pairs(self, run_id: str | None = None) -> list[tuple[str, Any]]:
        """``(parameter, secret)`` of the credentials live in this process (of ``run_id`` when
        given): what the gateway scrubs from a failed tool's message."""
        with self._lock:
            lives = [x for x in self._live.values() if run_id is None or x.run_id == run_id]
        return [(x.param, value) for x in lives for value in x.credential.scrub_values()]

    # revoking ---------------------------------------------------------------------------------
    def end_step(self, run_id: str, step_id: str, *, reason: str = "step ended") -> int:
        """Revoke the credentials of a step and of its delegated children; never raises
        (one that cannot be revoked now stays recorded as live, for the sweep)."""
        if not self.active:
            return 0  # no tool declares one: nothing to look for at every step's end
        self._forget(lambda x: x.run_id == run_id and (x.step_id == step_id or x.step_id.startswith(step_id + ".")))
        try:
            live = self.store.live_secrets(run_id, step_id)
        except Exception:  # the store is down: the records stay live, and the sweep revokes them later
            return 0
        return self._revoke_all(live, reason)

    def end_run(self, run_id: str, *, reason: str) -> int:
        """Revoke every credential of a run, tokens exchanged for its grants included (never
        raises; see ``end_step``)."""
        self._forget(lambda x: x.run_id == run_id)
        try:
            live = self.store.live_secrets(run_id)
        except Exception:
            return 0
        return self._revoke_all(live, reason)

    def sweep(self, *, reason: str = "swept: its step ended or was abandoned") -> int:
        """Revoke the credentials of steps that ended or were abandoned, and drop what a
        broker still holds for credentials the store says are revoked. Never raises.

        A credential is left alone while its step has a live grant and its run is driven
        by a live process: that step is running right now, here or elsewhere.
        """
        if not self.active:
            return 0
        now = self.clock.now()
        with tr.span(tr.SECRET_SWEEP, {}) as s:
            try:
                # Only this workflow's: another workflow may call a broker of another server by the same name.
                stale = [c.record for c in self.store.secret_sweep_candidates(now=now)
                         if c.record.workflow == self.workflow and c.record.broker in self.brokers and (
                             c.live_grants == 0 or c.lease_owner is None or (c.lease_until or 0.0) <= now
                             or not self.owner_alive(c.lease_owner))]
            except Exception as exc:  # a sweep that cannot read the store retries on the next start
                tr.set_error(s, type(exc).__name__)
                return 0
            count = self._revoke_all(stale, reason)
            count += self._drop_leftovers(reason)
            s.set_attribute(tr.REVOKED_COUNT, count)
        return count

    def _drop_leftovers(self, reason: str) -> int:
        count = 0
        for name, broker in self.brokers.items():
            try:
                found = broker.leftovers()
            except Exception:
                continue  # unreachable now: the next sweep tries again
            for handle, principal in found:
                record = self.store.get_secret(handle)
                if record is None or record.live or record.broker != name:
                    continue  # another store's, or live (the pass above judged it)
                if self._destroy(broker, handle, principal, run_id=record.run_id, step_id=record.step_id,
                                 reason=f"{reason} (left behind downstream)", mark=False):
                    count += 1
        return count

    def _revoke_all(self, records: Iterable[SecretRecord], reason: str) -> int:
        count = 0
        for record in records:
            broker = self.brokers.get(record.broker)
            if broker is None:
                continue  # a broker this workflow does not know: a runtime that does will sweep it
            if self._destroy(broker, record.handle, record.principal, run_id=record.run_id,
                             step_id=record.step_id, reason=reason, tool=record.tool, kind=record.kind,
                             broker_name=record.broker):
                count += 1
        return count

    def _destroy(self, broker: SecretBroker, handle: str, principal: str, *, run_id: str | None = None,
                 step_id: str | None = None, reason: str = "revoked", mark: bool = True, tool: str | None = None,
                 kind: str | None = None, broker_name: str | None = None) -> bool:
        """Destroy one credential downstream, then record it; ``False`` if it could not be."""
        attrs = {tr.SECRET_HANDLE: handle, tr.SECRET_PRINCIPAL: principal or None, tr.STEP_ID: step_id,
                 tr.SECRET_BROKER: broker_name, tr.SECRET_KIND: kind}
        with tr.span(tr.SECRET_REVOKE, attrs) as s:
            try:
                if principal:  # "": never made downstream (issue failed or was cut off before it)
                    broker.revoke(handle, principal)
            except Exception as exc:
                tr.set_error(s, type(exc).__name__)
                return False
            if run_id is None:
                return True
            try:
                with self.store.atomic():
                    changed = self.store.revoke_secret(handle, reason=reason, at=self.clock.now()) if mark else True
                    if changed:
                        self.ledger.append("secret_revoked", run_id, step_id=step_id, handle=handle,
                                           principal=principal or None, tool=tool, reason=reason)
            except Exception as exc:  # the store is down: the credential is gone, its record says live
                tr.set_error(s, type(exc).__name__)
                return False
        if changed:
            self.metrics.secrets_revoked.add(1, {"broker": broker_name or "", "kind": kind or ""})
        return bool(changed)

    def _forget(self, which: Callable[[_Live], bool]) -> None:
        with self._lock:
            for key in [k for k, v in self._live.items() if which(v)]:
                del self._live[key]
