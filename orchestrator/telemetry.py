"""Configuring the OpenTelemetry SDK for applications: the CLI, examples and tests.

Library modules use the API only and never call this. The standard ``OTEL_*``
environment variables select the exporter: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
``_TRACES_`` / ``_METRICS_`` variants) with ``OTEL_EXPORTER_OTLP_PROTOCOL`` =
``http/protobuf`` (default) or ``grpc`` sends spans and metrics to any OTLP collector;
without them spans go to a local JSONL file. ``OTEL_SDK_DISABLED=true`` turns it off.

An OTLP collector that cannot be reached must not hold the process: each export gives
up after ``EXPORT_TIMEOUT_SECONDS`` (unless ``OTEL_EXPORTER_OTLP_TIMEOUT`` says
otherwise), the final flush at exit waits at most ``SHUTDOWN_BUDGET_SECONDS``, and the
exporters' own log lines are replaced by one warning on stderr per process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import metrics, trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util import ns_to_iso_str
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

from .errors import ConfigError

EXPORT_TIMEOUT_SECONDS = 1.0
SHUTDOWN_BUDGET_SECONDS = 2.0
_TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
                      "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")


def encode_span_lines(spans: Sequence[ReadableSpan]) -> str:
    """The spans as JSON lines, each exactly ``span.to_json(indent=None)``, at a fraction of
    its cost (tests/test_trace_export.py holds the two equal).

    This runs on the batch processor's thread, which competes with the application's for
    the GIL: each microsecond spent here is one a run waits. ``to_json`` re-encodes and
    re-parses the resource for every span, formats times through ``datetime`` and builds
    each line as objects first; here the resource is encoded once, a second's text is
    reused, and the line is assembled from strings, only the free-form parts (name,
    attributes, events, links) going through the JSON encoder."""
    out: list[str] = []
    for s in spans:
        context = s.context
        parent = s.parent
        events = s.events
        links = s.links
        out.append(
            f'{{"name": {_dumps(s.name)}, "context": {_dumps_context(context)}, "kind": {_kind_json(s.kind)}, '
            f'"parent_id": {_dumps(f"0x{parent.span_id:016x}") if parent is not None else "null"}, '
            f'"start_time": {_time_json(s.start_time)}, "end_time": {_time_json(s.end_time)}, '
            f'"status": {_status_json(s.status)}, "attributes": {_dumps(_attributes(s))}, '
            f'"events": {_dumps([_event(e) for e in events]) if events else "[]"}, '
            f'"links": {_dumps([_link(k) for k in links]) if links else "[]"}, '
            f'"resource": {_resource_json(s.resource)}}}\n')
    return "".join(out)


_dumps = json.JSONEncoder().encode  # ``json.dumps`` with its defaults, minus the per-call set-up
_KINDS = {kind: _dumps(str(kind)) for kind in SpanKind}
_UNSET_STATUS = {code: _dumps({"status_code": code.name}) for code in StatusCode}
_NO_TRACE_STATE = _dumps("[]")  # ``repr`` of an empty ``TraceState``
_resource_cache: tuple[Resource, str] | None = None
_second_cache: dict[int, str] = {}


def _kind_json(kind: SpanKind) -> str:
    return _KINDS.get(kind) or _dumps(str(kind))


def _status_json(status: Status) -> str:
    if status.description:
        return _dumps({"status_code": status.status_code.name, "description": status.description})
    return _UNSET_STATUS[status.status_code]


def _attributes(s: ReadableSpan) -> dict[str, Any] | None:
    # A finished span's attributes are frozen (``BoundedAttributes``, immutable once the span
    # ends): their dict is read as it is, rather than copied key by key through the
    # read-only view that ``attributes`` returns.
    held = getattr(s, "_attributes", None)
    inner = getattr(held, "_dict", None) if isinstance(held, BoundedAttributes) else None
    if type(inner) is dict:
        return inner
    attributes = s.attributes
    return dict(attributes) if attributes is not None else None


def _context(context: SpanContext) -> dict[str, str]:
    return {"trace_id": f"0x{context.trace_id:032x}", "span_id": f"0x{context.span_id:016x}",
            "trace_state": repr(context.trace_state)}


def _dumps_context(context: SpanContext | None) -> str:
    if context is None:
        return "null"
    state = context.trace_state
    state_json = _dumps(repr(state)) if state else _NO_TRACE_STATE
    return (f'{{"trace_id": "0x{context.trace_id:032x}", "span_id": "0x{context.span_id:016x}", '
            f'"trace_state": {state_json}}}')


def _event(event: Event) -> dict[str, Any]:
    attributes = event.attributes
    return {"name": event.name, "timestamp": _iso(event.timestamp),
            "attributes": dict(attributes) if attributes is not None else None}


def _link(link: Link) -> dict[str, Any]:
    attributes = link.attributes
    return {"context": _context(link.context), "attributes": dict(attributes) if attributes is not None else None}


def _resource_json(resource: Resource) -> str:
    """The resource as ``to_json`` writes it, kept for the last resource seen (a provider has one)."""
    global _resource_cache
    cached = _resource_cache
    if cached is not None and cached[0] is resource:
        return cached[1]
    encoded = _dumps(json.loads(resource.to_json(indent=None)))
    _resource_cache = (resource, encoded)
    return encoded


def _time_json(nanoseconds: int | None) -> str:
    return f'"{_iso(nanoseconds)}"' if nanoseconds else "null"


def _iso(nanoseconds: int) -> str:
    """``opentelemetry.sdk.util.ns_to_iso_str``: ``datetime.fromtimestamp(ns / 1e9)`` splits
    the same float into whole seconds and microseconds rounded half to even (as here), then
    formats both; the seconds' text is the same for every span of that second."""
    if nanoseconds < 0:  # before 1970: a clock gone wrong; left to the SDK's own formatting
        return ns_to_iso_str(nanoseconds)
    fraction, whole = math.modf(nanoseconds / 1e9)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    second = int(whole)
    prefix = _second_cache.get(second)
    if prefix is None:
        if len(_second_cache) >= 64:
            _second_cache.clear()
        prefix = _second_cache[second] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return f"{prefix}{micros:06d}Z"


class JsonLinesSpanExporter(SpanExporter):
    """Appends each finished span as one JSON line: readable with ``jq``, no collector needed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot write traces to {str(self.path)!r}: {exc.strerror}") from None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        text = encode_span_lines(spans)
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as fh:
                fh.write(text)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def otlp_configured() -> bool:
    keys = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(os.environ.get(k) for k in keys) or os.environ.get("OTEL_TRACES_EXPORTER") == "otlp"


def configure(*, service_name: str = "scopegraph", jsonl_path: str | Path | None = None,
              warn: TextIO | None = None) -> Callable[[], None]:
    """Install tracer and meter providers; return a function that flushes and shuts them down.

    The returned function takes at most about ``SHUTDOWN_BUDGET_SECONDS``; telemetry not
    exported by then is dropped. A failed OTLP export is reported once, as one line on
    ``warn`` (default: stderr).

    Raises:
        ConfigError: an unknown ``OTEL_EXPORTER_OTLP_PROTOCOL`` or an unwritable JSONL path.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return lambda: None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    # Shut down by the function returned here, within its budget, not by an unbounded atexit hook.
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    readers: list[MetricReader] = []
    watch: _ExportWatch | None = None
    if otlp_configured():
        span_exporter, metric_exporter = _otlp_exporters()
        watch = _ExportWatch(_endpoint_shown(), warn)
        tracer_provider.add_span_processor(BatchSpanProcessor(_WatchedSpanExporter(span_exporter, watch)))
        readers.append(PeriodicExportingMetricReader(_WatchedMetricExporter(metric_exporter, watch)))
    elif jsonl_path is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(jsonl_path)))
    trace.set_tracer_provider(tracer_provider)
    # Without a reader no measurement is ever exported, yet an SDK meter provider would
    # still aggregate each one (several per tool call): then the API's no-op meters stay.
    meter_provider = (MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
                      if readers else None)
    if meter_provider is not None:
        metrics.set_meter_provider(meter_provider)

    def shutdown() -> None:
        budget_ms = SHUTDOWN_BUDGET_SECONDS * 1000
        threads = [threading.Thread(target=tracer_provider.shutdown, daemon=True)]
        if meter_provider is not None:
            threads.append(threading.Thread(target=meter_provider.shutdown, kwargs={"timeout_millis": budget_ms},
                                            daemon=True))
        deadline = time.monotonic() + SHUTDOWN_BUDGET_SECONDS
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if watch is not None and any(t.is_alive() for t in threads):
            watch.failed()  # what is still being sent is dropped when the process ends

    return shutdown


def _otlp_exporters() -> tuple[SpanExporter, Any]:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
    elif protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    else:
        raise ConfigError(f"unsupported OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r}: use http/protobuf or grpc")
    # A timeout from the environment wins; otherwise give up on an unreachable collector soon.
    timeout = None if any(os.environ.get(v) for v in _TIMEOUT_VARIABLES) else EXPORT_TIMEOUT_SECONDS
    return OTLPSpanExporter(timeout=timeout), OTLPMetricExporter(timeout=timeout)


# one warning instead of the exporters' own log lines -------------------------------------------
class _ExportWatch:
    """Says once, in one line, that telemetry could not be exported; silences the SDK's lines."""

    def __init__(self, endpoint: str, out: TextIO | None) -> None:
        self.endpoint = endpoint
        self._out = out
        self._lock = threading.Lock()
        self._warned = False
        _quiet_otel_logging()

    def failed(self) -> None:
        with self._lock:
            if self._warned:
                return
            self._warned = True
        out = self._out or sys.stderr
        try:
            print(f"scopegraph: warning: cannot export telemetry to the OTLP endpoint {self.endpoint}; "
                  "spans and metrics are dropped", file=out, flush=True)
        except (OSError, ValueError):  # stderr closed: nothing more to say
            pass


class _WatchedSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, watch: _ExportWatch) -> None:
        self._inner = inner
        self._watch = watch

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self._watch.failed()
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _WatchedMetricExporter(MetricExporter):
    def __init__(self, inner: Any, watch: _ExportWatch) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,
                         preferred_aggregation=inner._preferred_aggregation)
        self._inner = inner
        self._watch = watch

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self._watch.failed()
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class _Swallow(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        return None


def _quiet_otel_logging() -> None:
    """The exporters log each retry and failure; ``_ExportWatch`` says it once instead."""
    logger = logging.getLogger("opentelemetry")
    if not any(isinstance(h, _Swallow) for h in logger.handlers):
        logger.addHandler(_Swallow())
    logger.propagate = False


def _endpoint_shown() -> str:
    """The traces endpoint, without any user or password in it."""
    url = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
           or "(default)")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else url
    except ValueError:
        return "(unparsable URL)"
