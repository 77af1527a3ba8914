"""Durable stores, selected by URL: ``sqlite:///path.db`` (default) or ``postgresql://``."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .base import (
    ApproverRecord,
    CallRecord,
    GrantRecord,
    GrantState,
    LedgerHead,
    LedgerRow,
    RunRecord,
    Store,
    StoreCounts,
    TrustKeyRecord,
    UseRecord,
)
from .sqlite import SqliteStore

DEFAULT_STORE_URL = "sqlite:///.scopegraph/scopegraph.db"


def open_store(url: str | None = None, *, create: bool = True) -> Store:
    """Open the store a URL names: ``sqlite:///PATH``, or ``postgresql://`` (or ``postgres://``)
    in libpq's URL form, e.g. ``postgresql://user@host:5432/db?options=-csearch_path%3Dscopegraph``.

    A store that is not there is created (its directory, file or PostgreSQL schema, and
    its tables); with ``create=False`` (for commands that only read) it must exist already.
    Either way an existing store is brought up to the current schema.

    Raises:
        ConfigError: the URL's scheme is not supported, or it is not a valid libpq URL.
        StoreError: the store cannot be opened or created; with ``create=False``, there is
            no store at the URL (``no store at …``).
    """
    url = url or DEFAULT_STORE_URL
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if not path:
            raise ConfigError(f"store URL {url!r} names no file")
        return SqliteStore(Path(path), create=create)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore  # psycopg is loaded only when a PostgreSQL URL asks for it

        return PostgresStore(url, create=create)
    from .postgres import redact_url  # a URL of any scheme may carry a password

    raise ConfigError(f"unsupported store URL {redact_url(url)!r}: use sqlite:///PATH or postgresql://…")


__all__ = [
    "ApproverRecord", "CallRecord", "DEFAULT_STORE_URL", "GrantRecord", "GrantState", "LedgerHead", "LedgerRow",
    "RunRecord", "SqliteStore", "Store", "StoreCounts", "TrustKeyRecord", "UseRecord", "open_store",
]
