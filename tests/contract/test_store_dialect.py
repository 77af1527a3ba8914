"""The words the SQL stores spell differently, and nothing else."""

from __future__ import annotations

import pytest

from scopegraph.store.dialect import POSTGRES, SQLITE


def test_a_statement_is_written_once_and_spelled_per_database() -> None:
    template = "SELECT payload FROM sg_approvals WHERE id = ? AND run_id = ?${for_update}"
    assert SQLITE.sql(template) == "SELECT payload FROM sg_approvals WHERE id = ? AND run_id = ?"
    assert POSTGRES.sql(template) == "SELECT payload FROM sg_approvals WHERE id = %s AND run_id = %s FOR UPDATE"
    assert POSTGRES.sql(template) is POSTGRES.sql(template)  # rendered once


def test_a_counter_column_is_filled_by_the_database_that_can() -> None:
    template = "INSERT INTO t (id, seq) VALUES (?, ${serial:t.seq})"
    assert SQLITE.sql(template) == "INSERT INTO t (id, seq) VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM t))"
    assert POSTGRES.sql(template) == "INSERT INTO t (id, seq) VALUES (%s, DEFAULT)"


def test_schema_words_and_a_literal_percent() -> None:
    ddl = "CREATE TABLE k (id ${id_pk}, pem ${blob} NOT NULL, at ${float}, n ${int}, c ${serial})"
    assert SQLITE.ddl(ddl) == ("CREATE TABLE k (id INTEGER PRIMARY KEY AUTOINCREMENT, pem BLOB NOT NULL, "
                               "at REAL, n INTEGER, c INTEGER NOT NULL)")
    assert POSTGRES.ddl(ddl) == ("CREATE TABLE k (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                                 "pem BYTEA NOT NULL, at DOUBLE PRECISION, n BIGINT, "
                                 "c BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE)")
    assert POSTGRES.sql("SELECT 1 WHERE x LIKE 'a%' AND y = ?") == "SELECT 1 WHERE x LIKE 'a%%' AND y = %s"
    with pytest.raises(ValueError, match="no word 'nope' in the sqlite dialect"):
        SQLITE.ddl("SELECT ${nope}")


def test_a_script_is_cut_into_statements_only_where_sqlite_needs_it() -> None:
    script = "CREATE TABLE a (x TEXT DEFAULT ';');\nINSERT INTO a VALUES ('1;2');\n\n"
    assert SQLITE.script(script) == ["CREATE TABLE a (x TEXT DEFAULT ';');", "INSERT INTO a VALUES ('1;2');"]
    assert POSTGRES.script(script) == [script]
