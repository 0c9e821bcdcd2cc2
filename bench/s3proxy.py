"""A fault-injecting HTTP proxy in front of an S3 endpoint on loopback (moto's server in the tests and the
benchmarks).

Contract: ``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port unless one is given) and forwards every
request (method, path and query, headers, body) to ``upstream``, an ``http://host:port`` on loopback, over a
kept-alive connection per client connection, and streams the answer back. Its ``faults`` (a ``Faults``,
replaceable or changeable at any time, from any thread) decide per request, with a seeded random generator:

- ``slowdown``: share of requests answered ``503 SlowDown`` with S3's XML error body, never forwarded;
- ``internal``: share answered ``500 InternalError``, never forwarded;
- ``reset``: share whose connection is reset (SO_LINGER 0, then close: the client reads a TCP RST), never
  forwarded;
- ``truncate``: share of GET requests forwarded, whose answer is cut after its headers and half its body,
  then reset (a download that breaks mid-way); other requests that draw it are reset instead;
- ``slow`` / ``slow_seconds``: share delayed by that many more seconds before forwarding;
- ``latency_seconds`` / ``jitter_seconds``: added to every request before forwarding, uniform in
  latency +- jitter (a remote store's round trip; 0.02 s is a same-region S3 GET's first byte);
- ``paths_with``: only requests whose path contains it draw faults (all are delayed), such as ``".tar"``
  for an outage of the shards alone.

A request draws one fault at most (503, 500, reset, truncate, in that order of the shares). ``counts`` holds
how many requests came in and how many of each fault were injected; ``faulted`` how many faults each request
line (``"GET /bucket/key"``) drew. Only loopback addresses are accepted as
upstream, and the proxy listens on loopback only.
"""

from __future__ import annotations

import http.client
import io
import random
import socket
import struct
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlparse

# Headers that belong to one connection, not to the message: never forwarded either way.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
# Bytes per write when streaming an answer back.
_CHUNK = 64 * 1024
# Pending connections the listening socket queues: S3 clients open a few dozen at once (every read thread of
# every worker); the default of 5 drops SYNs, which costs the client a 1 s retransmission each.
_BACKLOG = 256

_ERROR_BODIES = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Faults:
    """What the proxy does to requests; shares are fractions of requests, in [0, 1]."""

    slowdown: float = 0.0
    internal: float = 0.0
    reset: float = 0.0
    truncate: float = 0.0
    slow: float = 0.0
    slow_seconds: float = 0.5
    latency_seconds: float = 0.0
    jitter_seconds: float = 0.0
    # Only requests whose path contains this are faulted (latency applies to all); empty: every request.
    paths_with: str = ""

    def __post_init__(self) -> None:
        if self.slowdown + self.internal + self.reset + self.truncate > 1.0:
            raise ValueError("fault shares add up to more than 1")

    @classmethod
    def mixed(cls, rate: float, **more: Any) -> Faults:
        """``rate`` of the requests failing, split evenly between 503, 500, reset and truncated answers."""
        return cls(slowdown=rate / 4, internal=rate / 4, reset=rate / 4, truncate=rate / 4, **more)


class FaultProxy:
    """See the module docstring. Use as a context manager, or ``start()`` / ``stop()``."""

    def __init__(self, upstream: str, faults: Faults | None = None, *, seed: int = 0, port: int = 0):
        parsed = urlparse(upstream)
        if parsed.scheme != "http" or parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream must be http:// on loopback, not {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.faults = faults or Faults()
        self.counts: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = _BACKLOG

        self._server = Server(("127.0.0.1", port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set(self, **changes: Any) -> None:
        """Change some fault settings; the rest stay."""
        self.faults = replace(self.faults, **changes)

    def reset(self, faults: Faults | None = None, *, seed: int = 0) -> None:
        """New faults (none by default), the generator seeded again, the counts zeroed."""
        with self._lock:
            self.faults = faults or Faults()
            self._rng.seed(seed)
            self.counts.clear()
            self.faulted.clear()

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _draw(self, method: str, path: str) -> tuple[str, float]:
        """The fault for one request ('' for none) and the seconds to wait before forwarding it."""
        f = self.faults
        with self._lock:
            self.counts["requests"] += 1
            x = self._rng.random()
            delay = f.latency_seconds + (
                self._rng.uniform(-f.jitter_seconds, f.jitter_seconds) if f.jitter_seconds else 0.0
            )
            if f.slow and self._rng.random() < f.slow:
                delay += f.slow_seconds
                self.counts["slow"] += 1
            fault = ""
            if f.paths_with and f.paths_with not in path:
                x = 1.0  # the draw is made all the same, so that a seed gives the same sequence either way
            for name, share in (
                ("slowdown", f.slowdown),
                ("internal", f.internal),
                ("reset", f.reset),
                ("truncate", f.truncate),
            ):
                if x < share:
                    fault = name
                    break
                x -= share
            if fault == "truncate" and method != "GET":
                fault = "reset"  # only a download can be cut half-way: a connection lost instead, same rate
            if fault:
                self.counts[fault] += 1
                self.faulted[f"{method} {path}"] += 1
        return fault, max(0.0, delay)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    # HTTP/1.1: clients keep their connections alive, as they do with S3 itself.
    protocol_version = "HTTP/1.1"
    _upstream: http.client.HTTPConnection | None = None

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm holds the second
        # write until the client's delayed ACK (40 ms on Linux), a latency the proxy must not add by itself.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per request would drown the test output

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _proxy(self) -> None:
        body = self._read_body()  # always, so that the connection stays in step whatever the fault
        fault, delay = self.owner._draw(self.command, self.path)
        if delay:
            threading.Event().wait(delay)
        if fault == "reset":
            self._reset()
            return
        if fault in ("slowdown", "internal"):
            self._error(503 if fault == "slowdown" else 500)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        try:
            response = self._forward(headers, body)
        except (OSError, http.client.HTTPException) as e:
            self._error(502, "BadGateway", f"upstream: {type(e).__name__}")
            return
        self._relay(response, truncate=fault == "truncate")

    def _forward(self, headers: dict[str, str], body: bytes) -> http.client.HTTPResponse:
        # One retry on a fresh connection: the upstream may have closed an idle kept-alive one.
        for attempt in (0, 1):
            if self._upstream is None:
                self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
                self._upstream.connect()
                self._upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._upstream.request(self.command, self.path, body=body, headers=headers)
                return self._upstream.getresponse()
            except (OSError, http.client.HTTPException):
                self._upstream.close()
                self._upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _relay(self, response: http.client.HTTPResponse, *, truncate: bool) -> None:
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        length = response.getheader("Content-Length")
        if has_body and length is None:
            data = response.read()  # the upstream streamed it chunked: send it with a length
            length, chunks = str(len(data)), iter((data,))
        else:
            chunks = iter(lambda: response.read(_CHUNK), b"") if has_body else iter(())
        self.send_response_only(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        if length is not None:
            self.send_header("Content-Length", length)
        self.end_headers()
        budget = int(length) // 2 if truncate and length is not None else None
        for chunk in chunks:
            if budget is not None:
                if len(chunk) >= budget:
                    self.wfile.write(chunk[:budget])
                    self.wfile.flush()
                    response.close()
                    self._upstream = None  # its answer was not read to the end: not reusable
                    self._reset()
                    return
                budget -= len(chunk)
            self.wfile.write(chunk)
        if budget is not None:  # an empty body: nothing to cut, so cut the connection after the headers
            self._reset()

    def _error(self, status: int, code: str | None = None, message: str | None = None) -> None:
        code, message = (code, message) if code else _ERROR_BODIES[status]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", request_id)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Abort the connection: with SO_LINGER on and a zero timeout, close() sends a TCP RST."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # The descriptor closes only once the file objects over it are closed too.
            self.rfile.close()
            self.wfile.close()
            self.connection.close()
        except OSError:
            pass
        # The base class still flushes and closes its files after the request: give it harmless ones.
        self.rfile, self.wfile = io.BytesIO(), io.BytesIO()

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the connection was reset on purpose
        if self._upstream is not None:
            self._upstream.close()
