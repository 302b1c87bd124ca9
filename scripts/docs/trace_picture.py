#!/usr/bin/env python3
"""Draw docs/images/trace-two-nodes.svg: one request's trace across two nodes,
taken from a real run's OTLP export.

It starts a small cluster on loopback with the helpers of tests/e2e (an API
node with no ranks of its own, `--data-parallel-size-local 0`, and one
headless node that runs rank 0), both exporting to an OTLP/gRPC receiver this
script runs (the tracing test's span decoding, `opentelemetry-proto`). It sends
one streamed chat completion with a W3C `traceparent`, collects that trace's
spans from both nodes and writes them as a standalone SVG timeline: one row
per span, indented by parent, on a shared time axis in ms, coloured by the
node that exported it.

Run it from anywhere, with the test clients installed
(python3 -m pip install -r tests/requirements.txt):

    FERRY_BIN=target/release/ferry \\
    FERRY_TEST_MODEL=$(ls ~/.cache/ferry/models/*.gguf | head -1) \\
    python3 scripts/docs/trace_picture.py [--out docs/images/trace-two-nodes.svg]

`--save-json FILE` keeps the collected spans; `--from-json FILE` redraws the
picture from such a file without starting a cluster. It exits non-zero with a
message when the cluster does not come up or the trace is incomplete (no span
from the headless node).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

REPO = Path(__file__).resolve().parents[2]
os.chdir(REPO)
sys.path.insert(0, str(REPO / "tests" / "e2e"))

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
# POST, tokenize, llm_request, stream (API node); engine.request, queue, prefill, decode (headless node).
EXPECTED_SPANS = 8


def fail(msg: str) -> "None":
    print(f"trace_picture: {msg}", file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------ the run


def collect() -> list[dict]:
    """Run the cluster and the request; the trace's spans, as the tracing test records them."""
    try:
        import httpx
        from e2e_cluster import new_cluster
        from e2e_server import SetupError
        from test_tracing import start_grpc_receiver  # the tracing test's receiver and decoding
    except ImportError as e:
        fail(f"{e}; install the test clients with: python3 -m pip install -r tests/requirements.txt")

    spans, port, receiver = start_grpc_receiver()
    endpoint = ["--otlp-traces-endpoint", f"http://127.0.0.1:{port}"]

    c = None
    try:
        c = new_cluster(1)
        c.api_node(0, 0, extra=endpoint).start()
        c.headless("node-b", 0, 1, extra=endpoint).start()
        c.wait_healthy()
        model = httpx.get(c.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}],
                "max_tokens": 24, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        # A warm-up request (its own trace) so the picture shows a steady request, not first-use costs.
        warm = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False, "max_tokens": 4}
        r = httpx.post(c.url + "/v1/chat/completions", json=warm, timeout=120)
        if r.status_code != 200:
            fail(f"the warm-up request failed: {r.status_code} {r.text[:500]}")
        with httpx.stream("POST", c.url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01"}) as r:
            text = r.read().decode()
            if r.status_code != 200:
                fail(f"the chat completion failed: {r.status_code} {text[:500]}")
        got = spans.of_trace(TRACE_ID, EXPECTED_SPANS)
        time.sleep(0.5)  # anything later than the expected spans
        got = spans.of_trace(TRACE_ID, EXPECTED_SPANS, timeout=0)
    except SetupError as e:
        fail(f"the cluster did not come up: {e}")
    finally:
        if c is not None:
            c.stop()
        receiver.stop(0)
    return got


def check(spans: list[dict]) -> None:
    instances = {s["resource"].get("service.instance.id", "") for s in spans}
    if not spans:
        fail(f"no span of trace {TRACE_ID} reached the receiver")
    if not any(i.startswith("headless") for i in instances):
        fail(f"the trace is incomplete: no span from the headless node (got {sorted(s['name'] for s in spans)} "
             f"from {sorted(instances)})")
    if not any(i.startswith("api") for i in instances):
        fail(f"the trace is incomplete: no span from the API node (got {sorted(s['name'] for s in spans)})")
    if len(spans) < EXPECTED_SPANS:
        fail(f"the trace is incomplete: {len(spans)} spans of {EXPECTED_SPANS} ({sorted(s['name'] for s in spans)})")


# ------------------------------------------------------------------ the picture

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
# One colour per exporting node, by the first word of service.instance.id.
PALETTE = {"api": ("#3b6fb6", "API node"), "headless": ("#d9822b", "headless node")}
OTHER = ("#777777", "other")

W = 1040
LABEL_X = 16          # span names start here (plus indentation)
INDENT = 16
BAR_X0 = 400          # the time axis
BAR_X1 = 920
DUR_X = W - 16        # durations, right-aligned
ROW_H = 40
TOP = 130             # first row


def ms(ns: float) -> str:
    v = ns / 1e6
    return f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def secs_as_ms(v) -> str:
    return ms(float(v) * 1e9)


def node_of(span: dict) -> str:
    return (span["resource"].get("service.instance.id") or "other").split()[0]


def key_attrs(span: dict, root: bool) -> str:
    """A few attributes worth reading, short."""
    a = span["attrs"]
    out = []
    if "ferry.rank" in a:
        out.append(f"rank {a['ferry.rank']}")
    if "gen_ai.usage.prompt_tokens" in a:
        out.append(f"prompt_tokens {a['gen_ai.usage.prompt_tokens']}")
    if "gen_ai.usage.cached_tokens" in a:
        out.append(f"cached {a['gen_ai.usage.cached_tokens']}")
    if "gen_ai.usage.completion_tokens" in a:
        out.append(f"completion_tokens {a['gen_ai.usage.completion_tokens']}")
    if "gen_ai.latency.time_to_first_token" in a:
        out.append(f"TTFT {secs_as_ms(a['gen_ai.latency.time_to_first_token'])}")
    if root and span["parent"]:
        out.append(f"parent {span['parent']}: the client's span, from traceparent")
    return " · ".join(out)


def order(spans: list[dict]) -> list[tuple[dict, int]]:
    """Depth-first from the roots (spans whose parent was not exported), children by start."""
    ids = {s["id"] for s in spans}
    kids: dict[str, list[dict]] = {}
    for s in spans:
        kids.setdefault(s["parent"] if s["parent"] in ids else "", []).append(s)
    out: list[tuple[dict, int]] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(kids.get(parent, []), key=lambda s: (s["start"], -s["end"])):
            out.append((s, depth))
            walk(s["id"], depth + 1)

    walk("", 0)
    return out


def nice_step(span_ms: float, ticks: int = 10) -> float:
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about `ticks` ticks."""
    raw = span_ms / ticks
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag)


def render(spans: list[dict]) -> str:
    rows = order(spans)
    t0 = min(s["start"] for s in spans)
    t1 = max(s["end"] for s in spans)
    total_ms = max((t1 - t0) / 1e6, 1e-3)
    step = nice_step(total_ms)
    axis_end = step * math.floor(total_ms / step + 1e-9)  # the last tick; the bars fill the axis
    scale = (BAR_X1 - BAR_X0) / total_ms

    def x(ns: int) -> float:
        return BAR_X0 + (ns - t0) / 1e6 * scale

    height = TOP + ROW_H * len(rows) + 44
    e = []
    e.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
             f'font-family="{FONT}" font-size="13">')
    e.append(f'<rect width="{W}" height="{height}" fill="#ffffff"/>')
    trace = spans[0]["trace"]
    e.append(f'<text x="{LABEL_X}" y="28" font-size="17" font-weight="bold" fill="#222">'
             f'{escape("One streamed chat completion, traced across two ferry nodes")}</text>')
    model = next((s["attrs"]["gen_ai.response.model"] for s in spans if "gen_ai.response.model" in s["attrs"]), "")
    sub = f"trace {trace} · {len(spans)} spans, {ms(t1 - t0)}"
    if model:
        sub += f" · model {Path(model).name}"
    e.append(f'<text x="{LABEL_X}" y="50" font-size="12" fill="#555">{escape(sub)}</text>')

    # Legend: one swatch per node that exported something.
    lx = LABEL_X
    for key in [k for k in PALETTE if any(node_of(s) == k for s in spans)] + \
               (["other"] if any(node_of(s) not in PALETTE for s in spans) else []):
        colour, label = PALETTE.get(key, OTHER)
        inst = next((s["resource"].get("service.instance.id", "") for s in spans if node_of(s) == key), "")
        if len(inst) > 22:
            inst = inst[:20] + "…"
        text = f"{label}, service.instance.id “{inst}”"
        e.append(f'<rect x="{lx}" y="64" width="14" height="14" rx="2" fill="{colour}"/>')
        e.append(f'<text x="{lx + 20}" y="76" font-size="12" fill="#333">{escape(text)}</text>')
        lx += 20 + 7 * len(text) + 24

    # Time axis and grid.
    axis_y = TOP - 14
    grid_bottom = TOP + ROW_H * len(rows)
    e.append(f'<text x="{BAR_X0}" y="{axis_y - 16}" font-size="11" fill="#555">time since the request arrived (ms)</text>')
    e.append(f'<text x="{LABEL_X}" y="{axis_y}" font-size="11" fill="#555">span (indented under its parent)</text>')
    e.append(f'<text x="{DUR_X}" y="{axis_y}" font-size="11" fill="#555" text-anchor="end">duration</text>')
    k = 0
    while k * step <= axis_end + 1e-9:
        gx = BAR_X0 + k * step * scale
        label = f"{k * step:g}"
        e.append(f'<line x1="{gx:.1f}" y1="{axis_y + 4}" x2="{gx:.1f}" y2="{grid_bottom}" stroke="#e3e3e3"/>')
        e.append(f'<text x="{gx:.1f}" y="{axis_y}" font-size="11" fill="#555" text-anchor="middle">{label}</text>')
        k += 1

    pos: dict[str, tuple[float, float, float]] = {}  # span id -> bar x0, x1, row y
    for i, (s, depth) in enumerate(rows):
        y = TOP + i * ROW_H
        if i % 2:
            e.append(f'<rect x="0" y="{y}" width="{W}" height="{ROW_H}" fill="#f7f7f7" fill-opacity="0.6"/>')
        colour = PALETTE.get(node_of(s), OTHER)[0]
        lx = LABEL_X + depth * INDENT
        if depth:
            e.append(f'<path d="M{lx - 10} {y + 6} V{y + 16} H{lx - 3}" fill="none" stroke="#aaa"/>')
        e.append(f'<text x="{lx}" y="{y + 17}" fill="#111">{escape(s["name"])}</text>')
        attrs = key_attrs(s, depth == 0)
        if attrs:
            e.append(f'<text x="{lx}" y="{y + 32}" font-size="10.5" fill="#666">{escape(attrs)}</text>')
        bx0, bx1 = x(s["start"]), x(s["end"])
        bw = max(bx1 - bx0, 2.0)
        e.append(f'<rect x="{bx0:.1f}" y="{y + 9}" width="{bw:.1f}" height="20" rx="3" fill="{colour}">'
                 f'<title>{escape(s["name"])} ({escape(s["resource"].get("service.instance.id", ""))}): '
                 f'{ms(s["end"] - s["start"])}</title></rect>')
        e.append(f'<text x="{DUR_X}" y="{y + 23}" font-size="12" fill="#333" text-anchor="end">'
                 f'{ms(s["end"] - s["start"])}</text>')
        pos[s["id"]] = (bx0, bx0 + bw, y)

    # Where the context crossed nodes: a dashed link from the parent's bar to the child's start.
    for s, _ in rows:
        p = next((q for q in spans if q["id"] == s["parent"]), None)
        if p is None or node_of(p) == node_of(s):
            continue
        px0, px1, py = pos[p["id"]]
        cx0, _, cy = pos[s["id"]]
        e.append(f'<path d="M{cx0:.1f} {py + 29} V{cy + 9}" stroke="#222" stroke-dasharray="3 3" fill="none"/>')
        e.append(f'<path d="M{cx0 - 4:.1f} {cy + 3} L{cx0:.1f} {cy + 9} L{cx0 + 4:.1f} {cy + 3}" stroke="#222" fill="none"/>')
        note = "TraceContext over the node transport"
        anchor, tx = ("end", cx0 - 6) if cx0 > (BAR_X0 + BAR_X1) / 2 else ("start", cx0 + 6)
        e.append(f'<text x="{tx:.1f}" y="{(py + 29 + cy + 9) / 2 + 4:.1f}" font-size="10.5" font-style="italic" '
                 f'fill="#222" text-anchor="{anchor}">{escape(note)}</text>')

    foot = ("Exported by each node with --otlp-traces-endpoint to one OTLP receiver; drawn by "
            "scripts/docs/trace_picture.py. Both nodes ran on one host (one clock).")
    e.append(f'<text x="{LABEL_X}" y="{height - 20}" font-size="11" fill="#777">{escape(foot)}</text>')
    e.append("</svg>")
    return "\n".join(e) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/images/trace-two-nodes.svg")
    ap.add_argument("--save-json", help="also write the collected spans to this file")
    ap.add_argument("--from-json", help="draw from spans saved with --save-json; start no cluster")
    args = ap.parse_args()
    if args.from_json:
        spans = json.loads(Path(args.from_json).read_text())
    else:
        spans = collect()
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(spans, indent=1))
    check(spans)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(spans))
    nodes = sorted({s["resource"].get("service.instance.id", "") for s in spans})
    print(f"wrote {out} ({out.stat().st_size} bytes): {len(spans)} spans from {nodes}")


if __name__ == "__main__":
    main()
