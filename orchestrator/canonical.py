"""Canonical JSON and digests: one byte string per value, so digests are stable."""

from __future__ import annotations

import hashlib
import json
from typing import Any


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
