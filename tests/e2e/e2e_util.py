"""Small helpers shared by the end-to-end tests: free ports, SSE and Prometheus
parsing, the OpenAI error shape, certificate pins, and clear failures when a
client library is missing."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import re
import socket
import time
from typing import Any, Callable

import pytest

REQUIREMENTS_HINT = "install the test clients with: python3 -m pip install -r tests/requirements.txt"


def need(module: str) -> Any:
    """Import a client library or fail the test with a message that says how to
    get it (a missing client must not turn into a silent skip)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the machine
        pytest.fail(f"the e2e tests need the Python module {module!r} ({e}); {REQUIREMENTS_HINT}",
                    pytrace=False)


# ------------------------------------------------------------------ ports


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_udp_port(tries: int = 50) -> int:
    """A port number free on both TCP and UDP (TLS and HTTP/3 share it)."""
    for _ in range(tries):
        port = free_tcp_port()
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both TCP and UDP")


# ------------------------------------------------------------------ SSE


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of an SSE stream, in order (multi-line events joined)."""
    out: list[str] = []
    cur: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if cur:
                out.append("\n".join(cur))
                cur = []
        elif line.startswith("data:"):
            v = line[5:]
            cur.append(v[1:] if v.startswith(" ") else v)
    if cur:
        out.append("\n".join(cur))
    return out


def sse_json_events(text: str) -> list[dict]:
    """Parse an OpenAI SSE body: every event is JSON but the last, `[DONE]`."""
    payloads = sse_payloads(text)
    assert payloads, f"no SSE events in the body: {text[:500]!r}"
    assert payloads[-1] == "[DONE]", f"stream does not end with data: [DONE]; last events: {payloads[-3:]!r}"
    assert payloads.count("[DONE]") == 1, "more than one [DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def completion_stream_text(events: list[dict]) -> str:
    """Concatenate the text of choice 0 of /v1/completions chunks."""
    return "".join(c.get("text") or "" for e in events for c in e.get("choices", []) if c.get("index", 0) == 0)


def chat_stream_text(events: list[dict]) -> str:
    return "".join((c.get("delta") or {}).get("content") or ""
                   for e in events for c in e.get("choices", []) if c.get("index", 0) == 0)


# ------------------------------------------------------------------ Prometheus

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def prom_samples(text: str) -> dict[str, list[float]]:
    """Metric name -> the values of all its label sets (comments skipped)."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            out.setdefault(m.group(1), []).append(float(m.group(3)))
    return out


def prom_value(text: str, name: str) -> float:
    """Sum of a gauge over its label sets (one per engine rank)."""
    s = prom_samples(text)
    assert name in s, f"/metrics has no {name}; it has: {sorted(s)[:40]}"
    return sum(s[name])


# ------------------------------------------------------------------ errors


def assert_openai_error(status: int, body: Any, expected_status: int, *, mentions: tuple[str, ...] = ()) -> dict:
    """Check status and the body `{"error": {"message","type","param","code"}}`."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except ValueError:
            pytest.fail(f"expected an OpenAI error JSON body with status {expected_status}, got status {status} "
                        f"and a non-JSON body: {body[:300]!r}")
    assert status == expected_status, f"expected status {expected_status}, got {status}: {body}"
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not OpenAI's error shape: {body}"
    err = body["error"]
    for k in ("message", "type", "param", "code"):
        assert k in err, f"error object lacks {k!r}: {err}"
    assert isinstance(err["message"], str) and err["message"], f"empty error message: {err}"
    assert isinstance(err["type"], str) and err["type"], f"empty error type: {err}"
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or str(err["code"]) == str(expected_status) or isinstance(err["code"], str), err
    text = (err["message"] + " " + (err["param"] or "")).lower()
    for m in mentions:
        assert m.lower() in text, f"error should mention {m!r}: {err}"
    return err


# ------------------------------------------------------------------ certificates


def spki_pin_of_pem(pem_path: str) -> str:
    """Base64 SHA-256 of the certificate's SubjectPublicKeyInfo (Chromium's pin)."""
    x509 = need("cryptography.x509")
    ser = need("cryptography.hazmat.primitives.serialization")
    with open(pem_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return spki_pin_of_cert(cert)


def spki_pin_of_cert(cert: Any) -> str:
    ser = need("cryptography.hazmat.primitives.serialization")
    der = cert.public_key().public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


# ------------------------------------------------------------------ polling


def wait_until(pred: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll `pred` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() > deadline:
            return last
        time.sleep(interval)
