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
    """Open the store a URL names: ``sqlite:///PATH``, or ``postgresql://`` (or ``postgres://``)
    in libpq's URL form, e.g. ``postgresql://user@host:5432/db?options=-csearch_path%3Dscopegraph``.

    Raises:
        ConfigError: the URL's scheme is not supported, or it is not a valid libpq URL.
        StoreError: the store cannot be opened or created.
    """
    url = url or DEFAULT_STORE_URL
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ConfigError(f"store URL {url!r} names no file")
        return SqliteStore(Path(path))
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore  # psycopg is loaded only when a PostgreSQL URL asks for it

        return PostgresStore(url)
    from .postgres import redact_url  # a URL of any scheme may carry a password

    raise ConfigError(f"unsupported store URL {redact_url(url)!r}: use sqlite:///PATH or postgresql://…")


__all__ = [
    "CallRecord", "DEFAULT_STORE_URL", "GrantRecord", "GrantState", "LedgerHead", "LedgerRow",
    "RunRecord", "SqliteStore", "Store", "UseRecord", "open_store",
]
