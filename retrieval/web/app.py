"""The Starlette application: thin routes over :class:`~retrieval.web.service.GalleryService`.

JSON API (documented in README.md, section "The web app"):

- ``GET  /api/search?id=N|url=URL|q=TOKEN&k=20&min_score=0.5&filter=key=value`` -> results
- ``POST /api/search`` (multipart field ``image``, or the raw image as the body) + the same parameters
- ``GET  /api/images/{id}``, ``/api/images/{id}/thumbnail``, ``/api/images/{id}/original``
- ``GET  /api/queries/{token}/thumbnail`` (an uploaded or fetched query image, while the server runs)
- ``GET  /api/stats``, ``/api/failures``, ``/api/duplicates``, ``/api/health``

Bad input gets a 4xx with ``{"error": "...", "reason": "tag"}``, never a traceback. Pages: ``/`` (search,
plain HTML + JS in ``static/``), ``/gallery``, ``/failures``, ``/duplicates`` (rendered here, every value
escaped). No path from a request is ever opened: images are served by id from the gallery's records.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import DatabaseError, ImageError, InputError, RetrievalError, WeightsError, WeightsUnavailableError
from . import filters as F
from . import pages
from .service import DEFAULT_K, FetchFailed, GalleryService, NotFound, TooLarge

STATIC = Path(__file__).resolve().parent / "static"
log = logging.getLogger("retrieval.web")

SECURITY_HEADERS = {
    # nothing from elsewhere, no inline script: metadata that slipped through escaping still could not run
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                                "style-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def error_status(exc: Exception) -> tuple[int, str]:
    """HTTP status and reason tag of a library exception."""
    if isinstance(exc, NotFound):
        return 404, "not-found"
    if isinstance(exc, TooLarge):
        return 413, "too-large"
    if isinstance(exc, ImageError):
        return (413 if exc.reason == "too-large" else 422), exc.reason
    if isinstance(exc, FetchFailed):
        return 422, exc.reason
    if isinstance(exc, InputError):
        return 400, "bad-input"
    if isinstance(exc, (DatabaseError, WeightsError, WeightsUnavailableError)):
        return 503, "unavailable"  # the gallery or the server's model, not the request: e.g. an empty gallery
    return 400, "bad-request"


def _error(status: int, message: str, reason: str) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=SECURITY_HEADERS)


def create_app(service: GalleryService, *, host: str = "127.0.0.1", warm: bool = True) -> Starlette:
    """The app serving ``service``'s gallery. ``warm``: load the model in the background at start-up (the
    first upload search waits for it then); pages and id searches never wait for it."""

    def params(request: Request, form=None) -> dict:
        q = request.query_params
        get = (lambda key, default=None: form.get(key, q.get(key, default))) if form is not None else q.get
        values = q.getlist("filter") + (form.getlist("filter") if form is not None else [])
        return {"k": service.check_k(get("k", DEFAULT_K)), "min_score": service.check_min_score(get("min_score")),
                "filters": F.parse(values)}

    def timed(fn, *args, **kwargs) -> dict:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        out["seconds"] = round(time.perf_counter() - t0, 4)
        return out

    def json(data, status=200) -> JSONResponse:
        return JSONResponse(data, status_code=status, headers=SECURITY_HEADERS)

    # ---------------------------------------------------------------- API

    async def api_search(request: Request):
        if request.method == "POST":
            data, name, form = await _read_upload(request, service.max_upload_bytes)
            p = params(request, form)
            out = await run_in_threadpool(timed, service.search_upload, data, name, p["k"], p["min_score"], p["filters"])
        else:
            q = request.query_params
            p = params(request)
            given = [key for key in ("id", "url", "q") if q.get(key)]
            if len(given) != 1:
                raise InputError("give exactly one query: id=N, url=URL or q=TOKEN (or POST an image)")
            fn = {"id": service.search_id, "url": service.search_url, "q": service.search_token}[given[0]]
            out = await run_in_threadpool(timed, fn, q[given[0]], p["k"], p["min_score"], p["filters"])
        out.update(k=p["k"], min_score=p["min_score"], filters=[f"{k}={v}" for k, v in p["filters"]])
        return json(out)

    async def api_image(request: Request):
        return json(await run_in_threadpool(service.image, request.path_params["image_id"]))

    def _thumb_response(thumb) -> Response:
        return Response(thumb.data, media_type=thumb.mime,
                        headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"})

    async def api_thumbnail(request: Request):
        return _thumb_response(await run_in_threadpool(service.thumbnail, request.path_params["image_id"]))

    async def api_query_thumbnail(request: Request):
        return _thumb_response(service.query_thumbnail(request.path_params["token"]))

    async def api_original(request: Request):
        path, mime = await run_in_threadpool(service.original, request.path_params["image_id"])
        return FileResponse(path, media_type=mime, headers={**SECURITY_HEADERS, "Content-Disposition": "inline"})

    async def api_stats(request: Request):
        return json(await run_in_threadpool(service.stats))

    async def api_failures(request: Request):
        q = request.query_params
        return json(await run_in_threadpool(service.failures, q.get("limit", 100), q.get("offset", 0), q.get("reason")))

    async def api_duplicates(request: Request):
        q = request.query_params
        return json(await run_in_threadpool(service.duplicates, q.get("limit", 100), q.get("offset", 0)))

    async def api_health(request: Request):
        return json({"ok": True, "model": service.model_status()})

    # ---------------------------------------------------------------- pages

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=SECURITY_HEADERS)

    def page(render):
        async def endpoint(request: Request):
            body = await run_in_threadpool(render, service, request.query_params)
            return HTMLResponse(body, headers=SECURITY_HEADERS)
        return endpoint

    # ---------------------------------------------------------------- errors

    async def on_library_error(request: Request, exc: RetrievalError):
        status, reason = error_status(exc)
        if request.url.path.startswith("/api/"):
            return _error(status, str(exc), reason)
        return HTMLResponse(pages.error_page(status, str(exc)), status_code=status, headers=SECURITY_HEADERS)

    async def on_http_error(request: Request, exc: HTTPException):
        message = {404: "no such page or resource", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        if request.url.path.startswith("/api/"):
            return _error(exc.status_code, f"{request.url.path[:200]}: {message}", "http-" + str(exc.status_code))
        return HTMLResponse(pages.error_page(exc.status_code, f"{request.url.path[:200]}: {message}"),
                            status_code=exc.status_code, headers=SECURITY_HEADERS)

    async def on_crash(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal error (see the server's log)", "internal")

    @asynccontextmanager
    async def lifespan(app):
        if warm:
            threading.Thread(target=service.warm, name="model-warmup", daemon=True).start()
        try:
            yield
        finally:
            service.close()

    routes = [
        Route("/", index),
        Route("/gallery", page(pages.gallery_page)),
        Route("/failures", page(pages.failures_page)),
        Route("/duplicates", page(pages.duplicates_page)),
        Route("/api/search", api_search, methods=["GET", "POST"]),
        Route("/api/images/{image_id}", api_image),
        Route("/api/images/{image_id}/thumbnail", api_thumbnail),
        Route("/api/images/{image_id}/original", api_original),
        Route("/api/queries/{token}/thumbnail", api_query_thumbnail),
        Route("/api/stats", api_stats),
        Route("/api/failures", api_failures),
        Route("/api/duplicates", api_duplicates),
        Route("/api/health", api_health),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    from .serve import is_loopback

    # on loopback, a page elsewhere cannot reach the app through a host name it controls (DNS rebinding)
    hosts = {"127.0.0.1", "localhost", "::1", host.strip("[]").lower()} if is_loopback(host) else None
    return Starlette(
        routes=routes,
        middleware=[Middleware(HostCheck, allowed=hosts)],
        exception_handlers={RetrievalError: on_library_error, HTTPException: on_http_error, Exception: on_crash},
        lifespan=lifespan,
    )


class HostCheck:
    """Answer 400 to a request whose Host header is not one of ``allowed`` (None: any). Unlike Starlette's
    TrustedHostMiddleware it reads bracketed IPv6 hosts (``[::1]:8000``) and answers in JSON."""

    def __init__(self, app, allowed=None):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send):
        if self.allowed is not None and scope["type"] in ("http", "websocket"):
            host = Headers(scope=scope).get("host", "").strip().lower()
            name = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]
            if name not in self.allowed:
                response = _error(400, f"host {host[:100]!r}: this server answers only as {sorted(self.allowed)[0]}",
                                  "bad-host")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_upload(request: Request, cap: int) -> tuple[bytes, str | None, object]:
    """The uploaded image's bytes, its file name and the form (None for a raw body), reading at most
    ``cap`` bytes of image (TooLarge beyond that, before reading the rest)."""
    declared = request.headers.get("content-length")
    overhead = 64 * 1024  # multipart boundaries and the small form fields
    if declared and declared.isdigit() and int(declared) > cap + overhead:
        raise TooLarge(f"upload of {int(declared)} bytes: above the limit of {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap + overhead:
            raise TooLarge(f"upload: above the limit of {cap} bytes")
    body = bytes(body)
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        if not body:
            raise InputError("upload: empty body; send an image (multipart field 'image', or the raw bytes)")
        return body, None, None

    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=50)
    except Exception as exc:  # python-multipart's parse errors, Starlette's limits
        raise InputError(f"upload: not a readable multipart form ({str(exc)[:200]})") from None
    file = form.get("image") or form.get("file")
    if file is None or isinstance(file, str):
        raise InputError("upload: no file in the form's 'image' field")
    data = await file.read()
    if len(data) > cap:
        raise TooLarge(f"upload of {len(data)} bytes: above the limit of {cap} bytes")
    return data, file.filename, form
