"""Canonical JSON and digests: one byte string per value, so digests are stable."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept; refuses NaN and non-JSON values."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(text: str) -> str:
    # ``surrogatepass``: a lone surrogate (text no UTF-8 can hold) still has one digest.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def action_digest(*, run_id: str, step_id: str, tool: str, arguments: Any, policy_version: str) -> str:
    """The digest an approval is bound to: SHA-256 over the canonical JSON of the action."""
    return sha256_hex(canonical_json({
        "run_id": run_id, "step_id": step_id, "tool": tool,
        "arguments": arguments, "policy_version": policy_version,
    }))


# RFC 8785 (JCS) ----------------------------------------------------------------------------
# The digests above use Python's own canonical form, which another language cannot always
# reproduce (keys sorted by code point rather than UTF-16 unit, Python's float text).
# JCS is the form a verifier elsewhere can recompute; tests/vectors/canonical.json holds
# inputs with their expected bytes and digests. Stored digests keep their version: the
# switch happens with a versioned layout (``action_digest_v2``), never in place.
ACTION_DIGEST_V2 = "scopegraph.action.v2"


def jcs(value: Any) -> bytes:
    """RFC 8785 canonical JSON of ``value`` as UTF-8 bytes.

    Raises:
        ValueError: NaN or infinity, an integer beyond ±2**53-1 (not exact in other
            languages' JSON), a lone surrogate, a non-string key, or a non-JSON value.
    """
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"value cannot be canonicalised (RFC 8785): {exc}") from None
    except (TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"value cannot be canonicalised (RFC 8785): {type(exc).__name__}") from None


def jcs_sha256_hex(value: Any) -> str:
    """SHA-256 over the JCS bytes of ``value``, as lowercase hex."""
    return hashlib.sha256(jcs(value)).hexdigest()


def action_digest_v2(*, run_id: str, step_id: str, tool: str, arguments: Any, policy_version: str) -> str:
    """The next action digest layout: SHA-256 over JCS of a typed, versioned object.

    ``{"type": "scopegraph.action.v2", "run_id", "step_id", "tool", "arguments",
    "policy_version"}``; stored digests say which layout made them (see the report's
    migration plan), so v1 digests keep verifying.
    """
    return jcs_sha256_hex({
        "type": ACTION_DIGEST_V2, "run_id": run_id, "step_id": step_id, "tool": tool,
        "arguments": arguments, "policy_version": policy_version,
    })
