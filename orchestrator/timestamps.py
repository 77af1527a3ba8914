"""Timestamps for machines and people: ISO 8601 in UTC beside the epoch seconds we store.

Every JSON document the command line prints passes through :func:`with_iso_times`, so
each epoch field (``at`` or a name ending in ``_at``) gains an ISO 8601 twin (``*_iso``,
e.g. ``"2026-12-02T07:41:01.123Z"``) while the epoch field stays for existing readers.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any


def iso(at: float | None) -> str | None:
    """``at`` (seconds since the epoch) as ISO 8601 in UTC with milliseconds, or ``None``."""
    if at is None or not math.isfinite(at):
        return None
    try:
        when = datetime.fromtimestamp(at, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):  # beyond what a calendar date can hold
        return None
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_epoch_field(key: str, value: Any) -> bool:
    if not (key == "at" or key.endswith("_at")):
        return False
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def with_iso_times(value: Any) -> Any:
    """A copy of a JSON-ready ``value`` where every epoch field has an ISO 8601 twin beside it."""
    if isinstance(value, list):
        return [with_iso_times(v) for v in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        out[key] = with_iso_times(item)
        twin = f"{key}_iso"
        if isinstance(key, str) and twin not in value and _is_epoch_field(key, item):
            out[twin] = iso(item)
    return out
