"""The shared store: PostgreSQL, for several workers on several machines.

Everything the SQLite store keeps, in the same shape and through the same statements
(``queries``, in the ``POSTGRES`` dialect). What SQLite gets from ``BEGIN IMMEDIATE`` (one
writer at a time) PostgreSQL gets from row locks, taken where a read decides a write:

- ``update_approval`` and ``acquire_run`` read their row ``FOR UPDATE``;
- ``append_ledger`` locks the one row of ``sg_ledger_tip`` (the last record's sequence
  number and hash) at a transaction's first append and moves it on before the commit, so
  appenders in any number of processes form one chain. A record deleted from the end is
  not silently chained over: the next record keeps counting from the tip, leaving a gap
  ``verify`` reports;
- single-statement updates (grant uses, revocations) rely on PostgreSQL re-checking
  their ``WHERE`` against the newest row version under READ COMMITTED.

A transaction's statements after its ``BEGIN`` are pipelined (psycopg's pipeline mode):
those whose results nobody reads travel with the next read or with the ``COMMIT``, so a
transaction costs a round trip per result it needs rather than one per statement.

The runtime's transactions take grant, approval and call rows before the ledger tip, and
the tip before the signed head; only a run's own row is locked after the tip (at the
run's end, by its lease holder alone). Should two transactions still wait on each other,
PostgreSQL ends one of them with a deadlock error, which surfaces as a ``StoreError``.

Tables are created and upgraded by ``MIGRATIONS`` (see ``migrations``), inside one
transaction that holds an advisory lock, so two processes opening a fresh database at once
do not race. The schema the URL pins (``options=-csearch_path=NAME``) is created if it is
missing, or the error says how to create it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, TupleRow
from psycopg_pool import ConnectionPool

from ..errors import ConfigError, StoreError
from .dialect import POSTGRES
from .migrations import MIGRATIONS, Migration, apply_migrations
from .queries import SqlStore

if TYPE_CHECKING:
    from langgraph.checkpoint.postgres import PostgresSaver

CONNECT_TIMEOUT_SECONDS = 10
POOL_TIMEOUT_SECONDS = 10.0
CHECKPOINT_SETUP_WAIT_SECONDS = 60

# Keys of the advisory locks that serialise schema set-up across processes.
_MIGRATION_LOCK = 0x73675F6D69677261  # "sg_migra"
_CHECKPOINT_SETUP_LOCK = 0x73675F636B707473  # "sg_ckpts"
_TRUST_KEYS_LOCK = 0x73675F6B65797321  # "sg_keys!"


class PostgresStore(SqlStore):
    """A ``Store`` in PostgreSQL: a pool of up to ``max_connections`` connections.

    Each thread's transaction has a connection of its own while it lasts; reads outside
    a transaction borrow one per statement. ``url`` is the URL with any password
    replaced by ``***``: safe to print, but not enough to connect with. With
    ``create=False`` the schema must exist and hold a store: nothing is created.

    Raises:
        ConfigError: the URL is not a valid libpq URL.
        StoreError: the database cannot be reached, its schema is missing and cannot be
            created (or, with ``create=False``, holds no store), or cannot be brought up to date.
    """

    dialect = POSTGRES
    driver_errors = (psycopg.Error,)

    def __init__(self, url: str, *, max_connections: int = 10, create: bool = True) -> None:
        super().__init__()
        self._conninfo = url
        self.url = redact_url(url)
        self._secrets = _secrets_of(url)
        self._max_connections = max_connections
        kwargs = _connect_kwargs(url, self.url, self._secrets)
        try:
            with psycopg.connect(url, **kwargs) as conn:
                if not create:
                    _require_store(conn, self.url)
                migrate(conn, self.url)
        except psycopg.Error as exc:
            raise self.error(exc, "cannot be opened") from exc
        # Each open transaction's pipeline (and what closes it), by its connection.
        self._pipelines: dict[int, tuple[ExitStack, psycopg.Pipeline]] = {}
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            url, kwargs=kwargs, min_size=1, max_size=max_connections, timeout=POOL_TIMEOUT_SECONDS,
            # Give up a reconnection series soon: the pool's backoff doubles the gaps
            # between attempts, and after a long outage a late series would keep calls
            # failing long after the server is back. The next call starts a fresh one.
            reconnect_timeout=POOL_TIMEOUT_SECONDS, open=False, name="scopegraph-store",
        )
        try:
            self._pool.open(wait=True, timeout=POOL_TIMEOUT_SECONDS)
        except psycopg.Error as exc:
            self._pool.close()
            raise self.error(exc, "cannot be opened") from exc

    # transactions (see ``SqlStore``): a pooled connection per transaction --------------------
    def _begin(self) -> psycopg.Connection[TupleRow]:
        try:
            conn, _ = self._checkout("BEGIN")
        except psycopg.Error as exc:
            raise self.error(exc) from exc
        # The rest of the transaction is pipelined: statements whose results nobody reads
        # travel with the next read or with the COMMIT, one round trip instead of one each.
        stack = ExitStack()
        try:
            pipeline = stack.enter_context(conn.pipeline())
        except psycopg.Error as exc:
            self._pool.putconn(conn)
            raise self.error(exc) from exc
        except BaseException:
            self._pool.putconn(conn)
            raise
        self._pipelines[id(conn)] = (stack, pipeline)
        return conn

    def _pipeline(self, conn: Any) -> Any:
        return self._pipelines[id(conn)][1]

    def _end(self, conn: Any, *, commit: bool) -> None:
        pipeline, _ = self._pipelines.pop(id(conn))
        try:
            if commit:
                conn.execute("COMMIT")
                pipeline.close()  # sends it, with what is still queued, and reports any failure
            else:
                try:
                    pipeline.close()
                except psycopg.Error:
                    pass  # the failure is what is being rolled back
                _rollback_quietly(conn)
        except psycopg.Error as exc:
            _rollback_quietly(conn)
            raise self.error(exc) from exc
        finally:
            self._pool.putconn(conn)  # one left broken or mid-transaction is discarded or reset

    def _read_outside(self, sql: str, params: Sequence[Any]) -> list[Any]:
        try:
            conn, cur = self._checkout(sql, params)
            try:
                return cur.fetchall()
            finally:
                self._pool.putconn(conn)
        except psycopg.Error as exc:
            raise self.error(exc) from exc

    def _checkout(self, sql: str, params: Sequence[Any] = ()
                  ) -> tuple[psycopg.Connection[TupleRow], psycopg.Cursor[TupleRow]]:
        """A pooled connection with ``sql`` (a read, or ``BEGIN``) run on it; the caller puts it back.

        A connection the server dropped while it sat in the pool (a restart, a failover)
        fails on that first statement, before anything was done: it is discarded and the
        statement runs again on the next one, until the pool has no dead ones left.
        """
        for _ in range(self._max_connections):
            conn = self._pool.getconn()
            try:
                return conn, conn.execute(sql, params)
            except psycopg.OperationalError:
                dead = conn.broken  # read before the pool closes it
                self._pool.putconn(conn)
                if not dead:
                    raise
            except BaseException:
                self._pool.putconn(conn)
                raise
        conn = self._pool.getconn()  # every pooled connection was dead: this one is new
        try:
            return conn, conn.execute(sql, params)
        except BaseException:
            self._pool.putconn(conn)
            raise

    def error(self, exc: BaseException, doing: str = "failed") -> StoreError:
        return StoreError(f"store {self.url!r} {doing}: {_one_line(exc, self._secrets)}")

    def _lock_trust_keys(self, tx: Any) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(%s)", (_TRUST_KEYS_LOCK,))
        if tx.pipeline is not None:
            # Held before anything else happens: the keystore makes keys between statements,
            # so a lock still queued in the pipeline would serialise nothing.
            tx.sync()

    def close(self) -> None:
        self._pool.close()

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"


# schema ---------------------------------------------------------------------------------
def migrate(conn: psycopg.Connection[Any], shown: str | None = None) -> list[int]:
    """Apply the ``MIGRATIONS`` this database lacks, in order, in one transaction.

    The advisory lock makes a second process opening the same database wait, then find
    the work done. The schema the connection's ``search_path`` names is created first if
    it is missing (``shown`` names the store in that error). Returns the versions applied now.

    Raises:
        StoreError: the database holds a schema newer than this code knows, or the
            missing schema cannot be created.
        psycopg.Error: the database failed.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        ensure_schema(conn, shown if shown is not None else conn.info.dsn)  # ``dsn`` holds no password
        return apply_migrations(conn, POSTGRES, MIGRATIONS)


def ensure_schema(conn: psycopg.Connection[Any], shown: str) -> None:
    """Create the schema ``search_path`` pins unless it exists (or no schema is pinned).

    Another process creating the same schema at the same moment is no error.

    Raises:
        StoreError: the schema is missing and this role may not create it; the message
            gives the command a database owner can run.
        psycopg.Error: the database failed.
    """
    name = _missing_schema(conn)
    if name is None:
        return
    row = conn.execute("SELECT current_user").fetchone()
    user = str(row[0]) if row is not None else conn.info.user
    try:
        with conn.transaction():  # a savepoint: a refusal leaves the caller's transaction usable
            conn.execute(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(name)))
    except psycopg.errors.UniqueViolation:
        return  # another process created it at the same moment
    except psycopg.errors.InsufficientPrivilege as exc:
        command = pgsql.SQL("CREATE SCHEMA {} AUTHORIZATION {};").format(
            pgsql.Identifier(name), pgsql.Identifier(user)).as_string(conn)
        raise StoreError(f"store {shown!r}: schema {name!r} does not exist and role {user!r} may not "
                         f"create it; as a database owner, run: {command}") from exc


def _missing_schema(conn: psycopg.Connection[Any]) -> str | None:
    """The schema ``search_path`` pins when none of its schemas exists; ``None`` otherwise."""
    row = conn.execute("SELECT current_schema(), current_setting('search_path')").fetchone()
    if row is None or row[0] is not None:
        return None
    names = [n for n in _search_path(str(row[1])) if n != "$user"]
    return names[0] if names else None


def _search_path(setting: str) -> list[str]:
    """The schema names of a ``search_path`` setting, unquoted (``"A b"``) or folded (``Ab``)."""
    names, current, quoted, i = [], "", False, 0
    text = setting.strip()
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == '"' and text[i + 1:i + 2] == '"':
                current += '"'
                i += 1
            elif ch == '"':
                quoted = False
            else:
                current += ch
        elif ch == '"':
            quoted = True
        elif ch == ",":
            names.append(current)
            current = ""
        elif not ch.isspace():
            current += ch.lower()
        i += 1
    names.append(current)
    return [n for n in names if n]


def _require_store(conn: psycopg.Connection[Any], shown: str) -> None:
    """Raises:
    StoreError: the schema ``search_path`` pins is missing, or holds no scopegraph tables.
    """
    missing = _missing_schema(conn)
    if missing is not None:
        raise StoreError(f"no store at {shown!r}: schema {missing!r} does not exist")
    row = conn.execute("SELECT to_regclass('sg_schema_migrations') IS NOT NULL, current_schema()").fetchone()
    if row is None or not row[0]:
        where = f"schema {row[1]!r}" if row is not None and row[1] else "the database"
        raise StoreError(f"no store at {shown!r}: {where} holds no scopegraph tables")


# LangGraph checkpoints --------------------------------------------------------------------
def checkpointer_for_postgres(
    store: PostgresStore | str,
) -> tuple[ConnectionPool[psycopg.Connection[DictRow]], PostgresSaver]:
    """A set-up LangGraph ``PostgresSaver`` on the store's database, and the pool to close.

    Pass the ``PostgresStore`` rather than its ``url``: the URL it shows has its
    password redacted. LangGraph is imported here, not at module level, so the store
    layer depends on it only when the runtime asks for checkpoints.

    Raises:
        StoreError: the database cannot be reached or the checkpoint tables cannot be made.
    """
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row

    conninfo = store._conninfo if isinstance(store, PostgresStore) else store
    shown = redact_url(conninfo)
    secrets = _secrets_of(conninfo)
    kwargs: dict[str, Any] = {**_connect_kwargs(conninfo, shown, secrets), "prepare_threshold": 0,
                              "row_factory": dict_row}
    try:
        # A direct connection fails fast when the server is down, where a pool would
        # keep retrying.
        with psycopg.connect(conninfo, **kwargs) as conn:
            _lock_for_checkpoint_setup(conn, shown)
            PostgresSaver(conn).setup()  # the lock ends with the session
    except psycopg.Error as exc:
        raise StoreError(f"cannot open checkpoints in {shown!r}: {_one_line(exc, secrets)}") from exc
    # The saver serialises its own use of the pool behind a lock; a second connection
    # only covers the swap after one breaks.
    pool: ConnectionPool[psycopg.Connection[DictRow]] = ConnectionPool(
        conninfo, kwargs=kwargs, min_size=1, max_size=2, timeout=POOL_TIMEOUT_SECONDS,
        reconnect_timeout=POOL_TIMEOUT_SECONDS, open=False, name="scopegraph-checkpoints",
        connection_class=psycopg.Connection,
    )
    try:
        pool.open(wait=True, timeout=POOL_TIMEOUT_SECONDS)
    except psycopg.Error as exc:
        pool.close()
        raise StoreError(f"cannot open checkpoints in {shown!r}: {_one_line(exc, secrets)}") from exc
    saver = PostgresSaver(pool)
    return pool, saver


def _lock_for_checkpoint_setup(conn: psycopg.Connection[Any], shown: str) -> None:
    """Take the session lock that lets one process at a time run the saver's ``setup``.

    ``setup`` creates indexes CONCURRENTLY, which waits for every older transaction in
    the database to end, including a statement blocked in ``pg_advisory_lock``: waiting
    there would deadlock, so this polls with short ``pg_try_advisory_lock`` statements.
    """
    deadline = time.monotonic() + CHECKPOINT_SETUP_WAIT_SECONDS
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (_CHECKPOINT_SETUP_LOCK,)).fetchone()
        if row is not None and row["locked"]:
            return
        if time.monotonic() > deadline:
            raise StoreError(f"cannot open checkpoints in {shown!r}: another process has been setting "
                             f"them up for over {CHECKPOINT_SETUP_WAIT_SECONDS} s")
        time.sleep(0.05)


# helpers --------------------------------------------------------------------------------
def redact_url(url: str) -> str:
    """``url`` with the password (in the user part or a ``password=`` parameter) shown as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable store URL>"
    netloc = parts.netloc
    userinfo, at, hostinfo = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostinfo}"
    pairs = []
    for pair in parts.query.split("&") if parts.query else []:
        name, eq, _ = pair.partition("=")
        pairs.append(f"{name}=***" if unquote(name).lower() == "password" and eq else pair)
    return urlunsplit((parts.scheme, netloc, parts.path, "&".join(pairs), parts.fragment))


def _secrets_of(url: str) -> tuple[str, ...]:
    """Every spelling of the URL's passwords, to scrub from error messages."""
    found: set[str] = set()
    try:
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        if at and ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found.update((raw, unquote(raw)))
        for pair in parts.query.split("&") if parts.query else []:
            name, _, value = pair.partition("=")
            if unquote(name).lower() == "password":
                found.update((value, unquote(value)))
    except ValueError:
        pass
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    if password:
        found.add(str(password))
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


def _connect_kwargs(url: str, shown: str, secrets: tuple[str, ...]) -> dict[str, Any]:
    """Connection settings: autocommit (transactions are explicit), a bounded connect wait."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        raise ConfigError(f"invalid store URL {shown!r}: {_one_line(exc, secrets)}") from exc
    kwargs: dict[str, Any] = {"autocommit": True}
    if "connect_timeout" not in params:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    if "application_name" not in params:
        kwargs["application_name"] = "scopegraph"
    return kwargs


def _one_line(exc: BaseException, secrets: tuple[str, ...]) -> str:
    """The first line of ``exc``'s message (details may quote row values), secrets scrubbed."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    for secret in secrets:
        text = text.replace(secret, "***")
    return text or type(exc).__name__


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        pass  # a broken connection has no transaction left; the pool discards it



__all__ = ["MIGRATIONS", "Migration", "PostgresStore", "checkpointer_for_postgres", "ensure_schema", "migrate",
           "redact_url"]
