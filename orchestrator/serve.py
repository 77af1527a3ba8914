"""``scopegraph serve``: the approval inbox, token exchange and introspection over HTTP, on uvicorn.

Audiences and introspection clients come from the command line; a client's secret comes
from the environment (``SCOPEGRAPH_CLIENT_SECRET_<ID>``, the id upper-cased, anything but
letters and digits as ``_``), never from an argument a process listing would show.

The inbox (``web.inbox_routes``) is served at the address browsers use, ``--public-url``
(default ``http://localhost:PORT``, or ``https://`` with TLS): its host is the passkeys'
relying party, so it must stay the same once approvers have enrolled. Listening on
anything but a loopback address needs ``--tls-cert`` and ``--tls-key``, or the explicit
``--dangerously-serve-http`` (say, behind a proxy that terminates TLS).
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .brokers.tokens import IntrospectionClient, TokenService
from .clock import Clock, SystemClock
from .errors import ConfigError
from .store import Store, open_store
from .web import create_app, token_routes
from .web.inbox import Site
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


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def site_for(*, host: str, port: int, public_url: str | None, tls: bool, plain_http: bool = False) -> Site:
    """Where browsers reach the inbox, checked: the origin and the passkeys' relying party.

    Raises:
        ConfigError: a non-loopback ``host`` without TLS or the explicit flag; a public
            URL that is not ``http(s)://HOST[:PORT]``, names an IP address (WebAuthn
            refuses them), or is ``http://`` to anything but localhost without the flag.
    """
    if not is_loopback(host) and not tls and not plain_http:
        raise ConfigError(f"--host {host!r} is not a loopback address: serve it with --tls-cert and --tls-key "
                          "(or --dangerously-serve-http behind a proxy that terminates TLS)")
    url = public_url or f"{'https' if tls else 'http'}://localhost:{port}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"--public-url {url!r}: write http(s)://HOST[:PORT], nothing after it")
    try:
        ipaddress.ip_address(parts.hostname)
        raise ConfigError(f"--public-url {url!r} names an IP address: passkeys need a host name "
                          "(use localhost on this machine)")
    except ValueError:
        pass
    if parts.scheme == "http" and parts.hostname != "localhost" and not plain_http:
        raise ConfigError(f"--public-url {url!r} is plain http: browsers allow passkeys over http only on "
                          "localhost (use https, or --dangerously-serve-http)")
    origin = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return Site(origin=origin, rp_id=parts.hostname)


def build_app(store: Store, *, audiences: Iterable[str], clients: Iterable[str], token_ttl: float = 60.0,
              token_uses: int = 10, environ: Mapping[str, str] | None = None, inbox: Any = None,
              hsts: bool = False) -> Any:
    """The app ``serve`` runs (tests build it too); with ``inbox`` (a ``web.inbox.Inbox``),
    the approval inbox too, every response with the inbox's security headers.

    Raises:
        ConfigError: a malformed ``--audience`` or ``--client``, or a client without its secret.
    """
    from starlette.middleware import Middleware

    from .web.inbox_routes import inbox_routes
    from .web.security import SecurityHeaders

    try:
        service = TokenService(store, audiences=parse_audiences(audiences), clients=parse_clients(clients, environ),
                               ttl=token_ttl, max_uses=token_uses)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if inbox is None:
        return create_app(token_routes(service))
    return create_app(token_routes(service), inbox_routes(inbox),
                      middleware=[Middleware(SecurityHeaders, hsts=hsts)])


def open_inbox(store: Store, store_url: str, site: Site, *, clock: Clock | None = None) -> Any:
    """The inbox over ``store`` (its trust roots opened: answers are endorsed and signed into
    the ledger). Close ``inbox.trust`` when done.

    Raises:
        KeystoreError: the store's keystore cannot be opened.
    """
    from .trust import TrustRoots
    from .web.inbox import Inbox

    clock = clock or SystemClock()
    return Inbox(store=store, store_url=store_url, trust=TrustRoots.open(store, clock=clock), clock=clock, site=site)


def banner(site: Site, *, host: str, port: int, tls: bool, audiences: Iterable[str],
           clients: Iterable[str]) -> list[str]:
    """What ``serve`` says as it starts: where the inbox is, and the token endpoints when
    ``--audience`` or ``--client`` configured them (names only: never a secret)."""
    listening = f"{'https' if tls else 'http'}://{'[' + host + ']' if ':' in host else host}:{port}"
    lines = [f"scopegraph: serving the approval inbox at {site.origin}/ (listening on {listening}; Ctrl-C stops)"]
    audience_names = [spec.rpartition("=")[0] for spec in audiences]
    client_names = [spec.partition("=")[0] for spec in clients]
    if audience_names or client_names:
        lines.append(f"scopegraph: serving token exchange and introspection on {listening}: "
                     f"POST /oauth/token for {_names(audience_names, 'audience')}, "
                     f"POST /oauth/introspect for {_names(client_names, 'client')}")
    if client_names and not audience_names:
        lines.append("scopegraph: warning: no --audience registered: every token exchange is refused")
    return lines


def _names(names: list[str], what: str) -> str:
    if not names:
        return f"no {what}"
    return f"{what}{'' if len(names) == 1 else 's'} " + ", ".join(names)


def serve(store_url: str, *, host: str, port: int, audiences: Iterable[str], clients: Iterable[str],
          token_ttl: float = 60.0, token_uses: int = 10, public_url: str | None = None,
          tls_cert: str | None = None, tls_key: str | None = None, plain_http: bool = False,
          webhooks: Iterable[str] = ()) -> int:
    """Serve until interrupted (Ctrl-C, SIGTERM); 0 on a clean stop.

    Raises:
        ConfigError: bad options. StoreError: no store at ``store_url``.
    """
    import uvicorn

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give --tls-cert and --tls-key together")
    for path in (tls_cert, tls_key):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"no TLS file at {path!r}")
    tls = tls_cert is not None
    site = site_for(host=host, port=port, public_url=public_url, tls=tls, plain_http=plain_http)
    audiences, clients = list(audiences), list(clients)
    store = open_store(store_url, create=False)  # a store the runtime made: this serves, it never creates
    inbox = None
    try:
        inbox = open_inbox(store, store_url, site)
        app = build_app(store, audiences=audiences, clients=clients, token_ttl=token_ttl, token_uses=token_uses,
                        inbox=inbox, hsts=site.origin.startswith("https://"))
        attach_webhooks(app, store, list(webhooks))  # approval events as signed POSTs, in the app's lifespan
        for line in banner(site, host=host, port=port, tls=tls, audiences=audiences, clients=clients):
            print(line, file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    finally:
        if inbox is not None:
            inbox.trust.close()
        store.close()
    return 0
