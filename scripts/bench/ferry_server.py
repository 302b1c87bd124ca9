"""Starting a local `ferry serve` for a bench script and waiting until it
answers: one place for the flags every bench server takes (loopback, its own
TLS port and certificate folder, 2 threads unless told); and reading a
server's speculative-decoding counters off /metrics."""

from __future__ import annotations

import subprocess
import tempfile
import time
import urllib.request


def start_ferry(binary: str, model: str, port: int, *extra: str, threads: str = "2",
                wait_s: float = 120.0) -> subprocess.Popen:
    """Starts `binary serve model` on 127.0.0.1:port (TLS on port + 100, a
    fresh certificate folder) with `extra` flags, and returns once /health
    answers (raising if it does not within `wait_s` or the process ends)."""
    p = subprocess.Popen([binary, "serve", model, "--host", "127.0.0.1", "--port", str(port),
                          "--tls-port", str(port + 100), "--cert-dir", tempfile.mkdtemp(),
                          "--threads", threads, *extra],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"ferry serve exited with {p.returncode} before answering")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return p
        except OSError:
            time.sleep(0.2)
    p.kill()
    raise RuntimeError(f"ferry serve did not answer on port {port} within {wait_s:.0f} s")


def spec_counters(port: int) -> dict[str, float]:
    """The server's vLLM speculative counters (`vllm:spec_decode_num_*_total`,
    the per-position ones left out), summed over their labels, by the name's
    middle part: drafts, draft_tokens, accepted_tokens."""
    out: dict[str, float] = {}
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    for line in text.splitlines():
        if line.startswith("vllm:spec_decode_num_") and "per_pos" not in line:
            name = line.split("{")[0].split(" ")[0].removeprefix("vllm:spec_decode_num_").removesuffix("_total")
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
