"""The web app (``cli.py serve``), end to end: a real gallery, a real server process on 127.0.0.1, its JSON API
over HTTP, and the page driven in headless Chromium (Selenium + Debian's chromium/chromedriver). One server
and one browser for the whole module. The contact sheet (``query --html``) is opened in the same browser."""

from __future__ import annotations

import io
import os
import struct
import zlib

import pytest
from PIL import Image

from webtools import (N_IMAGES, ROOT, SCRIPT_CAPTION, Server, base_env, browser_or_skip, cli, close_browser,
                      jpeg, make_gallery, small_weights)

SCREENSHOT = ROOT / "docs" / "screenshot.png"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    return base_env(small_weights(root / "w.safetensors"), root / "cache")


@pytest.fixture(scope="module")
def gallery(env, tmp_path_factory):
    return make_gallery(tmp_path_factory.mktemp("webgallery"), env)


@pytest.fixture(scope="module")
def server(env, gallery):
    srv = Server(env, gallery["db"], "--max-upload-mb", "1", "--allow-private")
    srv.wait_model()
    yield srv
    srv.stop()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header declares width x height: a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (8, 8)).save(buf, "PNG")
    data = buf.getvalue()
    body = struct.pack(">II", width, height) + data[24:29]
    chunk = struct.pack(">I", len(body)) + b"IHDR" + body + struct.pack(">I", zlib.crc32(b"IHDR" + body) & 0xFFFFFFFF)
    return data[:8] + chunk + data[33:]


def error_of(r, status: int, reason: str | None = None) -> str:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "reason"}, body
    assert "Traceback" not in body["error"] and "\n" not in body["error"]
    if reason is not None:
        assert body["reason"] == reason, body
    return body["error"]


# ---------------------------------------------------------------- JSON API


def test_search_by_id(server, gallery):
    ids = gallery["ids"]
    r = server.http.get(server.url("/api/search"), params={"id": ids["p2.jpg"], "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    res = body["results"]
    assert body["query"] == {"kind": "id", "id": ids["p2.jpg"]} and body["k"] == 5
    assert len(res) == 5 and [x["rank"] for x in res] == [1, 2, 3, 4, 5]
    assert res[0]["id"] == ids["p2.jpg"] and res[0]["score"] > 0.999
    assert all(a["score"] >= b["score"] for a, b in zip(res, res[1:]))
    assert res[0]["meta"] == {"title": "photo 2", "kind": "a"}
    assert res[0]["thumbnail"] == f"/api/images/{ids['p2.jpg']}/thumbnail"
    assert "path" not in res[0]  # the server's file layout is not part of the API
    # min_score and metadata filters
    cut = res[2]["score"]
    r2 = server.http.get(server.url("/api/search"), params={"id": ids["p2.jpg"], "k": 5, "min_score": cut}).json()
    assert [x["id"] for x in r2["results"]] == [x["id"] for x in res[:3]]
    r3 = server.http.get(server.url("/api/search"), params={"id": ids["p2.jpg"], "k": 20, "filter": "kind=b"}).json()
    assert len(r3["results"]) == N_IMAGES // 2 and all(x["meta"]["kind"] == "b" for x in r3["results"])
    assert [x["rank"] for x in r3["results"]] == list(range(1, N_IMAGES // 2 + 1))


def test_search_bad_parameters_are_4xx_json(server, gallery):
    get = lambda **p: server.http.get(server.url("/api/search"), params=p)  # noqa: E731
    assert "no such image" in error_of(get(id=999999), 404, "not-found")
    error_of(get(id="abc"), 400)
    error_of(get(id="1 OR 1=1"), 400)
    error_of(get(id=gallery["ids"]["p1.jpg"], k=0), 400)
    error_of(get(id=gallery["ids"]["p1.jpg"], k=100000), 400)
    error_of(get(id=gallery["ids"]["p1.jpg"], min_score="lots"), 400)
    error_of(get(id=gallery["ids"]["p1.jpg"], filter="nokey"), 400)
    error_of(get(), 400)
    error_of(get(id=1, url="http://127.0.0.1/x.jpg"), 400)
    assert "has no vector" in error_of(get(id=gallery["failed"][0]), 400)
    error_of(get(q="0123456789abcdef0123"), 404, "not-found")


def test_search_by_upload_multipart_raw_and_token(server, gallery):
    data = gallery["files"]["p4.jpg"].read_bytes()
    r = server.http.post(server.url("/api/search"), params={"k": 3}, files={"image": ("p4.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["kind"] == "upload" and body["query"]["name"] == "p4.jpg"
    assert body["results"][0]["id"] == gallery["ids"]["p4.jpg"] and body["results"][0]["score"] > 0.999
    assert len(body["results"]) == 3
    token = body["query"]["token"]
    # the same query again, by token (a page reload, or k changed): no upload, same results
    again = server.http.get(server.url("/api/search"), params={"q": token, "k": 3}).json()
    assert [x["id"] for x in again["results"]] == [x["id"] for x in body["results"]]
    t = server.http.get(server.url(body["query"]["thumbnail"]))
    assert t.status_code == 200 and Image.open(io.BytesIO(t.content)).format == "JPEG"
    # the raw bytes as the body, k as a form field in multipart
    raw = server.http.post(server.url("/api/search?k=2"), data=data, headers={"Content-Type": "image/jpeg"}).json()
    assert raw["results"][0]["id"] == gallery["ids"]["p4.jpg"] and len(raw["results"]) == 2
    form = server.http.post(server.url("/api/search"), data={"k": "4"}, files={"image": ("x", data)}).json()
    assert len(form["results"]) == 4


def test_bad_uploads(server):
    post = lambda body, name="x.jpg": server.http.post(  # noqa: E731
        server.url("/api/search"), files={"image": (name, body, "image/jpeg")})
    assert "not an image" in error_of(post(b"<html>hello</html>", "page.jpg"), 422, "not-an-image")
    error_of(post(b""), 422, "empty")
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 200
    error_of(post(bomb, "bomb.png"), 413, "too-large")
    truncated = jpeg(5, (400, 300))[:500]
    error_of(post(truncated), 422)
    # above the server's --max-upload-mb 1: refused from the announced length, and when streamed without it
    big = os.urandom(1024 * 1024 + 100_000)
    error_of(post(big, "big.jpg"), 413, "too-large")
    chunked = server.http.post(server.url("/api/search"), data=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                               headers={"Content-Type": "image/jpeg"})
    error_of(chunked, 413, "too-large")
    error_of(server.http.post(server.url("/api/search"), files={"other": ("x", b"abc")}), 400)
    error_of(server.http.post(server.url("/api/search"), data=b"", headers={"Content-Type": "image/jpeg"}), 400)
    # the server is still fine
    assert server.http.get(server.url("/api/health")).json()["ok"] is True


def test_search_by_url_uses_the_fetch_rules(server, gallery, http_server):
    http_server.add("/q.jpg", body=gallery["files"]["p6.jpg"].read_bytes(), headers={"Content-Type": "image/jpeg"})
    http_server.add("/page.html", body=b"<html></html>", headers={"Content-Type": "text/html"})
    r = server.http.get(server.url("/api/search"), params={"url": http_server.url("/q.jpg"), "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["kind"] == "url" and body["query"]["url"] == http_server.url("/q.jpg")
    assert body["results"][0]["id"] == gallery["ids"]["p6.jpg"]
    assert http_server.count("/q.jpg") == 1
    server.http.get(server.url("/api/search"), params={"url": http_server.url("/q.jpg"), "k": 5})
    assert http_server.count("/q.jpg") == 1  # k changed: the query's vector is reused, not fetched again
    error_of(server.http.get(server.url("/api/search"), params={"url": http_server.url("/nothing.jpg")}), 422, "http-404")
    error_of(server.http.get(server.url("/api/search"), params={"url": http_server.url("/page.html")}), 422, "not-an-image")
    error_of(server.http.get(server.url("/api/search"), params={"url": "javascript:alert(1)"}), 422, "invalid-url")
    error_of(server.http.get(server.url("/api/search"), params={"url": "file:///etc/passwd"}), 422, "invalid-url")


def test_image_metadata_thumbnail_and_original(server, gallery):
    ids = gallery["ids"]
    d = server.http.get(server.url(f"/api/images/{ids['p0.jpg']}")).json()
    assert d["status"] == "ok" and d["meta"] == {"title": "photo 0", "kind": "a"} and d["format"] == "JPEG"
    assert [x["id"] for x in d["duplicates"]] == [ids["p0_copy.jpg"]]
    dup = server.http.get(server.url(f"/api/images/{ids['p0_copy.jpg']}")).json()
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == ids["p0.jpg"]
    assert [x["id"] for x in dup["duplicates"]] == [ids["p0.jpg"]]
    for image_id in (ids["p0.jpg"], ids["p0_copy.jpg"]):
        t = server.http.get(server.url(f"/api/images/{image_id}/thumbnail"))
        assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
        im = Image.open(io.BytesIO(t.content))
        assert im.format == "JPEG" and max(im.size) <= 256
        o = server.http.get(server.url(f"/api/images/{image_id}/original"))
        assert o.status_code == 200 and o.headers["content-type"] == "image/jpeg"
        assert o.content == gallery["files"]["p0.jpg"].read_bytes()
        assert o.headers["x-content-type-options"] == "nosniff"
    failed = gallery["failed"][0]
    f = server.http.get(server.url(f"/api/images/{failed}")).json()
    assert f["status"] == "failed" and f["error"].startswith("invalid-url") and f["thumbnail"] is None
    error_of(server.http.get(server.url(f"/api/images/{failed}/thumbnail")), 404, "not-found")
    error_of(server.http.get(server.url(f"/api/images/{failed}/original")), 404, "not-found")
    for path in ("/api/images/999999", "/api/images/999999/thumbnail", "/api/images/999999/original"):
        error_of(server.http.get(server.url(path)), 404)
    error_of(server.http.get(server.url("/api/images/-1/original")), 404)
    error_of(server.http.get(server.url("/api/images/abc")), 400)


def test_path_traversal_is_never_opened(server, gallery):
    import requests

    secret = (ROOT / "cli.py").read_bytes()
    for path in ("/api/images/..%2F..%2F..%2Fetc%2Fpasswd/original", "/api/images/..%2Fcli.py/original",
                 "/api/images/1%2F..%2F..%2Fcli.py/original", "/api/images/%2Fetc%2Fpasswd/thumbnail",
                 "/api/images/../../cli.py", "/static/../cli.py", "/static/..%2F..%2F..%2Fcli.py",
                 "/static/%2e%2e/%2e%2e/%2e%2e/cli.py", "/api/queries/..%2F..%2Fcli.py/thumbnail"):
        # send the path exactly as written (no client-side normalisation of ../)
        req = requests.Request("GET", server.url("/")).prepare()
        req.url = server.url(path)
        r = server.http.send(req)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert secret[:200] not in r.content and b"root:" not in r.content, path
        assert "Traceback" not in r.text
    error_of(server.http.get(server.url("/api/nothing-here")), 404)


def test_state_endpoints_and_headers(server, gallery):
    s = server.http.get(server.url("/api/stats")).json()
    assert s["counts"] == {"ok": N_IMAGES, "failed": 2, "duplicate": 1, "total": N_IMAGES + 3}
    assert s["model"]["pooling"] == "mean" and "0006_thumbnails" in s["migrations"]
    assert s["thumbnails"] == N_IMAGES  # made at ingest
    f = server.http.get(server.url("/api/failures")).json()
    assert f["total"] == 2 and f["reasons"] == {"invalid-url": 2}
    assert {r["id"] for r in f["rows"]} == set(gallery["failed"])
    assert server.http.get(server.url("/api/failures"), params={"reason": "http-404"}).json()["total"] == 0
    error_of(server.http.get(server.url("/api/failures"), params={"limit": "x"}), 400)
    d = server.http.get(server.url("/api/duplicates")).json()
    assert d["total"] == 1 and d["groups"][0]["id"] == gallery["ids"]["p0.jpg"]
    assert [x["id"] for x in d["groups"][0]["duplicates"]] == [gallery["ids"]["p0_copy.jpg"]]
    r = server.http.get(server.url("/"))
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text.replace("https://… an image", "")  # nothing from elsewhere
    # a page elsewhere cannot talk to the app through a host name it controls (DNS rebinding)
    error_of(server.http.get(server.url("/api/stats"), headers={"Host": "evil.example"}), 400, "bad-host")
    error_of(server.http.get(server.url("/api/stats"), headers={"Host": "127.0.0.1.evil.example:80"}), 400, "bad-host")
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", "127.0.0.1"):
        assert server.http.get(server.url("/api/health"), headers={"Host": host}).status_code == 200, host


def test_pages_escape_untrusted_text(server):
    html = server.http.get(server.url("/failures")).text
    assert "&lt;script&gt;window.__xss = 2&lt;/script&gt;" in html and "<script>" not in html
    assert "invalid-url" in html
    assert "<script" not in server.http.get(server.url("/gallery")).text
    dup = server.http.get(server.url("/duplicates")).text
    assert "p0_copy.jpg" in dup
    missing = server.http.get(server.url("/nothing/<script>"))
    assert missing.status_code == 404 and "<script>" not in missing.text


def test_serve_says_where_it_listens(env, gallery):
    srv = Server(env, gallery["db"], "--lazy")
    try:
        assert srv.http.get(srv.url("/api/health")).json()["model"]["loaded"] is False  # --lazy: not yet
        r = srv.http.get(srv.url("/api/search"), params={"id": gallery["ids"]["p1.jpg"], "k": 2})
        assert r.status_code == 200  # an id search needs no model
        assert srv.http.get(srv.url("/api/health")).json()["model"]["loaded"] is False
    finally:
        out, _ = srv.stop()
    assert f"on http://127.0.0.1:{srv.port}/" in out and "Warning" not in out
    srv = Server(env, gallery["db"], "--lazy", host="0.0.0.0")
    out, _ = srv.stop()
    assert "Warning: listening on 0.0.0.0" in out


def test_an_empty_gallery_answers_503_not_a_traceback(env, tmp_path):
    from retrieval import store

    db = tmp_path / "empty.db"
    store.connect(db).close()
    srv = Server(env, db)
    try:
        r = srv.http.post(srv.url("/api/search"), files={"image": ("a.jpg", jpeg(1))})
        assert "empty" in error_of(r, 503, "unavailable")
        error_of(srv.http.get(srv.url("/api/search"), params={"id": 1}), 404)
        assert srv.http.get(srv.url("/gallery")).status_code == 200
    finally:
        srv.stop()


def test_serve_bad_input_is_one_line(env, gallery, tmp_path):
    import socket

    p = cli(env, "serve", "--db", tmp_path / "none.db", "--port", "0")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no such gallery database" in p.stderr
    assert not (tmp_path / "none.db").exists()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = cli(env, "serve", "--db", gallery["db"], "--port", port, "--lazy")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"Error: 127.0.0.1:{port}: cannot listen there")


# ---------------------------------------------------------------- the page, in headless Chromium


@pytest.fixture(scope="module")
def browser():
    driver = browser_or_skip()
    yield driver
    close_browser(driver)


def wait(driver, predicate, timeout=20, message="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d), message)


def tiles(driver, visible_only=False):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, "#grid .tile")
    return [t for t in found if t.is_displayed()] if visible_only else found


def grid_ids(driver):
    return [int(t.get_attribute("data-id")) for t in tiles(driver)]


def wait_grid(driver, first_id=None, count=None):
    def ready(d):
        ts = tiles(d)
        if not ts or (first_id is not None and int(ts[0].get_attribute("data-id")) != first_id):
            return False
        if count is not None and len(ts) != count:
            return False
        # every thumbnail has loaded
        return d.execute_script("return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")
    wait(driver, ready, message=f"grid with first id {first_id}, {count} tiles")


def test_page_upload_shows_grid_with_scores(browser, server, gallery):
    from selenium.webdriver.common.by import By

    browser.get(server.url("/"))
    assert "Search by dropping" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "file").send_keys(str(gallery["files"]["p2.jpg"]))
    wait_grid(browser, gallery["ids"]["p2.jpg"], count=N_IMAGES)
    first = tiles(browser)[0]
    score = float(first.find_element(By.CSS_SELECTOR, ".score").text)
    assert score > 0.999
    scores = [float(t.find_element(By.CSS_SELECTOR, ".score").text) for t in tiles(browser)]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 3
    assert "q=" in browser.current_url
    assert browser.find_element(By.ID, "queryimg").get_attribute("naturalWidth") != "0"
    as_json = server.http.get(browser.find_element(By.ID, "jsonlink").get_attribute("href")).json()
    assert [r["id"] for r in as_json["results"]] == [int(t.get_attribute("data-id")) for t in tiles(browser)]
    SCREENSHOT.parent.mkdir(exist_ok=True)
    png = browser.get_screenshot_as_png()  # the README shows it: kept small (256 colours)
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size > 10_000
    # a reload of the shareable URL shows the same search
    browser.refresh()
    wait_grid(browser, gallery["ids"]["p2.jpg"], count=N_IMAGES)


def test_page_more_like_this_and_history(browser, server, gallery):
    from selenium.webdriver.common.by import By

    start_url = browser.current_url
    target = int(tiles(browser)[3].get_attribute("data-id"))
    tiles(browser)[3].find_element(By.CSS_SELECTOR, "button.more").click()
    wait_grid(browser, target)
    assert f"id={target}" in browser.current_url
    browser.back()
    wait(browser, lambda d: d.current_url == start_url, message="back to the upload search")
    wait_grid(browser, gallery["ids"]["p2.jpg"])
    browser.forward()
    wait_grid(browser, target)
    assert f"id={target}" in browser.current_url


def test_page_k_selector_and_min_score_slider(browser, server, gallery):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    browser.get(server.url(f"/?id={gallery['ids']['p5.jpg']}"))
    wait_grid(browser, gallery["ids"]["p5.jpg"], count=N_IMAGES)
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("10")
    wait_grid(browser, gallery["ids"]["p5.jpg"], count=10)
    assert "k=10" in browser.current_url
    scores = [float(t.get_attribute("data-score")) for t in tiles(browser)]
    # a slider position (steps of 0.01 from -1) between two neighbouring scores
    cut = next(i for i in range(2, len(scores)) if scores[i - 1] - scores[i] > 0.011)
    steps = int((scores[cut - 1] + 1) / 0.01)  # -1 + steps * 0.01 <= scores[cut - 1]
    threshold = -1 + steps * 0.01
    assert scores[cut] < threshold - 1e-9 <= scores[cut - 1]
    slider = browser.find_element(By.ID, "min")
    slider.send_keys(Keys.HOME)
    slider.send_keys(Keys.ARROW_RIGHT * steps)
    wait(browser, lambda d: len(tiles(d, visible_only=True)) == cut, message=f"{cut} tiles visible")
    assert f"{threshold:.2f}" == browser.find_element(By.ID, "minval").text
    assert f"of 10 results shown (score ≥ {threshold:.2f})" in browser.find_element(By.ID, "status").text
    wait(browser, lambda d: f"min={threshold:.2f}" in d.current_url, message="min in the URL")
    browser.refresh()  # the threshold is part of the shareable state
    wait_grid(browser, gallery["ids"]["p5.jpg"], count=10)
    assert len(tiles(browser, visible_only=True)) == cut


def test_page_filters(browser, server, gallery):
    from selenium.webdriver.common.by import By

    browser.get(server.url(f"/?id={gallery['ids']['p5.jpg']}"))
    wait_grid(browser, gallery["ids"]["p5.jpg"], count=N_IMAGES)
    box = browser.find_element(By.ID, "filters")
    box.send_keys("kind=b")
    browser.find_element(By.CSS_SELECTOR, "#filterform button").click()
    wait_grid(browser, gallery["ids"]["p5.jpg"], count=N_IMAGES // 2)
    assert "f=kind%3Db" in browser.current_url


def test_page_detail_view_with_original_and_duplicates(browser, server, gallery):
    from selenium.webdriver.common.by import By

    p0 = gallery["ids"]["p0.jpg"]
    browser.get(server.url(f"/?id={p0}&k=10"))
    wait_grid(browser, p0, count=10)
    tiles(browser)[0].find_element(By.CSS_SELECTOR, "button.pic").click()
    dialog = browser.find_element(By.ID, "detail")
    wait(browser, lambda d: d.execute_script(
        "const i = document.querySelector('#detail img.original'); return !!(i && i.complete && i.naturalWidth > 0)"),
        message="the original in the detail view")
    text = dialog.text
    assert "photo 0" in text and "pics/p0.jpg" in text  # a local file inside the gallery's folder: its key is relative
    assert "p0_copy.jpg" in dialog.find_element(By.CSS_SELECTOR, "ul.duplicates").text
    natural = browser.execute_script("return document.querySelector('#detail img.original').naturalWidth")
    assert natural == Image.open(gallery["files"]["p0.jpg"]).width  # the original, not the thumbnail
    dialog.find_element(By.CSS_SELECTOR, "button.more").click()
    wait(browser, lambda d: not d.find_element(By.ID, "detail").is_displayed(), message="detail closed")


def test_page_script_caption_is_text(browser, server, gallery):
    from selenium.webdriver.common.by import By

    p3 = gallery["ids"]["p3.jpg"]
    browser.get(server.url(f"/?id={p3}"))
    wait_grid(browser, p3)
    first = tiles(browser)[0]
    assert SCRIPT_CAPTION in first.find_element(By.CSS_SELECTOR, ".meta").get_attribute("textContent")
    assert SCRIPT_CAPTION in first.get_attribute("title")
    assert browser.execute_script("return document.querySelectorAll('#grid script, #grid b').length") == 0
    first.find_element(By.CSS_SELECTOR, "button.pic").click()
    wait(browser, lambda d: SCRIPT_CAPTION in d.find_element(By.ID, "detailbody").text, message="caption as text")
    assert browser.execute_script("return document.querySelectorAll('#detail script, #detail b').length") == 0
    assert browser.execute_script("return window.__xss === undefined")


def test_page_search_by_url(browser, server, gallery, http_server):
    from selenium.webdriver.common.by import By

    http_server.add("/query.jpg", body=gallery["files"]["p7.jpg"].read_bytes(), headers={"Content-Type": "image/jpeg"})
    browser.get(server.url("/"))
    box = browser.find_element(By.ID, "url")
    box.send_keys(http_server.url("/query.jpg"))
    browser.find_element(By.CSS_SELECTOR, "#urlform button").click()
    wait_grid(browser, gallery["ids"]["p7.jpg"])
    assert "url=http" in browser.current_url
    assert http_server.url("/query.jpg") in browser.find_element(By.ID, "querylabel").text


DISPATCH = """
const [kind, id, done] = arguments;
fetch('/api/images/' + id + '/original').then(r => r.blob()).then(blob => {
  const data = new DataTransfer();
  data.items.add(new File([blob], kind + '.jpg', {type: 'image/jpeg'}));
  const event = kind === 'paste' ? new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true})
                                 : new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true});
  (kind === 'paste' ? document.body : document.getElementById('drop')).dispatchEvent(event);
  done(true);
});
"""


@pytest.mark.parametrize("kind", ["paste", "drop"])
def test_page_paste_and_drop_an_image(browser, server, gallery, kind):
    from selenium.webdriver.common.by import By

    name = {"paste": "p8.jpg", "drop": "p9.jpg"}[kind]
    browser.get(server.url("/"))
    assert browser.execute_async_script(DISPATCH, kind, gallery["ids"][name])
    wait_grid(browser, gallery["ids"][name])
    assert "q=" in browser.current_url
    assert browser.find_element(By.ID, "querylabel").text == f"query: {kind}.jpg"


def test_page_bad_input_shows_a_message(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server.url("/"))
    fake = tmp_path / "notes.jpg"
    fake.write_text("these are notes, not a picture")
    browser.find_element(By.ID, "file").send_keys(str(fake))
    wait(browser, lambda d: d.find_element(By.ID, "error").is_displayed(), message="an error message")
    assert "not an image" in browser.find_element(By.ID, "error").text
    browser.get(server.url("/?id=999999"))
    wait(browser, lambda d: "no such image" in d.find_element(By.ID, "error").text, message="unknown id message")
    assert tiles(browser) == []


def test_page_failures_and_gallery_pages(browser, server, gallery):
    from selenium.webdriver.common.by import By

    browser.get(server.url("/failures"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "invalid-url" in body and "<script>window.__xss = 2</script>" in body
    assert browser.execute_script("return window.__xss === undefined")
    browser.find_element(By.LINK_TEXT, "invalid-url").click()
    wait(browser, lambda d: "reason=invalid-url" in d.current_url, message="reason filter")
    assert "missing.jpg" in browser.find_element(By.TAG_NAME, "body").text
    browser.get(server.url("/gallery"))
    body = browser.find_element(By.TAG_NAME, "body").text
    assert f"{N_IMAGES + 3}: {N_IMAGES} ok, 2 failed, 1 duplicate" in body and "small" in body and "completed" in body
    browser.get(server.url("/duplicates"))
    assert browser.execute_script("return [...document.querySelectorAll('img.mini')].every(i => i.naturalWidth > 0)")


def test_contact_sheet_opens_in_the_browser(browser, env, gallery, tmp_path):
    from selenium.webdriver.common.by import By

    sheet = tmp_path / "results.html"
    p = cli(env, "query", gallery["files"]["p3.jpg"], "--db", gallery["db"], "-k", "5", "--html", sheet)
    assert p.returncode == 0, p.stderr
    html = sheet.read_text(encoding="utf-8")
    assert "http://" not in html.replace('http-equiv', '') and "<script" not in html
    browser.get(sheet.as_uri())
    imgs = browser.find_elements(By.TAG_NAME, "img")
    assert len(imgs) == 6  # the query and 5 results, all inlined
    assert all(i.get_attribute("src").startswith("data:image/jpeg;base64,") for i in imgs)
    assert browser.execute_script("return [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert SCRIPT_CAPTION in text and "pics/p3.jpg" in text
    assert browser.execute_script("return window.__xss === undefined")
    scores = [float(s.text) for s in browser.find_elements(By.CSS_SELECTOR, ".score")]
    assert len(scores) == 5 and scores[0] > 0.999 and scores == sorted(scores, reverse=True)
