"""Downstream credentials issued per step and revoked when it ends (see ``base``)."""

from __future__ import annotations

from .base import Credential, Issued, SecretBroker, SecretKind, SecretSpec, StepScope

__all__ = ["Credential", "Issued", "SecretBroker", "SecretKind", "SecretSpec", "StepScope"]
