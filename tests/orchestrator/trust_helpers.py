"""Shared by the trust-root tests: a store on each backend, and SQL run on it behind scopegraph's back."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest


@dataclass(frozen=True)
class Where:
    """A store URL, and where its keystore and witness are."""

    backend: str
    url: str
    keys: Path
    witness: Path

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``statement`` (``?`` placeholders) directly on the database, as an attacker with write access."""
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.url[len("sqlite:///"):], isolation_level=None)) as conn:
                return list(conn.execute(statement, params).fetchall())
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement.replace("?", "%s"), params or None)  # type: ignore[arg-type]
            return list(cur.fetchall()) if cur.description else []


def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    """For a ``params=["sqlite", "postgresql"]`` fixture: the store and the paths of its trust roots."""
    if request.param == "sqlite":
        path = tmp_path / "store" / "scopegraph.db"
        return Where("sqlite", f"sqlite:///{path}", path.parent / "keys", path.parent / "scopegraph.witness.jsonl")
    url = request.getfixturevalue("postgres_store_url")  # sets SCOPEGRAPH_KEYSTORE and SCOPEGRAPH_WITNESS
    return Where("postgresql", url, tmp_path / "pg-keys", tmp_path / "pg-witness.jsonl")
