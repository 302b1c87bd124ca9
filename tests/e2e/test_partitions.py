"""Cluster links under a one-way partition and a stuck rank: real processes
on loopback, a UDP relay between a headless node and the API node that can
drop one direction, and a rank whose busy loop stops while its link lives."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest

from e2e_cluster import new_cluster
from e2e_util import free_tcp_udp_port, need, sse_json_events, wait_until

httpx = need("httpx")


class UdpRelay:
    """Forwards UDP datagrams between clients and 127.0.0.1:`upstream`, one
    upstream socket per client address. `drop_down` drops what goes back to
    the clients (a one-way partition); `drop_up` what goes to the server."""

    def __init__(self, upstream: int):
        self.port = free_tcp_udp_port()
        self.upstream = ("127.0.0.1", upstream)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", self.port))
        self.back: dict[tuple, socket.socket] = {}
        self.drop_down = False
        self.drop_up = False
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            socks = [self.front, *self.back.values()]
            ready, _, _ = select.select(socks, [], [], 0.1)
            for s in ready:
                try:
                    data, addr = s.recvfrom(65536)
                except OSError:  # the server's port not open yet (ICMP refused): the client retries
                    continue
                if s is self.front:
                    b = self.back.get(addr)
                    if b is None:
                        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        b.connect(self.upstream)
                        self.back[addr] = b
                    if not self.drop_up:
                        try:
                            b.send(data)
                        except OSError:
                            pass
                else:
                    client = next(a for a, b in self.back.items() if b is s)
                    if not self.drop_down:
                        self.front.sendto(data, client)

    def close(self):
        self._stop = True
        self._t.join(2)
        for s in [self.front, *self.back.values()]:
            s.close()


def stream(url: str, payload: dict, headers: dict) -> list[dict]:
    with httpx.Client(timeout=180) as c:
        with c.stream("POST", url + "/v1/completions", json={**payload, "stream": True}, headers=headers) as r:
            raw = "".join(r.iter_text())
    return sse_json_events(raw)


@pytest.mark.timeout(300)
def test_a_one_way_partition_does_not_kill_a_node_and_it_serves_again_soon_after():
    c = new_cluster(2)
    relay = None
    try:
        relay = UdpRelay(c.rpc_port)
        node = c.headless("node-a", 1, 1, rpc_port=relay.port).start()
        c.api_node(0, 1).start()
        c.wait_healthy()
        long = {"prompt": "Write a very long essay about rivers.", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("events", stream(c.url, long, {"X-data-parallel-rank": "1"})))
        t.start()
        assert wait_until(lambda: c.per_rank("vllm:num_requests_running")[1] >= 1, 60, what="rank 1 busy")
        # The API node's packets stop reaching the node: the node times its
        # link out (3 s) and dials again while the API node still holds the
        # old link (its own timeout is 3 s after the node went quiet).
        relay.drop_down = True
        time.sleep(3.5)
        relay.drop_down = False
        healed = time.monotonic()
        assert wait_until(lambda: c.ranks_up() == [1.0, 1.0] and node.alive(), 20, interval=0.05,
                          what="rank 1 back"), (c.ranks_up(), node.alive(), c.logs())
        assert time.monotonic() - healed < 5.0, f"rank 1 took {time.monotonic() - healed:.1f}s to serve again"
        assert node.alive(), "the node must not exit on a refusal that waiting lifts"
        r = httpx.post(c.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
                       headers={"X-data-parallel-rank": "1"}, timeout=60)
        assert r.status_code == 200, r.text
        t.join(180)
        errors = [e for e in box["events"] if "error" in e]
        assert not errors, errors
    finally:
        c.stop()
        if relay:
            relay.close()


@pytest.mark.timeout(300)
def test_requests_on_a_rank_that_stops_making_progress_complete_elsewhere():
    c = new_cluster(2)
    try:
        # Rank 1's busy loop stops after a few steps; its link stays up.
        c.headless("node-a", 1, 1, env={"FERRY_FAULT_INJECT_STALL_AFTER_STEPS": "40"}).start()
        c.api_node(0, 1, extra=["--rank-stall-timeout", "3"]).start()
        c.wait_healthy()
        payload = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "ignore_eos": True}
        want = httpx.post(c.url + "/v1/completions", json=payload, headers={"X-data-parallel-rank": "0"},
                          timeout=120).json()["choices"][0]["text"]
        started = time.monotonic()
        events = stream(c.url, payload, {"X-data-parallel-rank": "1"})
        assert not [e for e in events if "error" in e], events[-3:]
        text = "".join(ch.get("text") or "" for e in events for ch in e.get("choices", []))
        assert text == want
        assert time.monotonic() - started < 60
        assert "made no progress" in c.nodes["api"].text()
    finally:
        c.stop()
