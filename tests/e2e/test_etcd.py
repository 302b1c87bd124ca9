"""Membership on etcd (`--etcd-endpoints`), with a real etcd (Debian's
etcd-server) on loopback and real processes: headless nodes given no API
address find both API nodes in etcd, ask one for a rank number and serve both;
a headless node killed with kill -9 leaves `/metrics` once its lease ends; a
node restarted with the same rank rejoins; an API node that appears later is
dialed by the nodes already running."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import time

import pytest

from e2e_cluster import ENGINE_ARGS, Cluster, Node, new_cluster
from e2e_util import free_tcp_port, free_tcp_udp_port, need, wait_until
from test_elastic import body, health, metric_ranks

httpx = need("httpx")

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="no etcd binary (CI installs Debian's etcd-server)")


def start_etcd(c: Cluster) -> tuple[subprocess.Popen, str]:
    client, peer = free_tcp_port(), free_tcp_port()
    url = f"http://127.0.0.1:{client}"
    log = open(c.dir / "etcd.log", "ab")
    proc = subprocess.Popen(
        [ETCD, "--name", "e2e", "--data-dir", str(c.dir / "etcd-data"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"e2e=http://127.0.0.1:{peer}"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    ok = wait_until(lambda: _etcd_up(url), 30, what="etcd up")
    assert ok, (c.dir / "etcd.log").read_text()[-2000:]
    return proc, url


def _etcd_up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def etcd_put(url: str, key: str, value: str) -> None:
    """Puts a key through etcd's own JSON gateway (no lease: it stays)."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()
    r = httpx.post(url + "/v3/kv/put", json={"key": b64(key), "value": b64(value)}, timeout=10)
    assert r.status_code == 200, r.text


def api_node(c: Cluster, name: str, etcd: str, port: int, rpc: int) -> Node:
    args = [str(c.model), "--host", "127.0.0.1", "--port", str(port), "--tls-port", str(free_tcp_udp_port()),
            "--data-parallel-size", "1", "--data-parallel-size-local", "0", "--data-parallel-elastic",
            "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc),
            "--etcd-endpoints", etcd, "--cluster-cert-dir", str(c.cert_dir("api")), "--cert-dir", str(c.dir / "tls"),
            *ENGINE_ARGS]
    n = Node(name, args, c.dir / f"{name}.log")
    c.nodes[name] = n
    return n


def engine_node(c: Cluster, name: str, etcd: str, rank: str, first_api_rpc: int | None = None) -> Node:
    """A headless node that finds the API nodes in etcd (told of none, or
    of the one at `first_api_rpc`, which it then asks first)."""
    told = [] if first_api_rpc is None else ["--data-parallel-address", "127.0.0.1",
                                             "--data-parallel-rpc-port", str(first_api_rpc)]
    args = [str(c.model), "--headless", "--data-parallel-size-local", "1", "--data-parallel-start-rank", rank,
            *told, "--etcd-endpoints", etcd, "--cluster-cert-dir", str(c.cert_dir(name)), *ENGINE_ARGS]
    n = Node(name, args, c.dir / f"{name}.log")
    c.nodes[name] = n
    return n


@pytest.mark.timeout(400)
def test_nodes_find_each_other_in_etcd_and_leave_it_with_their_lease():
    c = new_cluster(1)
    etcd = None
    try:
        etcd, etcd_url = start_etcd(c)
        port_a, rpc_a = c.port, c.rpc_port
        port_b, rpc_b = free_tcp_port(), free_tcp_udp_port()
        url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
        # Rank number 0 is claimed already (as another API node's assignment
        # would be, before its node registered): no API node hands it out.
        etcd_put(etcd_url, "/ferry/ranks/0", "another-node#0")
        a = api_node(c, "api-a", etcd_url, port_a, rpc_a).start()
        # Both headless nodes ask for rank numbers; neither is told an address.
        n0 = engine_node(c, "node-0", etcd_url, "auto").start()
        n1 = engine_node(c, "node-1", etcd_url, "auto").start()
        assert wait_until(lambda: health(url_a) == 200 and sorted(metric_ranks(url_a)) == [1, 2], 90,
                          what="both ranks on A"), c.logs()
        assert all("registered in etcd" in n.text() for n in (a, n0, n1)), c.logs()
        # A second API node registers later: the running nodes dial it too,
        # with the rank numbers A gave them.
        b = api_node(c, "api-b", etcd_url, port_b, rpc_b).start()
        assert wait_until(lambda: health(url_b) == 200 and metric_ranks(url_b) == {1: 1.0, 2: 1.0}, 90,
                          what="both ranks on B"), c.logs()
        for rank in ("1", "2"):
            texts = [httpx.post(u + "/v1/completions", json=body("The capital of France is", 6),
                                headers={"X-data-parallel-rank": rank}, timeout=60) for u in (url_a, url_b)]
            assert all(t.status_code == 200 for t in texts), [t.text for t in texts]
            assert texts[0].json()["choices"][0]["text"] == texts[1].json()["choices"][0]["text"]
        # kill -9: the links see it first (down), then the lease ends and
        # the rank is no longer a member on either API node.
        # node-0's number is whichever the API node gave it.
        m = re.search(r"assigned rank (\d+)", n0.text())
        assert m, n0.text()[-2000:]
        victim, node = int(m.group(1)), n0
        node.kill9()
        killed = time.monotonic()
        for u in (url_a, url_b):
            assert wait_until(lambda u=u: victim not in metric_ranks(u), 30, what=f"rank {victim} gone from {u}"), \
                (metric_ranks(u), c.logs())
        gone_after = time.monotonic() - killed
        assert gone_after < 25, f"the killed node stayed a member for {gone_after:.1f}s"
        assert "no longer members" in a.text() or "did not come back" in a.text(), a.text()[-2000:]
        # Restarted with its rank number given, it rejoins both.
        again = engine_node(c, f"node-{victim}-again", etcd_url, str(victim)).start()
        for u in (url_a, url_b):
            assert wait_until(lambda u=u: metric_ranks(u).get(victim) == 1.0, 60, what=f"rank {victim} back on {u}"), \
                c.logs()
        r = httpx.post(url_b + "/v1/completions", json=body("Hello", 4), headers={"X-data-parallel-rank": str(victim)},
                       timeout=60)
        assert r.status_code == 200, r.text
        # SIGTERM: the node drains, revokes its lease and leaves at once.
        assert again.term(timeout=60) == 0, again.text()[-2000:]
        for u in (url_a, url_b):
            assert wait_until(lambda u=u: victim not in metric_ranks(u), 10, what="left"), metric_ranks(u)
    finally:
        c.stop()
        if etcd is not None:
            etcd.kill()
            etcd.wait(timeout=10)


@pytest.mark.timeout(300)
def test_two_api_nodes_asked_at_once_hand_out_different_numbers():
    """Two nodes join together, each asking a different API node first: they
    get different numbers (from the other's registration, or, if both ask
    within the same moment, from the claim in etcd that only one API node
    wins; the pre-claimed number above and the unit tests of
    `engines::numbering` pin that path), and both API nodes end up with
    both ranks."""
    c = new_cluster(1)
    etcd = None
    try:
        etcd, etcd_url = start_etcd(c)
        port_b, rpc_b = free_tcp_port(), free_tcp_udp_port()
        url_a, url_b = f"http://127.0.0.1:{c.port}", f"http://127.0.0.1:{port_b}"
        api_node(c, "api-a", etcd_url, c.port, c.rpc_port).start()
        api_node(c, "api-b", etcd_url, port_b, rpc_b).start()
        assert wait_until(lambda: all(health(u) in (200, 503) for u in (url_a, url_b)), 60, what="API nodes up"), c.logs()
        nodes = [engine_node(c, "node-a", etcd_url, "auto", c.rpc_port), engine_node(c, "node-b", etcd_url, "auto", rpc_b)]
        for n in nodes:
            n.start()
        for u in (url_a, url_b):
            assert wait_until(lambda u=u: metric_ranks(u) == {0: 1.0, 1: 1.0}, 90, what=f"both ranks on {u}"), \
                (metric_ranks(u), c.logs())
        numbers = [re.search(r"assigned rank (\d+)", n.text()) for n in nodes]
        assert all(numbers) and {int(m.group(1)) for m in numbers} == {0, 1}, [n.text()[-1500:] for n in nodes]
    finally:
        c.stop()
        if etcd is not None:
            etcd.kill()
            etcd.wait(timeout=10)


def test_an_unreachable_etcd_stops_a_node_at_start_with_the_reason(tmp_path):
    c = new_cluster(1)
    try:
        dead = f"http://127.0.0.1:{free_tcp_port()}"
        n = api_node(c, "api", dead, c.port, c.rpc_port).start()
        assert wait_until(lambda: not n.alive(), 60, what="the node exits"), n.text()[-2000:]
        assert n.proc.returncode != 0
        assert "cannot reach etcd" in n.text(), n.text()[-2000:]
    finally:
        c.stop()
