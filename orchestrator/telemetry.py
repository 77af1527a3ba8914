"""Configuring the OpenTelemetry SDK for applications: the CLI, examples and tests.

Library modules use the API only and never call this. The standard ``OTEL_*``
environment variables select the exporter: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the
``_TRACES_`` / ``_METRICS_`` variants) with ``OTEL_EXPORTER_OTLP_PROTOCOL`` =
``http/protobuf`` (default) or ``grpc`` sends spans and metrics to any OTLP collector;
without them spans go to a local JSONL file. ``OTEL_SDK_DISABLED=true`` turns it off.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from .errors import ConfigError


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
        lines = [s.to_json(indent=None) for s in spans]
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def otlp_configured() -> bool:
    keys = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return any(os.environ.get(k) for k in keys) or os.environ.get("OTEL_TRACES_EXPORTER") == "otlp"


def configure(*, service_name: str = "scopegraph", jsonl_path: str | Path | None = None) -> Callable[[], None]:
    """Install tracer and meter providers; return a function that flushes and shuts them down.

    Raises:
        ConfigError: an unknown ``OTEL_EXPORTER_OTLP_PROTOCOL`` or an unwritable JSONL path.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return lambda: None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    tracer_provider = TracerProvider(resource=resource)
    readers: list[MetricReader] = []
    if otlp_configured():
        span_exporter, metric_exporter = _otlp_exporters()
        tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        readers.append(PeriodicExportingMetricReader(metric_exporter))
    elif jsonl_path is not None:
        tracer_provider.add_span_processor(BatchSpanProcessor(JsonLinesSpanExporter(jsonl_path)))
    trace.set_tracer_provider(tracer_provider)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    metrics.set_meter_provider(meter_provider)

    def shutdown() -> None:
        tracer_provider.shutdown()
        meter_provider.shutdown()

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
    return OTLPSpanExporter(), OTLPMetricExporter()
