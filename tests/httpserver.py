"""A real HTTP server on 127.0.0.1 for tests, with per-path responses and fault injection.

    server.add("/cat.jpg", body=b"...", status=200, headers={...})
    server.add("/slow", handler=lambda req: ...)   # req is the BaseHTTPRequestHandler: write anything
    server.url("/cat.jpg"); server.count("/cat.jpg"); server.requests  # [(method, path, headers)]

Only loopback is ever bound. Handlers run in daemon threads; the server is shut down by the fixture.
"""

from __future__ import annotations

import threading
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


class LocalHTTPServer:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
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
        self.httpd.shutdown()
        self.httpd.server_close()
