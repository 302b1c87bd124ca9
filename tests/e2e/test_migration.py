"""Streams that survive a node's death: real processes on loopback (an API
node with rank 0, headless nodes with ranks 1 and 2, QUIC with mutual TLS),
killed with SIGKILL, stopped with SIGTERM, or drained by an operator while
streams run on them. Every stream must end without an error event, its text
equal to an undisturbed run's (the same request on a rank nobody touches)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from e2e_cluster import new_cluster
from e2e_util import need, sse_json_events, wait_until

httpx = need("httpx")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "hobbies": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "hobbies"]}


def payloads(max_tokens: int) -> list[dict]:
    """Greedy, seeded-sampled with n=2 and logprobs and a stop string, and JSON-schema requests."""
    return [
        {"prompt": "Write a very long essay about rivers.", "max_tokens": max_tokens, "temperature": 0,
         "ignore_eos": True},
        {"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0.9, "seed": 1234, "n": 2,
         "logprobs": 1, "stop": ["\n\n\n"], "ignore_eos": True},
        {"prompt": "Describe a person as JSON:", "max_tokens": max_tokens, "temperature": 0,
         "structured_outputs": {"json": SCHEMA}},
    ]


class Stream:
    """One streamed completion, read on a thread; `seen` counts its chunks."""

    def __init__(self, url: str, payload: dict, headers: dict | None = None):
        self.seen = 0
        self.events: list[dict] = []
        self.error: Exception | None = None
        self._t = threading.Thread(target=self._run, args=(url, payload, headers or {}), daemon=True)
        self._t.start()

    def _run(self, url, payload, headers):
        try:
            body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
            with httpx.Client(timeout=180) as c:
                with c.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
                    raw = ""
                    for chunk in r.iter_text():
                        raw += chunk
                        self.seen = raw.count("data: ")
            self.events = sse_json_events(raw)
        except Exception as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def result(self, timeout: float = 180) -> dict:
        self._t.join(timeout)
        assert not self._t.is_alive(), "the stream did not end in time"
        if self.error:
            raise self.error
        return summarize(self.events)


def summarize(events: list[dict]) -> dict:
    """Per choice: text, tokens with logprobs, finish reason; plus usage and errors."""
    out = {"errors": [e for e in events if "error" in e], "choices": {}, "usage": None}
    for e in events:
        if e.get("usage"):
            out["usage"] = e["usage"]
        for c in e.get("choices", []):
            ch = out["choices"].setdefault(c["index"], {"text": "", "tokens": [], "finish": None})
            ch["text"] += c.get("text") or ""
            lp = c.get("logprobs") or {}
            ch["tokens"] += list(zip(lp.get("tokens") or [], lp.get("token_logprobs") or []))
            ch["finish"] = c.get("finish_reason") or ch["finish"]
    return out


def reference(url: str, payload: dict, rank: int) -> dict:
    """The same request, streamed undisturbed on `rank`."""
    return Stream(url, payload, {"X-data-parallel-rank": str(rank)}).result()


def assert_same(got: dict, want: dict, what: str) -> None:
    assert not got["errors"], f"{what}: error events {got['errors']}"
    assert got["choices"].keys() == want["choices"].keys(), what
    for k, w in want["choices"].items():
        g = got["choices"][k]
        assert g["text"] == w["text"], f"{what} choice {k}: {g['text']!r} != undisturbed {w['text']!r}"
        assert g["finish"] == w["finish"], f"{what} choice {k}"
        assert [t for t, _ in g["tokens"]] == [t for t, _ in w["tokens"]], f"{what} choice {k}: logprob tokens"
    counts = lambda u: u and (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])  # noqa: E731
    assert counts(got["usage"]) == counts(want["usage"]), f"{what}: usage {got['usage']} != {want['usage']}"


@pytest.fixture(scope="module")
def cluster():
    c = new_cluster(3)
    try:
        c.headless("node-a", 1, 1).start()
        c.headless("node-b", 2, 1).start()
        c.api_node(0, 1, extra=["--shutdown-timeout", "2"]).start()
        c.wait_healthy()
        yield c
    finally:
        c.stop()


def start_streams(c, rank: int, max_tokens: int) -> tuple[list[dict], list[Stream]]:
    ps = payloads(max_tokens)
    streams = [Stream(c.url, p, {"X-data-parallel-rank": str(rank)}) for p in ps]
    # Mid-stream: every stream has delivered some tokens.
    assert wait_until(lambda: all(s.seen >= 4 for s in streams), 120, what="streams under way"), \
        [s.seen for s in streams]
    return ps, streams


def counter(c, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in c.metrics_text().splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.timeout(400)
def test_kill9_mid_stream_moves_every_stream_and_the_text_is_an_undisturbed_runs(cluster):
    before = counter(cluster, "ferry:migrations_total")
    ps, streams = start_streams(cluster, 2, 96)
    cluster.nodes["node-b"].kill9()
    got = [s.result() for s in streams]
    want = [reference(cluster.url, p, 1) for p in ps]
    for g, w, p in zip(got, want, ps):
        assert_same(g, w, p["prompt"])
    assert counter(cluster, "ferry:migrations_total") >= before + 2
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 0.0], 10), cluster.ranks_up()
    cluster.nodes["node-b"].start()
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 90, what="node-b back"), cluster.logs()


@pytest.mark.timeout(400)
def test_sigterm_on_a_headless_node_mid_load_fails_nothing(cluster):
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 90, what="all ranks up")
    # Longer than the node's drain timeout (5 s): what is left moves when it exits.
    ps, streams = start_streams(cluster, 1, 400)
    unpinned = [Stream(cluster.url, {"prompt": f"Item {k}:", "max_tokens": 32, "temperature": 0}) for k in range(4)]
    rc = cluster.nodes["node-a"].term(timeout=60)
    assert rc == 0, cluster.nodes["node-a"].text()[-2000:]
    for s, p in zip(streams, ps):
        r = s.result()
        assert not r["errors"], r["errors"]
        assert all(ch["finish"] in ("length", "stop") for ch in r["choices"].values()), r["choices"]
    for s in unpinned:
        assert not s.result()["errors"]
    cluster.nodes["node-a"].start()
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 90, what="node-a back"), cluster.logs()


@pytest.mark.timeout(400)
def test_an_operator_drain_of_one_rank_moves_what_is_left_and_sends_it_nothing_new(cluster):
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 90, what="all ranks up")
    ps, streams = start_streams(cluster, 2, 160)
    r = httpx.post(cluster.url + "/v1/admin/ranks/2/drain", timeout=10)
    assert r.status_code == 202, r.text
    assert r.json()["rank"] == 2 and r.json()["in_flight"] >= 1
    assert httpx.post(cluster.url + "/v1/admin/ranks/9/drain", timeout=10).status_code == 404
    got = [s.result() for s in streams]
    want = [reference(cluster.url, p, 0) for p in ps]
    for g, w, p in zip(got, want, ps):
        assert_same(g, w, p["prompt"])
    ranks = httpx.get(cluster.url + "/v1/admin/ranks", timeout=10).json()["data"]
    assert ranks[2]["draining"] is True and ranks[0]["draining"] is False, ranks
    # Nothing new goes to the drained rank.
    before = cluster.generation_tokens()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        fresh = list(pool.map(lambda k: httpx.post(cluster.url + "/v1/completions", timeout=120, json={
            "prompt": f"Fact {k}:", "max_tokens": 4, "temperature": 0}), range(6)))
    assert all(f.status_code == 200 for f in fresh)
    after = cluster.generation_tokens()
    assert after[2] == before[2] and after[0] + after[1] - before[0] - before[1] == 6 * 4, (before, after)


@pytest.mark.timeout(300)
def test_a_rank_killed_before_the_first_token_is_retried_elsewhere(cluster):
    # Restart node-b (drained above) so rank 2 takes requests again.
    cluster.nodes["node-b"].kill9()
    assert wait_until(lambda: cluster.ranks_up()[2] == 0.0, 10, what="node-b seen down")
    cluster.nodes["node-b"].start()
    assert wait_until(lambda: cluster.ranks_up() == [1.0, 1.0, 1.0], 90, what="node-b back"), cluster.logs()
    before = counter(cluster, "ferry:request_retries_total")
    # Fill rank 2's sequence slots (--max-num-seqs 16) so the request waits in
    # its queue, surely before its first token, when the node dies.
    fillers = [Stream(cluster.url, {"prompt": f"List {k}:", "max_tokens": 100, "temperature": 0, "ignore_eos": True},
                      {"X-data-parallel-rank": "2"}) for k in range(16)]
    assert wait_until(lambda: all(f.seen >= 2 or f.error for f in fillers), 120, what="rank 2 full"), \
        [(f.seen, f.error) for f in fillers]
    payload = {"prompt": "The first token of this request never came from rank 2:", "max_tokens": 8, "temperature": 0}
    s = Stream(cluster.url, payload, {"X-data-parallel-rank": "2"})
    time.sleep(0.3)
    assert s.seen == 0, "the request should wait behind the fillers"
    cluster.nodes["node-b"].kill9()
    got = s.result()
    want = reference(cluster.url, payload, 0)
    assert_same(got, want, "retried")
    assert counter(cluster, "ferry:request_retries_total") >= before + 1
    for f in fillers:
        assert not f.result()["errors"]


@pytest.mark.timeout(300)
def test_with_migration_off_a_kill_gives_the_error_events_of_before(tmp_path):
    c = new_cluster(2)
    try:
        c.headless("node-a", 1, 1).start()
        c.api_node(0, 1, extra=["--migration-limit", "0"]).start()
        c.wait_healthy()
        s = Stream(c.url, payloads(200)[0], {"X-data-parallel-rank": "1"})
        assert wait_until(lambda: s.seen >= 4, 60, what="under way")
        c.nodes["node-a"].kill9()
        r = s.result()
        assert r["errors"] and r["errors"][0]["error"]["code"] == 503, r
    finally:
        c.stop()
