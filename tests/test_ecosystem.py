"""The gallery outside our own commands: views (migration 0005), export (Parquet, .npy + JSON lines),
reindex from the stored originals, the WAL checkpoint and backup, and Datasette with the project's
metadata. Real galleries made by ``cli.py ingest`` from a local HTTP server and local files; random
weights of the real shapes (small, depth 1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from httpserver import LocalHTTPServer
from retrieval import store

ROOT = Path(__file__).resolve().parent.parent
VIEWS = ("ok_images", "failed_images", "duplicate_images", "failure_reasons")


# ---------------------------------------------------------------- fixtures


def _weights(tmp_path_factory, seed: int) -> Path:
    from retrieval.variants import official_config, random_params
    from retrieval.weights import save_params

    path = tmp_path_factory.mktemp(f"weights{seed}") / f"w{seed}.safetensors"
    save_params(random_params(official_config("small", depth=1), seed=seed), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return _weights(tmp_path_factory, 0)


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory) -> Path:
    return _weights(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def env(weights, tmp_path_factory) -> dict:
    e = {k: v for k, v in os.environ.items()
         if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and not k.startswith("DINOV2_")}
    e.update(DINOV2_OFFLINE="1", DINOV2_WEIGHTS=str(weights), DINOV2_CACHE=str(tmp_path_factory.mktemp("cache")),
             DINOV2_ALLOW_PRIVATE="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
             PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="module")
def cli(env):
    def run(*args, timeout: float = 120, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=ROOT, env={**env, **(extra_env or {})},
                              capture_output=True, text=True, timeout=timeout)

    return run


def jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    a, b = rng.uniform(0, 255, (2, 3))
    arr = a * x + b * y + rng.normal(0, 40, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_gallery(folder: Path, cli, server: LocalHTTPServer, n_remote: int = 6) -> Path:
    """A gallery with every status: ``n_remote`` JPEGs over HTTP (one of them at a second URL too: a
    duplicate), a 404 and an HTML page (failures), two local files named in the CSV (one also a
    duplicate of a downloaded image), and metadata columns."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["url,title,year"]
    for i in range(n_remote):
        server.add(f"/img{i}.jpg", body=jpeg(i), headers={"Content-Type": "image/jpeg"})
        rows.append(f"{server.url(f'/img{i}.jpg')},picture {i},{2000 + i}")
    server.add("/copy-of-0.jpg", body=jpeg(0), headers={"Content-Type": "image/jpeg"})
    server.add("/page.html", body=b"<html>hello</html>", headers={"Content-Type": "text/html"})
    rows.append(f"{server.url('/copy-of-0.jpg')},copy,1999")
    rows.append(f"{server.url('/gone.jpg')},gone,1998")
    rows.append(f"{server.url('/page.html')},page,1997")
    (folder / "local").mkdir(exist_ok=True)
    (folder / "local" / "a.jpg").write_bytes(jpeg(100, (80, 60)))
    (folder / "local" / "b.jpg").write_bytes(jpeg(1))  # the bytes of img1.jpg
    rows.append("local/a.jpg,local a,2020")
    rows.append("local/b.jpg,local b,2021")
    csv = folder / "images.csv"
    csv.write_text("\n".join(rows) + "\n")
    db = folder / "gallery.db"
    p = cli("ingest", "--csv", csv, "--db", db, "--batch-size", "4", "--json", "-q")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert (s["new"], s["failed"], s["duplicate"]) == (n_remote + 1, 2, 2), s
    return db


@pytest.fixture(scope="module")
def server():
    srv = LocalHTTPServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, cli, server) -> Path:
    return make_gallery(tmp_path_factory.mktemp("gallery"), cli, server)


def rows_of(db) -> list[dict]:
    conn = store.connect(db)
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM images ORDER BY id")]
    finally:
        conn.close()


def vectors_of(db) -> dict[int, bytes]:
    conn = store.connect(db)
    try:
        return {int(r[0]): bytes(r[1]) for r in conn.execute("SELECT image_id, embedding FROM image_embeddings")}
    finally:
        conn.close()


# ---------------------------------------------------------------- views (migration 0005)


def plain_sqlite(db) -> sqlite3.Connection:
    """The standard library's sqlite3 WITHOUT sqlite-vec: what pandas, DuckDB or a plain client sees."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def test_views_on_a_blank_database(tmp_path):
    conn = store.connect(tmp_path / "blank.db")
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'view'")}
    assert set(VIEWS) <= names
    for view in VIEWS:
        assert conn.execute(f"SELECT count(*) FROM {view}").fetchone()[0] == 0
    conn.close()


def test_views_on_a_gallery_made_by_the_previous_schema(tmp_path):
    """A gallery at 0001+0002 holding every status is upgraded on open; the views then show its rows,
    and a client without sqlite-vec can read every view."""
    db = tmp_path / "old.db"
    conn = store.connect(db, apply_migrations=False)
    store.migrate(conn, upto=2)
    assert store.applied_migrations(conn) == ["0001_gallery", "0002_runs"]
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": 4})
    v = np.array([1, 0, 0, 0], np.float32)
    store.commit_batch(conn, [
        {"url": "http://127.0.0.1/a.jpg", "status": "ok", "vector": v, "content_sha256": "a" * 64, "path": "g/a.jpg",
         "meta": {"title": "A"}},
        {"url": "http://127.0.0.1/a2.jpg", "status": "duplicate", "content_sha256": "a" * 64},
        {"url": "http://127.0.0.1/b.jpg", "status": "failed", "error": "http-404: Not Found", "http_status": 404},
        {"url": "http://127.0.0.1/c.jpg", "status": "failed", "error": "http-404: Not Found", "http_status": 404},
        {"url": "http://127.0.0.1/d.html", "status": "failed", "error": "not-an-image: text/html"},
    ])
    conn.close()
    conn = store.connect(db)  # applies the rest, 0005 among them
    assert "0005_views" in store.applied_migrations(conn)
    conn.close()
    plain = plain_sqlite(db)
    assert [dict(r) for r in plain.execute("SELECT id, url, path, json_extract(meta, '$.title') AS t FROM ok_images")] == [
        {"id": 1, "url": "http://127.0.0.1/a.jpg", "path": "g/a.jpg", "t": "A"}]
    assert [tuple(r) for r in plain.execute("SELECT id, duplicate_of, original_url FROM duplicate_images")] == [
        (2, 1, "http://127.0.0.1/a.jpg")]
    assert [tuple(r) for r in plain.execute("SELECT reason, http_status FROM failed_images ORDER BY id")] == [
        ("http-404", 404), ("http-404", 404), ("not-an-image", None)]
    assert [tuple(r) for r in plain.execute("SELECT reason, images FROM failure_reasons")] == [
        ("http-404", 2), ("not-an-image", 1)]
    plain.close()
    # and the upgraded gallery exports like a new one
    from retrieval.export import export_npy

    conn = store.connect(db)
    assert export_npy(conn, db, tmp_path / "v.npy")["rows"] == 1
    conn.close()
    assert np.load(tmp_path / "v.npy").tobytes() == v.tobytes()
    assert json.loads((tmp_path / "v.jsonl").read_text())["meta"] == {"title": "A"}


def test_views_of_a_real_gallery_match_its_rows(gallery):
    rows = rows_of(gallery)
    plain = plain_sqlite(gallery)
    assert [r[0] for r in plain.execute("SELECT id FROM ok_images")] == [r["id"] for r in rows if r["status"] == "ok"]
    assert [r[0] for r in plain.execute("SELECT id FROM failed_images")] == [r["id"] for r in rows if r["status"] == "failed"]
    assert [r[0] for r in plain.execute("SELECT id FROM duplicate_images")] == [
        r["id"] for r in rows if r["status"] == "duplicate"]
    reasons = dict(plain.execute("SELECT reason, images FROM failure_reasons").fetchall())
    assert reasons == {"http-404": 1, "not-an-image": 1}
    plain.close()


# ---------------------------------------------------------------- export


def test_export_npy_is_bit_for_bit_with_its_rows_beside_it(gallery, cli, tmp_path):
    out = tmp_path / "vectors.npy"
    p = cli("export", "--format", "npy", "--out", out, "--db", gallery)
    assert p.returncode == 0, p.stderr
    arr = np.load(out)
    lines = [json.loads(line) for line in (tmp_path / "vectors.jsonl").read_text().splitlines()]
    stored = vectors_of(gallery)
    ok = [r for r in rows_of(gallery) if r["status"] == "ok"]
    assert arr.dtype == np.float32 and arr.shape == (len(ok), 384)
    assert [line["id"] for line in lines] == [r["id"] for r in ok]
    for row, line, vec in zip(ok, lines, arr):
        assert vec.tobytes() == stored[row["id"]]  # the stored float32, bit for bit
        assert line["url"] == row["url"] and line["meta"] == json.loads(row["meta"])
        assert Path(line["path"]).is_absolute() and Path(line["path"]).is_file()


def test_export_parquet_holds_rows_vectors_and_the_model(gallery, cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "gallery.parquet"
    p = cli("export", "--format", "parquet", "--out", out, "--db", gallery,
            "--status", "ok", "--status", "failed", "--status", "duplicate")
    assert p.returncode == 0, p.stderr
    table = pq.read_table(out)
    rows = rows_of(gallery)
    stored = vectors_of(gallery)
    assert table.column("id").to_pylist() == [r["id"] for r in rows]
    assert table.schema.field("vector").type == pa.list_(pa.float32(), 384)
    conn = store.connect(gallery)
    model = store.get_model(conn)
    conn.close()
    assert json.loads(table.schema.metadata[b"dinov2_retrieval.model"]) == model
    vectors = table.column("vector").to_pylist()
    for row, meta, url, status, vec in zip(rows, table.column("meta").to_pylist(), table.column("url").to_pylist(),
                                          table.column("status").to_pylist(), vectors):
        assert (url, status) == (row["url"], row["status"])
        assert json.loads(meta) == json.loads(row["meta"])
        if row["status"] == "ok":
            assert np.asarray(vec, np.float32).tobytes() == stored[row["id"]]
        else:
            assert vec is None
    # the default is the ok rows only
    p = cli("export", "--format", "parquet", "--out", tmp_path / "ok.parquet", "--db", gallery)
    assert p.returncode == 0, p.stderr
    assert pq.read_table(tmp_path / "ok.parquet").column("status").to_pylist() == ["ok"] * len(stored)


def test_vector_reader_gives_the_vec0_bytes_across_chunks_deletes_and_replacements(tmp_path):
    """Export reads whole sqlite-vec chunks instead of one lookup per vector: over more than one chunk
    (1024 vectors), with vectors deleted and replaced (new slots, cleared validity bits), it gives exactly
    what vec0 itself answers, without falling back; forced onto the lookup path it gives the same."""
    from retrieval.export import VectorReader

    conn = store.connect(tmp_path / "g.db")
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": 8})
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((2100, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store.commit_batch(conn, [{"url": f"http://127.0.0.1/{i}.jpg", "status": "ok", "vector": v,
                               "content_sha256": f"{i:064x}"} for i, v in enumerate(vecs)])
    with store.transaction(conn):
        conn.execute("DELETE FROM image_embeddings WHERE image_id IN (5, 1500, 2000)")
        conn.execute("INSERT INTO image_embeddings (image_id, embedding) VALUES (5, ?)", (vecs[7].tobytes(),))
    ids = list(range(1, 2101))
    expected = {int(i): bytes(b) for i, b in conn.execute("SELECT image_id, embedding FROM image_embeddings")}
    assert len(expected) == 2098
    reader = VectorReader(conn, 8)
    assert reader.get(ids) == expected and reader.fast and reader.fallbacks == 0
    slow = VectorReader(conn, 8)
    slow.fast = False
    assert slow.get(ids) == expected
    conn.close()


def test_export_parquet_without_pyarrow_says_how_to_install_it(gallery, cli, tmp_path):
    hide = tmp_path / "hide"
    (hide / "pyarrow").mkdir(parents=True)
    (hide / "pyarrow" / "__init__.py").write_text("raise ImportError('No module named pyarrow')\n")
    p = cli("export", "--format", "parquet", "--out", tmp_path / "x.parquet", "--db", gallery,
            extra_env={"PYTHONPATH": str(hide)})
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "pip install" in p.stderr and "[parquet]" in p.stderr, p.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_export_rejects_bad_options(gallery, cli, tmp_path):
    p = cli("export", "--format", "csv", "--out", tmp_path / "x", "--db", gallery)
    assert p.returncode == 2 and "--format csv" in p.stderr
    p = cli("export", "--format", "npy", "--out", tmp_path / "x.npy", "--db", gallery, "--status", "failed")
    assert p.returncode == 2 and "parquet only" in p.stderr
    p = cli("export", "--format", "parquet", "--out", tmp_path / "x.parquet", "--db", gallery, "--status", "gone")
    assert p.returncode == 2 and "--status gone" in p.stderr


# ---------------------------------------------------------------- reindex


def test_reindex_builds_the_same_rows_from_the_originals_without_network(tmp_path, cli, other_weights):
    """Every URL of the source gallery points at a server that is shut down before the reindex: any request
    would turn a row into a 'connection' failure. The new gallery has the same ids, URLs, metadata,
    statuses, failure reasons and duplicates, and vectors of the new model made from the stored bytes."""
    srv = LocalHTTPServer()
    try:
        src = make_gallery(tmp_path / "src", cli, srv)
        requests_before = srv.count()
    finally:
        srv.close()
    out = tmp_path / "new" / "reindexed.db"
    out.parent.mkdir()
    p = cli("reindex", "--db", src, "--out", out, "--weights", other_weights, "--pooling", "mean", "--json")
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    before, after = rows_of(src), rows_of(out)
    keys = ("id", "url", "url_hash", "status", "error", "http_status", "duplicate_of", "content_sha256", "meta",
            "bytes")
    # a local file is keyed by its path relative to its gallery's folder: the new gallery, elsewhere, keys it
    # by its absolute path
    for r in before:
        if "://" not in r["url"]:
            r["url"] = str((src.parent / r["url"]).resolve())
            r["url_hash"] = store.url_hash(r["url"])
    assert [{k: r[k] for k in keys} for r in after] == [{k: r[k] for k in keys} for r in before]
    # a duplicate's size is known only when it happened to be decoded before its ok row was stored (in either
    # run): compared for the ok rows
    size = ("width", "height", "format")
    assert [[r[k] for k in size] for r in after if r["status"] == "ok"] == [
        [r[k] for k in size] for r in before if r["status"] == "ok"]
    assert summary["new"] == sum(r["status"] == "ok" for r in before) and summary["failed"] == 2
    assert summary["duplicate"] == 2 and "connection" not in summary["failure_reasons"]
    assert srv.count() == requests_before  # nothing asked of the (closed) server either
    conn = store.connect(out)
    model = store.get_model(conn)
    conn.close()
    assert model["pooling"] == "mean" and model["dim"] == 384
    # each vector is the new model's encoding of the stored original (what `embed` gives, normalised)
    new_vectors = vectors_of(out)
    assert set(new_vectors) == {r["id"] for r in before if r["status"] == "ok"}
    assert all(new_vectors[i] != v for i, v in vectors_of(src).items())
    originals = [Path(store_path) if Path(store_path).is_absolute() else out.parent / store_path
                 for store_path in (r["path"] for r in after if r["status"] == "ok")]
    assert all(p.is_file() for p in originals)
    # downloaded originals are hard links to the source gallery's files, not copies
    src_files = {r["content_sha256"]: src.parent / r["path"] for r in before if r["status"] == "ok"}
    linked = [(src_files[r["content_sha256"]], p) for r, p in zip((r for r in after if r["status"] == "ok"), originals)
              if r["url"].startswith("http")]
    assert len(linked) >= 5 and all(os.path.samefile(a, b) for a, b in linked)  # 6, or 5 if local b.jpg got there first
    feats = tmp_path / "feats.npy"
    e = cli("embed", *originals, "--out", feats, "--weights", other_weights, "--pooling", "mean")
    assert e.returncode == 0, e.stderr
    expected = np.load(feats)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    got = np.stack([np.frombuffer(new_vectors[r["id"]], "<f4") for r in after if r["status"] == "ok"])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the new gallery answers queries, with its own model
    q = cli("query", "--id", "1", "--db", out, "--json", "--weights", other_weights)
    assert q.returncode == 0 and json.loads(q.stdout), q.stderr


def test_reindex_refuses_an_existing_out_unless_forced(gallery, cli, tmp_path, other_weights):
    out = tmp_path / "there.db"
    out.write_bytes(b"precious")
    p = cli("reindex", "--db", gallery, "--out", out, "--weights", other_weights)
    assert p.returncode == 2 and "--force" in p.stderr and str(out) in p.stderr
    assert out.read_bytes() == b"precious"
    p = cli("reindex", "--db", gallery, "--out", gallery, "--weights", other_weights, "--force")
    assert p.returncode == 2 and "source gallery itself" in p.stderr


def test_reindex_reports_progress_and_replaces_with_force(gallery, tmp_path, other_weights, weights):
    from retrieval.encoder import EncoderSettings, load_encoder
    from retrieval.export import reindex

    out = tmp_path / "r.db"
    seen = []
    encoder = load_encoder(other_weights, EncoderSettings(batch_size=2))
    s = reindex(gallery, out, encoder, progress=lambda s: seen.append((s.done, s.total)))
    assert s.status == "completed" and seen and seen[-1] == (len(rows_of(gallery)),) * 2
    assert not list(tmp_path.glob(".r.db*"))  # the temporary name is gone
    encoder = load_encoder(weights, EncoderSettings(batch_size=2))
    reindex(gallery, out, encoder, force=True)  # back to the first model: the same vectors as the source
    assert vectors_of(out).keys() == vectors_of(gallery).keys()
    for i, v in vectors_of(gallery).items():
        np.testing.assert_allclose(np.frombuffer(vectors_of(out)[i], "<f4"), np.frombuffer(v, "<f4"), atol=1e-6)


# ---------------------------------------------------------------- WAL and backup


def test_after_an_ingest_the_db_file_alone_holds_everything(tmp_path, cli, server):
    """Another connection stays open during the run (a reader, e.g. Datasette): SQLite then does not fold
    the WAL in when the ingest closes. The run's own checkpoint does: the -wal file is empty and a copy
    of the .db file alone has every row."""
    folder = tmp_path / "g"
    folder.mkdir()
    db = folder / "gallery.db"
    reader = store.connect(db)  # creates the schema; held open across the run
    try:
        make_gallery(folder, cli, server, n_remote=3)
        wal = Path(f"{db}-wal")
        assert not wal.exists() or wal.stat().st_size == 0, wal.stat().st_size
        copy = tmp_path / "copy.db"
        shutil.copyfile(db, copy)  # the .db alone
    finally:
        reader.close()
    plain = sqlite3.connect(copy)
    assert plain.execute("SELECT count(*) FROM images").fetchone()[0] == len(rows_of(db)) == 8
    assert plain.execute("SELECT status FROM runs").fetchall() == [("completed",)]
    plain.close()


def test_a_clean_close_checkpoints(tmp_path):
    db = tmp_path / "g.db"
    reader = store.connect(db)
    try:
        writer = store.connect(db)
        store.ensure_model(writer, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                                    "interpolation": "hf", "pooling": "cls", "dim": 4})
        assert Path(f"{db}-wal").stat().st_size > 0
        writer.close()
        assert Path(f"{db}-wal").stat().st_size == 0
    finally:
        reader.close()


def test_backup_copies_what_is_still_in_the_wal(tmp_path, cli):
    db = tmp_path / "g.db"
    conn = store.connect(db)
    store.ensure_model(conn, {"variant": "small", "weights_sha256": "0" * 64, "preprocess": "resize-short",
                              "interpolation": "hf", "pooling": "cls", "dim": 4})
    store.commit_batch(conn, [{"url": f"http://127.0.0.1/{i}.jpg", "status": "failed", "error": "http-404: x"}
                              for i in range(50)])
    try:
        assert Path(f"{db}-wal").stat().st_size > 0  # conn is still open: the rows are in the WAL
        p = cli("backup", tmp_path / "b.db", "--db", db)
        assert p.returncode == 0, p.stderr
        assert not Path(f"{tmp_path / 'b.db'}-wal").exists()
        plain = sqlite3.connect(tmp_path / "b.db")
        assert plain.execute("SELECT count(*) FROM images").fetchone()[0] == 50
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        plain.close()
        p = cli("backup", tmp_path / "b.db", "--db", db)
        assert p.returncode == 2 and "already exists" in p.stderr
    finally:
        conn.close()
    s = cli("stats", "--db", db)
    assert "python cli.py backup" in s.stdout and "not cp" in s.stdout


# ---------------------------------------------------------------- Datasette


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def test_metadata_hides_shadow_tables_and_skips_absent_thumbnails(gallery, cli, tmp_path):
    """With the web app's thumbnails table the queries show thumbnails; without it (a gallery made before
    that migration, or the table dropped) they leave them out and still work."""
    from retrieval import datasette_meta

    db = tmp_path / "gallery.db"
    shutil.copyfile(gallery, db)
    for dropped in (False, True):
        if dropped:
            conn = store.connect(db)
            conn.execute("DROP TABLE IF EXISTS thumbnails")
            conn.close()
        out = tmp_path / "meta.json"
        p = cli("datasette", "--db", db, "--write-metadata", out)
        assert p.returncode == 0, p.stderr
        meta = json.loads(out.read_text())["databases"]["gallery"]
        hidden = {name for name, spec in meta["tables"].items() if spec.get("hidden")}
        assert hidden == {"image_embeddings_chunks", "image_embeddings_info", "image_embeddings_rowids",
                          "image_embeddings_vector_chunks00"}
        assert meta["tables"]["images"]["label_column"] == "url"
        conn = store.connect(db)
        has = store._table_exists(conn, "thumbnails")
        assert has != dropped
        assert ("thumbnails" in meta["queries"]["similar"]["sql"]) == has
        # the canned query runs on the file as it is
        rows = conn.execute(meta["queries"]["similar"]["sql"], {"id": 1, "k": 3}).fetchall()
        assert len(rows) == 3 and 1 not in [r["id"] for r in rows]
        conn.close()
    assert datasette_meta.SIMILAR_SQL


def test_datasette_missing_says_how_to_install_it(gallery, cli, tmp_path):
    hide = tmp_path / "hide"
    (hide / "datasette").mkdir(parents=True)
    (hide / "datasette" / "__init__.py").write_text("raise ImportError('No module named datasette')\n")
    p = cli("datasette", "--db", gallery, "--port", free_port(), extra_env={"PYTHONPATH": str(hide)}, timeout=60)
    assert p.returncode == 2 and p.stderr.count("Error:") == 1 and "pip install" in p.stderr, p.stderr


@pytest.mark.slow
def test_datasette_serves_the_similar_query_like_query_id(gallery, cli, env, tmp_path):
    """`python cli.py datasette` on 127.0.0.1 (sqlite-vec loaded although this venv's sqlite3 cannot load
    extensions), with a thumbnails table present as the web app makes it: the canned 'similar' query as
    JSON gives the images and scores `query --id` gives, and the thumbnails render as pictures."""
    db = tmp_path / "gallery.db"
    shutil.copyfile(gallery, db)
    conn = store.connect(db)
    conn.execute("CREATE TABLE IF NOT EXISTS thumbnails (image_id INTEGER PRIMARY KEY REFERENCES images(id) "
                 "ON DELETE CASCADE, width INTEGER, height INTEGER, mime TEXT, data BLOB)")
    for (image_id,) in conn.execute("SELECT id FROM images WHERE status = 'ok'").fetchall():
        conn.execute("INSERT OR REPLACE INTO thumbnails (image_id, width, height, mime, data) "
                     "VALUES (?, 64, 48, 'image/jpeg', ?)", (image_id, jpeg(image_id)))
    conn.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "cli.py", "datasette", "--db", db, "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                get(f"{base}/-/versions.json", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError("datasette did not start: " + proc.communicate()[1][-2000:])
                time.sleep(0.3)
        k = 4
        dup = next(r["id"] for r in rows_of(db) if r["status"] == "duplicate")
        for image_id in (1, 3, dup):  # a duplicate leaves out the ok row holding its bytes too, as query --id does
            rows = json.loads(get(f"{base}/gallery/similar.json?id={image_id}&k={k}&_shape=array"))
            q = cli("query", "--id", image_id, "-k", k + 1, "--db", db, "--json")
            assert q.returncode == 0, q.stderr
            expected = [r for r in json.loads(q.stdout) if r["id"] != image_id][:k]
            assert [r["id"] for r in rows] == [r["id"] for r in expected]
            assert [r["score"] for r in rows] == pytest.approx([r["score"] for r in expected], abs=1e-6)
            assert all(r["thumbnail"] for r in rows)
        tables = json.loads(get(f"{base}/gallery.json"))["tables"]
        assert {t["name"] for t in tables if t["hidden"]} >= {"image_embeddings_chunks", "image_embeddings_rowids"}
        page = get(f"{base}/gallery/similar?id=1&k=2").decode()
        assert page.count('src="data:image/jpeg;base64,') == 2  # datasette-render-images
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
