"""Thumbnails in the database (migration 0006, retrieval/thumbs.py): made at ingest, lazily from the stored
original for a gallery made before them, or by ``cli.py thumbs``; the contact sheet's CLI options; the web
extra's absence; metadata filters."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from retrieval import store, thumbs
from retrieval.errors import InputError
from retrieval.web import filters as F
from webtools import ROOT, base_env, cli, jpeg, small_weights

RECORD = {"variant": "small", "weights_sha256": "ab" * 32, "preprocess": "resize-short", "interpolation": "hf",
          "pooling": "cls", "dim": 4}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("thumbs")
    return base_env(small_weights(root / "w.safetensors"), root / "cache")


def columns(conn, table):
    return [(r[1], r[2].upper(), r[5]) for r in conn.execute(f"PRAGMA table_info({table})")]


def test_migration_on_a_blank_database(tmp_path):
    conn = store.connect(tmp_path / "blank.db")
    assert "0006_thumbnails" in store.applied_migrations(conn)
    assert columns(conn, "thumbnails") == [("image_id", "INTEGER", 1), ("width", "INTEGER", 0),
                                           ("height", "INTEGER", 0), ("mime", "TEXT", 0), ("data", "BLOB", 0)]
    fk = conn.execute("PRAGMA foreign_key_list(thumbnails)").fetchone()
    assert fk["table"] == "images" and fk["on_delete"] == "CASCADE"


def old_gallery(tmp_path):
    """A gallery made by the schema before thumbnails (0001 + 0002) holding data: two ok images whose originals
    are stored beside it (one as a relative path, as ingest stores downloads), a duplicate, a failure, an ok
    row whose original is gone."""
    db = tmp_path / "old.db"
    conn = store.connect(db, apply_migrations=False)
    store.migrate(conn, upto=2)
    (tmp_path / "old_images").mkdir()
    a, b = tmp_path / "old_images" / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(jpeg(1, (640, 480)))
    b.write_bytes(jpeg(2, (120, 300)))
    store.ensure_model(conn, RECORD)
    rng = np.random.default_rng(0)

    def vec():
        v = rng.normal(size=4).astype(np.float32)
        return v / np.linalg.norm(v)

    ids = {}
    ids["a"], _ = store.record_ok(conn, {"url": "http://x.test/a.jpg", "content_sha256": "a" * 64, "width": 640,
                                         "height": 480, "format": "JPEG", "path": "old_images/a.jpg"}, vec())
    ids["b"], _ = store.record_ok(conn, {"url": str(b), "content_sha256": "b" * 64, "width": 120, "height": 300,
                                         "format": "JPEG", "path": str(b)}, vec())
    ids["gone"], _ = store.record_ok(conn, {"url": "http://x.test/gone.jpg", "content_sha256": "c" * 64,
                                            "format": "JPEG", "path": "old_images/gone.jpg"}, vec())
    ids["dup"], _ = store.record_duplicate(conn, {"url": "http://y.test/a.jpg", "content_sha256": "a" * 64}, ids["a"])
    ids["failed"], _ = store.record_failed(conn, {"url": "http://x.test/404.jpg", "error": "http-404: Not Found"})
    conn.close()
    return db, ids


def test_migration_on_an_old_gallery_keeps_its_data_and_thumbnails_come_lazily(tmp_path):
    db, ids = old_gallery(tmp_path)
    # 0004 rewrites local paths inside the gallery's folder as relative ones: compare the other columns
    cols = "id, status, error, http_status, content_sha256, duplicate_of, width, height, format, bytes, meta"
    before = sqlite3.connect(db).execute(f"SELECT {cols} FROM images ORDER BY id").fetchall()
    conn = store.connect(db)  # applies 0003.. including 0006
    assert "0006_thumbnails" in store.applied_migrations(conn)
    assert [tuple(r) for r in conn.execute(f"SELECT {cols} FROM images ORDER BY id")] == before
    assert conn.execute("SELECT count(*) FROM thumbnails").fetchone()[0] == 0
    assert thumbs.missing_ids(conn) == [ids["a"], ids["b"], ids["gone"]]
    t = thumbs.get(conn, ids["a"], db)  # made from the stored original (relative to the database), then cached
    im = Image.open(io.BytesIO(t.data))
    assert im.format == "JPEG" and im.size == (256, 192) == (t.width, t.height) and t.mime == "image/jpeg"
    assert thumbs.stored(conn, ids["a"]).data == t.data
    assert thumbs.get(conn, ids["dup"], db).data == t.data  # a duplicate shows the row it points at
    assert thumbs.stored(conn, ids["dup"]) is None
    assert thumbs.get(conn, ids["failed"], db) is None and thumbs.get(conn, ids["gone"], db) is None
    assert thumbs.get(conn, 12345, db) is None
    # deleting an image deletes its thumbnail (nothing orphaned)
    with store.transaction(conn):
        conn.execute("DELETE FROM images WHERE id = ?", (ids["dup"],))
        conn.execute("DELETE FROM image_embeddings WHERE image_id = ?", (ids["a"],))
        conn.execute("DELETE FROM images WHERE id = ?", (ids["a"],))
    assert thumbs.stored(conn, ids["a"]) is None
    assert conn.execute("SELECT count(*) FROM thumbnails").fetchone()[0] == 0
    assert store.check(conn) == []


def test_thumbnail_from_a_large_rotated_jpeg_decodes_at_reduced_scale(tmp_path):
    from retrieval.decode import decode
    from webtools import picture

    img = picture(7, (2400, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: portrait
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    path = tmp_path / "big.jpg"
    path.write_bytes(buf.getvalue())
    full = decode(buf.getvalue(), "big.jpg")
    drafted = decode(buf.getvalue(), "big.jpg", draft=(256, 256))
    assert full.size == (1200, 2400) and drafted.width < 1200 and drafted.height >= 256
    assert drafted.size[0] * 2 == drafted.size[1] and drafted.format == "JPEG"
    t = thumbs.from_file(path)
    assert (t.width, t.height) == (128, 256)
    expected = thumbs.make(full)
    a = np.asarray(Image.open(io.BytesIO(t.data)), np.float32)
    b = np.asarray(Image.open(io.BytesIO(expected.data)), np.float32)
    assert np.abs(a - b).mean() < 8  # the same picture, the same way up
    png = tmp_path / "big.png"
    img.save(png)
    assert (thumbs.from_file(png).width, thumbs.from_file(png).height) == (256, 128)  # not a JPEG: full decode
    with pytest.raises(Exception) as info:
        thumbs.from_file(tmp_path / "none.jpg")
    assert getattr(info.value, "reason", None) == "unreadable"


def test_a_busy_database_still_gets_its_thumbnail_without_waiting(tmp_path):
    import time

    db, ids = old_gallery(tmp_path)
    conn = store.connect(db)
    writer = store.connect(db)
    writer.execute("BEGIN IMMEDIATE")  # an ingest holding the write lock
    try:
        t0 = time.monotonic()
        t = thumbs.get(conn, ids["b"], db)
        assert time.monotonic() - t0 < 10  # not the connection's 30 s busy timeout
        assert t is not None and (t.width, t.height) == (102, 256)
        assert thumbs.stored(conn, ids["b"]) is None  # not cached this time
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    finally:
        writer.execute("ROLLBACK")
    thumbs.get(conn, ids["b"], db)
    assert thumbs.stored(conn, ids["b"]) is not None


def test_thumbs_command_makes_the_missing_ones_without_encoding(tmp_path, env):
    db, ids = old_gallery(tmp_path)
    # no weights at all: nothing may be encoded
    no_weights = {**env, "DINOV2_WEIGHTS": str(tmp_path / "no-such-weights.safetensors")}
    p = cli(no_weights, "thumbs", "--db", db, "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"made": 2, "unreadable": [ids["gone"]], "total": 3}
    conn = store.connect(db)
    sizes = dict((r[0], (r[1], r[2])) for r in conn.execute("SELECT image_id, width, height FROM thumbnails"))
    assert sizes == {ids["a"]: (256, 192), ids["b"]: (102, 256)}
    p = cli(no_weights, "thumbs", "--db", db)
    assert p.returncode == 0 and p.stdout.startswith("0 thumbnails made") and "1 originals missing" in p.stdout
    p = cli(no_weights, "thumbs", "--db", tmp_path / "none.db")
    assert p.returncode == 2 and "no such gallery database" in p.stderr and not (tmp_path / "none.db").exists()


def test_ingest_stores_thumbnails_with_the_batch(tmp_path, env):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg(10 + i, (300 + 50 * i, 200)))
    (folder / "copy.jpg").write_bytes((folder / "0.jpg").read_bytes())
    db = tmp_path / "g.db"
    p = cli(env, "ingest", "--dir", folder, "--db", db, "-q")
    assert p.returncode == 0, p.stderr
    conn = store.connect(db)
    rows = conn.execute("SELECT i.id, i.width, i.height, t.width, t.height, t.mime, t.data FROM images i "
                        "JOIN thumbnails t ON t.image_id = i.id").fetchall()
    assert len(rows) == 3 == conn.execute("SELECT count(*) FROM images WHERE status = 'ok'").fetchone()[0]
    for _, w, h, tw, th, mime, data in rows:
        assert mime == "image/jpeg" and max(tw, th) == 256 and abs(tw / th - w / h) < 0.02
        assert Image.open(io.BytesIO(data)).size == (tw, th)
    assert thumbs.missing_ids(conn) == []


def test_query_html_and_open(tmp_path, env):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg(20 + i))
    db = tmp_path / "g.db"
    assert cli(env, "ingest", "--dir", folder, "--db", db, "-q").returncode == 0
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "fake-browser"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {opened}\n")
    browser.chmod(0o755)
    sheet = tmp_path / "out.html"
    p = cli({**env, "BROWSER": str(browser)}, "query", "--id", "1", "--include-self", "--db", db, "--html", sheet, "--open",
          "--json")
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)) == 3  # --json output unchanged
    html = sheet.read_text()
    assert html.count("data:image/jpeg;base64,") == 4 and "image #1" in html
    assert opened.read_text().strip() == sheet.resolve().as_uri()
    p = cli(env, "query", "--id", "1", "--db", db, "--open")
    assert p.returncode == 2 and "--html" in p.stderr
    p = cli(env, "query", "--id", "1", "--db", db, "--html", tmp_path / "no-dir" / "x.html")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot write the contact sheet" in p.stderr


def test_serve_without_the_web_extra_says_how_to_install(tmp_path, env):
    db = tmp_path / "g.db"
    store.connect(db).close()
    blocker = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name.split('.')[0] in ('starlette', 'uvicorn', 'multipart'):\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               f"sys.argv = ['cli.py', 'serve', '--db', {str(db)!r}]\n"
               "import cli; cli.main()\n")
    p = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert p.stderr == "Error: serve needs the web extra: pip install -e '.[web]' (Starlette, uvicorn, python-multipart)\n"


def test_filters():
    assert F.parse(["kind=b", "", " title = a=b "]) == [("kind", "b"), ("title", "a=b")]
    with pytest.raises(InputError, match="expected key=value"):
        F.parse(["kind"])
    with pytest.raises(InputError):
        F.parse(["=x"])
    results = [{"rank": 1, "meta": {"kind": "A"}}, {"rank": 2, "meta": None}, {"rank": 3, "meta": {"kind": "a", "n": 3}}]
    assert F.apply(results, [("kind", "a")]) == [{"rank": 1, "meta": {"kind": "A"}}, {"rank": 2, "meta": {"kind": "a", "n": 3}}]
    assert F.apply(results, [("kind", "a"), ("n", "3")]) == [{"rank": 1, "meta": {"kind": "a", "n": 3}}]
    assert F.apply(results, []) is results
