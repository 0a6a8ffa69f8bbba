"""Download many URLs concurrently; every failure comes back as data (a reason), never as an exception.

    with Fetcher(FetchConfig(deadline=30), workers=8) as f:
        r = f.fetch("https://example.org/cat.jpg")     # FetchResult(ok, data, http_status, reason, ...)

    for r in fetch_many(((row.line, row.url) for row in rows), workers=8):   # bounded in-flight, any order
        r.key, r.url, r.ok, r.reason, r.transient

Reasons are ``"<tag>: <message>"``; the tag (``FetchResult.tag``) is one of

    http-NNN            a non-2xx answer ("http-404: Not Found"; retried 5xx/408/429 end with
                        "(gave up after N attempts)")
    timeout             no connection within connect_timeout, or no data for read_timeout
    blocked-address     a loopback/private/link-local/... address (retrieval.netguard), unless allowed
    host-busy           the host asked (Retry-After) for a wait longer than what is left of ``deadline``
    host-failing        not tried: the host's last ``host_failures`` downloads failed (``fetch_many``)
    deadline            the whole download (all attempts, redirects and waits between them) took more than
                        ``deadline`` seconds -- a slow-drip server cannot hold a worker: a watchdog shuts the
                        socket down at the deadline, even in the middle of a blocking read or of the headers
    too-large           Content-Length, or the bytes received after decompression, above ``max_bytes``
                        (so a gzip bomb is stopped after max_bytes of output)
    incomplete          the connection ended before Content-Length bytes (or before the last chunk)
    connection          refused, reset, closed without an answer, DNS failure, proxy failure
    tls                 certificate or TLS handshake failure
    redirect            a redirect without Location, to a non-http(s) scheme, or to an invalid URL
    too-many-redirects  more than ``max_redirects`` hops (loops end here)
    invalid-url         not an http/https URL with a host (see retrieval.csvread.check_url)
    bad-encoding        a Content-Encoding (gzip, deflate, ...) that does not decode
    protocol            a malformed HTTP answer (bad status line, header too long, ...)
    cancelled           the Fetcher was closed while the download was running

``transient`` says whether a later run may succeed: timeout, deadline, incomplete, connection, http-5xx,
http-408, http-429, host-busy and host-failing are transient; the rest are permanent. Within one fetch, transient failures are
retried (``retries`` times, exponential backoff with jitter, or the server's Retry-After); DNS "no such host",
deadline and cancelled are transient but not retried in the same run. A retry cut short by the deadline reports
the failure that caused the retry ("connection: reset ... (gave up after 3 attempts: the 60 s deadline passed
during the last one)"), not "deadline".

Content is not judged here: an HTML page served with status 200 is returned as data (``content_type`` is for
information only); the image decoder rejects it.

Politeness: at most ``per_host`` concurrent requests per host (a semaphore per host:port), and a 429/503
with Retry-After makes *every* request to that host wait (a per-host "not before" time), not only the retry.
A fetch waits for its host's turn at most ``deadline`` seconds: a host that asks for a longer wait fails it
at once as ``host-busy`` (transient).

Fairness (``fetch_many``): a slow or throttling host delays only its own rows. Rows wait for their host's
turn in a queue per host, holding no worker; a worker is given to a row only when its host has a free slot
(at most ``per_host``, and never all the workers) and no Retry-After pending, round-robin over the hosts, so
the other hosts' rows keep flowing. A host whose downloads failed transiently ``host_failures`` times in a
row (timeouts, refused, 5xx, 429...) with no success in between gets its remaining rows failed at once,
``host-failing`` (transient: a later run tries them again).

Cookies are kept only within one download's redirect chain (some sites set a cookie and redirect); the
session's own jar stores nothing, so it does not grow with millions of hosts.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import math
import random
import socket
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Iterable, Iterator
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from retrieval import __version__, netguard
from retrieval.csvread import check_url, clean_url
from retrieval.errors import ConfigError
from retrieval.safety import clean_text, redact_text

__all__ = ["FetchConfig", "FetchResult", "Fetcher", "MemoryBudget", "fetch_many", "make_session",
           "parse_retry_after", "DEFAULT_USER_AGENT"]

DEFAULT_USER_AGENT = f"dinov2-gallery/{__version__} (image search indexer; python-requests/{requests.__version__})"
# no AVIF/HEIC: ask for what the decoder (Pillow) reads everywhere
DEFAULT_ACCEPT = "image/webp,image/png,image/jpeg,image/gif,image/*;q=0.8,*/*;q=0.5"
_REDIRECTS = (301, 302, 303, 307, 308)


# ---------------------------------------------------------------- config and result


@dataclass
class FetchConfig:
    """How to download. All times in seconds. Validated on construction (ConfigError)."""

    connect_timeout: float = 10.0
    read_timeout: float = 20.0          # longest wait for any data (headers or the next body bytes)
    deadline: float = 60.0              # whole download: all attempts, redirects, backoff sleeps
    max_bytes: int = 50 * 1024 * 1024   # decoded body size limit
    retries: int = 3                    # extra attempts after a transient failure
    backoff: float = 0.5                # first backoff; doubles per retry, with jitter
    backoff_max: float = 30.0
    retry_after_max: float = 60.0       # cap on a server's Retry-After
    max_redirects: int = 5
    user_agent: str = DEFAULT_USER_AGENT
    per_host: int = 4                   # concurrent requests per host:port
    chunk_size: int = 64 * 1024
    accept: str = DEFAULT_ACCEPT
    # connect to loopback/private/link-local/... addresses (retrieval.netguard)? None: $DINOV2_ALLOW_PRIVATE
    allow_private: bool | None = None
    host_failures: int = 3              # transient failures in a row after which a host's other rows fail fast

    def __post_init__(self):
        def number(name, minimum, strict):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (v <= minimum if strict else v < minimum):
                need = "a positive number" if strict else "a number >= 0"
                raise ConfigError(f"fetch config: {name} must be {need} (seconds), got {v!r}")
            setattr(self, name, float(v))

        def integer(name, minimum, maximum):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
                raise ConfigError(f"fetch config: {name} must be an integer from {minimum} to {maximum}, got {v!r}")

        for name in ("connect_timeout", "read_timeout", "deadline"):
            number(name, 0, True)
        for name in ("backoff", "backoff_max", "retry_after_max"):
            number(name, 0, False)
        integer("max_bytes", 1, 2**40)
        integer("retries", 0, 100)
        integer("max_redirects", 0, 100)
        integer("per_host", 1, 10_000)
        integer("chunk_size", 1, 2**26)
        integer("host_failures", 0, 1_000_000)  # 0: never give up on a host
        if self.allow_private is not None and not isinstance(self.allow_private, bool):
            raise ConfigError(f"fetch config: allow_private must be True, False or None, got {self.allow_private!r}")
        for name in ("user_agent", "accept"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip() or any(c in v for c in "\r\n\0"):
                raise ConfigError(f"fetch config: {name} must be a non-empty one-line string, got {v!r}")


@dataclass
class FetchResult:
    """The outcome of one download. ``data`` is set only when ``ok``; ``reason`` only when not."""

    url: str
    ok: bool
    data: bytes | None = None
    http_status: int | None = None
    reason: str | None = None
    transient: bool = False
    attempts: int = 0
    elapsed: float = 0.0
    content_type: str | None = None
    final_url: str | None = None    # after redirects
    key: Any = None                 # the caller's tag, from fetch(url, key) / fetch_many((key, url), ...)
    reserved: int = 0               # bytes of the Fetcher's MemoryBudget held by ``data``: see release()
    budget: Any = None

    def release(self) -> None:
        """Give ``data``'s bytes back to the memory budget (call once done with the data; idempotent)."""
        if self.reserved and self.budget is not None:
            self.budget.release(self.reserved)
        self.reserved = 0

    @property
    def tag(self) -> str | None:
        """The reason's tag ("http-404", "timeout", ...), or None when ok."""
        return None if self.reason is None else self.reason.split(":", 1)[0]

    def __repr__(self) -> str:  # never dump megabytes of data
        size = "None" if self.data is None else f"<{len(self.data)} bytes>"
        return (f"FetchResult(url={self.url!r}, ok={self.ok}, data={size}, http_status={self.http_status}, "
                f"reason={self.reason!r}, transient={self.transient}, attempts={self.attempts}, "
                f"elapsed={self.elapsed:.3f}, content_type={self.content_type!r}, key={self.key!r})")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date), or None if absent/invalid."""
    if not value:
        return None
    v = value.strip()
    try:
        seconds = float(v)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# ---------------------------------------------------------------- deadline watchdog

_tls = threading.local()


class _Entry:
    """One fetch() in progress: its absolute deadline and the connection it is using right now."""

    __slots__ = ("lock", "active", "conn", "fired", "deadline_at", "allow_private")

    def __init__(self, allow_private: bool = False):
        self.lock = threading.Lock()
        self.active = True
        self.conn = None
        self.fired = False
        self.deadline_at: float | None = None
        self.allow_private = allow_private

    def attach(self, conn) -> None:
        with self.lock:
            self.conn = conn

    def detach(self) -> None:
        with self.lock:
            self.conn = None

    def deactivate(self) -> None:
        with self.lock:
            self.active = False
            self.conn = None

    def kill(self) -> bool:
        """Shut the current socket down (the blocked read returns at once). False if there was none yet."""
        with self.lock:
            if not self.active:
                return True
            self.fired = True
            conn = self.conn
            sock = getattr(conn, "sock", None) if conn is not None else None
            if sock is None or getattr(conn, "_dl_entry", None) is not self:
                return False
            try:
                if isinstance(sock, socket.socket):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # not SSLSocket.shutdown: keep TLS state
                else:  # pragma: no cover - TLS-in-TLS transports
                    sock.close()
            except OSError:
                pass
            return True


class _Watchdog:
    """One thread that kills the sockets of fetches that passed their deadline."""

    def __init__(self):
        self._heap: list = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def schedule(self, entry: _Entry, when: float) -> None:
        with self._cv:
            if self._stopped:
                return
            heapq.heappush(self._heap, (when, next(self._seq), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopped:
                        return
                    if self._heap:
                        delay = self._heap[0][0] - time.monotonic()
                        if delay <= 0:
                            _, _, entry = heapq.heappop(self._heap)
                            break
                        self._cv.wait(delay)
                    else:
                        self._cv.wait()
            if not entry.active:
                continue
            if entry.deadline_at is not None and entry.deadline_at > time.monotonic() + 0.001:
                self.schedule(entry, entry.deadline_at)  # the deadline moved (time spent waiting for memory)
            elif not entry.kill():
                self.schedule(entry, time.monotonic() + 0.1)  # still connecting: try again shortly

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._heap.clear()
            self._cv.notify()


class _TrackedConnection:
    """Mixin for urllib3 connections: remember which fetch is using the connection, for the watchdog; and
    connect only to addresses that the address rules (retrieval.netguard) allow: the name is resolved once,
    every address is checked, and the socket is connected to a checked address (no second lookup)."""

    _dl_entry = None

    def _new_conn(self):
        entry = getattr(_tls, "entry", None)
        allow = entry.allow_private if entry is not None else netguard.allow_private_default()
        if allow or getattr(self, "proxy", None) is not None:  # a proxy is the user's choice: it resolves names
            return super()._new_conn()
        U = urllib3.exceptions
        try:
            infos = netguard.resolve_checked(self._dns_host, self.port, urllib3.util.connection.allowed_gai_family())
        except socket.gaierror as exc:
            raise U.NameResolutionError(self.host, self, exc) from exc
        err = None
        for af, socktype, proto, _, sa in infos:
            sock = None
            try:
                sock = socket.socket(af, socktype, proto)
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                if self.timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                sock.connect(sa)
                peer = sock.getpeername()[0]
                if peer.split("%", 1)[0] != sa[0].split("%", 1)[0]:  # cannot happen; a last line of defence
                    raise netguard.BlockedAddressError(f"blocked-address: connected to {peer}, not the checked {sa[0]}")
                return sock
            except netguard.BlockedAddressError:
                if sock is not None:
                    sock.close()
                raise
            except socket.timeout as exc:
                if sock is not None:
                    sock.close()
                err = U.ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                                  f"(connect timeout={self.timeout})")
                err.__cause__ = exc
            except OSError as exc:
                if sock is not None:
                    sock.close()
                err = U.NewConnectionError(self, f"Failed to establish a new connection: {exc}")
                err.__cause__ = exc
        raise err if err is not None else U.NewConnectionError(self, "no address to connect to")

    def request(self, *args, **kwargs):
        entry = getattr(_tls, "entry", None)
        self._dl_entry = entry
        if entry is not None:
            entry.attach(self)
        return super().request(*args, **kwargs)


class _HTTPConnection(_TrackedConnection, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_TrackedConnection, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOL_CLASSES)

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        if type(manager) is urllib3.ProxyManager:  # not SOCKS: its pools need their own connections
            manager.pool_classes_by_scheme = dict(_POOL_CLASSES)
        return manager


class _Session(requests.Session):
    def get_redirect_target(self, resp):
        """A Location that is not UTF-8 is taken as the (latin-1) text it is, then judged like any other target
        (requests raises UnicodeDecodeError, even with allow_redirects=False)."""
        try:
            return super().get_redirect_target(resp)
        except UnicodeError:
            return resp.headers.get("location")


class _NoCookies(DefaultCookiePolicy):
    def set_ok(self, cookie, request):
        return False


def make_session(config: FetchConfig | None = None, workers: int = 8) -> requests.Session:
    """The one Session a Fetcher uses: pools sized to the workers, no urllib3 retries (we retry), no cookie
    storage, the configured User-Agent and Accept headers."""
    config = config or FetchConfig()
    s = _Session()
    adapter = _Adapter(pool_connections=max(10, workers), pool_maxsize=max(1, min(workers, config.per_host)),
                       max_retries=0, pool_block=False)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = config.user_agent
    s.headers["Accept"] = config.accept
    s.cookies.set_policy(_NoCookies())
    return s


# ---------------------------------------------------------------- memory budget


class MemoryBudget:
    """Bytes that downloads in flight and images waiting for the encoder may hold together.

    A download reserves its size before reading the body -- the Content-Length when announced (and not
    compressed), else ``max_bytes`` -- and waits while that would go past ``limit``; once read, the
    reservation shrinks to the body's size, and it is released when the caller is done with the data
    (``FetchResult.release``). The ingest reserves each preprocessed image the same way until it is encoded
    (``kind="pixels"``). A reservation is always granted when nothing of its kind is held (so one item larger
    than the budget still passes, alone, and images waiting for the encoder can never be starved by
    downloads, which would be a deadlock): ``peak`` <= ``limit`` + one such item.
    """

    def __init__(self, limit: int):
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"memory budget must be a positive number of bytes, got {limit!r}")
        self.limit = limit
        self.in_use = 0
        self.pixels = 0
        self.peak = 0
        self.waits = 0  # reservations that had to wait
        self._cv = threading.Condition()

    def acquire(self, n: int, *, kind: str = "download", cancel: threading.Event | None = None,
                until: float | None = None) -> bool:
        """Reserve ``n`` bytes, waiting for them; False when ``cancel`` is set or ``until`` (monotonic) passes."""
        waited = False
        with self._cv:
            while True:
                held = self.in_use if kind == "download" else self.pixels
                if self.in_use + n <= self.limit or held == 0:
                    self.in_use += n
                    if kind == "pixels":
                        self.pixels += n
                    self.peak = max(self.peak, self.in_use)
                    self.waits += waited
                    return True
                waited = True
                if cancel is not None and cancel.is_set():
                    return False
                left = 0.25 if until is None else until - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(0.25, left))

    def release(self, n: int, *, kind: str = "download") -> None:
        with self._cv:
            self.in_use -= n
            if kind == "pixels":
                self.pixels -= n
            self._cv.notify_all()


# ---------------------------------------------------------------- per-host slots


class _Cancelled(Exception):
    pass


class _HostBusy(Exception):
    def __init__(self, wait: float):
        self.wait = wait


class _HostState:
    __slots__ = ("sem", "users", "not_before")

    def __init__(self, n: int):
        self.sem = threading.BoundedSemaphore(n)
        self.users = 0
        self.not_before = 0.0


class _Hosts:
    """A semaphore and a "not before" time per host:port; entries vanish when unused."""

    def __init__(self, per_host: int):
        self.per_host = per_host
        self.lock = threading.Lock()
        self.states: dict[tuple, _HostState] = {}

    def not_before(self, key) -> float:
        """The monotonic time before which no request may go to ``key`` (0 when none is pending)."""
        with self.lock:
            st = self.states.get(key)
            return st.not_before if st is not None else 0.0

    def acquire(self, key: tuple, cancel: threading.Event, limit: float | None = None) -> _HostState:
        """Wait for a slot of ``key``'s host; _HostBusy when its Retry-After ends after ``limit``."""
        with self.lock:
            st = self.states.get(key)
            if st is None:
                if len(self.states) > 4096:
                    self._prune()
                st = self.states[key] = _HostState(self.per_host)
            st.users += 1
        try:
            while True:
                delay = st.not_before - time.monotonic()
                if delay > 0 and limit is not None and st.not_before > limit:
                    raise _HostBusy(delay)
                if delay > 0:
                    if cancel.wait(delay):
                        raise _Cancelled()
                    continue
                if st.sem.acquire(timeout=0.25):
                    if st.not_before > time.monotonic():  # a 429/503 arrived while we queued
                        st.sem.release()
                        continue
                    return st
                if cancel.is_set():
                    raise _Cancelled()
        except BaseException:
            self._unuse(key, st)
            raise

    def release(self, key: tuple, st: _HostState) -> None:
        st.sem.release()
        self._unuse(key, st)

    def defer(self, key: tuple, until: float) -> None:
        with self.lock:
            st = self.states.get(key)
            if st is not None:
                st.not_before = max(st.not_before, until)

    def _unuse(self, key: tuple, st: _HostState) -> None:
        with self.lock:
            st.users -= 1
            if st.users == 0 and st.not_before <= time.monotonic() and self.states.get(key) is st:
                del self.states[key]

    def _prune(self) -> None:
        now = time.monotonic()
        for k in [k for k, s in self.states.items() if s.users == 0 and s.not_before <= now]:
            del self.states[k]


def _host_key(url: str) -> tuple:
    p = urlsplit(url)
    scheme = p.scheme.lower()
    try:
        port = p.port
    except ValueError:
        port = None
    return (scheme, (p.hostname or "").lower(), port or (443 if scheme == "https" else 80))


# ---------------------------------------------------------------- fetching


@dataclass
class _Outcome:
    ok: bool = False
    data: bytes | None = None
    status: int | None = None
    reason: str | None = None
    transient: bool = False
    retry: bool = False
    retry_after: float | None = None
    content_type: str | None = None
    redirect: str | None = None
    final_url: str | None = None
    reserved: int = 0


def _fail(reason: str, transient: bool, retry: bool | None = None, status=None, ctype=None, **kw) -> _Outcome:
    return _Outcome(reason=reason, transient=transient, retry=transient if retry is None else retry,
                    status=status, content_type=ctype, **kw)


def _content_length(headers) -> int | None:
    v = headers.get("Content-Length")
    if v is None:
        return None
    try:
        values = {int(x.strip()) for x in v.split(",")}
    except ValueError:
        return None
    return values.pop() if len(values) == 1 and min(values) >= 0 else None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes/contexts and exceptions held in its args (urllib3 nests them there)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 20:
        e = todo.pop(0)
        if e is None or any(e is x for x in out):
            continue
        out.append(e)
        todo.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
        reason = getattr(e, "reason", None)  # urllib3 MaxRetryError keeps the real error here
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo.append(e.__cause__)
        todo.append(e.__context__)
    return out


def _has(chain, *types) -> BaseException | None:
    return next((e for e in chain if isinstance(e, types)), None)


def _short(exc: BaseException, limit: int = 160) -> str:
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _status_phrase(status: int, fallback: str | None) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return (fallback or "").strip() or "unknown status"


class Fetcher:
    """Downloads with one shared ``requests.Session``; thread-safe; ``fetch`` never raises for a bad URL or
    server. Close it (or use ``with``) when done: closing also aborts downloads still running."""

    def __init__(self, config: FetchConfig | None = None, workers: int = 8, budget: MemoryBudget | None = None):
        if config is None:
            config = FetchConfig()
        if not isinstance(config, FetchConfig):
            raise ConfigError(f"fetch config: expected a FetchConfig, got {type(config).__name__}")
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 1024:
            raise ConfigError(f"fetch: workers must be an integer from 1 to 1024, got {workers!r}")
        self.config = config
        self.workers = workers
        self.budget = budget  # downloads reserve their bytes here (see MemoryBudget)
        self.session = make_session(config, workers)
        self.allow_private = (netguard.allow_private_default() if config.allow_private is None
                              else config.allow_private)
        self._hosts = _Hosts(config.per_host)
        self._watchdog = _Watchdog()
        self._closed = threading.Event()
        self._active: set[_Entry] = set()
        self._active_lock = threading.Lock()
        self._failing: dict[tuple, tuple[int, str]] = {}  # host key -> (transient failures in a row, last reason)
        self._failing_lock = threading.Lock()

    # -- public

    def fetch(self, url: str, key: Any = None) -> FetchResult:
        """Download one URL (following redirects, retrying transient failures). Never raises for a bad
        URL or server; raises TypeError for a non-string URL."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, got {type(url).__name__}")
        t0 = time.monotonic()
        result = self._fetch(url, key, t0)
        if result.attempts:
            self._record_host(_host_key(clean_url(url)), result)
        return result

    def _fetch(self, url: str, key: Any, t0: float) -> FetchResult:
        target = clean_url(url)
        bad = check_url(target)
        if bad is not None:
            reason = bad if bad.startswith("invalid-url") else "invalid-url: empty URL"
            return FetchResult(url=url, ok=False, reason=reason, transient=False, attempts=0,
                               elapsed=time.monotonic() - t0, key=key)
        cfg = self.config
        entry = _Entry(self.allow_private)
        jar = RequestsCookieJar()
        attempts = 0
        note = ""
        retried = None  # the failure that caused the current retry
        with self._active_lock:
            self._active.add(entry)
        _tls.entry = entry
        try:
            while True:
                if self._closed.is_set():
                    out = _fail("cancelled: the fetcher was closed", True, False)
                    break
                attempts += 1
                try:
                    out = self._attempt(target, entry, jar, t0)
                except _Cancelled:
                    out = _fail("cancelled: the fetcher was closed", True, False)
                    break
                except _HostBusy as busy:
                    out = _fail(f"host-busy: the host asked (Retry-After) for {busy.wait:.0f} s more, longer than "
                                f"the {cfg.deadline:g} s deadline allows", True, False)
                    break
                if retried is not None and not out.ok and (out.reason or "").startswith("deadline:"):
                    # a retry cut short by the deadline: the failure that caused it is the explanation
                    # (so a server that resets every connection is "connection", whatever the timing)
                    out = retried
                    note = (f" (gave up after {attempts} attempts: the {cfg.deadline:g} s deadline passed "
                            "during the last one)")
                    break
                if out.ok or not out.retry:
                    break
                if attempts > cfg.retries:
                    note = f" (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
                    break
                delay = out.retry_after if out.retry_after is not None else self._backoff(attempts)
                if entry.deadline_at is not None and time.monotonic() + delay >= entry.deadline_at:
                    note = (f" (gave up after {attempts} attempt{'s' if attempts > 1 else ''}: "
                            f"no time left before the {cfg.deadline:g} s deadline)")
                    break
                if self._closed.wait(delay):
                    out = _fail("cancelled: the fetcher was closed", True, False)
                    break
                retried = out
        finally:
            entry.deactivate()
            _tls.entry = None
            with self._active_lock:
                self._active.discard(entry)
        return FetchResult(
            url=url, ok=out.ok, data=out.data if out.ok else None, http_status=out.status,
            reason=None if out.ok else clean_text(redact_text((out.reason or "connection: unknown failure") + note)),
            transient=False if out.ok else out.transient, attempts=attempts,
            elapsed=time.monotonic() - t0, content_type=out.content_type, final_url=out.final_url, key=key,
            reserved=out.reserved if out.ok else 0, budget=self.budget)

    def host_failing(self, key) -> str | None:
        """The ``host-failing: ...`` reason when ``key``'s host (see ``_host_key``) failed ``host_failures``
        downloads in a row in this Fetcher's lifetime, else None."""
        n = self.config.host_failures
        if not n or key is None:
            return None
        with self._failing_lock:
            count, last = self._failing.get(key, (0, ""))
        if count < n:
            return None
        host = f"{key[1]}:{key[2]}"
        return clean_text(f"host-failing: not tried, the last {count} downloads from {host} failed "
                          f"(the last one: {last[:200]})")

    def _record_host(self, key, result: "FetchResult") -> None:
        """Count transient failures in a row per host; an answer of the host (ok or a permanent failure) resets."""
        if not self.config.host_failures or key is None or (result.tag or "") in ("cancelled", "host-failing"):
            return
        with self._failing_lock:
            if result.ok or not result.transient:
                self._failing.pop(key, None)
                return
            count, _ = self._failing.pop(key, (0, ""))
            self._failing[key] = (count + 1, result.reason or "")
            while len(self._failing) > 65536:  # the oldest entries go first
                del self._failing[next(iter(self._failing))]

    def close(self) -> None:
        """Abort running downloads (they end as "cancelled") and release the connections."""
        if self._closed.is_set():
            return
        self._closed.set()
        with self._active_lock:
            active = list(self._active)
        for entry in active:
            entry.kill()
        self._watchdog.stop()
        self.session.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # an unclosed Fetcher must not leave its watchdog thread behind
        try:
            self._watchdog.stop()
        except Exception:
            pass

    # -- internals

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        d = min(cfg.backoff_max, cfg.backoff * (2 ** (attempt - 1)))
        return d / 2 + random.uniform(0, d / 2)

    def _attempt(self, url: str, entry: _Entry, jar: RequestsCookieJar, t0: float) -> _Outcome:
        """One attempt: the request and its redirect chain, each hop checked."""
        cfg = self.config
        current = url
        hops = 0
        while True:
            if not entry.allow_private:  # an address literal or localhost name: refused without any lookup
                blocked = netguard.host_problem(urlsplit(current).hostname or "")
                if blocked is not None:
                    return _fail(blocked, False)
            key = _host_key(current)
            limit = (entry.deadline_at if entry.deadline_at is not None else t0 + cfg.deadline)
            st = self._hosts.acquire(key, self._closed, limit)
            try:
                if entry.deadline_at is None:  # the clock starts once the host lets us in
                    entry.deadline_at = time.monotonic() + cfg.deadline
                    self._watchdog.schedule(entry, entry.deadline_at)
                out = self._hop(current, entry, jar, key)
            finally:
                entry.detach()
                self._hosts.release(key, st)
            if out.redirect is None:
                out.final_url = current
                return out
            hops += 1
            target = clean_url(out.redirect)
            if hops > cfg.max_redirects:
                return _fail(f"too-many-redirects: more than {cfg.max_redirects} (the last one to {target[:200]})",
                             False, status=out.status)
            scheme = urlsplit(target).scheme.lower() if "://" in target else ""
            if scheme not in ("http", "https"):
                shown = target[:200]
                if scheme:
                    return _fail(f"redirect: to non-http scheme {shown}", False, status=out.status)
                return _fail(f"redirect: to an invalid URL {shown}", False, status=out.status)
            bad = check_url(target)
            if bad is not None:
                return _fail(f"redirect: to an invalid URL {target[:200]} ({bad})", False, status=out.status)
            current = target

    def _hop(self, url: str, entry: _Entry, jar: RequestsCookieJar, key: tuple) -> _Outcome:
        cfg = self.config
        remaining = entry.deadline_at - time.monotonic()
        if remaining <= 0 or entry.fired:
            return self._deadline(0, None)
        timeout = (min(cfg.connect_timeout, remaining), min(cfg.read_timeout, remaining))
        r = None
        got = 0
        reserved = 0
        try:
            r = self.session.get(url, stream=True, allow_redirects=False, timeout=timeout, cookies=jar)
            if entry.fired:  # the watchdog cut the headers short: whatever was parsed is not the answer
                return self._deadline(0, None)
            jar.update(r.cookies)
            status = r.status_code
            ctype = r.headers.get("Content-Type")
            if status in _REDIRECTS:
                location = self.session.get_redirect_target(r)
                if not location:
                    return _fail(f"redirect: HTTP {status} without a Location header", False, status=status,
                                 ctype=ctype)
                return _Outcome(status=status, redirect=urljoin(url, location), content_type=ctype)
            retry_after = None
            if status in (429, 503):
                ra = parse_retry_after(r.headers.get("Retry-After"))
                if ra is not None:
                    retry_after = min(ra, cfg.retry_after_max)
                    self._hosts.defer(key, time.monotonic() + retry_after)
            if not 200 <= status < 300:
                transient = status in (408, 429) or 500 <= status < 600
                return _fail(f"http-{status}: {_status_phrase(status, r.reason)}", transient, status=status,
                             ctype=ctype, retry_after=retry_after)
            length = _content_length(r.headers)
            if length is not None and length > cfg.max_bytes:
                return _fail(f"too-large: Content-Length {length} bytes > max_bytes {cfg.max_bytes}", False,
                             status=status, ctype=ctype)
            encoded = bool(r.headers.get("Content-Encoding", "").strip().lower() not in ("", "identity"))
            if self.budget is not None:
                want = min(length, cfg.max_bytes) if length is not None and not encoded else cfg.max_bytes
                t_wait = time.monotonic()
                if not self.budget.acquire(want, cancel=self._closed, until=t_wait + cfg.deadline):
                    if self._closed.is_set():
                        return _fail("cancelled: the fetcher was closed", True, False, status=status, ctype=ctype)
                    return _fail(f"deadline: waited more than {cfg.deadline:g} s for the memory budget", True, False,
                                 status=status, ctype=ctype)
                reserved = want
                waited = time.monotonic() - t_wait
                if waited > 0.001:  # time spent waiting for memory is not the server's: the deadline moves
                    entry.deadline_at += waited
                    self._watchdog.schedule(entry, entry.deadline_at)
            chunks = []
            for chunk in r.iter_content(cfg.chunk_size):
                got += len(chunk)
                if got > cfg.max_bytes:
                    after = " after decompression" if encoded else ""
                    return _fail(f"too-large: more than max_bytes {cfg.max_bytes} bytes{after}", False,
                                 status=status, ctype=ctype)
                chunks.append(chunk)
                if time.monotonic() >= entry.deadline_at or entry.fired:
                    return self._deadline(got, status, ctype)
                if self._closed.is_set():
                    return _fail("cancelled: the fetcher was closed", True, False, status=status, ctype=ctype)
            if entry.fired:
                return self._deadline(got, status, ctype)
            raw = r.raw.tell()
            if length is not None and raw < length:
                return _fail(f"incomplete: got {raw} of {length} bytes", True, status=status, ctype=ctype)
            data = b"".join(chunks)
            del chunks
            if reserved > len(data):  # keep only what the body holds
                self.budget.release(reserved - len(data))
                reserved = len(data)
            out = _Outcome(ok=True, data=data, status=status, content_type=ctype, reserved=reserved)
            reserved = 0
            return out
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                OSError, UnicodeError) as exc:
            return self._failure(exc, entry, got, r, url, timeout)
        finally:
            if reserved:  # a failure: nothing is kept
                self.budget.release(reserved)
            if r is not None:
                r.close()

    def _deadline(self, got: int, status, ctype=None) -> _Outcome:
        so_far = f" (got {got} bytes)" if got else ""
        return _fail(f"deadline: the download took more than {self.config.deadline:g} s{so_far}",
                     True, False, status=status, ctype=ctype)

    def _failure(self, exc, entry: _Entry, got: int, r, url: str, timeout) -> _Outcome:
        status = r.status_code if r is not None else None
        ctype = r.headers.get("Content-Type") if r is not None else None
        if self._closed.is_set():
            return _fail("cancelled: the fetcher was closed", True, False, status=status, ctype=ctype)
        if entry.fired or time.monotonic() >= entry.deadline_at - 0.01:
            return self._deadline(got, status, ctype)
        chain = _chain(exc)
        E = requests.exceptions
        U = urllib3.exceptions
        blocked = _has(chain, netguard.BlockedAddressError)
        if blocked is not None:
            return _fail(blocked.reason, False, status=status, ctype=ctype)
        if _has(chain, E.InvalidURL, E.MissingSchema, E.InvalidSchema, U.LocationValueError, U.LocationParseError):
            return _fail(f"invalid-url: {_short(exc)}", False, status=status, ctype=ctype)
        if _has(chain, E.ContentDecodingError, U.DecodeError):
            enc = r.headers.get("Content-Encoding", "?") if r is not None else "?"
            return _fail(f"bad-encoding: the body does not decode as Content-Encoding {enc}", False,
                         status=status, ctype=ctype)
        if _has(chain, E.SSLError, U.SSLError):
            inner = _has(chain, OSError) if not _has(chain, U.SSLError) else _has(chain, U.SSLError)
            return _fail(f"tls: {_short(inner or exc)}", False, status=status, ctype=ctype)
        gai = _has(chain, socket.gaierror)
        if _has(chain, U.NameResolutionError) or gai is not None:
            host = urlsplit(url).hostname
            temporary = gai is not None and gai.errno == socket.EAI_AGAIN
            return _fail(f"connection: cannot resolve host {host!r}", True, retry=temporary,
                         status=status, ctype=ctype)
        # urllib3's NewConnectionError (refused, unreachable, ...) subclasses ConnectTimeoutError: not a timeout
        if _has(chain, E.ConnectTimeout) or any(isinstance(e, U.ConnectTimeoutError)
                                                and not isinstance(e, U.NewConnectionError) for e in chain):
            return _fail(f"timeout: no connection within {timeout[0]:.3g} s", True, status=status, ctype=ctype)
        if _has(chain, E.ReadTimeout, U.ReadTimeoutError) or (
                _has(chain, TimeoutError) and not _has(chain, U.NewConnectionError)):
            where = "for the response" if r is None else "in the middle of the body"
            return _fail(f"timeout: no data for {timeout[1]:.3g} s {where}", True, status=status, ctype=ctype)
        if _has(chain, E.ProxyError, U.ProxyError):
            return _fail(f"connection: proxy failure ({_short(exc)})", True, status=status, ctype=ctype)
        if r is not None:  # the body was being read
            raw = r.raw.tell()
            length = _content_length(r.headers)
            if _has(chain, ConnectionResetError):
                return _fail("connection: reset by peer while reading the body", True, status=status, ctype=ctype)
            if length is not None and raw < length:
                return _fail(f"incomplete: got {raw} of {length} bytes", True, status=status, ctype=ctype)
            if _has(chain, E.ChunkedEncodingError, U.ProtocolError, http.client.IncompleteRead):
                return _fail(f"incomplete: the connection closed before the end of the body (got {raw} bytes)",
                             True, status=status, ctype=ctype)
        if _has(chain, ConnectionRefusedError):
            return _fail("connection: refused", True, status=status, ctype=ctype)
        if _has(chain, ConnectionResetError):
            return _fail("connection: reset by peer", True, status=status, ctype=ctype)
        if _has(chain, http.client.RemoteDisconnected, BrokenPipeError, ConnectionAbortedError):
            return _fail("connection: closed by the server without a response", True, status=status, ctype=ctype)
        proto = _has(chain, http.client.BadStatusLine, http.client.LineTooLong, U.HeaderParsingError,
                     U.InvalidHeader, E.InvalidHeader)
        if proto is None:
            proto = next((e for e in chain if isinstance(e, http.client.HTTPException)
                          and not isinstance(e, http.client.IncompleteRead)), None)
        if proto is not None:
            return _fail(f"protocol: {type(proto).__name__}: {_short(proto)}", False, status=status, ctype=ctype)
        inner = next((e for e in reversed(chain) if isinstance(e, OSError)), exc)
        return _fail(f"connection: {_short(inner)}", True, status=status, ctype=ctype)


# ---------------------------------------------------------------- many


def _split_item(item) -> tuple[Any, str]:
    if isinstance(item, str):
        return item, item
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"fetch_many: expected (key, url) pairs or URL strings, got {item!r:.80}")


def _dispatch_key(url: str):
    """The host key that schedules ``url`` in fetch_many; None for a URL that fails without a request."""
    target = clean_url(url)
    return _host_key(target) if check_url(target) is None else None


def fetch_many(items: Iterable, workers: int = 8, config: FetchConfig | None = None, *,
               fetcher: Fetcher | None = None, max_in_flight: int | None = None) -> Iterator[FetchResult]:
    """Download ``items`` -- (key, url) pairs (or bare URL strings, whose key is the URL) -- with ``workers``
    threads, yielding each FetchResult (``.key`` set) as it completes, in any order.

    The input is consumed lazily: at most ``max_in_flight`` (default max(2 x workers, 1024)) items are taken
    from it and not yet yielded -- running, or waiting in their host's queue (a waiting item holds no data) --
    so memory stays flat for millions of URLs, and rows of other hosts can start while one host is slow or
    throttled (see "Fairness" in the module docstring). At most ``workers`` downloads run at a time. Without
    ``fetcher`` one is made (and closed at the end); with one, ``config`` is ignored. Closing the generator
    early cancels waiting downloads and aborts running ones (only when the fetcher is our own).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"fetch: workers must be a positive integer, got {workers!r}")
    limit = max_in_flight if max_in_flight is not None else max(2 * workers, 1024)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"fetch: max_in_flight must be a positive integer, got {max_in_flight!r}")
    own = fetcher is None
    f = Fetcher(config, workers=workers) if own else fetcher
    # a host never has all the workers (unless there is only one): the others stay free for other hosts
    cap = max(1, min(f.config.per_host, workers - 1))
    it = iter(items)
    waiting: dict[Any, deque] = {}  # host key -> items waiting for their host's turn (insertion order: round-robin)
    n_waiting = 0
    running: dict[Any, int] = {}
    futures: dict = {}  # future -> host key
    exhausted = False
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")

    def fail_fast(key, url, reason) -> FetchResult:
        return FetchResult(url=url, ok=False, reason=reason, transient=True, attempts=0, key=key)

    try:
        step = max(16, workers)  # items read per round: results are yielded as they come, not after a long read
        while True:
            for _ in range(step):
                if exhausted or n_waiting + len(futures) >= limit:
                    break
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                key, url = _split_item(item)
                hk = _dispatch_key(url)
                failing = f.host_failing(hk)
                if failing is not None:
                    yield fail_fast(key, url, failing)
                    continue
                waiting.setdefault(hk, deque()).append((key, url))
                n_waiting += 1
            now = time.monotonic()
            wake = None  # the earliest Retry-After end among hosts that have waiting items
            for hk in list(waiting):
                if len(futures) >= workers:
                    break
                if hk is not None:
                    if running.get(hk, 0) >= cap:
                        continue
                    nb = f._hosts.not_before(hk)
                    if nb > now:
                        wake = nb if wake is None else min(wake, nb)
                        continue
                q = waiting.pop(hk)
                while q and len(futures) < workers and (hk is None or running.get(hk, 0) < cap):
                    key, url = q.popleft()
                    n_waiting -= 1
                    futures[pool.submit(f.fetch, url, key)] = hk
                    running[hk] = running.get(hk, 0) + 1
                if q:
                    waiting[hk] = q  # to the back of the round
            if not futures:
                if not waiting and exhausted:
                    return
                if not waiting:
                    continue
                # every waiting host is throttled (Retry-After) and nothing runs: sleep until the first one ends
                if f._closed.wait(max(0.0, (wake or now + 0.05) - now)):
                    for q in waiting.values():
                        for key, url in q:
                            yield FetchResult(url=url, ok=False, reason="cancelled: the fetcher was closed",
                                              transient=True, key=key)
                    return
                continue
            timeout = None if wake is None else max(0.0, wake - now)
            if not exhausted and n_waiting + len(futures) < limit:
                timeout = 0  # more input can be read: only pick up what has finished already
            done, _ = wait(list(futures), timeout=timeout, return_when=FIRST_COMPLETED)
            for fut in done:
                hk = futures.pop(fut)
                running[hk] -= 1
                if not running[hk]:
                    del running[hk]
                yield fut.result()
                failing = f.host_failing(hk)
                if failing is not None and hk in waiting:  # fail the host's queued rows now, not one by one
                    q = waiting.pop(hk)
                    n_waiting -= len(q)
                    for key, url in q:
                        yield fail_fast(key, url, failing)
    finally:
        for fut in futures:
            fut.cancel()
        if own:
            f.close()  # aborts what is still running, so the shutdown below is quick
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in futures:  # results nobody will see: their bytes go back to the budget
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                fut.result().release()
