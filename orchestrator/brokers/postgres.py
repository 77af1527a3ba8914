"""PostgreSQL dynamic roles: one login role per step, dropped when the step ends.

A tool declares what its step may touch::

    @tool(risk="read", secrets=[postgres_role("db", select={"orders": ["id", "customer_id", "amount"]},
                                              rows={"orders": {"customer_id": "customer"}})])
    def customer_orders(customer: str, db: PostgresCredential) -> list: ...

For each step that calls it, ``PostgresRoleBroker`` creates a ``LOGIN`` role with a
random password (sent to the server as a SCRAM verifier, never in clear) and ``VALID
UNTIL`` the step's grant expires, grants it exactly the declared columns, and binds its
rows with a row-level-security policy to the values the step's plan pinned (here the
``customer`` argument's ``exact`` or ``one_of`` value): the role can read only those rows,
whatever SQL the tool sends. When the step ends its sessions are terminated and the role
is dropped with its privileges and policies.

The broker refuses to issue when the privileges would exceed what the step's
constraints imply: rows bound to an argument the step leaves open (``any``, a prefix, a
pattern, a range), write privileges for a ``read`` tool, rows bound on a table without
row-level security. Roles are named ``<prefix><run>_<step>_<nonce>`` and carry a JSON
comment with their handle, run and step, so a sweep finds the roles of steps that
ended without revoking them (a killed worker).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ..errors import ConfigError, SecretError, SecretRefusedError, ToolError
from .base import Credential, Issued, SecretKind, SecretSpec, StepScope

DEFAULT_PREFIX = "sgr_"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\Z")
_LOCK = "scopegraph.brokers.postgres"  # one advisory lock: concurrent GRANTs on one table collide
_WRITES = ("insert", "update", "delete")

_Columns = tuple[tuple[str, tuple[str, ...]], ...]  # ((table, (column, ...)), ...)


@dataclass(frozen=True, kw_only=True)
class PostgresRoleSpec(SecretSpec):
    """The privileges a per-step PostgreSQL role gets (see ``postgres_role``)."""

    select: _Columns = ()
    insert: _Columns = ()
    update: _Columns = ()
    delete: tuple[str, ...] = ()
    rows: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # ((table, ((column, argument), ...)), ...)
    kind_name: ClassVar[str] = "PostgreSQL role"

    def tables(self) -> list[str]:
        seen: dict[str, None] = {}
        for t, _ in (*self.select, *self.insert, *self.update):
            seen[t] = None
        for t in self.delete:
            seen[t] = None
        return list(seen)

    def writes(self) -> bool:
        return bool(self.insert or self.update or self.delete)

    def bound_rows(self) -> dict[str, tuple[tuple[str, str], ...]]:
        return dict(self.rows)

    def check_tool(self, tool: str, arguments: Sequence[str], risk: str) -> None:
        if not self.tables():
            raise ToolError(f"tool {tool!r}: postgres_role {self.param!r} grants nothing: name tables in select=, "
                            "insert=, update= or delete=")
        for table in self.tables():
            _check_table_name(tool, table)
        for _, cols in (*self.select, *self.insert, *self.update):
            for col in cols:
                if not _IDENT.match(col):
                    raise ToolError(f"tool {tool!r}: invalid column name {col!r}")
        if self.writes() and risk == "read":
            raise ToolError(f"tool {tool!r} is a read tool: its postgres_role {self.param!r} may not insert, "
                            "update or delete")
        for table, bindings in self.rows:
            if table not in self.tables():
                raise ToolError(f"tool {tool!r}: rows are bound on {table!r}, which postgres_role "
                                f"{self.param!r} does not grant")
            for column, argument in bindings:
                if not _IDENT.match(column):
                    raise ToolError(f"tool {tool!r}: invalid column name {column!r}")
                if argument not in arguments:
                    raise ToolError(f"tool {tool!r}: rows of {table!r} are bound to {argument!r}, which is not "
                                    "one of its arguments")

    def describe(self) -> str:
        return f"PostgreSQL role from {self.broker!r} on {', '.join(self.tables())}"


def postgres_role(
    param: str = "db",
    *,
    select: Mapping[str, Iterable[str]] | None = None,
    insert: Mapping[str, Iterable[str]] | None = None,
    update: Mapping[str, Iterable[str]] | None = None,
    delete: Iterable[str] = (),
    rows: Mapping[str, Mapping[str, str]] | None = None,
    broker: str = "postgres",
) -> PostgresRoleSpec:
    """Declare that the tool's parameter ``param`` receives a per-step PostgreSQL role.

    ``select``, ``insert`` and ``update`` map tables (``schema.table``, or a table of the
    broker's schema) to the columns granted; ``delete`` lists tables. ``rows`` binds a
    table's rows to the step: ``{"orders": {"customer_id": "customer"}}`` lets the role
    see only the orders whose ``customer_id`` is a value the step's plan pinned the tool's
    ``customer`` argument to. Issued by the broker called ``broker``.
    """

    def columns(m: Mapping[str, Iterable[str]] | None) -> _Columns:
        if m is not None and not isinstance(m, Mapping):
            raise ToolError(f"postgres_role {param!r}: map tables to columns, e.g. {{'orders': ['id']}}")
        out = []
        for table, cols in (m or {}).items():
            if isinstance(cols, str):
                raise ToolError(f"postgres_role {param!r}: the columns of {table!r} are a list, not one string")
            out.append((table, tuple(cols)))
        return tuple(out)

    if isinstance(delete, str):
        raise ToolError(f"postgres_role {param!r}: delete= is a list of tables, not one string")
    bound = tuple((table, tuple(sorted(dict(b).items()))) for table, b in (rows or {}).items())
    return PostgresRoleSpec(param=param, broker=broker, select=columns(select), insert=columns(insert),
                            update=columns(update), delete=tuple(delete), rows=bound)


def _check_table_name(tool: str, table: str) -> None:
    parts = table.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ToolError(f"tool {tool!r}: invalid table name {table!r}: use table or schema.table")


class PostgresCredential(Credential):
    """A per-step login role, as its tool receives it. ``connect()`` opens a session as it."""

    def __init__(self, *, handle: str, host: str, port: str, dbname: str, user: str, password: str,
                 expires_at: float) -> None:
        self.handle = handle
        self.host, self.port, self.dbname, self.user = host, port, dbname, user
        self.expires_at = expires_at
        self._password = password

    def danger_conninfo(self) -> str:
        """A libpq connection string carrying the password. Never log or trace it."""
        return make_conninfo("", host=self.host, port=self.port, dbname=self.dbname, user=self.user,
                             password=self._password)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection as this role (``kwargs`` go to ``psycopg.connect``)."""
        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(self.danger_conninfo(), **kwargs)

    def scrub_values(self) -> tuple[str, ...]:
        return (self._password, self.danger_conninfo())

    def __repr__(self) -> str:
        return f"PostgresCredential(user={self.user!r}, dbname={self.dbname!r}, password=<redacted>)"

    __str__ = __repr__


class PostgresRoleBroker:
    """Issues per-step login roles on one PostgreSQL database.

    ``admin_url`` is a libpq URL of a role that may create roles, grant on the declared
    tables, create policies and terminate sessions (a superuser, or a role with
    ``CREATEROLE``, ownership of the tables and ``pg_signal_backend``). ``schema``
    resolves unqualified table names and becomes the roles' ``search_path``.
    ``connect_host`` overrides the host tools connect to (default: the admin URL's).
    """

    kind: SecretKind = "ephemeral"

    def __init__(self, admin_url: str, *, schema: str = "public", prefix: str = DEFAULT_PREFIX,
                 connection_limit: int = 4, connect_host: str | None = None) -> None:
        if not re.match(r"^[a-z][a-z0-9_]{0,15}\Z", prefix):
            raise ConfigError(f"invalid role prefix {prefix!r}: 1-16 lowercase letters, digits or '_'")
        if not _IDENT.match(schema):
            raise ConfigError(f"invalid schema name {schema!r}")
        if connection_limit < 1:
            raise ConfigError(f"connection_limit {connection_limit!r} must be at least 1")
        try:
            params = conninfo_to_dict(admin_url)
        except psycopg.Error:
            raise ConfigError("the broker's admin URL is not a valid libpq URL") from None
        self._admin_url = admin_url
        self.schema = schema
        self.prefix = prefix
        self.connection_limit = connection_limit
        self.host = str(connect_host or params.get("host") or "127.0.0.1")
        self.port = str(params.get("port") or "5432")
        self.dbname = str(params.get("dbname") or params.get("user") or "postgres")

    def __repr__(self) -> str:
        return f"PostgresRoleBroker(host={self.host!r}, dbname={self.dbname!r}, prefix={self.prefix!r})"

    def accepts(self, spec: SecretSpec) -> bool:
        return isinstance(spec, PostgresRoleSpec)

    # issuing ------------------------------------------------------------------------------------
    def role_name(self, scope: StepScope) -> str:
        """``<prefix><run>_<step>_<nonce>``: recognisable, distinct for concurrent steps, at most 63 bytes."""
        run = re.sub(r"[^a-z0-9]", "", scope.run_id.lower())[:16] or "run"
        step = re.sub(r"[^a-z0-9]", "", scope.step_id.lower())[:12] or "step"
        return f"{self.prefix}{run}_{step}_{secrets.token_hex(4)}"

    def issue(self, spec: SecretSpec, scope: StepScope, *, handle: str) -> Issued:
        if not isinstance(spec, PostgresRoleSpec):
            raise SecretError(f"the PostgreSQL broker cannot issue {spec.describe()}")
        bindings = self._row_bindings(spec, scope)
        role = self.role_name(scope)
        password = secrets.token_urlsafe(32)
        until = dt.datetime.fromtimestamp(scope.expires_at, tz=dt.timezone.utc).isoformat()
        comment = json.dumps({"scopegraph": handle, "run": scope.run_id, "step": scope.step_id})
        try:
            with self._admin() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK,))
                tables = {t: self._table(conn, t) for t in spec.tables()}
                self._check_columns(spec, tables)
                for table, _ in bindings.items():
                    if not tables[table]["rls"]:
                        raise SecretRefusedError(
                            f"refused a role for step {scope.step_id!r}: rows of {table!r} are bound to the step, "
                            f"but the table has no row-level security; enable it "
                            f"(ALTER TABLE {table} ENABLE ROW LEVEL SECURITY)")
                verifier = conn.pgconn.encrypt_password(password.encode(), role.encode(), b"scram-sha-256")
                conn.execute(sql.SQL(
                    "CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS "
                    "CONNECTION LIMIT {} VALID UNTIL {} PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(self.connection_limit), sql.Literal(until),
                        sql.Literal(verifier.decode())))
                conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), sql.Literal(comment)))
                conn.execute(sql.SQL("ALTER ROLE {} SET search_path TO {}").format(
                    sql.Identifier(role), sql.Identifier(self.schema)))
                self._grant(conn, role, spec, tables, bindings)
        except SecretError:
            raise
        except psycopg.Error as exc:
            raise SecretError(f"the PostgreSQL broker could not create a role for step {scope.step_id!r}: "
                              f"{_first_line(exc)}") from None
        credential = PostgresCredential(handle=handle, host=self.host, port=self.port, dbname=self.dbname,
                                        user=role, password=password, expires_at=scope.expires_at)
        detail = {"tables": spec.tables(),
                  "rows": {t: {c: list(v) for c, v in b.items()} for t, b in bindings.items()},
                  "valid_until": until}
        return Issued(credential=credential, principal=role, expires_at=scope.expires_at, detail=detail)

    def _row_bindings(self, spec: PostgresRoleSpec, scope: StepScope) -> dict[str, dict[str, tuple[Any, ...]]]:
        """Each bound table's ``{column: pinned values}``, or a refusal naming the open argument."""
        if spec.writes() and scope.risk == "read":
            raise SecretRefusedError(f"refused a role for step {scope.step_id!r}: tool {scope.tool!r} is a read "
                                     "tool, and the role would insert, update or delete")
        out: dict[str, dict[str, tuple[Any, ...]]] = {}
        for table, pairs in spec.rows:
            for column, argument in pairs:
                values = scope.pinned(argument)
                if values is None:
                    how = scope.constraints.get(argument)
                    open_as = how.describe() if how is not None and hasattr(how, "describe") else "unconstrained"
                    raise SecretRefusedError(
                        f"refused a role for step {scope.step_id!r}: rows of {table!r} are bound to argument "
                        f"{argument!r}, which the step leaves open ({open_as}); the role would see every "
                        "row: pin the argument with exact or one_of in the plan")
                out.setdefault(table, {})[column] = values
        return out

    def _table(self, conn: psycopg.Connection[Any], table: str) -> dict[str, Any]:
        schema, _, name = table.rpartition(".")
        row = conn.execute(
            "SELECT c.oid, c.relrowsecurity, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s", (schema or self.schema, name)).fetchone()
        if row is None or row[2] not in ("r", "p", "v", "m"):
            raise SecretError(f"table {table!r} does not exist in database {self.dbname!r}")
        columns = {r[0] for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (row[0],)).fetchall()}
        return {"schema": schema or self.schema, "name": name, "rls": bool(row[1]), "columns": columns,
                "view": row[2] in ("v", "m")}

    @staticmethod
    def _check_columns(spec: PostgresRoleSpec, tables: Mapping[str, Mapping[str, Any]]) -> None:
        for table, cols in (*spec.select, *spec.insert, *spec.update):
            missing = sorted(set(cols) - tables[table]["columns"])
            if missing:
                raise SecretError(f"table {table!r} has no column {missing[0]!r}")
        for table, pairs in spec.rows:
            for column, _ in pairs:
                if column not in tables[table]["columns"]:
                    raise SecretError(f"table {table!r} has no column {column!r}")

    def _grant(self, conn: psycopg.Connection[Any], role: str, spec: PostgresRoleSpec,
               tables: Mapping[str, Mapping[str, Any]], bindings: Mapping[str, Mapping[str, tuple[Any, ...]]]) -> None:
        r = sql.Identifier(role)

        def ident(table: str) -> sql.Composable:
            return sql.Identifier(tables[table]["schema"], tables[table]["name"])

        for schema in sorted({t["schema"] for t in tables.values()}):
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), r))
        for privilege, entries in (("SELECT", spec.select), ("INSERT", spec.insert), ("UPDATE", spec.update)):
            for table, cols in entries:
                conn.execute(sql.SQL("GRANT {} ({}) ON TABLE {} TO {}").format(
                    sql.SQL(privilege), sql.SQL(", ").join(map(sql.Identifier, cols)), ident(table), r))
        for table in spec.delete:
            conn.execute(sql.SQL("GRANT DELETE ON TABLE {} TO {}").format(ident(table), r))
        for table, info in tables.items():
            if info["view"] or not info["rls"]:
                continue  # no row-level security: the column grants are the whole story
            bound = bindings.get(table)
            condition: sql.Composable = sql.SQL("true") if not bound else sql.SQL(" AND ").join(
                sql.SQL("{} IN ({})").format(sql.Identifier(column), sql.SQL(", ").join(map(sql.Literal, values)))
                for column, values in sorted(bound.items()))
            conn.execute(sql.SQL("CREATE POLICY {} ON {} AS PERMISSIVE FOR ALL TO {} USING ({}) WITH CHECK ({})")
                         .format(r, ident(table), r, condition, condition))

    # revoking -----------------------------------------------------------------------------------
    def revoke(self, handle: str, principal: str) -> None:
        """Stop new logins, terminate the role's sessions, drop its policies, privileges and the role.

        Raises:
            SecretError: the server cannot be reached, or the role was not made for ``handle``.
        """
        role = principal
        if not role.startswith(self.prefix) or not _IDENT.match(role):
            raise SecretError(f"refusing to drop role {role!r}: it is not one of this broker's roles")
        try:
            with self._admin() as conn:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK,))
                    row = conn.execute("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
                                       (role,)).fetchone()
                    if row is None:
                        return  # gone already
                    if _comment_handle(row[0]) != handle:
                        raise SecretError(f"refusing to drop role {role!r}: it was not made for handle {handle!r}")
                    conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)))
                # Committed: no new session can start; now end the ones that are open.
                conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                             "WHERE usename = %s AND pid <> pg_backend_pid()", (role,))
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK,))
                    for schema, table in conn.execute(
                            "SELECT schemaname, tablename FROM pg_policies WHERE policyname = %s", (role,)).fetchall():
                        conn.execute(sql.SQL("DROP POLICY IF EXISTS {} ON {}").format(
                            sql.Identifier(role), sql.Identifier(schema, table)))
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        except SecretError:
            raise
        except psycopg.Error as exc:
            raise SecretError(f"the PostgreSQL broker could not drop role {role!r}: {_first_line(exc)}") from None

    def leftovers(self) -> list[tuple[str, str]]:
        """``(handle, role)`` of every role with this broker's prefix and a handle in its comment.

        Raises:
            SecretError: the server cannot be reached.
        """
        pattern = self.prefix.replace("_", "\\_") + "%"
        try:
            with self._admin() as conn:
                rows = conn.execute("SELECT rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
                                    "WHERE rolname LIKE %s ORDER BY rolname", (pattern,)).fetchall()
        except psycopg.Error as exc:
            raise SecretError(f"the PostgreSQL broker could not list its roles: {_first_line(exc)}") from None
        found = []
        for name, comment in rows:
            handle = _comment_handle(comment)
            if handle:
                found.append((handle, str(name)))
        return found

    def _admin(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._admin_url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise SecretError(f"the PostgreSQL broker cannot reach {self.host}:{self.port}/{self.dbname}: "
                              f"{_first_line(exc)}") from None


def _comment_handle(comment: object) -> str | None:
    if not isinstance(comment, str):
        return None
    try:
        data = json.loads(comment)
    except ValueError:
        return None
    handle = data.get("scopegraph") if isinstance(data, dict) else None
    return handle if isinstance(handle, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
