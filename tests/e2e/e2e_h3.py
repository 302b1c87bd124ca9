"""A small HTTP/3 client on aioquic's H3Connection (asyncio), with the two ways
the tests trust ferry's self-signed certificate: the certificate file as a CA,
or the SPKI pin the server printed (verification off, pin compared after the
handshake). It can also reset a request stream or close the connection
mid-response, for the disconnect tests."""

from __future__ import annotations

import asyncio
import json
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

from e2e_util import need, spki_pin_of_cert

need("aioquic")
from aioquic.asyncio import connect  # noqa: E402
from aioquic.asyncio.protocol import QuicConnectionProtocol  # noqa: E402
from aioquic.h3.connection import H3_ALPN, H3Connection  # noqa: E402
from aioquic.h3.events import DataReceived, HeadersReceived  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.events import ConnectionTerminated, StreamReset  # noqa: E402

# RFC 9114 error code a client uses to give up on a request.
H3_REQUEST_CANCELLED = 0x10C


class H3Error(RuntimeError):
    pass


@dataclass
class H3Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    alpn: str | None = None
    extras: dict = field(default_factory=dict)

    def json(self):
        return json.loads(self.body)


class _Protocol(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.queues: dict[int, asyncio.Queue] = {}

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            for q in self.queues.values():
                q.put_nowait(event)
            return
        if isinstance(event, StreamReset) and event.stream_id in self.queues:
            self.queues[event.stream_id].put_nowait(event)
        for ev in self.http.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)) and ev.stream_id in self.queues:
                self.queues[ev.stream_id].put_nowait(ev)


class H3Client:
    """One QUIC connection; `request` and `stream` send requests over it."""

    def __init__(self, proto: _Protocol, authority: str):
        self.proto = proto
        self.authority = authority

    @property
    def alpn(self) -> str | None:
        return self.proto._quic.tls.alpn_negotiated

    def peer_pin(self) -> str:
        cert = getattr(self.proto._quic.tls, "_peer_certificate", None)
        if cert is None:
            raise H3Error("aioquic did not expose the server certificate (tls._peer_certificate)")
        return spki_pin_of_cert(cert)

    def _send(self, method: str, path: str, headers: dict[str, str] | None, body: bytes | None) -> tuple[int, asyncio.Queue]:
        quic = self.proto._quic
        sid = quic.get_next_available_stream_id()
        q: asyncio.Queue = asyncio.Queue()
        self.proto.queues[sid] = q
        hdrs = [(b":method", method.encode()), (b":scheme", b"https"),
                (b":authority", self.authority.encode()), (b":path", path.encode()),
                (b"user-agent", b"ferry-e2e-aioquic")]
        for k, v in (headers or {}).items():
            hdrs.append((k.lower().encode(), v.encode()))
        if body is not None:
            hdrs.append((b"content-length", str(len(body)).encode()))
        self.proto.http.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.proto.http.send_data(sid, body, end_stream=True)
        self.proto.transmit()
        return sid, q

    async def _next(self, q: asyncio.Queue, timeout: float):
        ev = await asyncio.wait_for(q.get(), timeout)
        if isinstance(ev, ConnectionTerminated):
            raise H3Error(f"connection closed: error {ev.error_code:#x} {ev.reason_phrase!r}")
        if isinstance(ev, StreamReset):
            raise H3Error(f"server reset the stream: error {ev.error_code:#x}")
        return ev

    async def _headers(self, q: asyncio.Queue, timeout: float) -> tuple[H3Response, bool]:
        ev = await self._next(q, timeout)
        if not isinstance(ev, HeadersReceived):
            raise H3Error(f"expected response headers, got {ev!r}")
        hs = {k.decode(): v.decode() for k, v in ev.headers}
        resp = H3Response(status=int(hs.pop(":status")), headers=hs, alpn=self.alpn)
        return resp, ev.stream_ended

    async def request(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                      json_body=None, timeout: float = 60) -> H3Response:
        body = json.dumps(json_body).encode() if json_body is not None else None
        h = dict(headers or {})
        if body is not None:
            h.setdefault("content-type", "application/json")
        sid, q = self._send(method, path, h, body)
        resp, ended = await self._headers(q, timeout)
        chunks = []
        while not ended:
            ev = await self._next(q, timeout)
            if isinstance(ev, DataReceived):
                chunks.append(ev.data)
                ended = ev.stream_ended
            elif isinstance(ev, HeadersReceived):  # trailers
                ended = ev.stream_ended
        resp.body = b"".join(chunks)
        del self.proto.queues[sid]
        return resp

    async def stream(self, path: str, json_body, *, headers: dict[str, str] | None = None,
                     timeout: float = 60) -> tuple[int, H3Response, AsyncIterator[bytes]]:
        """Send a POST; return (stream id, response head, async iterator of body chunks)."""
        h = {"content-type": "application/json", "accept": "text/event-stream", **(headers or {})}
        sid, q = self._send("POST", path, h, json.dumps(json_body).encode())
        resp, ended = await self._headers(q, timeout)

        async def chunks():
            done = ended
            while not done:
                ev = await self._next(q, timeout)
                if isinstance(ev, DataReceived):
                    done = ev.stream_ended
                    if ev.data:
                        yield ev.data
                elif isinstance(ev, HeadersReceived):
                    done = ev.stream_ended
        return sid, resp, chunks()

    def reset_stream(self, sid: int) -> None:
        """Abandon a request: RESET_STREAM our half and STOP_SENDING theirs."""
        quic = self.proto._quic
        try:
            quic.reset_stream(sid, H3_REQUEST_CANCELLED)
        except Exception:  # our sending half may already be finished
            pass
        quic.stop_stream(sid, H3_REQUEST_CANCELLED)
        self.proto.transmit()

    def close(self) -> None:
        self.proto.close(error_code=0x100)  # H3_NO_ERROR


@asynccontextmanager
async def h3_connect(host: str, port: int, *, cafile: str | None = None, pin: str | None = None,
                     timeout: float = 15) -> AsyncIterator[H3Client]:
    if (cafile is None) == (pin is None):
        raise ValueError("trust the server by exactly one of cafile or pin")
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, idle_timeout=30.0)
    if cafile:
        cfg.load_verify_locations(cafile)
        cfg.verify_mode = ssl.CERT_REQUIRED
    else:
        cfg.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(timeout):
        cm = connect(host, port, configuration=cfg, create_protocol=_Protocol)
        proto = await cm.__aenter__()
    try:
        client = H3Client(proto, f"{host}:{port}")
        if pin is not None:
            got = client.peer_pin()
            if got != pin:
                raise H3Error(f"server certificate pin {got} does not match the expected {pin}")
        yield client
    finally:
        await cm.__aexit__(None, None, None)
