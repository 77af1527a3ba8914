"""Webhooks: each approval event (see ``approval_events``) as a signed JSON POST.

The body is the event's JSON (``ApprovalEvent.as_json``: ids, tool, times, never argument
values). Headers: ``X-Scopegraph-Event`` (the kind), ``X-Scopegraph-Delivery`` (an id of the event and
receiver, the same on every retry and after a restart, so a receiver can drop a repeat),
``X-Scopegraph-Timestamp`` (seconds since the epoch, fresh on every attempt) and
``X-Scopegraph-Signature: sha256=<hex>``, the HMAC-SHA256 of ``"{timestamp}.{body}"`` under
the secret in ``$SCOPEGRAPH_WEBHOOK_SECRET``. The secret is read from the environment only:
an argument would show in a process listing. A receiver checks a delivery with
``verify_signature``.

A delivery is retried with exponential back-off (tenacity) on a connection error, a
timeout, a 5xx or a 429, up to ``DeliverySettings.attempts`` attempts; any other answer
but a 2xx is final. A delivery that finally fails is logged as one line (the receiver's
URL without its query or user info; never the secret) and the dispatcher moves on: a dead
receiver must not hold every later event back forever. After each event, the cursor of
the last event handled is written to a small state file, so a restarted server goes on
where it stopped instead of sending everything again (on its very first start it begins
at the present, not at the store's history). Delivery is at least once: a server stopped
between a delivery and saving its cursor sends that event again, with the same delivery id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .approval_events import ApprovalEvent, ApprovalEventFeed
from .clock import Clock
from .errors import ConfigError, WebhookSignatureError
from .store import Store

WEBHOOK_SECRET_ENV = "SCOPEGRAPH_WEBHOOK_SECRET"
EVENT_HEADER = "X-Scopegraph-Event"
DELIVERY_HEADER = "X-Scopegraph-Delivery"
TIMESTAMP_HEADER = "X-Scopegraph-Timestamp"
SIGNATURE_HEADER = "X-Scopegraph-Signature"
MIN_SECRET_BYTES = 16
DEFAULT_TOLERANCE_SECONDS = 300.0

log = logging.getLogger("scopegraph.webhooks")


# signing and verifying ------------------------------------------------------------------------
def signature(secret: str | bytes, timestamp: str, body: bytes) -> str:
    """``sha256=`` and the hex HMAC-SHA256 of ``"{timestamp}.{body}"`` under ``secret``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, headers: Mapping[str, str], body: bytes,
                     tolerance: float = DEFAULT_TOLERANCE_SECONDS, *, now: float | None = None) -> None:
    """Check a delivery as a receiver: its signature is ours over this exact body and timestamp,
    and the timestamp is within ``tolerance`` seconds of ``now`` (default: the wall clock), so
    a delivery recorded and replayed later is refused. ``headers`` may be in any case.

    Raises:
        WebhookSignatureError: a header is missing, the timestamp is malformed or too far from
            ``now``, or the signature does not match.
    """
    given = {k.lower(): v for k, v in headers.items()}
    stamp, sig = given.get(TIMESTAMP_HEADER.lower()), given.get(SIGNATURE_HEADER.lower())
    if not stamp or not sig:
        raise WebhookSignatureError(f"the delivery lacks {TIMESTAMP_HEADER if not stamp else SIGNATURE_HEADER}")
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        raise WebhookSignatureError("the delivery's timestamp is not whole seconds since the epoch")
    current = time.time() if now is None else now
    if abs(current - int(stamp)) > tolerance:
        raise WebhookSignatureError(f"the delivery's timestamp is more than {tolerance:g} seconds from now "
                                    "(a replay, or a clock far off)")
    if not hmac.compare_digest(signature(secret, stamp, body).encode("ascii"), sig.encode("utf-8", "replace")):
        raise WebhookSignatureError("the delivery's signature does not match its body and timestamp")


def event_body(event: ApprovalEvent) -> bytes:
    """The bytes a delivery carries (and its signature covers)."""
    return json.dumps(event.as_json(), sort_keys=True, separators=(",", ":")).encode("utf-8")


def delivery_id(event: ApprovalEvent, url: str) -> str:
    """The id of ``event``'s delivery to ``url``: one per event and receiver, the same on every
    retry and after a restart (a server stopped between a delivery and saving its cursor sends
    it again; the receiver can tell it has it already)."""
    identity = "\0".join([url, event.kind, event.approval_id, repr(event.at), event.approver or ""])
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def shown_url(url: str) -> str:
    """``url`` as a log line may show it: no user info, query or fragment (they may hold tokens)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # host and port as written, without user info
    return f"{parts.scheme}://{host}{parts.path}"


def check_url(url: str) -> str:
    """Raises:
        ConfigError: not an ``http://`` or ``https://`` URL with a host.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a malformed port raises here)
    except ValueError:
        raise ConfigError(f"--webhook {shown_url(url)!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--webhook {shown_url(url)!r}: give an http:// or https:// URL")
    return url


# delivering ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DeliverySettings:
    """How hard a delivery is tried: ``attempts`` in all, waiting ``backoff`` seconds after the
    first failure, twice that after the second, and so on, never more than ``max_backoff``."""

    attempts: int = 6
    backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 10.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff < 0 or self.max_backoff < self.backoff or self.timeout <= 0:
            raise ConfigError("webhook delivery settings: attempts >= 1, 0 <= backoff <= max_backoff, timeout > 0")


class _TryAgain(Exception):
    """An answer worth retrying (5xx, 429)."""


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """How one delivery of one event to one URL ended."""

    url: str
    delivery_id: str
    ok: bool
    attempts: int
    problem: str = ""


class WebhookDispatcher:
    """Follows an ``ApprovalEventFeed`` and delivers each event to every URL.

    The signing secret comes from ``$SCOPEGRAPH_WEBHOOK_SECRET`` (``environ``, default the
    process environment); it is kept only in here and never shown.
    """

    def __init__(self, feed: ApprovalEventFeed, urls: Sequence[str], *, state_path: Path | str,
                 settings: DeliverySettings | None = None, environ: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Raises:
            ConfigError: no URL, a URL that is not http(s), or the secret not set or too short.
        """
        if not urls:
            raise ConfigError("no webhook URL given")
        self.urls = [check_url(u) for u in urls]
        env = os.environ if environ is None else environ
        secret = env.get(WEBHOOK_SECRET_ENV, "")
        if not secret:
            raise ConfigError(f"--webhook needs a signing secret: export {WEBHOOK_SECRET_ENV}")
        if len(secret.encode("utf-8")) < MIN_SECRET_BYTES:
            raise ConfigError(f"{WEBHOOK_SECRET_ENV} is shorter than {MIN_SECRET_BYTES} bytes; use a random one "
                              "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        self._secret = secret.encode("utf-8")
        self.feed = feed
        self.state_path = Path(state_path)
        self.settings = settings or DeliverySettings()
        self._transport = transport

    def __repr__(self) -> str:
        return f"WebhookDispatcher(urls={[shown_url(u) for u in self.urls]!r}, secret=<redacted>)"

    # the remembered cursor -----------------------------------------------------------------
    def saved_cursor(self) -> str | None:
        """The cursor of the last event handled, from the state file (``None``: never ran)."""
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"webhook state file {str(self.state_path)!r} is unreadable: {exc}") from None
        cursor = data.get("cursor") if isinstance(data, dict) else None
        if not isinstance(cursor, str):
            raise ConfigError(f"webhook state file {str(self.state_path)!r} holds no cursor")
        return cursor

    def save_cursor(self, cursor: str) -> None:
        """Write the cursor whole or not at all (a crash mid-write leaves the old one)."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_path.with_name(self.state_path.name + ".tmp")
        temporary.write_text(json.dumps({"cursor": cursor}), encoding="utf-8")
        os.replace(temporary, self.state_path)

    # delivering ------------------------------------------------------------------------------
    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=self.settings.timeout, transport=self._transport, follow_redirects=False)

    async def deliver(self, event: ApprovalEvent, client: httpx.AsyncClient) -> list[Delivery]:
        """Deliver ``event`` to every URL at once; each delivery is retried on its own."""
        body = event_body(event)
        return list(await asyncio.gather(*(self._deliver_one(client, url, event.kind, body, delivery_id(event, url))
                                           for url in self.urls)))

    async def _deliver_one(self, client: httpx.AsyncClient, url: str, kind: str, body: bytes,
                           delivery_id: str) -> Delivery:
        s = self.settings
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(s.attempts),
            wait=wait_exponential(multiplier=s.backoff, min=s.backoff, max=s.max_backoff),
            retry=retry_if_exception_type((_TryAgain, httpx.TransportError)),
            sleep=s.sleep, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    stamp = str(int(time.time()))
                    response = await client.post(url, content=body, headers={
                        "Content-Type": "application/json", EVENT_HEADER: kind, DELIVERY_HEADER: delivery_id,
                        TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature(self._secret, stamp, body)})
                    code = response.status_code
                    if code >= 500 or code == 429:
                        raise _TryAgain(f"HTTP {code}")
                    if not 200 <= code < 300:
                        return self._failed(url, kind, delivery_id, attempts, f"HTTP {code} (not retried)")
            return Delivery(url=url, delivery_id=delivery_id, ok=True, attempts=attempts)
        except _TryAgain as exc:
            return self._failed(url, kind, delivery_id, attempts, str(exc))
        except httpx.TransportError as exc:
            return self._failed(url, kind, delivery_id, attempts, _one_line(exc))

    def _failed(self, url: str, kind: str, delivery_id: str, attempts: int, problem: str) -> Delivery:
        log.warning("webhook delivery %s (%s) to %s failed after %d attempt%s: %s", delivery_id, kind,
                    shown_url(url), attempts, "" if attempts == 1 else "s", problem)
        return Delivery(url=url, delivery_id=delivery_id, ok=False, attempts=attempts, problem=problem)

    async def run(self) -> None:
        """Deliver events until cancelled, from the saved cursor (first run: from now).

        A store that cannot be read is retried after a pause; it does not stop the loop.
        """
        cursor = self.saved_cursor()
        async with self.client() as client:
            while True:
                try:
                    if cursor is None:
                        cursor = await asyncio.to_thread(self.feed.head)
                        self.save_cursor(cursor)
                    async for event in self.feed.follow(cursor):
                        await self.deliver(event, client)
                        cursor = event.cursor
                        self.save_cursor(cursor)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the store is down, say: wait and go on from the cursor
                    log.warning("webhook dispatcher: %s; retrying in %gs", _one_line(exc), self.feed.poll_interval * 10)
                    await asyncio.sleep(self.feed.poll_interval * 10)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# the server's lifespan --------------------------------------------------------------------------
def default_state_path(store: Store) -> Path:
    """Where the delivered cursor is kept: beside a SQLite file, else in ``.scopegraph/``."""
    from .trust import state_directory

    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return path.with_name(path.stem + ".webhooks.json")
    store_id = hashlib.sha256(store.url.encode("utf-8")).hexdigest()[:16]
    return state_directory(store) / f"webhooks-{store_id}.json"


def attach_webhooks(app: Any, store: Store, urls: Sequence[str], *, clock: Clock | None = None,
                    state_path: Path | str | None = None, settings: DeliverySettings | None = None,
                    environ: Mapping[str, str] | None = None) -> WebhookDispatcher | None:
    """Run a dispatcher for ``urls`` in the Starlette ``app``'s lifespan (started with the server,
    cancelled when it stops), around whatever lifespan the app has. No URL: nothing is attached.

    Raises:
        ConfigError: as ``WebhookDispatcher``.
    """
    if not urls:
        return None
    dispatcher = WebhookDispatcher(ApprovalEventFeed(store, clock=clock), urls,
                                   state_path=state_path or default_state_path(store),
                                   settings=settings, environ=environ)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: Any) -> AsyncIterator[Any]:
        async with inner(application) as state:
            task = asyncio.create_task(dispatcher.run(), name="scopegraph-webhooks")
            try:
                yield state
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app.router.lifespan_context = lifespan
    return dispatcher
