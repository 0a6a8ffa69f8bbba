"""Living with a gallery, end to end through ``python cli.py``: remove, ingest --prune, query --where /
--min-score / --include-self, dupes, galleries moved as a folder, --copy-originals, and a gallery made by the
previous schema (0001 + 0002) upgraded by migration 0004. Real SQLite files with sqlite-vec, a real HTTP
server on 127.0.0.1, real JPEGs; random weights of the real shapes (small, depth 1)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval import lifecycle, store
from test_ingest import (  # noqa: F401  (fixtures)
    assert_consistent, cli, env, ingest, jpeg, one_error_line, png, weights,
)


def rows(db) -> dict:
    conn = store.connect(db)
    try:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM images")}
    finally:
        conn.close()


def by_url(db) -> dict:
    return {r["url"]: r for r in rows(db).values()}


def vectors(db) -> dict:
    conn = store.connect(db)
    try:
        return {int(r[0]): np.frombuffer(r[1], "<f4").copy() for r in conn.execute("SELECT image_id, embedding FROM image_embeddings")}
    finally:
        conn.close()


def run_json(cli, *args) -> dict | list:
    p = cli(*args, "--json")
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return json.loads(p.stdout)


def doctor_clean(cli, db):
    p = cli("doctor", "--db", db)
    assert p.returncode == 0, p.stdout + p.stderr


# ---------------------------------------------------------------- remove


def test_remove_promotes_duplicates_and_leaves_nothing_orphaned(cli, ingest, http_server, tmp_path):
    a, b = jpeg(1), jpeg(2)
    urls = {
        "a": http_server.add("/a.jpg", body=a, headers={"Content-Type": "image/jpeg"}),
        "a2": http_server.add("/a-again.jpg", body=a, headers={"Content-Type": "image/jpeg"}),
        "a3": http_server.add("/a-third.jpg", body=a, headers={"Content-Type": "image/jpeg"}),
        "b": http_server.add("/b.jpg", body=b, headers={"Content-Type": "image/jpeg"}),
        "gone": http_server.url("/missing.jpg"),
    }
    csv = tmp_path / "list.csv"
    csv.write_text("url,tag,year,note\n"
                   f"{urls['a']},cat,2019,\n{urls['a2']},cat,2021,second\n{urls['a3']},cat,2022, \n"
                   f"{urls['b']},dog,2020,\n{urls['gone']},bird,2022,\n", encoding="utf-8")
    db = tmp_path / "g.db"
    s = ingest("--csv", csv, "--db", db)
    assert (s["new"], s["duplicate"], s["failed"]) == (2, 2, 1), s
    r = by_url(db)
    assert json.loads(r[urls["b"]]["meta"]) == {"tag": "dog", "year": "2020"}  # the empty cell is not stored
    assert json.loads(r[urls["a2"]]["meta"]) == {"note": "second", "tag": "cat", "year": "2021"}
    assert json.loads(r[urls["a3"]]["meta"]) == {"tag": "cat", "year": "2022"}  # a blank cell neither
    # which of the three copies was fetched first (and is ok) depends on the concurrent downloads
    copies = sorted((r[urls[k]] for k in ("a", "a2", "a3")), key=lambda x: (x["status"] != "ok", x["id"]))
    assert [c["status"] for c in copies] == ["ok", "duplicate", "duplicate"]
    ida, ida2, ida3 = (c["id"] for c in copies)
    urls["a"], urls["a2"], urls["a3"] = (c["url"] for c in copies)
    idb = r[urls["b"]]["id"]
    stored_a = db.parent / r[urls["a"]]["path"]
    stored_b = db.parent / r[urls["b"]]["path"]
    assert stored_a.is_file() and stored_b.is_file()
    vec_a = vectors(db)[ida]
    conn = store.connect(db)  # the ingest made a thumbnail for each ok row (retrieval/thumbs.py)
    assert {r[0] for r in conn.execute("SELECT image_id FROM thumbnails")} == {ida, idb}
    conn.close()

    before = rows(db)
    p = cli("remove", "--id", ida, "--db", db, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == (
        f"would remove 1 row (1 ok), 1 vector, 1 thumbnail, 0 stored originals; duplicate {ida2} takes over from {ida}")
    assert rows(db) == before and stored_a.is_file()  # a dry run changes nothing

    p = cli("remove", "--id", ida, "--db", db)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == (
        f"removed 1 row (1 ok), 1 vector, 1 thumbnail, 0 stored originals; duplicate {ida2} takes over from {ida}")
    after = rows(db)
    assert ida not in after
    heir = after[ida2]
    assert heir["status"] == "ok" and heir["duplicate_of"] is None
    assert heir["path"] == before[ida]["path"] and heir["width"] == before[ida]["width"]  # took over the original
    assert after[ida3]["status"] == "duplicate" and after[ida3]["duplicate_of"] == ida2
    assert np.array_equal(vectors(db)[ida2], vec_a)  # the same vector, bit for bit
    assert stored_a.is_file()  # still referenced by the heir
    assert assert_consistent(db) == {"ok": 2, "duplicate": 1, "failed": 1}

    # a duplicate row just goes; the ok row that took over, by URL, takes its stored original with it
    out = run_json(cli, "remove", "--url", urls["a3"], "--url", urls["a2"], "--db", db)
    assert out["by_status"] == {"ok": 1, "duplicate": 1} and out["promoted"] == [] and out["vectors"] == 1
    assert out["files"] == [str(stored_a.resolve())] and not stored_a.exists()
    assert stored_b.is_file()
    # --status and --where narrow (all must hold); nothing is selected by a status alone that is absent
    p = cli("remove", "--where", "tag=dog", "--status", "failed", "--db", db)
    assert p.returncode == 0 and p.stdout.strip() == "nothing to remove"
    p = cli("remove", "--status", "failed", "--db", db)
    assert p.returncode == 0 and p.stdout.strip() == "removed 1 row (1 failed), 0 vectors, 0 thumbnails, 0 stored originals"
    p = cli("remove", "--where", "tag=dog", "--where", "year>=2020", "--status", "ok", "--db", db)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "removed 1 row (1 ok), 1 vector, 1 thumbnail, 1 stored original"
    assert not stored_b.exists() and rows(db) == {}
    conn = store.connect(db)
    assert conn.execute("SELECT count(*) FROM thumbnails").fetchone()[0] == 0
    conn.close()
    assert assert_consistent(db) == {}
    doctor_clean(cli, db)

    # bad input: one line naming it, nothing removed
    one_error_line(cli("remove", "--db", db), "--id", "--where")
    one_error_line(cli("remove", "--id", 12345, "--db", db), "--id 12345")
    one_error_line(cli("remove", "--url", "http://127.0.0.1:9/nothing.jpg", "--db", db), "nothing.jpg")
    one_error_line(cli("remove", "--status", "lost", "--db", db), "--status lost")
    one_error_line(cli("remove", "--where", "tag", "--db", db), "--where")
    one_error_line(cli("remove", "--id", 1, "--db", tmp_path / "none.db"), "none.db")
    assert not (tmp_path / "none.db").exists()


def test_remove_a_removed_rows_duplicates_together_and_by_local_path(cli, ingest, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, data in {"x.jpg": jpeg(10), "x-copy.jpg": jpeg(10), "y.png": png(11)}.items():
        (folder / name).write_bytes(data)
    db = tmp_path / "g.db"
    ingest("--dir", folder, "--db", db)
    r = by_url(db)
    assert set(r) == {"photos/x.jpg", "photos/x-copy.jpg", "photos/y.png"}  # relative to the gallery's folder
    # the ok row and its only duplicate together: no promotion, both go; the user's own files stay
    out = run_json(cli, "remove", "--url", folder / "x.jpg", "--url", "photos/x-copy.jpg", "--db", db)
    assert out["removed"] == 2 and out["promoted"] == [] and out["files"] == []
    assert (folder / "x.jpg").is_file() and (folder / "x-copy.jpg").is_file()
    assert assert_consistent(db) == {"ok": 1}


# ---------------------------------------------------------------- ingest --prune


def test_ingest_prune_removes_rows_of_files_gone_from_the_folder(cli, ingest, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    files = {"a.jpg": jpeg(20), "b.jpg": jpeg(21), "sub/c.png": png(22), "d.jpg": jpeg(23)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    other = tmp_path / "elsewhere"  # another folder of the same gallery: never pruned by a run on photos/
    other.mkdir()
    (other / "e.jpg").write_bytes(jpeg(24))
    db = tmp_path / "g.db"
    ingest("--dir", folder, "--db", db)
    ingest("--dir", other, "--db", db)
    ids = {u: r["id"] for u, r in by_url(db).items()}
    vec_b = vectors(db)[ids["photos/b.jpg"]]
    (folder / "a.jpg").unlink()
    (folder / "sub" / "c.png").unlink()
    (folder / "b.jpg").rename(folder / "b-renamed.jpg")
    (other / "e.jpg").unlink()

    p = cli("ingest", "--dir", folder, "--db", db, "-q")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == f"3 files gone from {folder}; --prune removes them"
    assert len(rows(db)) == 6  # nothing removed without --prune; the renamed file is a duplicate of b

    p = cli("ingest", "--dir", folder, "--db", db, "-q", "--prune")
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith(f"pruned 3 files gone from {folder}: removed 3 rows (3 ok), 3 vectors"), last
    assert f"duplicate {by_url(db)['photos/b-renamed.jpg']['id']} takes over from {ids['photos/b.jpg']}" in last
    r = by_url(db)
    assert set(r) == {"photos/b-renamed.jpg", "photos/d.jpg", "elsewhere/e.jpg"}
    assert r["photos/b-renamed.jpg"]["status"] == "ok"
    assert np.array_equal(vectors(db)[r["photos/b-renamed.jpg"]["id"]], vec_b)  # not re-encoded
    s = run_json(cli, "ingest", "--dir", folder, "--db", db, "-q")
    assert s["gone"] == 0 and (s["new"], s["skipped"]) == (0, 2)
    assert assert_consistent(db) == {"ok": 3}
    one_error_line(cli("ingest", "--csv", tmp_path / "x.csv", "--prune", "--db", db), "--prune")


# ---------------------------------------------------------------- query --where, --min-score, --include-self


@pytest.fixture(scope="module")
def tagged(ingest, tmp_path_factory):
    """A gallery of 16 local files with metadata from a CSV: tag (cat/dog), year (2015..2030; file 4's is
    2020.0), title; file 15 is a copy of file 0."""
    root = tmp_path_factory.mktemp("tagged")
    (root / "img").mkdir()
    lines = ["url,tag,year,title"]
    for i in range(16):
        (root / "img" / f"{i}.jpg").write_bytes(jpeg(100, (56, 48)) if i == 15 else jpeg(100 + i, (56 + 4 * i, 48)))
        year = "2020.0" if i == 4 else str(2015 + i)
        lines.append(f"img/{i}.jpg,{'cat' if i % 3 == 0 else 'dog'},{year},Photo {i}'s title")
    (root / "list.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    db = root / "g.db"
    s = ingest("--csv", root / "list.csv", "--db", db)
    assert (s["new"], s["duplicate"]) == (15, 1), s
    return db


def brute(db, query_vec, keep) -> list[tuple[int, float]]:
    conn = store.connect(db)
    try:
        out = []
        for r in conn.execute("SELECT id, meta FROM images WHERE status = 'ok'"):
            if keep(json.loads(r["meta"])):
                out.append((int(r["id"]), float(store.get_vector(conn, r["id"]) @ query_vec)))
    finally:
        conn.close()
    return sorted(out, key=lambda x: (-x[1], x[0]))


def test_query_where_filters_and_returns_k_matches(cli, tagged):
    db = tagged
    r = by_url(db)
    q = r["img/1.jpg"]["id"]
    qvec = vectors(db)[q]
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 3, "--where", "tag=cat", "--where", "year>=2020")
    want = brute(db, qvec, lambda m: m["tag"] == "cat" and float(m["year"]) >= 2020)
    assert len(want) >= 3
    assert [x["id"] for x in res] == [i for i, _ in want[:3]]
    assert all(x["meta"]["tag"] == "cat" and float(x["meta"]["year"]) >= 2020 for x in res)
    assert [x["rank"] for x in res] == [1, 2, 3]
    # numeric: 2020.0 equals 2020
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 20, "--where", "year=2020")
    assert sorted(x["meta"]["year"] for x in res) == ["2020", "2020.0"]
    # text and LIKE; != keeps rows whose value differs; a quote in the value is just a value
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 20, "--where", "title~%7's%", "--include-self")
    assert [x["meta"]["title"] for x in res] == ["Photo 7's title"]
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 20, "--where", "tag!=dog")
    assert {x["meta"]["tag"] for x in res} == {"cat"} and len(res) == 5  # 0,3,6,9,12 (15 is a copy of 0)
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 20, "--where", "tag=x' OR '1'='1")
    assert res == []
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 20, "--where", "nosuchcolumn!=1")
    assert res == []  # a row without the key never matches
    # --min-score: only scores at or above it, however large k
    every = run_json(cli, "query", "--id", q, "--db", db, "-k", 20)
    cut = every[4]["score"]
    res = run_json(cli, "query", "--id", q, "--db", db, "-k", 20, "--min-score", cut)
    assert [x["id"] for x in res] == [x["id"] for x in every if x["score"] >= cut] and len(res) >= 5

    # plain output shows the metadata under each result
    p = cli("query", "--id", q, "--db", db, "-k", 2, "--where", "tag=cat")
    assert p.returncode == 0, p.stderr
    assert "tag=cat" in p.stdout and "year=" in p.stdout and "title=Photo" in p.stdout
    one_error_line(cli("query", "--id", q, "--db", db, "--where", "=cat"), "--where")


def test_query_by_id_leaves_out_the_image_and_its_exact_copies(cli, tagged):
    db = tagged
    r = by_url(db)
    first, copy = r["img/0.jpg"]["id"], r["img/15.jpg"]["id"]
    assert r["img/15.jpg"]["status"] == "duplicate" and r["img/15.jpg"]["duplicate_of"] == first
    res = run_json(cli, "query", "--id", first, "--db", db, "-k", 5)
    assert len(res) == 5 and first not in [x["id"] for x in res]
    res = run_json(cli, "query", "--id", copy, "--db", db, "-k", 5)  # the copy: its holder is the same bytes
    assert len(res) == 5 and first not in [x["id"] for x in res]
    res = run_json(cli, "query", "--id", first, "--db", db, "-k", 5, "--include-self")
    assert res[0]["id"] == first and res[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # a query by image file is not a query by id: nothing is left out
    res = run_json(cli, "query", Path(db).parent / "img" / "0.jpg", "--db", db, "-k", 1, "--where", "tag=cat")
    assert res[0]["id"] == first


def test_filtered_search_grows_the_knn_the_same_as_the_exact_scan(tagged, monkeypatch):
    """Both strategies of lifecycle.search (exact scan of the matching rows; a KNN grown until k pass) give the
    same answer, and store.search is what the KNN one calls."""
    conn = store.connect(tagged)
    try:
        me = by_url(tagged)["img/2.jpg"]["id"]
        q = store.get_vector(conn, me)
        where = [lifecycle.parse_where("tag=cat")]
        exact = lifecycle._exact_filtered(conn, q, 2, where, None, {me})
        calls = []
        real = store.search
        monkeypatch.setattr(lifecycle, "EXACT_SCAN_SHARE", 0)
        monkeypatch.setattr(store, "search", lambda c, v, k, **kw: calls.append(k) or real(c, v, k, **kw))
        grown = lifecycle.search(conn, q, 2, where=where, exclude={me})
        assert calls and calls[0] < 15  # asked for some neighbours first, not the whole gallery
        assert [(x["id"], x["rank"]) for x in grown] == [(x["id"], x["rank"]) for x in exact]
        assert [x["score"] for x in grown] == pytest.approx([x["score"] for x in exact], abs=1e-6)
        assert len(exact) == 2
        monkeypatch.setattr(lifecycle, "EXACT_SCAN_SHARE", 1)  # every filter: the exact scan, no KNN
        calls.clear()
        assert [x["id"] for x in lifecycle.search(conn, q, 2, where=where, exclude={me})] == [x["id"] for x in exact]
        assert calls == []
    finally:
        conn.close()


# ---------------------------------------------------------------- dupes


def components(ids, X, threshold):
    """Connected components of the pairs at or above threshold, by brute force (reference)."""
    S = X @ X.T
    n = len(ids)
    seen, groups = set(), []
    for s in range(n):
        if s in seen or not any(S[s, j] >= threshold for j in range(n) if j != s):
            continue
        stack, comp = [s], set()
        while stack:
            x = stack.pop()
            if x in comp:
                continue
            comp.add(x)
            stack.extend(j for j in range(n) if j != x and S[x, j] >= threshold and j not in comp)
        seen |= comp
        groups.append(sorted(int(ids[x]) for x in comp))
    return sorted(groups)


def test_dupes_groups_match_brute_force(cli, tagged):
    db = tagged
    v = vectors(db)
    ids = np.array(sorted(v))
    X = np.stack([v[i] for i in ids])
    S = X @ X.T
    upper = np.sort(S[np.triu_indices(len(ids), 1)])
    threshold = float(upper[int(len(upper) * 0.97)])  # links among the closest 3% of pairs
    out = run_json(cli, "dupes", "--db", db, "--threshold", threshold)
    copy = by_url(db)["img/15.jpg"]
    got = sorted(sorted(m["id"] for m in g["images"] if m["duplicate_of"] is None) for g in out["groups"])
    want = components(ids, X, threshold)
    holder_group = [g for g in want if copy["duplicate_of"] in g]
    if not holder_group:
        want = sorted(want + [[copy["duplicate_of"]]])  # an image with only an exact copy is a group too
    assert got == want and len(want) >= 1
    for g in out["groups"]:
        rep = g["representative"]
        assert g["images"][0]["id"] == rep and g["size"] == len(g["images"])
        for m in g["images"]:
            if m["duplicate_of"] is None:
                assert m["score"] == pytest.approx(float(v[m["id"]] @ v[rep]), abs=1e-5)
    copies = [m for g in out["groups"] for m in g["images"] if m["duplicate_of"] is not None]
    assert [(m["id"], m["duplicate_of"], m["score"]) for m in copies] == [(copy["id"], copy["duplicate_of"], 1.0)]
    p = cli("dupes", "--db", db, "--threshold", threshold)
    assert p.returncode == 0, p.stderr
    assert f"{len(out['groups'])} group" in p.stdout.strip().splitlines()[-1]
    assert f"(same bytes as {copy['duplicate_of']})" in p.stdout
    one_error_line(cli("dupes", "--db", db, "--threshold", 2), "--threshold")


def test_dupes_on_planted_clusters(cli, tmp_path):
    """A real gallery whose vectors are planted: clusters of near-identical vectors among random ones."""
    rng = np.random.default_rng(5)
    dim, n = 384, 700
    X = rng.normal(size=(n, dim)).astype(np.float32)
    clusters = [[3, 200, 650], [10, 11], [400, 401, 402, 403]]
    for c in clusters:
        for i in c[1:]:
            X[i] = X[c[0]] + rng.normal(scale=0.05, size=dim)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    db = tmp_path / "planted.db"
    conn = store.connect(db)
    store.ensure_model(conn, dict(variant="small", weights_sha256="0" * 64, preprocess="resize-short",
                                  interpolation="hf", pooling="cls", dim=dim))
    store.commit_batch(conn, [dict(status="ok", url=f"http://example.test/{i}.jpg", content_sha256=f"{i:064x}",
                                   vector=X[i]) for i in range(n)])
    conn.close()
    out = run_json(cli, "dupes", "--db", db, "--threshold", 0.95)
    assert sorted(sorted(m["id"] - 1 for m in g["images"]) for g in out["groups"]) == sorted(clusters)
    assert [g["size"] for g in out["groups"]] == [4, 3, 2]
    # the blocked product finds exactly the brute-force pairs whatever the block size
    I, J, S = lifecycle.near_pairs(X, 0.95, block=64, tile=100)
    full = X @ X.T
    want = {(i, j) for i in range(n) for j in range(i + 1, n) if full[i, j] >= 0.95}
    assert set(zip(I.tolist(), J.tolist())) == want


# ---------------------------------------------------------------- moving a gallery, copying originals


def test_a_gallery_moved_as_a_folder_keeps_working(cli, ingest, tmp_path):
    home = tmp_path / "before" / "album"
    (home / "photos").mkdir(parents=True)
    for i in range(4):
        (home / "photos" / f"{i}.jpg").write_bytes(jpeg(200 + i))
    (home / "photos" / "again.jpg").write_bytes(jpeg(200))
    (home / "list.csv").write_text("url,place\nphotos/1.jpg,beach\n", encoding="utf-8")
    db = home / "gallery.db"
    ingest("--dir", home / "photos", "--db", db)
    ingest("--csv", home / "list.csv", "--db", db)
    assert all(not Path(r["url"]).is_absolute() and r["path"] == r["url"] for r in rows(db).values())

    moved = tmp_path / "after" / "renamed-album"
    moved.parent.mkdir()
    shutil.move(str(home), str(moved))
    assert not home.exists()
    db = moved / "gallery.db"
    res = run_json(cli, "query", moved / "photos" / "2.jpg", "--db", db, "-k", 4)
    assert len(res) == 4 and all(Path(x["path"]).is_file() for x in res)
    assert all(Path(x["path"]).resolve().is_relative_to(moved.resolve()) for x in res)
    doctor_clean(cli, db)
    s = run_json(cli, "ingest", "--dir", moved / "photos", "--db", db, "-q")
    assert (s["new"], s["skipped"], s["duplicate"], s["gone"]) == (0, 5, 0, 0), s
    # removing by the file's path as the user sees it now
    out = run_json(cli, "remove", "--url", moved / "photos" / "3.jpg", "--db", db)
    assert [r["url"] for r in out["rows"]] == ["photos/3.jpg"]
    assert assert_consistent(db) == {"ok": 3, "duplicate": 1}


def test_copy_originals_and_files_outside_the_gallery_folder(cli, ingest, tmp_path):
    outside = tmp_path / "camera"
    outside.mkdir()
    (outside / "p.jpg").write_bytes(jpeg(300))
    (outside / "q.png").write_bytes(png(301))
    gdir = tmp_path / "gallery"
    gdir.mkdir()
    db = gdir / "g.db"
    ingest("--dir", outside, "--db", db)
    r = by_url(db)
    assert set(r) == {str((outside / "p.jpg").resolve()), str((outside / "q.png").resolve())}  # outside: absolute

    db2 = gdir / "copied.db"
    ingest("--dir", outside, "--db", db2, "--copy-originals")
    for url, row in by_url(db2).items():
        stored = gdir / row["path"]
        assert row["path"] != url and not Path(row["path"]).is_absolute()
        assert stored.is_file() and stored.read_bytes() == Path(url).read_bytes()
        assert stored.stem == hashlib.sha256(stored.read_bytes()).hexdigest()
    shutil.rmtree(outside)  # the sources go: the copies keep the gallery whole
    res = run_json(cli, "query", "--id", 1, "--db", db2, "-k", 2, "--include-self")
    assert all(Path(x["path"]).is_file() for x in res)
    outside.mkdir()
    p = cli("ingest", "--dir", outside, "--db", db2, "-q", "--prune")
    assert p.returncode == 0 and "pruned 2 files" in p.stdout, p.stdout + p.stderr
    assert not any((gdir / "copied_images").rglob("*.*"))  # their copies went with them
    assert assert_consistent(db2) == {}


# ---------------------------------------------------------------- a gallery from the previous schema


def _downgrade(db: Path, folder: Path) -> None:
    """Turn a gallery into what the code before 0004 wrote: absolute local paths, mtime in nanoseconds, empty
    CSV cells kept as "", no 0004 (no duplicate_of index)."""
    conn = store.connect(db)
    with store.transaction(conn):
        for r in conn.execute("SELECT id, url, path, meta FROM images").fetchall():
            url = str((db.parent / r["url"]).resolve())
            meta = json.loads(r["meta"]) if r["meta"] else {}
            meta["empty"] = ""
            conn.execute("UPDATE images SET url = ?, url_hash = ?, path = ?, mtime = ?, meta = ? WHERE id = ?",
                         (url, store.url_hash(url), url if r["path"] == r["url"] else r["path"],
                          os.stat(url).st_mtime_ns, json.dumps(meta, sort_keys=True), r["id"]))
        conn.execute("DROP INDEX images_duplicate_of")
        # 0004 is the migration this test upgrades through (the others' own tests upgrade from 0001+0002)
        conn.execute("DELETE FROM migrations WHERE name = '0004_lifecycle'")
    conn.close()


def test_gallery_made_by_the_previous_schema_is_upgraded(cli, ingest, tmp_path):
    home = tmp_path / "old"
    (home / "photos").mkdir(parents=True)
    for i in range(5):
        (home / "photos" / f"{i}.jpg").write_bytes(jpeg(400 + i))
    (home / "photos" / "copy.jpg").write_bytes(jpeg(400))
    db = home / "gallery.db"
    ingest("--dir", home / "photos", "--db", db)
    _downgrade(db, home / "photos")
    conn = store.connect(db, apply_migrations=False)
    assert "0004_lifecycle" not in store.applied_migrations(conn)
    old = {r["id"]: dict(r) for r in conn.execute("SELECT * FROM images")}
    conn.close()
    assert all(Path(r["url"]).is_absolute() and r["mtime"] > 10**15 for r in old.values())

    s = run_json(cli, "ingest", "--dir", home / "photos", "--db", db, "-q")  # upgrades, then skips everything
    assert (s["new"], s["skipped"], s["duplicate"], s["gone"]) == (0, 6, 0, 0), s
    new = rows(db)
    assert set(new) == set(old)
    for i, r in new.items():
        assert r["url"] == f"photos/{Path(old[i]['url']).name}" and r["path"] == r["url"]
        assert r["url_hash"] == store.url_hash(r["url"])
        assert r["mtime"] == pytest.approx(old[i]["mtime"] / 1e9, abs=1e-6)
        assert "empty" not in json.loads(r["meta"])
    conn = store.connect(db)
    assert "images_duplicate_of" in {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "0004_lifecycle" in store.applied_migrations(conn)
    conn.close()
    doctor_clean(cli, db)
    # and it moves, queries, removes and finds its duplicates like a new one
    shutil.move(str(home), str(tmp_path / "new"))
    db = tmp_path / "new" / "gallery.db"
    res = run_json(cli, "query", "--id", 1, "--db", db, "-k", 3, "--where", "relative_path~%.jpg")
    assert len(res) == 3 and all(Path(x["path"]).is_file() for x in res)
    out = run_json(cli, "remove", "--id", 1, "--db", db)
    assert len(out["promoted"]) == 1
    groups = run_json(cli, "dupes", "--db", db, "--threshold", 0.99)["groups"]
    heir = out["promoted"][0]["heir"]
    assert heir in {m["id"] for g in groups for m in g["images"]} and all(g["size"] >= 2 for g in groups)
    assert assert_consistent(db) == {"ok": 5}
    doctor_clean(cli, db)


def test_migration_0004_on_old_rows_in_sql(tmp_path):
    """The 0004 statements on rows as the previous schema stored them: nanosecond mtimes, blank meta cells,
    absolute paths inside and outside the gallery's folder, URLs that are not paths."""
    db = tmp_path / "g.db"
    conn = store.connect(db, apply_migrations=False)
    store.migrate(conn, upto=2)
    inside = str(tmp_path / "pics" / "a.jpg")
    outside = "/somewhere/else/b.jpg"
    stored = str(tmp_path / "g_images" / "ab" / ("ab" + "0" * 62 + ".jpg"))
    conn.executemany("INSERT INTO images (url, url_hash, status, path, mtime, meta) VALUES (?, ?, 'ok', ?, ?, ?)", [
        (inside, store.url_hash(inside), inside, 1_700_000_000_123_456_789, '{"a": "", "b": "x", "c": "  "}'),
        (outside, store.url_hash(outside), outside, 1_600_000_000, '{"a": ""}'),
        ("https://h.test/c.jpg", store.url_hash("https://h.test/c.jpg"), stored, None, None),
    ])
    conn.close()
    conn = store.connect(db)
    r = [dict(x) for x in conn.execute("SELECT url, url_hash, path, mtime, meta FROM images ORDER BY id")]
    conn.close()
    assert r[0]["url"] == "pics/a.jpg" and r[0]["path"] == "pics/a.jpg" and r[0]["url_hash"] == store.url_hash("pics/a.jpg")
    assert r[0]["mtime"] == pytest.approx(1_700_000_000.123456789) and json.loads(r[0]["meta"]) == {"b": "x"}
    assert r[1]["url"] == outside and r[1]["mtime"] == 1_600_000_000 and r[1]["meta"] is None
    assert r[2]["url"] == "https://h.test/c.jpg" and r[2]["path"] == "g_images/ab/ab" + "0" * 62 + ".jpg"
