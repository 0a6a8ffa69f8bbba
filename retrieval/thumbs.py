"""Thumbnails: small JPEG previews of gallery images, kept IN the database (table ``thumbnails``,
migration 0006) so a page of 50 results needs 50 small reads and no decoding.

They are made
- at ingest, from the image the ingest has just decoded (``make``; ``ingest.run`` stores them in the
  same transaction as the batch's rows and vectors),
- or later from the stored original: lazily by :func:`get` on first request (then cached), or all at
  once by :func:`make_missing` (``python cli.py thumbs``). A gallery ingested before thumbnails existed
  gets them this way, without encoding anything again.

A ``duplicate`` row has no thumbnail of its own: :func:`get` answers with the one of the row it points at.
Originals are found only through the gallery's own record (``images.path``, resolved by
``query.display_path``); nothing here opens a path that did not come from the database.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from . import store
from .decode import decode
from .errors import ImageError

SIZE = 256  # the long side, in pixels
QUALITY = 82
MIME = "image/jpeg"


@dataclass
class Thumb:
    width: int
    height: int
    mime: str
    data: bytes


def make(img: Image.Image, size: int = SIZE) -> Thumb:
    """A JPEG of ``img`` (an RGB image, e.g. from ``decode.decode``) at most ``size`` px on its long side."""
    t = img.copy() if img.mode == "RGB" else img.convert("RGB")
    # reducing_gap=1: a box reduction to about the target size first, then bicubic (2.5x faster than 2.0)
    t.thumbnail((size, size), Image.Resampling.BICUBIC, reducing_gap=1.0)
    buf = io.BytesIO()
    t.save(buf, "JPEG", quality=QUALITY)
    return Thumb(t.width, t.height, MIME, buf.getvalue())


def try_make(img: Image.Image) -> Thumb | None:
    """:func:`make`, or None if Pillow cannot make it (the thumbnail is then made lazily later): a
    thumbnail must never cost an ingest its image."""
    try:
        return make(img)
    except (OSError, ValueError, MemoryError):
        return None


def has_table(conn) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'thumbnails'").fetchone() is not None


def save(conn, image_id: int, thumb: Thumb) -> None:
    """Store (or replace) the thumbnail of ``image_id``; joins an open transaction."""
    save_many(conn, [(image_id, thumb)])


def save_many(conn, pairs) -> int:
    """Store ``[(image_id, Thumb)]`` in one transaction (joining an open one); returns how many."""
    pairs = [(int(i), t) for i, t in pairs if t is not None]
    if not pairs or not has_table(conn):
        return 0
    with store.transaction(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO thumbnails (image_id, width, height, mime, data) VALUES (?, ?, ?, ?, ?)",
            [(i, t.width, t.height, t.mime, t.data) for i, t in pairs])
    return len(pairs)


def stored(conn, image_id: int) -> Thumb | None:
    """The cached thumbnail of ``image_id`` (this exact row), or None."""
    if not has_table(conn):
        return None
    row = conn.execute("SELECT width, height, mime, data FROM thumbnails WHERE image_id = ?", (int(image_id),)).fetchone()
    return None if row is None else Thumb(row[0], row[1], row[2], bytes(row[3]))


def source_id(conn, image_id: int) -> int | None:
    """The row whose picture ``image_id`` shows: itself when ok, the row it duplicates, else None."""
    row = conn.execute("SELECT status, duplicate_of FROM images WHERE id = ?", (int(image_id),)).fetchone()
    if row is None:
        return None
    if row[0] == "ok":
        return int(image_id)
    if row[0] == "duplicate" and row[1] is not None:
        return int(row[1])
    return None


def original_path(conn, image_id: int, db_path) -> Path | None:
    """The stored original of an ok (or duplicate) row as an openable path, from the gallery's record only."""
    from .query import display_path

    src = source_id(conn, image_id)
    if src is None:
        return None
    row = conn.execute("SELECT path FROM images WHERE id = ?", (src,)).fetchone()
    if row is None or not row[0]:
        return None
    return Path(display_path(row[0], db_path))


def from_file(path) -> Thumb:
    """The thumbnail of an image file, decoded as ingest decodes it (the same checks and limits), a JPEG
    at reduced scale (``decode(draft=...)``). ImageError when the file cannot be read or decoded."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ImageError(path, f"cannot read the file: {exc.strerror or exc}", "unreadable") from exc
    return make(decode(data, str(path), draft=(SIZE, SIZE)))


def get(conn, image_id: int, db_path, *, cache: bool = True) -> Thumb | None:
    """The thumbnail of an image: the cached one, else made from the stored original and cached
    (``cache``; a database that cannot be written, e.g. opened read-only, still gets the thumbnail).
    None when the image is unknown, failed, or its original cannot be read or decoded."""
    src = source_id(conn, image_id)
    if src is None:
        return None
    thumb = stored(conn, src)
    if thumb is not None:
        return thumb
    path = original_path(conn, src, db_path)
    if path is None:
        return None
    try:
        thumb = from_file(path)
    except ImageError:
        return None
    if cache:
        _save_if_free(conn, src, thumb)
    return thumb


def _save_if_free(conn, image_id: int, thumb: Thumb) -> None:
    """Cache a lazily made thumbnail unless the database is read-only or busy (an ingest writing): then the
    request is answered anyway, without waiting the connection's long busy timeout."""
    if conn.in_transaction:
        save(conn, image_id, thumb)
        return
    old = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute("PRAGMA busy_timeout = 250")
    try:
        save(conn, image_id, thumb)
    except store.SQLITE_ERRORS:
        pass
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(old)}")


def missing_ids(conn) -> list[int]:
    """Ids of ok rows without a thumbnail."""
    if not has_table(conn):
        return []
    return [int(r[0]) for r in conn.execute(
        "SELECT id FROM images WHERE status = 'ok' AND id NOT IN (SELECT image_id FROM thumbnails) ORDER BY id")]


def make_missing(conn, db_path, *, batch: int = 64, progress=None) -> dict:
    """Make the thumbnail of every ok row that has none, from its stored original (nothing is encoded).
    Returns ``{"made": n, "unreadable": [ids whose original is missing or undecodable]}``."""
    ids = missing_ids(conn)
    made, unreadable, pending = 0, [], []
    for n, image_id in enumerate(ids, start=1):
        path = original_path(conn, image_id, db_path)
        try:
            if path is None:
                raise ImageError(image_id, "no stored original", "unreadable")
            pending.append((image_id, from_file(path)))
        except ImageError:
            unreadable.append(image_id)
        if len(pending) >= batch or n == len(ids):
            made += save_many(conn, pending)
            pending = []
            if progress:
                progress(n, len(ids))
    return {"made": made, "unreadable": unreadable, "total": len(ids)}
