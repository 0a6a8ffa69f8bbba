"""Start the web app with uvicorn: ``python cli.py serve``."""

from __future__ import annotations

import ipaddress
import socket
import sys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(service, host: str = "127.0.0.1", port: int = 8000, *, warm: bool = True, log_level: str = "warning",
        out=sys.stdout) -> None:
    import uvicorn

    from .app import create_app

    from ..errors import ConfigError

    # bind here, so a port in use is one clear line (uvicorn would log and exit), then hand the socket over
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{host}:{port}: cannot listen there ({exc.strerror or exc}); give another --port or --host") from None
    port = sock.getsockname()[1]
    app = create_app(service, host=host, warm=warm)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            server_header=False, lifespan="on")
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(host):
        print(f"Warning: listening on {host}, not only on this machine (127.0.0.1): anyone who can reach it on "
              f"port {port} can search {service.db_path} and see its images.", file=out, flush=True)
    print(f"Serving {service.db_path} on http://{shown}:{port}/ (Ctrl-C stops)", file=out, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
