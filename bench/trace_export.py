"""What the JSONL span exporter costs per span: the SDK's ``to_json`` against ours.

The spans are those of real scopegraph runs (the same plan as ``step_overhead.py``),
captured in memory by an SDK ``TracerProvider``; then each arm encodes all of them,
the arms alternating (``to_json``, ours, ``to_json``, …) so drift affects both alike.
This is the work the batch processor's thread does per span, competing with the run's
thread for the GIL. It checks that both arms write the same bytes, and prints the
spans per step and the bytes per span. The last line printed is ``ratio=<x>``: ours
over ``to_json`` (median per-span times).

    python bench/trace_export.py [--steps 20] [--runs 5] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).parent))
import step_overhead  # noqa: E402  (a sibling script: its plan, tool and arm)

from scopegraph.telemetry import encode_span_lines  # noqa: E402


def sdk_lines(spans: Sequence[ReadableSpan]) -> str:
    """What the exporter wrote before: one ``to_json`` per span."""
    return "".join(s.to_json(indent=None) + "\n" for s in spans)


def per_span(encode: Callable[[Sequence[ReadableSpan]], str], spans: Sequence[ReadableSpan]) -> float:
    start = time.perf_counter()
    encode(spans)
    return (time.perf_counter() - start) / len(spans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="plan steps per run (default 20)")
    parser.add_argument("--runs", type=int, default=5, help="runs whose spans are encoded (default 5)")
    parser.add_argument("--rounds", type=int, default=15, help="timed encodings per arm (default 15)")
    args = parser.parse_args(argv)
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "scopegraph"}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    with tempfile.TemporaryDirectory(prefix="sg-bench-") as tmp:
        arm = step_overhead.ScopegraphArm(step_overhead.Place(Path(tmp), "sg", None), args.steps)
        try:
            for _ in range(args.runs):
                arm.run_once()
        finally:
            arm.close()
    spans = list(memory.get_finished_spans())
    ours = encode_span_lines(spans)
    if ours != sdk_lines(spans):
        raise SystemExit("the lean encoding differs from to_json")
    times: dict[str, list[float]] = {"to_json": [], "lean": []}
    for _ in range(args.rounds):
        times["to_json"].append(per_span(sdk_lines, spans))
        times["lean"].append(per_span(encode_span_lines, spans))
    print(f"spans={len(spans)} spans_per_step={len(spans) / (args.runs * args.steps):.2f} "
          f"bytes_per_span={len(ours.encode()) / len(spans):.0f} rounds={args.rounds}")
    for name, samples in times.items():
        print(f"{name:8} median {statistics.median(samples) * 1e6:6.2f} µs/span   min {min(samples) * 1e6:6.2f}")
    print(f"ratio={statistics.median(times['lean']) / statistics.median(times['to_json']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
