"""Export: ``OTEL_*`` selects OTLP, the demo writes JSONL by default (issue 4, point 2).

A real ``scopegraph demo`` runs in a subprocess against an OTLP receiver on 127.0.0.1
(OTLP/HTTP with ``http.server``; OTLP/gRPC with ``grpcio``); what arrives is decoded with
``opentelemetry-proto`` and checked against the run record and the store.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from scopegraph.cli import main
from scopegraph.store import SqliteStore

SUBPROCESS_TIMEOUT = 120


# decoded spans ---------------------------------------------------------------------------
@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    status: str  # "UNSET" | "OK" | "ERROR"
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[Span]:
    out = []
    for rs in request.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(Span(
                    name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(), attributes=_attrs(s.attributes),
                    status={0: "UNSET", 1: "OK", 2: "ERROR"}[s.status.code],
                    resource=resource, scope=ss.scope.name))
    return out


def decode_jsonl(path: Path) -> list[Span]:
    out = []
    for line in path.read_text().splitlines():
        s = json.loads(line)
        out.append(Span(
            name=s["name"], trace_id=s["context"]["trace_id"].removeprefix("0x"),
            span_id=s["context"]["span_id"].removeprefix("0x"),
            parent_id=(s.get("parent_id") or "").removeprefix("0x"), attributes=s["attributes"],
            status=s["status"]["status_code"], resource=s.get("resource", {}).get("attributes", {})))
    return out


# receivers -------------------------------------------------------------------------------
class Received:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.paths: list[str] = []

    def spans(self) -> list[Span]:
        with self.lock:
            return [s for r in self.traces for s in decode(r)]

    def metric_names(self) -> set[str]:
        with self.lock:
            return {m.name for r in self.metrics for rm in r.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics}


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/HTTP (protobuf) receiver on an ephemeral loopback port."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            with received.lock:
                received.paths.append(self.path)
                if self.path == "/v1/traces":
                    received.traces.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                elif self.path == "/v1/metrics":
                    received.metrics.append(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                    reply = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, Received]]:
    """An OTLP/gRPC receiver on an ephemeral loopback port."""
    grpc = pytest.importorskip("grpc")
    received = Received()

    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC API
            with received.lock:
                received.traces.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC API
            with received.lock:
                received.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        server.stop(grace=None).wait(10)


# running the CLI -------------------------------------------------------------------------
def _env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SCOPEGRAPH_STORE"}
    env.update(extra)
    return env


def scopegraph(cwd: Path, store_url: str, *argv: str, env: Mapping[str, str] = {}) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scopegraph.cli", "--store", store_url, *argv],
        cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False,
    )


def run_demo(tmp_path: Path, store_url: str, env: Mapping[str, str] = {}) -> dict[str, Any]:
    done = scopegraph(tmp_path, store_url, "demo", "--json", "--as", "carol", env=env)
    assert done.returncode == 3, done.stderr  # paused for the write's approval
    assert "Traceback" not in done.stderr
    return dict(json.loads(done.stdout))


def approve_and_resume(tmp_path: Path, store_url: str, record: dict[str, Any],
                       capsys: pytest.CaptureFixture[str], *resume_args: str,
                       env: Mapping[str, str] = {}) -> dict[str, Any]:
    (approval,) = record["approvals"]
    assert main(["--store", store_url, "approve", approval["id"], "--as", "bob", "--reason", "ok"]) == 0
    capsys.readouterr()
    done = scopegraph(tmp_path, store_url, "resume", record["run_id"], "--json", *resume_args, env=env)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


# what a demo run's spans must show -------------------------------------------------------
def assert_demo_trace(spans: list[Span], record: dict[str, Any], store_path: Path) -> str:
    """The spans of the paused demo run; returns its trace id."""
    run_id = record["run_id"]
    assert spans, "no spans arrived"
    trace_ids = {s.trace_id for s in spans}
    assert len(trace_ids) == 1, f"one run, {len(trace_ids)} traces"
    by_id = {s.span_id: s for s in spans}
    roots = [s for s in spans if not s.parent_id]
    assert [r.name for r in roots] == ["invoke_workflow expenses"]
    root = roots[0]
    assert root.attributes["scopegraph.run.id"] == run_id
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["scopegraph.run.status"] == "paused"
    for s in spans:
        if s.parent_id:
            assert s.parent_id in by_id, f"{s.name} points at a span that never arrived"

    (planner,) = [s for s in spans if s.name == "invoke_agent planner"]
    assert planner.parent_id == root.span_id
    assert planner.attributes["gen_ai.agent.id"] == record["planner_spiffe_id"]
    assert planner.attributes["gen_ai.agent.name"] == "planner"

    store = SqliteStore(store_path)
    try:
        stored = {g.step_id: g for g in store.grants_for_run(run_id)}
    finally:
        store.close()
    for step in record["steps"]:
        (tool_span,) = [s for s in spans if s.name == "invoke_agent executor"
                        and s.attributes["scopegraph.step.id"] == step["step_id"]]
        assert tool_span.parent_id == root.span_id
        assert tool_span.attributes["scopegraph.step.tool"] == step["tool"]
        assert tool_span.attributes["gen_ai.agent.id"] == step["spiffe_id"]
        assert tool_span.attributes["scopegraph.spiffe_id"] == step["spiffe_id"]
        assert step["spiffe_id"].startswith("spiffe://demo.scopegraph.local/wf/expenses/run/")
        calls = [s for s in spans if s.parent_id == tool_span.span_id and s.name.startswith("execute_tool ")]
        assert len(calls) == len(step["calls"]), "one execute_tool span per call"
        # The step's hops: its own children, and those of its calls' spans.
        kids = [s for s in spans if s.parent_id == tool_span.span_id
                or s.parent_id in {c.span_id for c in calls}]
        (mint,) = [k for k in kids if k.name == "scopegraph.grant.mint"]
        assert mint.attributes["scopegraph.grant.id"] == step["grant_id"] == stored[step["step_id"]].jti
        assert mint.attributes["scopegraph.spiffe_id"] == step["spiffe_id"] == stored[step["step_id"]].subject
        (revoke,) = [k for k in kids if k.name == "scopegraph.grant.revoke"]
        assert revoke.attributes["scopegraph.grant.id"] == step["grant_id"]
        decides = [k for k in kids if k.name == "scopegraph.decide"]
        assert len(decides) == len(step["calls"])
        for d in decides:
            assert d.attributes["scopegraph.spiffe_id"] == step["spiffe_id"]

    receipt = next(s for s in spans if s.name == "invoke_agent executor"
                   and s.attributes["scopegraph.step.tool"] == "read_receipt")
    receipt_calls = {s.span_id for s in spans if s.parent_id == receipt.span_id}
    decides = [s for s in spans if s.parent_id in receipt_calls and s.name == "scopegraph.decide"]
    outcomes = sorted((d.attributes["gen_ai.tool.name"], d.attributes["scopegraph.decision"], d.status)
                      for d in decides)
    # Denials are outcomes, not errors (issue 10): their status stays unset.
    assert outcomes == [("read_receipt", "allow", "UNSET"), ("read_receipt", "deny", "UNSET"),
                        ("send_email", "deny", "UNSET")]
    filing = next(s for s in spans if s.name == "invoke_agent executor"
                  and s.attributes["scopegraph.step.tool"] == "file_expense")
    assert filing.attributes["scopegraph.decision"] == "needs_approval"
    assert filing.attributes["scopegraph.approval.id"] == record["approvals"][0]["id"]
    assert filing.attributes["scopegraph.data_labels"] == ["confidential"]
    return trace_ids.pop()


# OTLP/HTTP -------------------------------------------------------------------------------
def test_demo_exports_its_spans_over_otlp_http_and_resume_continues_the_trace(
        tmp_path: Path, store_url: str, store_path: Path, http_receiver: tuple[str, Received],
        capsys: pytest.CaptureFixture[str]) -> None:
    endpoint, received = http_receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    record = run_demo(tmp_path, store_url, env)
    assert "/v1/traces" in received.paths
    first = received.spans()
    assert {s.scope for s in first} == {"scopegraph"}
    assert {s.resource.get("service.name") for s in first} == {"scopegraph"}
    trace_id = assert_demo_trace(first, record, store_path)
    assert {"scopegraph.decisions", "scopegraph.grants.minted"} <= received.metric_names()
    assert not (store_path.parent / "traces.jsonl").exists(), "OTLP configured, yet spans went to JSONL"

    # Another process resumes the run: its spans join the first trace.
    finished = approve_and_resume(tmp_path, store_url, record, capsys, env=env)
    assert finished["status"] == "completed"
    later = [s for s in received.spans() if s.span_id not in {f.span_id for f in first}]
    assert later and {s.trace_id for s in later} == {trace_id}
    root1 = next(s for s in first if not s.parent_id)
    (root2,) = [s for s in later if s.name == "invoke_workflow expenses"]
    assert root2.parent_id == root1.span_id and root2.attributes["scopegraph.resumed"] is True
    (wait,) = [s for s in later if s.name == "scopegraph.approval.wait"]
    assert wait.attributes["scopegraph.approval.approver"] == "bob"
    assert wait.attributes["scopegraph.approval.id"] == record["approvals"][0]["id"]
    step = next(s for s in finished["steps"] if s["step_id"] == "file")
    (call,) = [s for s in later if s.name == "scopegraph.tool.call"]
    assert call.attributes["scopegraph.grant.id"] == step["grant_id"]
    assert call.attributes["gen_ai.tool.name"] == "file_expense"


# OTLP/gRPC -------------------------------------------------------------------------------
def test_demo_exports_its_spans_over_otlp_grpc(tmp_path: Path, store_url: str, store_path: Path,
                                               grpc_receiver: tuple[str, Received]) -> None:
    endpoint, received = grpc_receiver
    record = run_demo(tmp_path, store_url, {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert_demo_trace(received.spans(), record, store_path)
    assert "scopegraph.decisions" in received.metric_names()


# JSONL by default ------------------------------------------------------------------------
def test_without_otel_settings_spans_go_to_traces_jsonl_beside_the_store(
        tmp_path: Path, store_url: str, store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = run_demo(tmp_path, store_url)
    default = store_path.parent / "traces.jsonl"
    assert default.exists(), sorted(str(p) for p in tmp_path.rglob("*"))
    first = decode_jsonl(default)
    trace_id = assert_demo_trace(first, record, store_path)
    assert not (tmp_path / ".scopegraph").exists(), "wrote beside the default store instead"

    elsewhere = tmp_path / "elsewhere" / "spans.jsonl"
    finished = approve_and_resume(tmp_path, store_url, record, capsys, "--traces", str(elsewhere))
    assert finished["status"] == "completed"
    assert len(decode_jsonl(default)) == len(first), "--traces did not take the spans elsewhere"
    later = decode_jsonl(elsewhere)
    assert later and {s.trace_id for s in later} == {trace_id}


# bad settings ----------------------------------------------------------------------------
@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"])
@pytest.mark.parametrize("protocol", ["carrier-pigeon", "http/json"])
def test_unknown_otlp_protocol_is_a_one_line_usage_error(
        variable: str, protocol: str, store_url: str, store_path: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv(variable, protocol)
    code = main(["--store", store_url, "demo", "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert repr(protocol) in lines[0] and "OTEL_EXPORTER_OTLP_PROTOCOL" in lines[0]
    if store_path.exists():  # nothing ran: no run, no ledger record
        store = SqliteStore(store_path)
        try:
            assert store.list_runs() == [] and store.ledger_rows() == []
        finally:
            store.close()


def test_sdk_disabled_writes_no_trace_file(store_url: str, store_path: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert main(["--store", store_url, "demo", "--json"]) == 3
    capsys.readouterr()
    assert store_path.exists()
    assert not (store_path.parent / "traces.jsonl").exists()
    # (the ledger's witness beside the store is JSON lines too, and no trace file)
    assert not [p for p in tmp_path.rglob("*.jsonl") if not p.name.endswith(".witness.jsonl")]


# an unreachable collector ------------------------------------------------------------------
# Generous for a start-up on a loaded machine, yet short of the ~15 s that exporters retrying
# at exit used to cost.
UNREACHABLE_TIMEOUT = 12
ONE_STEP = '''
from scopegraph import Workflow, tool
from scopegraph.agents import DirectExecutor, ScriptedPlanner

@tool
def lookup(key: str) -> dict:
    """Look a key up."""
    return {"key": key}

workflow = Workflow(name="otlpdown", tools=[lookup], executor=DirectExecutor(), planner=ScriptedPlanner(
    {"steps": [{"id": "look", "tool": "lookup", "constraints": {"key": {"kind": "exact", "value": "k"}}}]}))
'''


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_an_unreachable_collector_costs_one_warning_line_and_little_time(
        tmp_path: Path, store_url: str, protocol: str) -> None:
    from tests.contract.conftest import closed_port

    (tmp_path / "wf_otlpdown.py").write_text(ONE_STEP)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    done = subprocess.run(
        [sys.executable, "-m", "scopegraph.cli", "--store", store_url, "run", "wf_otlpdown.py:workflow",
         "--task", "look k up", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=UNREACHABLE_TIMEOUT, check=False,
        env=_env({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "completed"
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("scopegraph: warning: ") and endpoint in line, line
