"""Multi-process clusters on loopback: `ferry certs` material, an API node and
headless nodes as real processes (each standing for a machine), started, killed
with SIGKILL and restarted by the tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from e2e_server import REPO, SetupError, _ANSI, default_model, ferry_binary
from e2e_util import free_tcp_port, free_tcp_udp_port, need

# Small caches and one thread per process: three nodes share a 2-core machine.
ENGINE_ARGS = ["--threads", "1", "--max-model-len", "512", "--max-num-seqs", "16",
               "--kv-cache-memory-bytes", str(48 << 20), "--seed", "0"]


def run_certs(*args: str) -> None:
    subprocess.run([str(ferry_binary()), "certs", *args], check=True, capture_output=True, timeout=60)


@dataclass
class Node:
    name: str
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)

    def start(self) -> "Node":
        env = dict(os.environ, NO_COLOR="1", RUST_BACKTRACE="1", FERRY_LOG=os.environ.get("FERRY_LOG", "info"), **self.env)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([str(ferry_binary()), "serve", *self.args], cwd=str(REPO), env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        out.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def term(self, timeout: float = 30) -> int:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.kill9()

    def text(self) -> str:
        try:
            return _ANSI.sub("", self.log.read_text(errors="replace"))
        except OSError:
            return ""


@dataclass
class Cluster:
    dir: Path
    model: Path
    size: int
    port: int
    tls_port: int
    rpc_port: int
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cert_dir(self, name: str, ca: str = "ca") -> Path:
        d = self.dir / f"{ca}-{name}"
        if not d.exists():
            run_certs("node", "--ca-dir", str(self.dir / ca), "--dir", str(d), "--name", name, "--san", "127.0.0.1")
        return d

    def dp_flags(self, start: int, local: int, rpc_port: int | None = None) -> list[str]:
        return ["--data-parallel-size", str(self.size), "--data-parallel-size-local", str(local),
                "--data-parallel-start-rank", str(start), "--data-parallel-address", "127.0.0.1",
                "--data-parallel-rpc-port", str(rpc_port or self.rpc_port)]

    def api_node(self, start: int, local: int, extra: list[str] | None = None, engine: list[str] | None = None) -> Node:
        args = [str(self.model), "--host", "127.0.0.1", "--port", str(self.port), "--tls-port", str(self.tls_port),
                *self.dp_flags(start, local), "--cluster-cert-dir", str(self.cert_dir("api")),
                "--cert-dir", str(self.dir / "tls"), *(ENGINE_ARGS if engine is None else engine), *(extra or [])]
        n = Node("api", args, self.dir / "api.log")
        self.nodes["api"] = n
        return n

    def headless(self, name: str, start: int, local: int, cert: list[str] | None = None,
                 extra: list[str] | None = None, rpc_port: int | None = None, env: dict | None = None) -> Node:
        """A headless node; `rpc_port` dials another port than the API node's (a relay)."""
        tls = cert if cert is not None else ["--cluster-cert-dir", str(self.cert_dir(name))]
        args = [str(self.model), "--headless", *self.dp_flags(start, local, rpc_port), *tls, *ENGINE_ARGS, *(extra or [])]
        n = Node(name, args, self.dir / f"{name}.log", env=env or {})
        self.nodes[name] = n
        return n

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {k} ---\n" + "\n".join(n.text().splitlines()[-40:]) for k, n in self.nodes.items())

    def health(self) -> int:
        httpx = need("httpx")
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def metrics_text(self) -> str:
        httpx = need("httpx")
        return httpx.get(self.url + "/metrics", timeout=10).text

    def per_rank(self, metric: str) -> list[float]:
        """`metric`'s value for each engine label 0..size-1, summed over its other
        labels (0 where absent)."""
        out = [0.0] * self.size
        pat = re.compile(re.escape(metric) + r'\{[^}]*engine="(\d+)"[^}]*\} (\S+)$')
        for line in self.metrics_text().splitlines():
            m = pat.match(line)
            if m and int(m.group(1)) < self.size:
                out[int(m.group(1))] += float(m.group(2))
        return out

    def ranks_up(self) -> list[float]:
        return self.per_rank("ferry:engine_up")

    def generation_tokens(self) -> list[float]:
        return self.per_rank("vllm:generation_tokens_total")

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.health() != 200:
            for n in self.nodes.values():
                if not n.alive():
                    raise SetupError(f"node {n.name} exited ({n.proc.returncode}) before the cluster was healthy\n"
                                     + self.logs())
            if time.monotonic() > deadline:
                raise SetupError("cluster not healthy in time\n" + self.logs())
            time.sleep(0.2)


def new_cluster(size: int) -> Cluster:
    d = Path(tempfile.mkdtemp(prefix="ferry-e2e-cluster-"))
    run_certs("ca", "--dir", str(d / "ca"))
    run_certs("ca", "--dir", str(d / "other-ca"))
    port = free_tcp_port()
    tls = free_tcp_udp_port()
    rpc = free_tcp_udp_port()
    while len({port, tls, rpc}) < 3:
        rpc = free_tcp_udp_port()
    return Cluster(dir=d, model=default_model(), size=size, port=port, tls_port=tls, rpc_port=rpc)
