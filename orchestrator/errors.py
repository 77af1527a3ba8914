"""Every exception scopegraph raises, in one tree.

::

    ScopegraphError (RuntimeError)
    ├── ConfigError            bad workflow definition, settings or CLI input
    ├── ToolError              tool declaration or argument problems
    │   ├── UnknownToolError
    │   └── ToolArgumentsError
    ├── PlanError              malformed plan: unknown tool, bad constraint, cycle
    ├── IdentityError          SPIFFE IDs, SVIDs, trust bundle
    ├── KeystoreError          a private key cannot be found, made, read safely or used
    ├── GrantError             a grant failed verification (never retried)
    │   ├── GrantExpiredError
    │   ├── GrantRevokedError
    │   ├── GrantExhaustedError
    │   └── GrantScopeError    the call lies outside the grant's scope
    ├── PolicyError            invalid policy files or schema; evaluation failure
    ├── ApprovalError          an approval cannot be given, found or used
    ├── StoreError             the durable store is unreachable or unwritable
    ├── SecretError            a downstream credential cannot be issued, found or revoked
    │   ├── SecretRefusedError the credential would grant more than the step's scope implies
    │   └── TokenRequestError  a token exchange or introspection request is refused (an OAuth error code)
    ├── RunBusyError           another process is driving the run right now
    ├── WebhookError           webhook deliveries and their signatures
    │   └── WebhookSignatureError a delivery's signature or timestamp does not verify
    └── ToolExecutionError     the tool itself failed
        └── TransientToolError the tool failed in a way worth retrying

Roots are ``RuntimeError`` so that LangGraph's default retry policy, which retries
only a few built-in exception types, never retries a security failure. Messages are
one sentence, name the problem and the offending value, and never carry a secret.
"""

from __future__ import annotations


class ScopegraphError(RuntimeError):
    """Base of every scopegraph error."""


class ConfigError(ScopegraphError):
    """A workflow, setting or command-line input is invalid."""


class ToolError(ScopegraphError):
    """A tool is declared or called incorrectly."""


class UnknownToolError(ToolError, KeyError):
    """A tool name is not registered in the workflow.

    Also a ``KeyError``, so the tool registry honours the ``Mapping`` protocol.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown tool"


class ToolArgumentsError(ToolError):
    """Arguments do not match a tool's schema."""


class PlanError(ScopegraphError):
    """A plan is malformed: unknown tool, invalid constraint, or dependency cycle."""


class IdentityError(ScopegraphError):
    """A SPIFFE ID, SVID or trust bundle is invalid."""


class KeystoreError(ScopegraphError):
    """A keystore is missing, unsafe (readable by others), locked, or holds no usable key."""


class GrantError(ScopegraphError):
    """A grant failed verification; the call it was presented for is denied."""


class GrantExpiredError(GrantError):
    """The grant's expiry has passed."""


class GrantRevokedError(GrantError):
    """The grant has been revoked."""


class GrantExhaustedError(GrantError):
    """The grant has no uses left."""


class GrantScopeError(GrantError):
    """The call lies outside what the grant allows."""


class PolicyError(ScopegraphError):
    """A policy file or schema is invalid, or evaluation failed."""


class ApprovalError(ScopegraphError):
    """An approval is unknown, not answerable by this person, expired, used, or for another call."""


class StoreError(ScopegraphError):
    """The durable store cannot be read or written."""


class SecretError(ScopegraphError):
    """A downstream credential (a broker's role or token, a static secret) cannot be
    issued, found or revoked."""


class SecretRefusedError(SecretError):
    """A broker refuses to issue: what it would grant exceeds what the step's scope implies."""


class TokenRequestError(SecretError):
    """A token exchange (RFC 8693) or introspection (RFC 7662) request is refused.

    ``code`` is the OAuth error code the HTTP layer answers with (``invalid_grant``,
    ``invalid_target``, ``invalid_request``, ``invalid_scope``, ``unsupported_grant_type``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunBusyError(ScopegraphError):
    """Another runtime holds the run's lease: two drivers must never run one run at once."""


class WebhookError(ScopegraphError):
    """A webhook delivery or its signature is at fault."""


class WebhookSignatureError(WebhookError):
    """A delivery's signature does not match, or its timestamp is missing, malformed or stale."""


class ToolExecutionError(ScopegraphError):
    """A tool raised while executing a permitted call."""


class TransientToolError(ToolExecutionError):
    """A tool failure worth retrying; raise it from a tool to ask for a retry.

    Every retry is a new call: it is authorized again and counts as a use of the grant.
    """
