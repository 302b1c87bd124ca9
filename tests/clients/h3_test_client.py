"""HTTP/3 test client for ferry's server tests, on aioquic (PyPI).

usage: h3_test_client.py HOST PORT CAFILE MODE PATH [ARG]
modes:
  get           print one JSON line: status, headers, body
  sse           print one JSON line per DATA chunk with its arrival time, then "end"
  cancel KIND   read the first DATA chunk, then KIND = stop | reset | both | close,
                (early-KIND: wait 0.3 s instead of for data),
                print "cancelled", and hold the connection open for 5 s
  post SIZE     POST SIZE bytes, print the response like get
  bigheader N   GET with an N-byte header, print the response like get
  params        print the server's transport parameters we care about
Output is JSON lines on stdout, flushed at once (the Rust test reads them live).
"""

import asyncio
import json
import ssl
import sys
import time

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

H3_REQUEST_CANCELLED = 0x10C


def out(obj):
    print(json.dumps(obj), flush=True)


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.queues = {}

    def quic_event_received(self, event):
        for ev in self.h3.handle_event(event):
            q = self.queues.get(getattr(ev, "stream_id", None))
            if q is not None:
                q.put_nowait(ev)

    def request(self, method, authority, path, headers=(), body=b""):
        sid = self._quic.get_next_available_stream_id()
        self.queues[sid] = asyncio.Queue()
        hdrs = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ] + list(headers)
        self.h3.send_headers(sid, hdrs, end_stream=not body)
        if body:
            self.h3.send_data(sid, body, end_stream=True)
        self.transmit()
        return sid

    async def next_event(self, sid, timeout=10):
        return await asyncio.wait_for(self.queues[sid].get(), timeout)

    async def collect(self, sid):
        status, headers, body = None, {}, b""
        while True:
            ev = await self.next_event(sid)
            if isinstance(ev, HeadersReceived):
                for k, v in ev.headers:
                    if k == b":status":
                        status = int(v)
                    else:
                        headers[k.decode()] = v.decode()
            elif isinstance(ev, DataReceived):
                body += ev.data
            if ev.stream_ended:
                return status, headers, body


async def main():
    host, port, cafile, mode, path = sys.argv[1:6]
    arg = sys.argv[6] if len(sys.argv) > 6 else None
    port = int(port)
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    cfg.load_verify_locations(cafile)
    cfg.verify_mode = ssl.CERT_REQUIRED
    authority = f"localhost:{port}"
    async with connect(host, port, configuration=cfg, create_protocol=Client) as c:
        if mode == "params":
            out({"max_streams_bidi": c._quic._remote_max_streams_bidi,
                 "alpn": c._quic.tls.alpn_negotiated})
        elif mode in ("get", "post", "bigheader"):
            headers, body = [], b""
            if mode == "post":
                body = bytes(i % 251 for i in range(int(arg)))
                headers = [(b"content-type", b"application/octet-stream")]
            if mode == "bigheader":
                headers = [(b"x-big", b"a" * int(arg))]
            sid = c.request("POST" if mode == "post" else "GET", authority, path, headers, body)
            status, hdrs, data = await c.collect(sid)
            out({"status": status, "headers": hdrs, "body": data.decode("utf-8", "replace")})
        elif mode == "sse":
            sid = c.request("GET", authority, path)
            t0 = time.monotonic()
            while True:
                ev = await c.next_event(sid)
                if isinstance(ev, HeadersReceived):
                    out({"headers": {k.decode(): v.decode() for k, v in ev.headers}})
                elif isinstance(ev, DataReceived) and ev.data:
                    out({"t": time.monotonic() - t0, "data": ev.data.decode()})
                if ev.stream_ended:
                    break
            out("end")
        elif mode == "cancel":
            sid = c.request("GET", authority, path)
            if arg.startswith("early-"):
                # The handler has not answered yet: cancel before any response.
                await asyncio.sleep(0.3)
                arg = arg[len("early-"):]
            else:
                while True:
                    ev = await c.next_event(sid)
                    if isinstance(ev, DataReceived) and ev.data:
                        break
            if arg in ("stop", "both"):
                c._quic.stop_stream(sid, H3_REQUEST_CANCELLED)
            if arg in ("reset", "both"):
                c._quic.reset_stream(sid, H3_REQUEST_CANCELLED)
            if arg == "close":
                c.close()
            c.transmit()
            out("cancelled")
            await asyncio.sleep(5)
        else:
            raise SystemExit(f"unknown mode {mode}")


asyncio.run(main())
