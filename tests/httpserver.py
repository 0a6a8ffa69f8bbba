"""A real HTTP server on 127.0.0.1 for tests, with per-path responses and fault injection.

    server.add("/cat.jpg", body=b"...", status=200, headers={...})
    server.add("/slow", handler=lambda req: ...)   # req is the BaseHTTPRequestHandler: write anything
    server.url("/cat.jpg"); server.count("/cat.jpg"); server.requests  # [(method, path, headers)]

Only loopback is ever bound. Handlers run in daemon threads; the server is shut down by the fixture.

Fault injection (handlers for ``server.add(path, handler=...)``): ``hang``, ``drip(body, interval)``,
``drip_headers(interval)``, ``truncated(body, claimed_length)``, ``reset_after(body, claimed_length)``,
``sequence(*(status, body, headers))``, ``ConcurrencyTracker(delay, body)``; ``gzip_bomb(size)`` makes a
small gzip body that decompresses to ``size`` zero bytes. Handlers that wait use ``server.closing`` (set
when the server closes) so that shutting the server down never waits for them.
"""

from __future__ import annotations

import gzip
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    handler: Callable | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall per request

    def log_message(self, *args):  # keep test output quiet
        pass

    def _serve(self, with_body: bool):
        srv: LocalHTTPServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        with srv.lock:
            srv.requests.append((self.command, self.path, dict(self.headers)))
            route = srv.routes.get(path)
        if route is None:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            if with_body:
                self.wfile.write(b"not found")
            return
        if route.handler is not None:
            route.handler(self)
            return
        self.send_response(route.status)
        headers = {"Content-Length": str(len(route.body)), **route.headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if with_body:
            self.wfile.write(route.body)

    def do_GET(self):
        self._serve(True)

    def do_HEAD(self):
        self._serve(False)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """Clients that hang up mid-response are what the fault tests do on purpose: no traceback."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class LocalHTTPServer:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()  # set by close(): waiting handlers stop waiting
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        # a short poll interval: close() (which waits for the serve loop to notice) takes ~0.05 s, not ~0.5 s
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes = b"", status: int = 200, headers: dict | None = None,
            handler: Callable | None = None) -> str:
        with self.lock:
            self.routes[path] = Route(status, body, dict(headers or {}), handler)
        return self.url(path)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def count(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, p, _ in self.requests if path is None or p.split("?", 1)[0] == path)

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- fault injection


def _closing(req) -> threading.Event:
    return req.server.owner.closing


def _start(req, status: int = 200, headers: dict | None = None) -> None:
    req.send_response(status)
    for k, v in (headers or {}).items():
        req.send_header(k, v)
    req.end_headers()


def hang(req) -> None:
    """Accept the request, read it, and never answer (until the server closes)."""
    _closing(req).wait(120)
    req.close_connection = True


def drip(body: bytes = b"x" * 10_000, interval: float = 0.2, headers: dict | None = None):
    """A handler that sends the headers (with the full Content-Length) then one byte every ``interval``."""
    def handler(req):
        _start(req, 200, {"Content-Length": str(len(body)), "Content-Type": "image/jpeg", **(headers or {})})
        req.close_connection = True
        try:
            req.wfile.flush()
            for i in range(len(body)):
                if _closing(req).wait(interval):
                    return
                req.wfile.write(body[i:i + 1])
        except OSError:
            pass
    return handler


def drip_headers(interval: float = 0.2):
    """A handler that sends a status line, then a header one byte every ``interval``, forever."""
    def handler(req):
        req.close_connection = True
        try:
            req.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not _closing(req).wait(interval):
                req.wfile.write(b"a")
        except OSError:
            pass
    return handler


def truncated(body: bytes, claimed_length: int, headers: dict | None = None):
    """A handler that announces ``claimed_length`` bytes, sends ``body`` (shorter) and closes cleanly."""
    def handler(req):
        _start(req, 200, {"Content-Length": str(claimed_length), "Content-Type": "image/jpeg", **(headers or {})})
        req.close_connection = True
        try:
            req.wfile.write(body)
        except OSError:
            pass
    return handler


def reset_after(body: bytes, claimed_length: int | None = None):
    """A handler that sends part of a body then resets the connection (TCP RST, not a clean close)."""
    def handler(req):
        _start(req, 200, {"Content-Length": str(claimed_length or len(body) * 10), "Content-Type": "image/jpeg"})
        req.close_connection = True
        try:
            req.wfile.write(body)
            time.sleep(0.05)  # let the client read the body before the reset
            req.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            req.connection.close()
        except OSError:
            pass
    return handler


def sequence(*responses):
    """A handler answering the n-th request with ``responses[n]`` ((status, body, headers) tuples); the last
    one repeats."""
    lock = threading.Lock()
    state = {"n": 0}

    def handler(req):
        with lock:
            n = state["n"]
            state["n"] += 1
        status, body, headers = (tuple(responses[min(n, len(responses) - 1)]) + (None, None))[:3]
        body = body or b""
        _start(req, status, {"Content-Length": str(len(body)), **(headers or {})})
        req.wfile.write(body)
    return handler


class ConcurrencyTracker:
    """A handler that holds each request ``delay`` seconds and records the most requests seen at once."""

    def __init__(self, delay: float = 0.2, body: bytes = b"ok"):
        self.delay = delay
        self.body = body
        self.current = 0
        self.max_seen = 0
        self.total = 0
        self.lock = threading.Lock()

    def __call__(self, req):
        with self.lock:
            self.current += 1
            self.total += 1
            self.max_seen = max(self.max_seen, self.current)
        try:
            _closing(req).wait(self.delay)
        finally:
            with self.lock:
                self.current -= 1
        _start(req, 200, {"Content-Length": str(len(self.body)), "Content-Type": "image/jpeg"})
        req.wfile.write(self.body)


def gzip_bomb(size: int = 10 * 1024 * 1024) -> bytes:
    """``size`` zero bytes, gzip-compressed (about 1000:1)."""
    return gzip.compress(bytes(size), compresslevel=9)
