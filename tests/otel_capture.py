"""An OpenTelemetry SDK for tests: in-memory spans and metrics, installed once per process.

The OpenTelemetry API lets a process set its global tracer and meter providers only
once, so this module installs one ``TracerProvider`` (a ``SimpleSpanProcessor`` into an
``InMemorySpanExporter``) and one ``MeterProvider`` (an ``InMemoryMetricReader`` with
delta temporality) the first time a test asks, and the ``otel`` fixture empties both
before and after each test. If something else installed an SDK tracer provider first,
the exporter is attached to it instead; a foreign meter provider cannot take a reader
afterwards, so the fixture then fails loudly rather than measuring nothing.

Import the fixture into a test module: ``from tests.otel_capture import otel``.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

_DELTA = {kind: AggregationTemporality.DELTA for kind in (
    Counter, UpDownCounter, Histogram, ObservableCounter, ObservableUpDownCounter, ObservableGauge)}

_lock = threading.Lock()
_installed: tuple[InMemorySpanExporter, InMemoryMetricReader] | None = None


def install() -> tuple[InMemorySpanExporter, InMemoryMetricReader]:
    """Install (once) the process-wide providers and return their in-memory sinks."""
    global _installed
    with _lock:
        if _installed is not None:
            return _installed
        exporter = InMemorySpanExporter()
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            trace.set_tracer_provider(TracerProvider())
            provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):  # pragma: no cover - a foreign API provider
            pytest.fail(f"cannot capture spans: the global tracer provider is {provider!r}")
        provider.add_span_processor(SimpleSpanProcessor(exporter))

        reader = InMemoryMetricReader(preferred_temporality=_DELTA)
        mine = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(mine)
        if metrics.get_meter_provider() is not mine:  # pragma: no cover - set by someone else first
            pytest.fail("cannot capture metrics: another meter provider was installed first")
        _installed = (exporter, reader)
        return _installed


@dataclass(frozen=True)
class Point:
    """One metric data point: a counter's value or a histogram's count and sum."""

    name: str
    attributes: Mapping[str, Any]
    value: float = 0.0
    count: int = 0
    sum: float = 0.0


class Capture:
    """What the code under test emitted since the fixture started."""

    def __init__(self, exporter: InMemorySpanExporter, reader: InMemoryMetricReader) -> None:
        self._exporter = exporter
        self._reader = reader
        self._points: list[Point] = []

    def spans(self) -> list[ReadableSpan]:
        return list(self._exporter.get_finished_spans())

    def points(self) -> list[Point]:
        """Every data point recorded since the fixture started (delta collections summed up)."""
        data = self._reader.get_metrics_data()
        for rm in (data.resource_metrics if data else ()):
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for dp in metric.data.data_points:
                        attrs = dict(dp.attributes or {})
                        if hasattr(dp, "count"):
                            self._points.append(Point(metric.name, attrs, count=dp.count, sum=dp.sum))
                        else:
                            self._points.append(Point(metric.name, attrs, value=dp.value))
        return list(self._points)

    def totals(self, name: str, *keys: str) -> dict[tuple[Any, ...], float]:
        """A counter's total by the values of ``keys`` (all attributes when none are given)."""
        out: dict[tuple[Any, ...], float] = defaultdict(float)
        for p in self.points():
            if p.name == name:
                key = tuple(p.attributes.get(k) for k in keys) if keys else tuple(sorted(p.attributes.items()))
                out[key] += p.value
        return dict(out)

    def histogram(self, name: str, *keys: str) -> dict[tuple[Any, ...], tuple[int, float]]:
        """A histogram's (count, sum) by the values of ``keys``."""
        out: dict[tuple[Any, ...], tuple[int, float]] = {}
        for p in self.points():
            if p.name == name:
                key = tuple(p.attributes.get(k) for k in keys)
                count, total = out.get(key, (0, 0.0))
                out[key] = (count + p.count, total + p.sum)
        return out


@pytest.fixture
def otel() -> Iterator[Capture]:
    """Spans and metrics emitted during the test, through the real OpenTelemetry SDK."""
    exporter, reader = install()
    exporter.clear()
    reader.get_metrics_data()  # drain what earlier tests recorded
    yield Capture(exporter, reader)
    exporter.clear()
    reader.get_metrics_data()


# span helpers ---------------------------------------------------------------------------------
def by_name(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    found = by_name(spans, name)
    assert len(found) == 1, f"expected one span {name!r}, found {len(found)}: {sorted(s.name for s in spans)}"
    return found[0]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id
    return [s for s in spans if s.parent is not None and s.parent.span_id == pid]


def parent_of(spans: Sequence[ReadableSpan], span: ReadableSpan) -> ReadableSpan | None:
    if span.parent is None:
        return None
    found = [s for s in spans if s.context.span_id == span.parent.span_id]
    return found[0] if found else None


def is_error(span: ReadableSpan) -> bool:
    return span.status.status_code is StatusCode.ERROR


def run_spans(spans: Sequence[ReadableSpan], run_id: str) -> list[ReadableSpan]:
    """The spans of one run: everything in the traces of spans that name ``run_id``."""
    traces = {s.context.trace_id for s in spans if (s.attributes or {}).get("scopegraph.run.id") == run_id}
    return [s for s in spans if s.context.trace_id in traces]
