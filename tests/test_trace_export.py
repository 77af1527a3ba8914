"""The JSONL span exporter (issue 11): its lean encoder writes exactly what the SDK's
``to_json`` writes, every span reaches the file by shutdown, and ``configure`` installs
no meter provider when nothing would read its measurements.

Spans come from a real SDK ``TracerProvider`` of the test's own (not the process-wide
one), so each test sees only its spans.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util import ns_to_iso_str
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from scopegraph.telemetry import JsonLinesSpanExporter, _iso, encode_span_lines


def _provider(*processors: object, service: str = "export-test") -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": service, "deployment": "ci"}),
                              shutdown_on_exit=False)
    for p in processors:
        provider.add_span_processor(p)  # type: ignore[arg-type]
    return provider


def _varied_spans(provider: TracerProvider) -> None:
    """Spans with each part ``to_json`` writes: parents, kinds, statuses with and without a
    description, events, links, a remote parent's trace state, and attribute values of
    every type, with quotes, newlines and non-ASCII text in them."""
    tracer = provider.get_tracer("export-test")
    with tracer.start_as_current_span("invoke_workflow \"w\"\n", kind=SpanKind.SERVER,
                                      attributes={"s": "é \"q\" \\ \n", "i": 7, "f": 0.25, "b": True,
                                                  "ls": ["a", "b"], "li": [1, 2], "lb": [False],
                                                  "lf": [1.5], "empty": []}) as root:
        root.add_event("scopegraph.denied", {"scopegraph.decision.policy_ids": ["p1", "p2"],
                                             "scopegraph.decision.reason": "no ✓"})
        root.add_event("bare")
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT,
                                          links=[Link(root.get_span_context(), {"why": "retry"}),
                                                 Link(root.get_span_context())]) as child:
            child.set_status(Status(StatusCode.ERROR, "tool raised: \"x\""))
        with tracer.start_as_current_span("ok") as ok:
            ok.set_status(Status(StatusCode.OK))
        with tracer.start_as_current_span("error, no description") as bad:
            bad.set_status(Status(StatusCode.ERROR))
    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
               "tracestate": "vendor=abc,other=x-y"}
    token = otel_context.attach(TraceContextTextMapPropagator().extract(carrier))
    try:
        with tracer.start_as_current_span("under a remote parent", kind=SpanKind.CONSUMER,
                                          attributes={"n": -1}):
            pass
    finally:
        otel_context.detach(token)
    for kind in SpanKind:
        tracer.start_span(f"kind {kind.name}", kind=kind).end()
    unfinished = tracer.start_span("ended at a given time", start_time=1_700_000_000_999_999_500)
    unfinished.end(end_time=1_700_000_001_000_000_000)


def _finished(provider_spans: InMemorySpanExporter) -> list[ReadableSpan]:
    spans = list(provider_spans.get_finished_spans())
    assert len(spans) > 10
    return spans


def test_lean_encoding_is_byte_for_byte_the_sdks_to_json() -> None:
    memory = InMemorySpanExporter()
    provider = _provider(SimpleSpanProcessor(memory))
    _varied_spans(provider)
    spans = _finished(memory)
    assert encode_span_lines(spans) == "".join(s.to_json(indent=None) + "\n" for s in spans)
    # and each line is one JSON object with what a reader looks for
    lines = encode_span_lines(spans).splitlines()
    assert len(lines) == len(spans)
    remote = [json.loads(line) for line in lines if '"under a remote parent"' in line]
    assert remote[0]["context"]["trace_state"] != "[]"
    assert remote[0]["parent_id"] == "0xb7ad6b7169203331"


def test_a_second_provider_gets_its_own_resource_in_its_lines() -> None:
    # The resource's JSON is cached: a span of another resource must not get the first one's.
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    _varied_spans(_provider(SimpleSpanProcessor(first), service="one"))
    _varied_spans(_provider(SimpleSpanProcessor(second), service="two"))
    mixed = [s for pair in zip(_finished(first), _finished(second), strict=False) for s in pair]
    assert encode_span_lines(mixed) == "".join(s.to_json(indent=None) + "\n" for s in mixed)
    services = {json.loads(line)["resource"]["attributes"]["service.name"]
                for line in encode_span_lines(mixed).splitlines()}
    assert services == {"one", "two"}


@pytest.mark.parametrize("nanoseconds", [
    -1_500, -1_000_000_001, 1, 999, 1_000, 1_500, 2_500, 999_999_499, 999_999_500, 999_999_999,
    1_700_000_000_000_000_000, 1_700_000_000_000_000_500, 1_700_000_000_000_001_500,
    1_700_000_000_999_999_499, 1_700_000_000_999_999_500, 1_700_000_000_999_999_999,
    1_764_633_599_999_999_999, 1_764_633_600_000_000_000, 4_102_444_799_999_999_999,
])
def test_timestamps_are_formatted_as_the_sdk_formats_them(nanoseconds: int) -> None:
    # Half a microsecond rounds as ``datetime.fromtimestamp`` rounds it, carrying into the
    # next second (and day) when it must.
    assert _iso(nanoseconds) == ns_to_iso_str(nanoseconds)


def test_timestamps_agree_on_many_values() -> None:
    step = 7_919_113_337  # a prime number of nanoseconds: every sub-microsecond phase comes by
    for n in range(1_764_633_500_000_000_000, 1_764_633_500_000_000_000 + 20_000 * step, step):
        assert _iso(n) == ns_to_iso_str(n), n


def test_batch_export_writes_every_span_by_shutdown(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "traces.jsonl"
    memory = InMemorySpanExporter()
    # a batch smaller than the spans, and a delay long enough that shutdown does the last export
    batch = BatchSpanProcessor(JsonLinesSpanExporter(path), max_export_batch_size=7, schedule_delay_millis=60_000)
    provider = _provider(batch, SimpleSpanProcessor(memory))
    for _ in range(5):
        _varied_spans(provider)
    provider.shutdown()
    spans = list(memory.get_finished_spans())
    lines = path.read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == sorted(s.to_json(indent=None) for s in spans)
    assert len(lines) == len(spans) == len({json.loads(line)["context"]["span_id"] for line in lines})


def test_configure_for_jsonl_installs_tracing_and_no_unread_metrics(tmp_path: Path) -> None:
    # In a process of its own: the global providers are set once per process.
    code = (
        "import json, sys\n"
        "from opentelemetry import metrics, trace\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from scopegraph import tracing\n"
        "from scopegraph.telemetry import configure\n"
        "shutdown = configure(jsonl_path=sys.argv[1])\n"
        "assert isinstance(trace.get_tracer_provider(), TracerProvider)\n"
        "assert not isinstance(metrics.get_meter_provider(), MeterProvider)\n"
        "m = tracing.Metrics()\n"
        "with tracing.span('outer', {'a': 1}):\n"
        "    with tracing.span('inner', lambda: {'b': ['x'], 'none': None}) as s:\n"
        "        m.decisions.add(1, {'outcome': 'allow'})\n"
        "        m.tool_latency.record(0.5, {'tool': 't'})\n"
        "        s.set_attribute('c', 'd')\n"
        "shutdown()\n"
        "print('ok')\n"
    )
    path = tmp_path / "t.jsonl"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    spans = {s["name"]: s for s in map(json.loads, path.read_text().splitlines())}
    assert set(spans) == {"outer", "inner"}
    assert spans["inner"]["parent_id"] == spans["outer"]["context"]["span_id"]
    assert spans["inner"]["attributes"] == {"b": ["x"], "c": "d"}
    assert spans["outer"]["attributes"] == {"a": 1}
