"""What differs between the SQL stores' databases, and nothing else.

Statements are written once (see ``queries``), with ``?`` for parameters and ``${word}``
for the few words that differ (SQLite / PostgreSQL):

- ``?``: ``?`` / ``%s``;
- ``${for_update}``: nothing, since ``BEGIN IMMEDIATE`` already made the transaction the one
  writer / `` FOR UPDATE``, locking the rows read until the commit;
- ``${serial:TABLE.COLUMN}``, an insert's value for a counter column:
  ``(SELECT COALESCE(MAX(COLUMN), 0) + 1 FROM TABLE)``, safe with one writer / ``DEFAULT``
  (an identity column);
- in schema statements: ``${float}`` ``REAL`` / ``DOUBLE PRECISION``; ``${int}`` ``INTEGER`` /
  ``BIGINT``; ``${blob}`` ``BLOB`` / ``BYTEA``; ``${timestamp}`` ``TEXT`` / ``TIMESTAMPTZ``;
  ``${id_pk}`` (an autoincrement key) ``INTEGER PRIMARY KEY AUTOINCREMENT`` / ``BIGINT GENERATED
  ALWAYS AS IDENTITY PRIMARY KEY``; ``${serial}`` (a counter column) ``INTEGER NOT NULL`` /
  ``BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE``.

Upserts (``INSERT … ON CONFLICT … DO NOTHING | DO UPDATE SET … = excluded.…``) and
``RETURNING`` are spelled the same by both (SQLite 3.24 and 3.35 or newer), so they need no word.
A statement is rendered once per dialect and kept.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field

_WORD = re.compile(r"\$\{(\w+)(?::(\w+)\.(\w+))?\}")


@dataclass(frozen=True, kw_only=True)
class Dialect:
    """How one database spells the words that differ."""

    name: str
    param: str
    words: Mapping[str, str]
    serial_value: str  # an insert's value for a serial column; ``{table}`` and ``{column}`` filled in
    _rendered: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def sql(self, template: str) -> str:
        """``template`` (a statement with ``?`` parameters) in this dialect; rendered once."""
        rendered = self._rendered.get(template)
        if rendered is None:
            text = self.ddl(template)
            if self.param != "?":
                text = text.replace("%", "%%").replace("?", self.param)
            rendered = self._rendered[template] = text
        return rendered

    def ddl(self, template: str) -> str:
        """``template`` (schema statements, no parameters) in this dialect."""
        return _WORD.sub(self._word, template)

    def script(self, sql: str) -> list[str]:
        """``sql`` cut into what one ``execute`` may run."""
        if self.name != "sqlite":
            return [sql]  # PostgreSQL runs a parameterless script in one go
        statements, current = [], ""
        for piece in sql.split(";"):
            current += piece + ";"
            if sqlite3.complete_statement(current):  # not a ";" inside a literal or a trigger
                if current.strip(" \t\r\n;"):
                    statements.append(current.strip())
                current = ""
        if current.strip(" \t\r\n;"):
            statements.append(current.strip(" \t\r\n;"))
        return statements

    def _word(self, match: re.Match[str]) -> str:
        word, table, column = match.groups()
        if word == "serial" and table:
            return self.serial_value.format(table=table, column=column)
        try:
            return self.words[word]
        except KeyError:
            raise ValueError(f"no word {word!r} in the {self.name} dialect") from None


SQLITE = Dialect(
    name="sqlite", param="?",
    serial_value="(SELECT COALESCE(MAX({column}), 0) + 1 FROM {table})",
    words={"for_update": "", "float": "REAL", "int": "INTEGER", "blob": "BLOB",
           "id_pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "serial": "INTEGER NOT NULL", "timestamp": "TEXT"},
)

POSTGRES = Dialect(
    name="postgresql", param="%s",
    serial_value="DEFAULT",
    words={"for_update": " FOR UPDATE", "float": "DOUBLE PRECISION", "int": "BIGINT", "blob": "BYTEA",
           "id_pk": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
           "serial": "BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE", "timestamp": "TIMESTAMPTZ"},
)
