"""Fixtures for the broker tests: the PostgreSQL server and a schema of each test's own
(shared with the store contract), and a broker whose roles carry a prefix of the test's own
(roles are global to the server, and other tests run beside these)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from scopegraph.brokers.postgres import PostgresRoleBroker
from tests.contract.conftest import postgres_schema, postgres_store_url, postgres_url

__all__ = ["postgres_schema", "postgres_store_url", "postgres_url"]


@pytest.fixture
def admin(postgres_url: str, postgres_schema: str) -> Iterator[psycopg.Connection[Any]]:
    """An admin session in the test's schema, with two customers' orders under row-level security."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        s = sql.Identifier(postgres_schema)
        conn.execute(sql.SQL("CREATE TABLE {}.orders (id int PRIMARY KEY, customer_id text NOT NULL, "
                             "amount int NOT NULL, card text, note text NOT NULL DEFAULT '')").format(s))
        conn.execute(sql.SQL("ALTER TABLE {}.orders ENABLE ROW LEVEL SECURITY").format(s))
        conn.execute(sql.SQL("CREATE TABLE {}.cards (customer_id text, number text)").format(s))
        conn.execute(sql.SQL("CREATE TABLE {}.notes (id int, body text)").format(s))  # no row-level security
        conn.execute(sql.SQL("INSERT INTO {}.orders VALUES (1, 'c-1', 100, '4111', 'rail'), "
                             "(2, 'c-1', 250, '4111', 'hotel'), (3, 'c-2', 999, '5500', 'rail'), "
                             "(4, 'c-3', 7, '3400', 'taxi')").format(s))
        conn.execute(sql.SQL("INSERT INTO {}.cards VALUES ('c-1', '4111'), ('c-2', '5500')").format(s))
        conn.execute(sql.SQL("INSERT INTO {}.notes VALUES (1, 'hello')").format(s))
        conn.execute(sql.SQL("SET search_path TO {}").format(s))
        yield conn


@pytest.fixture
def broker(postgres_url: str, postgres_schema: str, admin: psycopg.Connection[Any]) -> Iterator[PostgresRoleBroker]:
    b = PostgresRoleBroker(postgres_url, schema=postgres_schema, prefix=f"t{uuid.uuid4().hex[:8]}_")
    try:
        yield b
    finally:  # whatever a test left behind
        for handle, role in b.leftovers():
            b.revoke(handle, role)
