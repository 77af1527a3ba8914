"""Durable stores, selected by URL: ``sqlite:///path.db`` (default) or ``postgresql://``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import (
    CallRecord,
    GrantRecord,
    GrantState,
    LedgerHead,
    LedgerRow,
    RunRecord,
    Store,
    UseRecord,
)
from .sqlite import SqliteStore

DEFAULT_STORE_URL = "sqlite:///.scopegraph/scopegraph.db"


def open_store(url: str | None = None) -> Store:
    """Open the store a URL names.

    Raises:
        ConfigError: the URL's scheme is not supported.
        StoreError: the store cannot be opened or created.
    """
    url = url or DEFAULT_STORE_URL
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ConfigError(f"store URL {url!r} names no file")
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"store URL {url!r}: the PostgreSQL store is not available yet")
    raise ConfigError(f"unsupported store URL {url!r}: use sqlite:///PATH")


__all__ = [
    "CallRecord", "DEFAULT_STORE_URL", "GrantRecord", "GrantState", "LedgerHead", "LedgerRow",
    "RunRecord", "SqliteStore", "Store", "UseRecord", "open_store",
]
