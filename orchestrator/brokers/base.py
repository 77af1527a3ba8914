"""Downstream credentials: what a tool declares, what a broker issues, what a step's scope allows.

A tool that reaches a database or an API declares the credentials it needs
(``@tool(secrets=[postgres_role(...)])``). Each declaration (a ``SecretSpec``) names the
tool parameter that receives the credential and the broker that issues it. After the
gateway allows a call, the broker issues a credential for the call's step, scoped from
the step's grant (a ``StepScope``: its tool, constraints and expiry, never its token);
the tool receives it as a keyword argument the executor and the model never see, and
the broker revokes it when the step ends.

Brokers are of two kinds: ``ephemeral`` ones make a credential per step and destroy it
afterwards (a PostgreSQL role, an exchanged token); ``static`` sources hand out a
long-lived secret they cannot revoke (an API key from the environment), so the least
privilege report proposes moving them behind a broker.

What is recorded (store, ledger, spans) is the credential's ``handle`` and its
``principal`` (a role name, an audience, a secret's name): never the secret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from ..constraints import Exact, OneOf

if TYPE_CHECKING:
    from ..credentials import Grant

SecretKind = Literal["ephemeral", "static"]


class Credential:
    """A secret handed to one tool for one step. It never prints its secret.

    Subclasses keep the secret in attributes whose names start with ``_`` and reach it
    through ``danger_*`` methods; ``scrub_values`` lists every form a message could
    quote, so the gateway can scrub it from the tool's errors.
    """

    handle: str = ""

    def scrub_values(self) -> tuple[str, ...]:
        """The secret strings of this credential (the gateway scrubs them from messages)."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(handle={self.handle!r}, secret=<redacted>)"

    __str__ = __repr__


@dataclass(frozen=True, kw_only=True)
class StepScope:
    """What a broker learns of the step it issues for: its grant's facts, never the token."""

    run_id: str
    step_id: str
    workflow: str
    tool: str
    risk: str
    subject: str
    grant_id: str
    expires_at: float
    constraints: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, grant: Grant, *, risk: str) -> StepScope:
        return cls(run_id=grant.run_id, step_id=grant.step_id, workflow=grant.workflow, tool=grant.tool,
                   risk=risk, subject=str(grant.subject), grant_id=grant.jti, expires_at=grant.expires_at,
                   constraints=dict(grant.constraints))

    def pinned(self, argument: str) -> tuple[Any, ...] | None:
        """The values the step's plan pinned ``argument`` to (``exact`` or ``one_of``), or
        ``None`` when the step lets the executor choose (any other constraint, or none)."""
        c = self.constraints.get(argument)
        if isinstance(c, Exact):
            return (c.value,)
        if isinstance(c, OneOf):
            return tuple(c.values)
        return None


@dataclass(frozen=True, kw_only=True)
class Issued:
    """A credential a broker made: the secret for the tool, the rest for the records."""

    credential: Credential = field(repr=False)
    principal: str  # what the downstream system calls it (a role name, an audience): not secret
    expires_at: float | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)  # what was granted, for the ledger


@dataclass(frozen=True, kw_only=True)
class SecretSpec:
    """One credential a tool declares: the parameter that receives it and its broker's name."""

    param: str
    broker: str
    kind_name: ClassVar[str] = "secret"

    def check_tool(self, tool: str, arguments: Sequence[str], risk: str) -> None:
        """Refuse a declaration that cannot work for ``tool`` (raises ``ToolError``)."""

    def describe(self) -> str:
        """What the credential is, in words, for reports (no secret)."""
        return f"{self.kind_name} from broker {self.broker!r}"


@runtime_checkable
class SecretBroker(Protocol):
    """Issues and revokes one kind of downstream credential.

    ``issue`` must not leave anything behind when it raises; ``revoke`` is idempotent
    (revoking what is gone succeeds) and must work from another process than the one
    that issued (after a crash, by handle and principal alone).
    """

    kind: SecretKind

    def accepts(self, spec: SecretSpec) -> bool:
        """Whether this broker issues the credentials ``spec`` declares."""
        ...

    def issue(self, spec: SecretSpec, scope: StepScope, *, handle: str) -> Issued:
        """Make a credential for one step.

        Raises:
            SecretRefusedError: it would grant more than the step's scope implies.
            SecretError: it cannot be made.
        """
        ...

    def revoke(self, handle: str, principal: str) -> None:
        """Destroy the credential (idempotent).

        Raises:
            SecretError: it cannot be destroyed now (the sweep tries again later).
        """
        ...

    def leftovers(self) -> list[tuple[str, str]]:
        """``(handle, principal)`` of every credential this broker finds downstream (for the
        sweep; a broker that cannot look returns ``[]``)."""
        ...
