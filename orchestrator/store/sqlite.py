"""The embedded store: one SQLite file shared with LangGraph's SQLite checkpointer."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tenacity import RetryError, retry, retry_if_exception, stop_after_delay, wait_random

from ..errors import StoreError
from .dialect import SQLITE
from .migrations import GENESIS_HASH, MIGRATIONS, VERSION_TABLE, apply_migrations
from .queries import SqlStore

# Pages the write-ahead log may hold before a commit copies it into the database file. That
# copy (a checkpoint) syncs the disk twice, and a secured step writes about 30 pages of store
# and checkpoint data: fewer, larger checkpoints than SQLite's default 1000 pages. Durability
# does not change (a commit is in the log either way); the log file grows to about 16 MB.
WAL_AUTOCHECKPOINT_PAGES = 4000

# How a store written by scopegraph 0.1.0 (which kept ``sg_meta.schema_version = 1`` and no
# migrations table) becomes a store at migration 1: the same tables, with the indexes,
# ledger tip row and version record that migration 1 makes.
_ADOPT_RELEASE_0_1 = f"""
INSERT INTO sg_ledger_tip (id, seq, hash) VALUES (1, 0, '{GENESIS_HASH}') ON CONFLICT (id) DO NOTHING;
DROP INDEX sg_uses_run;
CREATE INDEX sg_uses_run ON sg_uses (run_id, id);
DROP INDEX sg_approvals_run;
CREATE INDEX sg_approvals_run ON sg_approvals (run_id, seq);
DROP INDEX sg_ledger_run;
CREATE INDEX sg_ledger_run ON sg_ledger (run_id, seq);
CREATE INDEX sg_runs_workflow ON sg_runs (workflow, created_at);
INSERT INTO sg_schema_migrations (version, name) VALUES (1, 'initial tables');
DROP TABLE sg_meta;
"""


class SqliteStore(SqlStore):
    """A ``Store`` in one SQLite file (WAL mode, one serialised connection).

    With ``create=False`` the file must exist and hold a store: nothing is created.

    Raises:
        StoreError: the file cannot be opened or created (or, with ``create=False``, holds
            no store), or its schema cannot be brought up to date.
    """

    dialect = SQLITE
    driver_errors = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        super().__init__()
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.RLock()
        if not create and not self.path.is_file():
            raise StoreError(f"no store at {str(self.path)!r}")
        try:
            if create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(
                    str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
            else:  # read-write, but never create the file
                self._conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=rw", uri=True,
                                             check_same_thread=False, isolation_level=None, timeout=10.0)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open store {self.url!r}: {exc}") from exc
        try:
            self._set_up(create)
        except BaseException as exc:
            self._conn.close()
            if isinstance(exc, RetryError):
                raise StoreError(f"cannot open store {self.url!r}: {exc.last_attempt.exception()}") from exc
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open store {self.url!r}: {exc}") from exc
            raise

    # Switching a fresh file to WAL while another process does the same can fail with
    # "database is locked" without waiting on the busy timeout: retry that, briefly.
    @retry(retry=retry_if_exception(lambda e: isinstance(e, sqlite3.OperationalError) and "locked" in str(e)),
           stop=stop_after_delay(10), wait=wait_random(0.005, 0.05))
    def _set_up(self, create: bool) -> None:
        if not create and not self._has_tables("sg_schema_migrations", "sg_meta"):  # before anything writes
            raise StoreError(f"no store at {str(self.path)!r}: the file holds no scopegraph tables")
        self._conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives a process crash; only an OS crash can
        # lose the last transactions, the trade LangGraph's own saver makes.
        self._conn.execute("PRAGMA synchronous=NORMAL")
        # What is deleted or overwritten is zeroed in its page (at no extra I/O): an erased
        # key must not linger in the file's free space.
        self._conn.execute("PRAGMA secure_delete=FAST")
        self._conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        self._conn.execute("BEGIN IMMEDIATE")  # the one migrator: waits on the busy timeout
        try:
            if self._has_tables("sg_meta") and not self._has_tables("sg_schema_migrations"):
                self._adopt_release_0_1()
            apply_migrations(self._conn, SQLITE, MIGRATIONS)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _has_tables(self, *names: str) -> bool:
        marks = ", ".join("?" for _ in names)
        return bool(self._conn.execute(
            f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name IN ({marks})", names).fetchone())

    def _adopt_release_0_1(self) -> None:
        row = self._conn.execute("SELECT value FROM sg_meta WHERE key = 'schema_version'").fetchone()
        if row is None or row[0] != "1":
            raise StoreError(f"store {self.url!r} has unknown schema version {row[0] if row else None!r}")
        self._conn.execute(SQLITE.ddl(VERSION_TABLE))
        for statement in SQLITE.script(_ADOPT_RELEASE_0_1):
            self._conn.execute(statement)

    # transactions (see ``SqlStore``): one connection, one writer at a time -------------------
    def _begin(self) -> sqlite3.Connection:
        self._lock.acquire()
        try:
            self._conn.execute("BEGIN IMMEDIATE")  # the write lock first: read-check-write is atomic
        except sqlite3.Error as exc:
            self._lock.release()
            raise self.error(exc) from exc
        except BaseException:
            self._lock.release()
            raise
        return self._conn

    def _end(self, conn: Any, *, commit: bool) -> None:
        try:
            if commit:
                try:
                    conn.execute("COMMIT")
                    return
                except sqlite3.Error as exc:
                    _rollback_quietly(conn)
                    raise self.error(exc) from exc
            _rollback_quietly(conn)
        finally:
            self._lock.release()

    def _read_outside(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self.error(exc) from exc

    def _after_erase(self) -> None:
        # Copy the zeroed pages into the database file now and empty the WAL, so the old
        # bytes are in neither file.
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                raise self.error(exc) from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __repr__(self) -> str:
        return f"SqliteStore({self.url!r})"


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # no transaction left (a closed connection, or SQLite already rolled it back)
