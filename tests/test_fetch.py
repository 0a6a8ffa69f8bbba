"""retrieval.fetch against a real HTTP server on 127.0.0.1: every failure is a result with a reason."""

import gzip
import threading
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from httpserver import (ConcurrencyTracker, drip, drip_headers, gzip_bomb, hang, reset_after, sequence,
                        truncated)
from retrieval.errors import ConfigError
from retrieval.fetch import FetchConfig, Fetcher, fetch_many, parse_retry_after

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9"


def config(**kw):
    """Small timeouts so that every test ends in about a second at most."""
    base = dict(connect_timeout=2, read_timeout=2, deadline=5, max_bytes=1 << 20, retries=3, backoff=0.01,
                backoff_max=0.05, retry_after_max=3, max_redirects=5, per_host=4)
    base.update(kw)
    return FetchConfig(**base)


@pytest.fixture
def fetcher():
    made = []

    def make(workers=4, **kw):
        f = Fetcher(config(**kw), workers=workers)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


# ---------------------------------------------------------------- success and HTTP errors


def test_200_returns_the_bytes(http_server, fetcher):
    url = http_server.add("/cat.jpg", body=JPEG, headers={"Content-Type": "image/jpeg"})
    r = fetcher().fetch(url, key=7)
    assert r.ok and r.data == JPEG and r.reason is None and r.tag is None
    assert (r.http_status, r.content_type, r.attempts, r.key, r.url, r.final_url) == (200, "image/jpeg", 1, 7, url, url)
    headers = http_server.requests[-1][2]
    assert headers["User-Agent"].startswith("dinov2-gallery/") and "image/" in headers["Accept"]


def test_html_with_200_is_returned_as_data(http_server, fetcher):
    url = http_server.add("/page", body=b"<html>nope</html>", headers={"Content-Type": "text/html"})
    r = fetcher().fetch(url)
    assert r.ok and r.data == b"<html>nope</html>" and r.content_type == "text/html"


def test_404_is_permanent_and_not_retried(http_server, fetcher):
    r = fetcher().fetch(http_server.url("/missing.jpg"))
    assert not r.ok and r.data is None
    assert r.reason == "http-404: Not Found" and r.tag == "http-404"
    assert r.http_status == 404 and not r.transient and r.attempts == 1
    assert http_server.count("/missing.jpg") == 1


def test_500_retried_until_give_up(http_server, fetcher):
    url = http_server.add("/boom", status=500)
    r = fetcher(retries=3).fetch(url)
    assert not r.ok and r.transient and r.http_status == 500
    assert r.reason.startswith("http-500: ") and "gave up after 4 attempts" in r.reason
    assert r.attempts == 4 and http_server.count("/boom") == 4


def test_503_burst_then_200_succeeds(http_server, fetcher):
    url = http_server.add("/flaky", handler=sequence((503, b"busy"), (503, b"busy"), (200, JPEG)))
    r = fetcher(retries=3).fetch(url)
    assert r.ok and r.data == JPEG and r.attempts == 3 and http_server.count("/flaky") == 3


def test_429_retry_after_is_honoured(http_server, fetcher):
    url = http_server.add("/limited", handler=sequence((429, b"", {"Retry-After": "1"}), (200, JPEG)))
    r = fetcher().fetch(url)
    assert r.ok and r.attempts == 2
    assert r.elapsed >= 1.0


def test_retry_after_delays_other_requests_to_the_same_host(http_server, fetcher):
    a = http_server.add("/a", handler=sequence((429, b"", {"Retry-After": "1"}), (200, b"a")))
    b = http_server.add("/b", body=b"b")
    f = fetcher()
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("a", f.fetch(a)))
    t.start()
    end = time.monotonic() + 2
    key = ("http", "127.0.0.1", http_server.port)
    while f._hosts.not_before(key) == 0 and time.monotonic() < end:  # until /a's 429 was received (not sent)
        time.sleep(0.01)
    t0 = time.monotonic()
    rb = f.fetch(b)
    waited = time.monotonic() - t0
    t.join(5)
    assert rb.ok and results["a"].ok
    assert waited >= 0.7, f"/b was not held back by /a's Retry-After (waited {waited:.2f} s)"


def test_4xx_other_than_408_429_are_permanent(http_server, fetcher):
    f = fetcher(retries=0)
    for status, transient in [(403, False), (410, False), (408, True), (429, True)]:
        url = http_server.add(f"/s{status}", status=status)
        r = f.fetch(url)
        assert r.transient is transient and r.reason.startswith(f"http-{status}: ")


# ---------------------------------------------------------------- slow, broken and huge answers


def test_server_that_never_answers_times_out(http_server, fetcher):
    url = http_server.add("/hang", handler=hang)
    r = fetcher(read_timeout=0.3, retries=1).fetch(url)
    assert not r.ok and r.tag == "timeout" and r.transient
    assert r.reason.startswith("timeout: no data for 0.3 s") and "gave up after 2 attempts" in r.reason
    assert r.attempts == 2 and r.elapsed < 2


def test_slow_drip_is_stopped_by_the_deadline(http_server, fetcher):
    url = http_server.add("/drip", handler=drip(b"x" * 10_000, interval=0.2))
    r = fetcher(read_timeout=2, deadline=1).fetch(url)
    assert not r.ok and r.tag == "deadline" and r.transient and r.http_status == 200
    assert 0.9 < r.elapsed < 2
    assert r.attempts == 1  # a slow server is not retried in the same run


def test_slow_drip_of_headers_is_stopped_by_the_deadline(http_server, fetcher):
    url = http_server.add("/dripheaders", handler=drip_headers(interval=0.2))
    r = fetcher(read_timeout=2, deadline=1).fetch(url)
    assert not r.ok and r.tag == "deadline" and r.elapsed < 2


def test_connection_reset_mid_body(http_server, fetcher):
    url = http_server.add("/reset", handler=reset_after(b"x" * 5000))
    r = fetcher(retries=1).fetch(url)
    assert not r.ok and r.data is None and r.transient
    assert r.tag in ("connection", "incomplete"), r.reason
    assert r.attempts == 2


def test_content_length_larger_than_body_is_incomplete(http_server, fetcher):
    url = http_server.add("/short", handler=truncated(b"x" * 100, 1000))
    r = fetcher(retries=0).fetch(url)
    assert not r.ok and r.data is None and r.transient
    assert r.reason.startswith("incomplete: got 100 of 1000 bytes")


def test_gzip_content_encoding_is_decoded(http_server, fetcher):
    url = http_server.add("/gz", body=gzip.compress(JPEG), headers={"Content-Encoding": "gzip"})
    r = fetcher().fetch(url)
    assert r.ok and r.data == JPEG


def test_gzip_bomb_is_stopped_by_decoded_size(http_server, fetcher):
    bomb = gzip_bomb(10 * 1024 * 1024)
    assert len(bomb) < 20_000
    url = http_server.add("/bomb", body=bomb, headers={"Content-Encoding": "gzip"})
    r = fetcher(max_bytes=1 << 20).fetch(url)
    assert not r.ok and r.tag == "too-large" and not r.transient and "decompression" in r.reason


def test_broken_gzip_is_a_bad_encoding(http_server, fetcher):
    url = http_server.add("/badgz", body=b"this is not gzip", headers={"Content-Encoding": "gzip"})
    r = fetcher().fetch(url)
    assert not r.ok and r.tag == "bad-encoding" and not r.transient and r.attempts == 1


def test_content_length_over_max_bytes_is_refused_without_reading(http_server, fetcher):
    def huge(req):  # announce 100 MB, then send nothing: reading the body would run into the deadline
        req.send_response(200)
        req.send_header("Content-Length", str(100 * 1024 * 1024))
        req.end_headers()
        req.close_connection = True
        req.server.owner.closing.wait(10)
    url = http_server.add("/huge", handler=huge)
    r = fetcher(max_bytes=1 << 20, deadline=3).fetch(url)
    assert not r.ok and r.reason.startswith("too-large: Content-Length 104857600") and not r.transient
    assert r.elapsed < 1


def test_body_over_max_bytes_without_content_length(http_server, fetcher):
    def chunked(req):
        req.send_response(200)
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        chunk = b"y" * 65536
        try:
            for _ in range(40):
                req.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            req.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass
    url = http_server.add("/chunked", handler=chunked)
    r = fetcher(max_bytes=1 << 20).fetch(url)
    assert not r.ok and r.tag == "too-large"


# ---------------------------------------------------------------- redirects


def test_redirect_chain_within_the_limit(http_server, fetcher):
    final = http_server.add("/final.jpg", body=JPEG)
    http_server.add("/r3", status=301, headers={"Location": "/final.jpg"})       # relative
    http_server.add("/r2", status=307, headers={"Location": http_server.url("/r3")})
    start = http_server.add("/r1", status=302, headers={"Location": "r2"})
    r = fetcher(max_redirects=3).fetch(start)
    assert r.ok and r.data == JPEG and r.final_url == final and r.url == start


def test_redirect_loop(http_server, fetcher):
    http_server.add("/loop-a", status=302, headers={"Location": "/loop-b"})
    url = http_server.add("/loop-b", status=302, headers={"Location": "/loop-a"})
    r = fetcher(max_redirects=5).fetch(url)
    assert not r.ok and r.tag == "too-many-redirects" and not r.transient
    assert http_server.count("/loop-a") + http_server.count("/loop-b") == 6


def test_redirect_to_ftp_is_refused(http_server, fetcher):
    url = http_server.add("/to-ftp", status=301, headers={"Location": "ftp://files.example/x.jpg"})
    r = fetcher().fetch(url)
    assert not r.ok and r.reason == "redirect: to non-http scheme ftp://files.example/x.jpg"
    assert not r.transient and r.http_status == 301


def test_redirect_without_location(http_server, fetcher):
    url = http_server.add("/nowhere", status=302)
    r = fetcher().fetch(url)
    assert not r.ok and r.tag == "redirect" and "Location" in r.reason


def test_cookies_are_kept_within_a_redirect_chain_only(http_server, fetcher):
    def gate(req):
        ok = "seen=1" in req.headers.get("Cookie", "")
        body = b"in" if ok else b"no cookie"
        req.send_response(200 if ok else 403)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
    http_server.add("/gate", handler=gate)
    url = http_server.add("/set", status=302, headers={"Location": "/gate", "Set-Cookie": "seen=1; Path=/"})
    f = fetcher()
    assert f.fetch(url).data == b"in"
    assert f.fetch(http_server.url("/gate")).http_status == 403  # not stored in the session
    assert len(f.session.cookies) == 0


# ---------------------------------------------------------------- bad URLs, dead hosts


@pytest.mark.parametrize("url", ["ftp://a.example/x.jpg", "not a url", "http://", ""])
def test_invalid_urls_are_results(fetcher, url):
    r = fetcher().fetch(url)
    assert not r.ok and r.tag == "invalid-url" and not r.transient and r.attempts == 0


def test_connection_refused_is_transient(fetcher):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    r = fetcher(retries=1).fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert not r.ok and r.reason.startswith("connection: refused") and r.transient and r.attempts == 2


# ---------------------------------------------------------------- concurrency


def test_per_host_cap(http_server):
    tracker = ConcurrencyTracker(delay=0.1)
    http_server.add("/slow", handler=tracker)
    urls = [(i, http_server.url(f"/slow?i={i}")) for i in range(16)]
    results = list(fetch_many(urls, workers=8, config=config(per_host=2)))
    assert len(results) == 16 and all(r.ok for r in results)
    assert tracker.total == 16
    assert tracker.max_seen <= 2
    assert tracker.max_seen == 2  # and the cap is actually used


def test_fetch_many_yields_every_result_with_its_key(http_server):
    for i in range(50):
        http_server.add(f"/img{i}.jpg", body=b"%d" % i)
    items = [(f"row-{i}", http_server.url(f"/img{i}.jpg")) for i in range(45)]
    items += [(f"row-{i}", http_server.url(f"/gone{i}.jpg")) for i in range(45, 50)]
    results = list(fetch_many(items, workers=4, config=config()))
    assert len(results) == 50
    by_key = {r.key: r for r in results}
    assert set(by_key) == {f"row-{i}" for i in range(50)}
    for i in range(45):
        assert by_key[f"row-{i}"].data == b"%d" % i
    assert all(by_key[f"row-{i}"].reason == "http-404: Not Found" for i in range(45, 50))


def test_fetch_many_consumes_its_input_lazily(http_server):
    url = http_server.add("/x.jpg", body=b"x")
    pulled = []

    def items():
        for i in range(10_000):
            pulled.append(i)
            yield i, url
    gen = fetch_many(items(), workers=2, config=config(), max_in_flight=4)
    first = next(gen)
    assert first.ok
    assert len(pulled) <= 5  # never the whole list
    gen.close()


def test_closing_aborts_running_downloads(http_server):
    url = http_server.add("/hang", handler=hang)
    f = Fetcher(config(read_timeout=30, deadline=30))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", f.fetch(url)))
    t.start()
    end = time.monotonic() + 2
    while http_server.count("/hang") == 0 and time.monotonic() < end:
        time.sleep(0.01)
    t0 = time.monotonic()
    f.close()
    t.join(5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert out["r"].tag == "cancelled"
    assert f.fetch(url).tag == "cancelled"  # a closed fetcher answers at once


# ---------------------------------------------------------------- config and helpers


@pytest.mark.parametrize("kw", [
    dict(deadline=0), dict(connect_timeout=-1), dict(read_timeout=float("nan")), dict(deadline=float("inf")),
    dict(max_bytes=0), dict(max_bytes=True), dict(retries=-1), dict(retries=1.5), dict(max_redirects=-1),
    dict(per_host=0), dict(user_agent=""), dict(user_agent="a\r\nX: y"), dict(backoff=-0.1), dict(deadline="60"),
])
def test_config_rejects_nonsense(kw):
    with pytest.raises(ConfigError, match="fetch config"):
        FetchConfig(**kw)


def test_workers_validated():
    with pytest.raises(ConfigError):
        Fetcher(workers=0)
    with pytest.raises(ConfigError):
        list(fetch_many([], workers=0))


def test_parse_retry_after():
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("-3") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < parse_retry_after(later) <= 30
    earlier = format_datetime(datetime.now(timezone.utc) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier) == 0.0


# ---------------------------------------------------------------- issue 10: per-host fairness


def _timed_results(items, **kw):
    """[(seconds since start, result)] of fetch_many over ``items``, in the order they were yielded."""
    t0 = time.monotonic()
    return [(time.monotonic() - t0, r) for r in fetch_many(items, **kw)]


@pytest.fixture
def other_server():
    from httpserver import LocalHTTPServer

    s = LocalHTTPServer()
    yield s
    s.close()


def test_a_throttling_host_delays_only_its_own_rows_and_then_fails_fast(http_server, other_server):
    """24 rows on a host answering 429 with Retry-After 30 s, then 8 rows on another host (the issue's case): the
    good host's rows are not held back, and the throttling host's remaining rows fail at once (transient)."""
    for i in range(24):
        http_server.add(f"/busy/{i}.jpg", status=429, body=b"slow down", headers={"Retry-After": "30"})
    good = [other_server.add(f"/ok/{i}.jpg", handler=sequence((200, JPEG))) for i in range(8)]
    items = [(f"a{i}", http_server.url(f"/busy/{i}.jpg")) for i in range(24)] + [(f"b{i}", u) for i, u in enumerate(good)]
    out = _timed_results(items, workers=8, config=config(deadline=5, retry_after_max=60))
    by_key = {r.key: (t, r) for t, r in out}
    assert len(by_key) == 32
    assert all(by_key[f"b{i}"][1].ok for i in range(8))
    assert max(by_key[f"b{i}"][0] for i in range(8)) < 3, [round(t, 2) for t, _ in out]
    throttled = [by_key[f"a{i}"][1] for i in range(24)]
    assert all(not r.ok and r.transient for r in throttled)
    assert {r.tag for r in throttled} <= {"http-429", "host-busy", "host-failing"}, {r.tag for r in throttled}
    assert sum(r.tag == "host-failing" for r in throttled) >= 18  # not tried: no request, no wait
    assert all(r.attempts == 0 for r in throttled if r.tag == "host-failing")
    assert http_server.count() <= 6
    assert out[-1][0] < 6, out[-1][0]  # the whole run: no 30 s Retry-After wait


def test_a_slow_host_does_not_hold_the_other_hosts_rows(http_server, other_server):
    slow = ConcurrencyTracker(delay=1.0, body=JPEG)
    for i in range(24):
        http_server.add(f"/slow/{i}.jpg", handler=slow)
    good = [other_server.add(f"/ok/{i}.jpg", body=JPEG) for i in range(8)]
    items = [(f"a{i}", http_server.url(f"/slow/{i}.jpg")) for i in range(24)] + [(f"b{i}", u) for i, u in enumerate(good)]
    out = _timed_results(items, workers=8, config=config(deadline=10))
    times = {r.key: t for t, r in out}
    assert all(r.ok for _, r in out)
    assert max(times[f"b{i}"] for i in range(8)) < 1.5, sorted(times.items(), key=lambda kv: kv[1])
    assert slow.max_seen <= 4  # the slow host never had more than its per-host share of the workers


def test_a_host_that_keeps_failing_gets_its_remaining_rows_failed_fast(http_server):
    dead = f"http://127.0.0.1:{_free_port()}"
    items = [(i, f"{dead}/{i}.jpg") for i in range(40)] + [("ok", http_server.add("/fine.jpg", body=JPEG))]
    with Fetcher(config(retries=1), workers=4) as f:
        out = list(fetch_many(items, workers=4, fetcher=f))
        results = {r.key: r for r in out}
        assert results["ok"].ok
        tags = [results[i].tag for i in range(40)]
        assert tags.count("host-failing") >= 34 and set(tags) <= {"connection", "host-failing"}, tags
        assert all(results[i].transient for i in range(40))
        assert "127.0.0.1" in results[39].reason and "connection: refused" in results[39].reason
        # the same fetcher (the same ingest run) keeps the host's state: a later row fails at once too
        assert f.host_failing(("http", "127.0.0.1", int(dead.rsplit(":", 1)[1]))) is not None
    # an answer resets the count: a host that fails now and then is never given up on
    flaky = http_server.add("/flaky.jpg", handler=sequence(*([(503, b"")] * 2 + [(200, JPEG)]) * 20))
    with Fetcher(config(retries=0, host_failures=3), workers=1) as f:
        res = list(fetch_many([(i, flaky) for i in range(30)], workers=1, fetcher=f))
    assert not any(r.tag == "host-failing" for r in res), [r.tag for r in res]


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------- issue 10: memory budget


def test_downloads_in_flight_stay_within_the_memory_budget(http_server):
    """16 workers, 40 bodies of 200 KB, a budget of 1 MB and a slow consumer: never more than 1 MB of bodies
    held at once (announced sizes are reserved exactly; an unannounced size reserves max_bytes)."""
    from retrieval.fetch import MemoryBudget

    body = bytes(range(256)) * 800  # 204,800 bytes
    urls = [(i, http_server.add(f"/b/{i}", body=body)) for i in range(40)]
    urls += [("chunked", http_server.add("/chunked", handler=_no_length(body)))]
    budget = MemoryBudget(1_000_000)
    seen = []
    with Fetcher(config(max_bytes=300_000, deadline=20, per_host=16), workers=16, budget=budget) as f:
        for r in fetch_many(urls, workers=16, fetcher=f):
            assert r.ok, r
            assert r.reserved == len(r.data) == len(body)
            seen.append(budget.in_use)
            time.sleep(0.01)  # the consumer is slower than the downloads: they must wait for memory
            r.release()
            r.release()  # idempotent
    assert len(seen) == 41
    assert budget.peak <= 1_000_000, budget.peak
    assert budget.peak >= 4 * len(body)  # the budget was used, not just respected by a trickle
    assert budget.waits > 0 and budget.in_use == 0


def _no_length(body):
    def handler(req):
        req.send_response(200)
        req.send_header("Connection", "close")
        req.end_headers()
        req.close_connection = True
        req.wfile.write(body)
    return handler
