"""``scopegraph serve``: token exchange and introspection over HTTP, on uvicorn.

Audiences and introspection clients come from the command line; a client's secret comes
from the environment (``SCOPEGRAPH_CLIENT_SECRET_<ID>``, the id upper-cased, anything but
letters and digits as ``_``), never from an argument a process listing would show.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from .brokers.tokens import IntrospectionClient, TokenService
from .errors import ConfigError
from .store import Store, open_store
from .web import create_app, token_routes
from .webhooks import attach_webhooks

CLIENT_SECRET_ENV = "SCOPEGRAPH_CLIENT_SECRET_"


def parse_audiences(specs: Iterable[str]) -> dict[str, list[str]]:
    """``AUDIENCE=TOOL[,TOOL…]`` (``*``: any tool) into ``{audience: [tool, …]}``.

    Raises:
        ConfigError: a spec without ``=`` or tools, or an audience given twice.
    """
    out: dict[str, list[str]] = {}
    for spec in specs:
        audience, sep, tools = spec.rpartition("=")
        names = [t.strip() for t in tools.split(",") if t.strip()]
        if not sep or not audience or not names:
            raise ConfigError(f"--audience {spec!r}: write AUDIENCE=TOOL[,TOOL...] ('*' for any tool)")
        if audience in out:
            raise ConfigError(f"--audience {audience!r} is given twice")
        out[audience] = names
    return out


def client_secret_variable(client_id: str) -> str:
    return CLIENT_SECRET_ENV + re.sub(r"[^A-Z0-9]", "_", client_id.upper())


def parse_clients(specs: Iterable[str], environ: Mapping[str, str] | None = None) -> list[IntrospectionClient]:
    """``ID=AUDIENCE[,AUDIENCE…]`` into clients, each with its secret from the environment.

    Raises:
        ConfigError: a malformed spec, an id given twice, or a secret not set.
    """
    env = os.environ if environ is None else environ
    clients: dict[str, IntrospectionClient] = {}
    for spec in specs:
        client_id, sep, audiences = spec.partition("=")
        names = [a.strip() for a in audiences.split(",") if a.strip()]
        if not sep or not re.match(r"^[A-Za-z0-9._-]{1,64}\Z", client_id) or not names:
            raise ConfigError(f"--client {spec!r}: write ID=AUDIENCE[,AUDIENCE...] "
                              "(ID: letters, digits, '.', '_', '-')")
        if client_id in clients:
            raise ConfigError(f"--client {client_id!r} is given twice")
        variable = client_secret_variable(client_id)
        secret = env.get(variable, "")
        if not secret:
            raise ConfigError(f"--client {client_id!r} has no secret: export {variable}")
        clients[client_id] = IntrospectionClient.with_secret(client_id, secret, names)
    return list(clients.values())


def build_app(store: Store, *, audiences: Iterable[str], clients: Iterable[str], token_ttl: float = 60.0,
              token_uses: int = 10, environ: Mapping[str, str] | None = None) -> Any:
    """The app ``serve`` runs (tests build it too).

    Raises:
        ConfigError: a malformed ``--audience`` or ``--client``, or a client without its secret.
    """
    try:
        service = TokenService(store, audiences=parse_audiences(audiences), clients=parse_clients(clients, environ),
                               ttl=token_ttl, max_uses=token_uses)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return create_app(token_routes(service))


def serve(store_url: str, *, host: str, port: int, audiences: Iterable[str], clients: Iterable[str],
          token_ttl: float = 60.0, token_uses: int = 10, webhooks: Iterable[str] = ()) -> int:
    """Serve until interrupted (Ctrl-C, SIGTERM); 0 on a clean stop.

    Raises:
        ConfigError: bad options. StoreError: no store at ``store_url``.
    """
    import uvicorn

    audiences, clients = list(audiences), list(clients)
    store = open_store(store_url, create=False)  # a store the runtime made: this serves, it never creates
    try:
        app = build_app(store, audiences=audiences, clients=clients, token_ttl=token_ttl, token_uses=token_uses)
        attach_webhooks(app, store, list(webhooks))  # approval events as signed POSTs, in the app's lifespan
        if not audiences:
            print("scopegraph: warning: no --audience registered: every token exchange is refused",
                  file=sys.stderr, flush=True)
        print(f"scopegraph: serving token exchange and introspection on http://{host}:{port} "
              "(Ctrl-C stops)", file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        store.close()
    return 0
