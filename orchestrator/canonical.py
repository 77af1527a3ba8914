"""Canonical JSON and digests: one byte string per value, so digests are stable."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

import rfc8785


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 kept; refuses NaN and non-JSON values."""
    return _canonical_encode(value)


# What ``json.dumps`` with these options does, its encoder made once rather than per call
# (every grant's claims are written so): the same text, the same errors.
_canonical_encode = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     allow_nan=False).encode


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

    The usual value is written by Python's own JSON encoder (see ``python_json_is_jcs``),
    anything else by ``rfc8785``; the two are property-tested to agree.

    Raises:
        ValueError: NaN or infinity, an integer beyond ±2**53-1 (not exact in other
            languages' JSON), a lone surrogate, a non-string key, or a non-JSON value.
    """
    if python_json_is_jcs(value):
        return sorted_json(value).encode("utf-8")
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"value cannot be canonicalised (RFC 8785): {exc}") from None
    except (TypeError, UnicodeEncodeError) as exc:
        raise ValueError(f"value cannot be canonicalised (RFC 8785): {type(exc).__name__}") from None


def _sorted_json_encoder() -> Callable[[Any], str]:
    """Python's sorted compact JSON, UTF-8 kept: the JCS form of what ``python_json_is_jcs``
    admits. The C encoder is made once (``JSONEncoder.encode`` makes one per call, with a
    cycle check that ``python_json_is_jcs``'s depth limit already makes needless); the
    same bytes either way."""
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without the C accelerator
        return encoder.encode

    def refuse(value: Any) -> Any:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")

    iterencode = make(None, refuse, json.encoder.encode_basestring, None, ":", ",", True, False, False)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return encoder.encode(value)
        return "".join(iterencode(value, 0))

    return encode


sorted_json = _sorted_json_encoder()
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_EXACT_INT = 2**53 - 1
_MAX_DEPTH = 64


def python_json_is_jcs(value: Any, depth: int = 0) -> bool:
    """Whether ``sorted_json(value)`` is the RFC 8785 form of ``value``: JSON (tuples as
    arrays) with no lone surrogate, no key with a character from U+D800 on (key order by
    code point is then key order by UTF-16 unit), integers within ±2**53-1, and only floats
    whose ``repr`` is their ECMAScript form. Strings are escaped alike by both."""
    if type(value) is dict and depth <= _MAX_DEPTH:
        # The usual case, a ledger payload: a flat dict of ASCII strings and small numbers.
        # Its members of exact built-in types are checked here without a call each;
        # anything else goes the general way below, which decides alike.
        for k, v in value.items():
            if type(k) is not str or not (k.isascii() or max(k) < "\ud800"):
                return False
            kind = type(v)
            if kind is str:
                if not v.isascii() and _SURROGATE.search(v):
                    return False
            elif kind is int:
                if not -_MAX_EXACT_INT <= v <= _MAX_EXACT_INT:
                    return False
            elif kind is float:  # a timestamp, a duration: ``plain_float``, without a call
                if not (math.isfinite(v) and not v.is_integer() and 1e-4 <= abs(v) < 1e16):
                    return False
            elif kind is list and depth < _MAX_DEPTH:
                # A list (policy ids, reasons): its strings checked here too; the depth
                # test is the one the general way makes for a list one level down.
                for x in v:
                    if type(x) is str:
                        if not x.isascii() and _SURROGATE.search(x):
                            return False
                    elif not python_json_is_jcs(x, depth + 2):
                        return False
            elif v is not None and kind is not bool and not python_json_is_jcs(v, depth + 1):
                return False
        return True
    if isinstance(value, str):
        return value.isascii() or not _SURROGATE.search(value)
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -_MAX_EXACT_INT <= value <= _MAX_EXACT_INT
    if isinstance(value, float):
        return plain_float(value)
    if depth > _MAX_DEPTH:
        return False
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str) or not (k.isascii() or max(k) < "\ud800") \
                    or not python_json_is_jcs(v, depth + 1):
                return False
        return True
    if isinstance(value, list | tuple):
        for v in value:
            if not python_json_is_jcs(v, depth + 1):
                return False
        return True
    return False


def plain_float(value: float) -> bool:
    """Whether Python's ``repr`` of ``value`` is the ECMAScript form JCS asks for: finite, not
    integral ("1.0" is "1" there), and neither so small nor so large that either writes an
    exponent."""
    return math.isfinite(value) and not value.is_integer() and 1e-4 <= abs(value) < 1e16


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
