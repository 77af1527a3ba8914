"""Downstream credentials issued per step and revoked when it ends (see ``base``).

Declarations and brokers: ``scopegraph.brokers.postgres`` (``postgres_role``,
``PostgresRoleBroker``: psycopg is imported only by it), ``scopegraph.brokers.static``
(``static_secret``, ``EnvSecretSource``, ``FileSecretSource``, re-exported here),
``scopegraph.brokers.tokens`` (token exchange and introspection), and the runtime's
``scopegraph.brokers.service.SecretService``.
"""

from __future__ import annotations

from .base import Credential, Issued, SecretBroker, SecretKind, SecretSpec, StepScope
from .static import EnvSecretSource, FileSecretSource, StaticSecret, static_secret

__all__ = ["Credential", "EnvSecretSource", "FileSecretSource", "Issued", "SecretBroker", "SecretKind",
           "SecretSpec", "StaticSecret", "StepScope", "static_secret"]
