"""What the web app does, without HTTP: one :class:`GalleryService` per served gallery.

Every search goes through the library the CLI uses: ``query.by_id`` for an id, the gallery's own
encoder (``query.gallery_encoder``) and ``store.search`` for an uploaded or fetched image, downloads
through ``fetch.Fetcher`` (the ingest's rules), decoding through ``decode.decode`` (the ingest's
limits), thumbnails through ``thumbs``. Errors are the library's exceptions (``retrieval/errors.py``);
``app.py`` turns them into HTTP statuses.

SQLite connections are per thread (the app's routes run in a thread pool); the encoder is loaded once
(in the background when the app starts, or on the first search that needs it) and used under a lock.
"""

from __future__ import annotations

import hashlib
import json
import mimetypes
import threading
import time
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from .. import query, store, thumbs
from ..decode import decode
from ..encoder import encode_images, l2_normalise
from ..errors import InputError, RetrievalError
from ..fetch import FetchConfig, Fetcher
from . import filters as F

MAX_K = 1000
DEFAULT_K = 20
QUERY_CACHE = 64  # recent query vectors kept for ?q=TOKEN (uploads) and URL searches
FILTER_OVERFETCH = 20  # with filters, search this many times k (at least 200) before filtering


class NotFound(InputError):
    """An id (image or query token) the gallery does not have."""


class TooLarge(InputError):
    """An upload above the size cap."""


class FetchFailed(InputError):
    """A search-by-URL whose download failed (``reason`` is the fetch's tag, e.g. ``http-404``)."""

    def __init__(self, message: str, reason: str):
        self.reason = reason
        super().__init__(message)


def fetch_config(allow_private: bool = False, **kwargs) -> FetchConfig:
    """The fetch options of search-by-URL: the ingest's defaults; ``allow_private`` passes through to
    whatever the fetch layer uses to allow loopback/private addresses (a FetchConfig field when it has
    one, else the documented environment variable)."""
    if allow_private:
        fields = getattr(FetchConfig, "__dataclass_fields__", {})
        if "allow_private" in fields:
            kwargs["allow_private"] = True
        else:
            import os

            os.environ["DINOV2_ALLOW_PRIVATE"] = "1"
    return FetchConfig(**kwargs)


def _mime(fmt: str | None, path: Path) -> str:
    if fmt:
        mime = Image.MIME.get(fmt.upper())
        if mime:
            return mime
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed if guessed and guessed.startswith("image/") else "application/octet-stream"


class GalleryService:
    def __init__(self, db_path, *, weights=None, offline: bool = False, allow_private: bool = False,
                 max_upload_bytes: int = 25 * 1024 * 1024, fetch: FetchConfig | None = None):
        self.db_path = Path(db_path)
        if not self.db_path.exists():
            raise InputError(f"{self.db_path}: no such gallery database (run: python cli.py ingest --csv FILE --db {self.db_path})")
        self.weights = weights
        self.offline = offline
        self.max_upload_bytes = int(max_upload_bytes)
        # bring the schema up to date once (the thumbnails table); the per-thread connections only read it
        conn = store.connect(self.db_path)
        try:
            self.model = store.get_model(conn)
        finally:
            conn.close()
        self._local = threading.local()
        self._conns: list = []
        self._conns_lock = threading.Lock()
        self._encoder = None
        self._encoder_error: Exception | None = None
        self._encoder_lock = threading.Lock()  # loading, and encoding (one image at a time)
        self._encoder_seconds: float | None = None
        self._queries: OrderedDict[str, dict] = OrderedDict()
        self._queries_lock = threading.Lock()
        self.fetcher = Fetcher(fetch or fetch_config(allow_private), workers=4)

    # ------------------------------------------------------------ resources

    def conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = store.connect(self.db_path, apply_migrations=False)
            self._local.conn = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def close(self) -> None:
        self.fetcher.close()
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except Exception:  # another thread's connection: closing may be refused; the process ends anyway
                    pass
            self._conns.clear()

    def encoder(self):
        """The gallery's encoder, loaded once (``query.gallery_encoder``: refuses other weights)."""
        if self._encoder is not None:
            return self._encoder
        with self._encoder_lock:
            if self._encoder is None:
                from ..hub import resolve_weights

                t0 = time.perf_counter()
                conn = self.conn()
                model = query.gallery_model(conn)
                path = resolve_weights(self.weights, variant=model["variant"], allow_download=not self.offline,
                                       progress=False)
                self._encoder = query.gallery_encoder(conn, path)
                self._encoder_seconds = time.perf_counter() - t0
        return self._encoder

    def warm(self) -> None:
        """Load the encoder now (called in a background thread at start-up); errors are kept for the
        first search that needs it, which raises them."""
        try:
            if self.model is not None:
                self.encoder()
        except Exception as exc:  # reported by the first upload/URL search
            self._encoder_error = exc

    def model_status(self) -> dict:
        return {"loaded": self._encoder is not None, "load_seconds": self._encoder_seconds,
                "error": str(self._encoder_error) if self._encoder_error and self._encoder is None else None}

    # ------------------------------------------------------------ searching

    @staticmethod
    def check_k(k) -> int:
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise InputError(f"k={k!r}: expected a whole number from 1 to {MAX_K}") from None
        if not 1 <= k <= MAX_K:
            raise InputError(f"k={k}: expected a whole number from 1 to {MAX_K}")
        return k

    @staticmethod
    def check_min_score(value) -> float | None:
        if value in (None, ""):
            return None
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise InputError(f"min_score={value!r}: expected a number from -1 to 1") from None
        if not -1.0 <= v <= 1.0:
            raise InputError(f"min_score={value!r}: expected a number from -1 to 1")
        return v

    def _finish(self, results, k, min_score, filters) -> list[dict]:
        results = F.apply(results, filters)[:k]
        if min_score is not None:
            results = [r for r in results if r["score"] >= min_score]
        out = []
        for r in results:
            out.append({
                "rank": r["rank"], "id": r["id"], "url": r["url"], "score": round(float(r["score"]), 6),
                "width": r["width"], "height": r["height"], "meta": r["meta"],
                "thumbnail": f"/api/images/{r['id']}/thumbnail", "original": f"/api/images/{r['id']}/original",
            })
        return out

    def _search_k(self, k: int, filters) -> int:
        return min(max(k * FILTER_OVERFETCH, 200), 4096) if filters else k

    def search_id(self, image_id, k, min_score=None, filters=()) -> dict:
        conn = self.conn()
        image_id = self._image_id(image_id)
        if store.get_image(conn, image_id) is None:
            raise NotFound(f"image {image_id}: no such image in {self.db_path.name}")
        results = query.by_id(conn, image_id, self._search_k(k, filters))
        return {"query": {"kind": "id", "id": image_id}, "results": self._finish(results, k, min_score, filters)}

    def _remember(self, token: str, entry: dict) -> None:
        with self._queries_lock:
            self._queries[token] = entry
            self._queries.move_to_end(token)
            while len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)

    def _recall(self, token: str) -> dict | None:
        with self._queries_lock:
            entry = self._queries.get(token)
            if entry is not None:
                self._queries.move_to_end(token)
            return entry

    def _encode(self, img) -> "object":
        encoder = self.encoder()
        with self._encoder_lock:
            return l2_normalise(encode_images(encoder, [img]))[0]  # (D,)

    def _image_query(self, data: bytes, source: str, kind: str, extra: dict) -> tuple[str, dict]:
        token = hashlib.sha256(data).hexdigest()[:20]
        entry = self._recall(token)
        if entry is None:
            img = decode(data, source)  # the ingest's decoder and limits: ImageError on bad input
            if self.model is None:
                self.model = query.gallery_model(self.conn())
            entry = {"vector": self._encode(img), "thumb": thumbs.make(img), "kind": kind, **extra,
                     "width": img.width, "height": img.height}
            self._remember(token, entry)
        return token, entry

    def _vector_search(self, token, entry, k, min_score, filters) -> dict:
        results = store.search(self.conn(), entry["vector"], self._search_k(k, filters))
        q = {"kind": entry["kind"], "token": token, "thumbnail": f"/api/queries/{token}/thumbnail",
             "width": entry["width"], "height": entry["height"]}
        if entry.get("url"):
            q["url"] = entry["url"]
        if entry.get("name"):
            q["name"] = entry["name"]
        return {"query": q, "results": self._finish(results, k, min_score, filters)}

    def search_upload(self, data: bytes, name: str | None, k, min_score=None, filters=()) -> dict:
        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"upload of {len(data)} bytes: above the limit of {self.max_upload_bytes} bytes")
        label = f"upload {name!r}" if name else "upload"
        token, entry = self._image_query(data, label, "upload", {"name": name})
        return self._vector_search(token, entry, k, min_score, filters)

    def search_url(self, url: str, k, min_score=None, filters=()) -> dict:
        url = (url or "").strip()
        if not url:
            raise InputError("url: empty; give the address of an image")
        token_key = "url:" + url
        token = hashlib.sha256(token_key.encode()).hexdigest()[:20]
        entry = self._recall(token)
        if entry is None:
            res = self.fetcher.fetch(url)  # the ingest's fetch rules (timeouts, size cap, redirects, addresses)
            if not res.ok:
                raise FetchFailed(f"{url}: {res.reason}", res.tag or "fetch")
            _, entry = self._image_query(res.data, url, "url", {"url": url})
            self._remember(token, entry)
        return self._vector_search(token, entry, k, min_score, filters)

    def search_token(self, token: str, k, min_score=None, filters=()) -> dict:
        entry = self._recall(str(token))
        if entry is None:
            raise NotFound(f"query {token}: not known to this server (uploads are kept while it runs): upload the image again")
        return self._vector_search(token, entry, k, min_score, filters)

    def query_thumbnail(self, token: str) -> thumbs.Thumb:
        entry = self._recall(str(token))
        if entry is None:
            raise NotFound(f"query {token}: not known to this server")
        return entry["thumb"]

    # ------------------------------------------------------------ images

    @staticmethod
    def _image_id(image_id) -> int:
        try:
            value = int(str(image_id).strip())
        except (TypeError, ValueError):
            raise InputError(f"id {str(image_id)[:80]!r}: expected a whole number (an image id)") from None
        if not 1 <= value < 2**63:
            raise NotFound(f"image {value}: no such image")
        return value

    def image(self, image_id) -> dict:
        conn = self.conn()
        image_id = self._image_id(image_id)
        row = store.get_image(conn, image_id)
        if row is None:
            raise NotFound(f"image {image_id}: no such image in {self.db_path.name}")
        source = thumbs.source_id(conn, image_id)
        dups = []
        if source is not None:
            for r in conn.execute("SELECT id, url FROM images WHERE (duplicate_of = ? AND status = 'duplicate') "
                                  "OR (id = ? AND id != ?) ORDER BY id", (source, source, image_id)):
                if int(r[0]) != image_id:
                    dups.append({"id": int(r[0]), "url": r[1]})
        keys = ("id", "url", "status", "error", "http_status", "width", "height", "format", "bytes",
                "content_sha256", "duplicate_of", "created_at", "updated_at", "meta")
        out = {key: row.get(key) for key in keys}
        out["duplicates"] = dups
        shown = source is not None
        out["thumbnail"] = f"/api/images/{image_id}/thumbnail" if shown else None
        out["original"] = f"/api/images/{image_id}/original" if shown else None
        return out

    def thumbnail(self, image_id) -> thumbs.Thumb:
        image_id = self._image_id(image_id)
        thumb = thumbs.get(self.conn(), image_id, self.db_path)
        if thumb is None:
            raise NotFound(f"image {image_id}: no such image with a picture in {self.db_path.name}")
        return thumb

    def original(self, image_id) -> tuple[Path, str]:
        """The stored original of an image, from the gallery's record only: ``(path, mime type)``."""
        conn = self.conn()
        image_id = self._image_id(image_id)
        path = thumbs.original_path(conn, image_id, self.db_path)
        if path is None or not path.is_file():
            raise NotFound(f"image {image_id}: no stored original in {self.db_path.name}")
        src = thumbs.source_id(conn, image_id)
        fmt = conn.execute("SELECT format FROM images WHERE id = ?", (src,)).fetchone()[0]
        return path, _mime(fmt, path)

    # ------------------------------------------------------------ the gallery's state

    def stats(self) -> dict:
        conn = self.conn()
        s = store.stats(conn)
        s["thumbnails"] = (conn.execute("SELECT count(*) FROM thumbnails").fetchone()[0]
                           if thumbs.has_table(conn) else 0)
        s["model_loaded"] = self.model_status()
        return json.loads(json.dumps(s, default=str))

    def failures(self, limit=100, offset=0, reason: str | None = None) -> dict:
        conn = self.conn()
        limit, offset = self._page(limit, offset)
        reasons: dict[str, int] = {}
        for (error, n) in conn.execute("SELECT error, count(*) FROM images WHERE status = 'failed' GROUP BY error"):
            tag = (error or "unknown").split(":", 1)[0].strip()
            reasons[tag] = reasons.get(tag, 0) + int(n)
        where, params = "status = 'failed'", []
        if reason:
            where += " AND (error = ? OR error LIKE ? ESCAPE '\\')"
            escaped = reason.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params += [reason, escaped + ":%"]
        total = conn.execute(f"SELECT count(*) FROM images WHERE {where}", params).fetchone()[0]
        rows = [dict(r) for r in conn.execute(
            f"SELECT id, url, error, attempts, http_status, updated_at FROM images WHERE {where} "
            "ORDER BY id LIMIT ? OFFSET ?", [*params, limit, offset])]
        return {"reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))), "total": int(total),
                "limit": limit, "offset": offset, "rows": rows}

    def duplicates(self, limit=100, offset=0) -> dict:
        conn = self.conn()
        limit, offset = self._page(limit, offset)
        total = conn.execute("SELECT count(DISTINCT duplicate_of) FROM images WHERE status = 'duplicate'").fetchone()[0]
        heads = [int(r[0]) for r in conn.execute(
            "SELECT DISTINCT duplicate_of FROM images WHERE status = 'duplicate' ORDER BY duplicate_of LIMIT ? OFFSET ?",
            (limit, offset))]
        groups = []
        for head in heads:
            row = conn.execute("SELECT id, url FROM images WHERE id = ?", (head,)).fetchone()
            dups = [{"id": int(r[0]), "url": r[1]} for r in conn.execute(
                "SELECT id, url FROM images WHERE duplicate_of = ? AND status = 'duplicate' ORDER BY id", (head,))]
            groups.append({"id": head, "url": row[1] if row else None, "thumbnail": f"/api/images/{head}/thumbnail",
                           "duplicates": dups})
        return {"total": int(total), "limit": limit, "offset": offset, "groups": groups}

    @staticmethod
    def _page(limit, offset) -> tuple[int, int]:
        try:
            limit, offset = int(limit), int(offset)
        except (TypeError, ValueError):
            raise InputError(f"limit={limit!r}, offset={offset!r}: expected whole numbers") from None
        if not 1 <= limit <= 1000 or offset < 0:
            raise InputError(f"limit={limit}, offset={offset}: limit from 1 to 1000, offset 0 or more")
        return limit, offset


__all__ = ["GalleryService", "NotFound", "TooLarge", "FetchFailed", "RetrievalError", "fetch_config", "MAX_K"]
