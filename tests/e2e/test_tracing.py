"""OpenTelemetry traces (`--otlp-traces-endpoint`) into real OTLP receivers
on loopback: a gRPC collector (the default protocol) for a single node, and
an HTTP/protobuf one (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`) for
a cluster whose engine rank runs on a headless node. Each request is one
trace that continues the client's `traceparent`: the HTTP request, vLLM's
`llm_request` with its `gen_ai.*` attributes, tokenization, the stream, and
the engine's request with its queue, prefill and decode, whichever node ran
it."""

from __future__ import annotations

import http.server
import threading
import time
from concurrent import futures

import pytest

from e2e_cluster import new_cluster
from e2e_server import start_server, stop_server
from e2e_util import free_tcp_port, need

httpx = need("httpx")
grpc = need("grpc")
need("opentelemetry.proto")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Spans:
    """What a receiver got: every span, with its resource's attributes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spans: list[dict] = []

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in request.resource_spans:
                resource = {a.key: value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append({
                            "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(), "parent": s.parent_span_id.hex(),
                            "start": s.start_time_unix_nano, "end": s.end_time_unix_nano,
                            "attrs": {a.key: value(a.value) for a in s.attributes}, "resource": resource,
                        })

    def of_trace(self, trace: str, want: int, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = [s for s in self.spans if s["trace"] == trace]
            if len(got) >= want or time.monotonic() > deadline:
                return got
            time.sleep(0.2)


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def one(spans: list[dict], name: str) -> dict:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, (name, [s["name"] for s in spans])
    return found[0]


def check_tree(spans: list[dict], route: str, body: dict, client_span: str | None) -> None:
    """The request's spans hang together as the docs say, with the right figures."""
    http_span = one(spans, route)
    llm = one(spans, "llm_request")
    engine = one(spans, "engine.request")
    assert http_span["parent"] == (client_span or "")
    assert llm["parent"] == http_span["id"]
    assert one(spans, "tokenize")["parent"] == http_span["id"]
    assert one(spans, "stream")["parent"] == llm["id"]
    assert engine["parent"] == llm["id"]
    for phase in ("queue", "prefill", "decode"):
        s = one(spans, phase)
        assert s["parent"] == engine["id"]
        assert engine["start"] <= s["start"] <= s["end"] <= engine["end"] + 1_000_000, phase
    usage = body["usage"]
    assert llm["attrs"]["gen_ai.usage.prompt_tokens"] == usage["prompt_tokens"]
    assert llm["attrs"]["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert engine["attrs"]["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert one(spans, "decode")["attrs"]["gen_ai.usage.completion_tokens"] == usage["completion_tokens"]
    assert llm["attrs"]["gen_ai.request.id"] == body["id"]
    assert llm["attrs"]["gen_ai.request.max_tokens"] == 12
    assert llm["attrs"]["gen_ai.latency.time_to_first_token"] > 0
    assert http_span["start"] <= llm["start"] and engine["end"] <= http_span["end"] + 1_000_000


def start_grpc_receiver() -> tuple[Spans, int, "grpc.Server"]:
    """An OTLP/gRPC trace receiver on a free loopback port: the spans it
    collects, its port, and the server (stop it with `.stop(0)`). Also used
    by scripts/docs/trace_picture.py."""
    spans = Spans()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (the service's name)
            spans.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return spans, port, server


@pytest.fixture(scope="module")
def grpc_receiver():
    spans, port, server = start_grpc_receiver()
    yield spans, port
    server.stop(0)


@pytest.fixture(scope="module")
def traced(server, grpc_receiver):
    _, port = grpc_receiver
    srv = start_server(["--otlp-traces-endpoint", f"http://127.0.0.1:{port}"])
    srv.model_id = server.model_id
    try:
        yield srv
    finally:
        stop_server(srv)


def chat(srv, headers: dict | None = None) -> dict:
    body = {"model": srv.model_id, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0}
    r = httpx.post(srv.http_url + "/v1/chat/completions", json=body, headers={**srv.auth, **(headers or {})}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_request_continues_the_clients_trace_over_grpc(traced, grpc_receiver):
    spans, _ = grpc_receiver
    body = chat(traced, {"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"})
    got = spans.of_trace(TRACE_ID, 8)
    check_tree(got, "POST /v1/chat/completions", body, CLIENT_SPAN)
    assert {s["resource"]["service.name"] for s in got} == {"ferry"}


def test_requests_without_a_parent_start_their_own_and_unsampled_ones_record_nothing(traced, grpc_receiver):
    spans, _ = grpc_receiver
    before = len(spans.spans)
    r = httpx.post(traced.http_url + "/v1/completions", headers=traced.auth, timeout=120,
                   json={"model": traced.model_id, "prompt": "One, two,", "max_tokens": 12, "temperature": 0, "stream": True,
                         "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    import json
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    body = {"id": chunks[0]["id"], "usage": chunks[-1]["usage"]}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        roots = [s for s in spans.spans[before:] if s["name"] == "POST /v1/completions"]
        if roots and len(spans.of_trace(roots[0]["trace"], 8, timeout=0)) >= 8:
            break
        time.sleep(0.2)
    assert roots, "no span for the untraced request"
    check_tree(spans.of_trace(roots[0]["trace"], 8), "POST /v1/completions", body, None)
    # A client that says "not sampled" is not traced.
    unsampled = "0af7651916cd43dd8448eb211c80319c"
    chat(traced, {"traceparent": f"00-{unsampled}-b7ad6b7169203331-00"})
    time.sleep(1.5)
    assert spans.of_trace(unsampled, 1, timeout=0) == []
    m = httpx.get(traced.http_url + "/metrics", headers=traced.auth, timeout=10).text
    assert 'ferry:trace_spans_dropped_total{model_name="' in m


def test_engine_spans_from_a_headless_node_join_the_api_nodes_trace():
    spans = Spans()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            data = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(data)
            spans.add(req)
            out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", free_tcp_port()), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}/v1/traces"
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    c = new_cluster(2)
    try:
        c.headless("node-b", 1, 1, extra=["--otlp-traces-endpoint", endpoint], env=env).start()
        api = c.api_node(0, 1, extra=["--otlp-traces-endpoint", endpoint])
        api.env = env
        api.start()
        c.wait_healthy()
        model = httpx.get(c.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        trace = "11112222333344445555666677778888"
        r = httpx.post(c.url + "/v1/chat/completions", timeout=120,
                       headers={"traceparent": f"00-{trace}-{CLIENT_SPAN}-01", "X-data-parallel-rank": "1"},
                       json={"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        got = spans.of_trace(trace, 8)
        check_tree(got, "POST /v1/chat/completions", r.json(), CLIENT_SPAN)
        engine = one(got, "engine.request")
        assert engine["attrs"]["ferry.rank"] == 1
        assert engine["resource"]["service.instance.id"].startswith("headless"), engine["resource"]
        assert one(got, "llm_request")["resource"]["service.instance.id"].startswith("api")
    finally:
        c.stop()
        receiver.shutdown()
