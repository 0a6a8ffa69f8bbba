"""The ingest stage: CSV rows or folder files -> fetched, decoded, preprocessed -> encoded -> stored.

Two threads. A producer thread (with its own read connection) walks the source, skips what the
gallery already knows (no network request), downloads the rest concurrently, decodes and
preprocesses each image, stores the original under ``images_dir`` named by its content hash, and
hands items to the main thread through a bounded queue. The main thread encodes items in batches of
equal shape and commits each batch -- its rows and vectors, and the failures and duplicates that
arrived with it -- in one transaction. Bytes the gallery already holds are recorded as duplicates
without being decoded or encoded. So downloading and decoding overlap with encoding, memory stays
flat however long the source is, and a crash or SIGKILL loses at most the batch in flight.

Failures are data: every row that could not be ingested is stored with status ``failed`` and its
reason ("http-404: Not Found", "not-an-image: ...").
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import store
from .csvread import read_rows
from .decode import decode
from .encoder import Encoder, encode_pixels, l2_normalise
from .errors import ConfigError, ImageError, InputError
from .fetch import FetchConfig, Fetcher, fetch_many
from .preprocess import preprocess

# Failures a later run may retry (up to max_attempts): the server or network may recover.
TRANSIENT_TAGS = ("timeout", "deadline", "incomplete", "connection", "cancelled", "http-408", "http-429", "tls")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".jp2", ".qoi"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
CHUNK = 256  # rows looked up in the gallery at a time


def is_transient(error: str | None) -> bool:
    """Whether a stored failure reason may succeed on a later run."""
    if not error:
        return False
    tag = error.split(":", 1)[0].strip()
    return tag in TRANSIENT_TAGS or (tag.startswith("http-5") and len(tag) == 8)


@dataclass(frozen=True)
class IngestOptions:
    workers: int = 8
    retry_failed: bool = False  # retry every failed row, whatever its reason and attempts
    max_attempts: int = 3  # transient failures are retried on later runs until this many attempts
    images_dir: Path | None = None  # where downloaded originals go (default: <db stem>_images beside the db)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    queue_size: int = 64  # decoded images waiting for the encoder

    def __post_init__(self):
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"--workers {self.workers}: expected a whole number from 1 to 256")
        if not 1 <= self.max_attempts <= 1000:
            raise ConfigError(f"--max-attempts {self.max_attempts}: expected a whole number from 1 to 1000")


@dataclass
class Summary:
    run_id: int = 0
    source: str = ""
    new: int = 0
    skipped: int = 0
    failed: int = 0
    duplicate: int = 0
    seconds: float = 0.0
    status: str = "running"
    total: int | None = None  # rows or files in the source, when known (for progress)
    reasons: dict = field(default_factory=dict)  # failure tag -> count, this run

    @property
    def done(self) -> int:
        return self.new + self.skipped + self.failed + self.duplicate

    @property
    def images_per_s(self) -> float:
        return self.new / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "run_id": self.run_id, "source": self.source, "status": self.status, "new": self.new,
            "skipped": self.skipped, "failed": self.failed, "duplicate": self.duplicate,
            "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 3),
            "failure_reasons": dict(sorted(self.reasons.items())),
        }


@dataclass
class Item:
    """One source row on its way to the gallery."""

    url: str
    url_hash: str
    meta: dict | None = None
    mtime: int | None = None
    http_status: int | None = None
    error: str | None = None  # set: record as failed
    pixels: np.ndarray | None = None  # set: encode and record as ok
    info: dict = field(default_factory=dict)  # content_sha256, width, height, format, bytes, path
    skipped: int = 0  # a marker item that only counts skipped rows
    local: bool = False  # url is a local file's absolute path: read it, don't fetch it
    duplicate_of: int | None = None  # set: its bytes are already in the gallery as this row (no encoding)

    def row(self) -> dict:
        r = {"url": self.url, "url_hash": self.url_hash, "meta": self.meta or None, "mtime": self.mtime,
             "http_status": self.http_status, "error": self.error}
        r.update(self.info)
        return r


def default_images_dir(db_path) -> Path:
    p = Path(db_path).resolve()
    return p.with_name(p.stem + "_images")


# ---------------------------------------------------------------- sources


def _skip(known: dict | None, options: IngestOptions, mtime: int | None = None) -> bool:
    """Whether a row the gallery already holds needs no work (and no network request)."""
    if known is None:
        return False
    if mtime is not None and known["mtime"] != mtime:
        return False  # a local file that changed since it was read
    if known["status"] in ("ok", "duplicate"):
        return True
    if options.retry_failed:
        return False
    return not (is_transient(known["error"]) and known["attempts"] < options.max_attempts)


def count_lines(path) -> int:
    """Newlines in a file, read in blocks (for the progress bar's total: an estimate for CSVs)."""
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def local_item(path: Path, meta: dict | None = None) -> Item:
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = None
    return Item(url=str(path), url_hash=store.url_hash(str(path)), mtime=mtime, meta=meta, local=True)


def csv_items(path) -> Iterator[Item]:
    """CSV rows as items. A cell with no scheme that names an existing file (relative to the CSV's
    folder, or absolute) is a local image. A row with a bad or missing URL becomes a failed item,
    keyed by its line when it has no URL at all."""
    folder = Path(path).resolve().parent
    with read_rows(path) as rows:
        for row in rows:
            if row.error and row.error.startswith("invalid-url") and "://" not in row.url:
                local = folder / row.url
                if local.is_file():
                    yield local_item(local.resolve(), row.meta)
                    continue
                row.error = "invalid-url: neither an http(s) URL nor an existing file"
            url = row.url or f"csv:{folder / Path(path).name}:{row.line}"
            yield Item(url=url, url_hash=store.url_hash(url), meta=row.meta, error=row.error)


def dir_items(folder) -> Iterator[Item]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped), keyed by absolute path."""
    root = Path(folder).resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            yield local_item(path, {"relative_path": str(path.relative_to(root))})


def needs_work(conn, source: Iterator[Item], options: IngestOptions, window: int = 10_000,
               stop: threading.Event | None = None) -> Iterator[Item]:
    """The items of ``source`` that need work, in order, looked up in the gallery at ``conn`` CHUNK rows at
    a time; after each chunk that skipped rows, a marker ``Item(skipped=n)``. Skipped: rows the gallery
    knows and need not retry (:func:`_skip`), and a URL repeated within the last ``window`` items handed on
    (its first copy may still be in the pipeline; anything older has been committed and known() finds it)."""
    recent: set[str] = set()
    order: deque[str] = deque()
    it = iter(source)
    while stop is None or not stop.is_set():
        chunk = [x for _, x in zip(range(CHUNK), it)]
        if not chunk:
            return
        known = store.known(conn, [x.url_hash for x in chunk])
        skipped = 0
        for x in chunk:
            if x.url_hash in recent or _skip(known.get(x.url_hash), options, x.mtime):
                skipped += 1
                continue
            recent.add(x.url_hash)
            order.append(x.url_hash)
            if len(order) > window:
                recent.discard(order.popleft())
            yield x
        if skipped:
            yield Item(url="", url_hash="", skipped=skipped)


# ---------------------------------------------------------------- producer


class _Fatal(Exception):
    """Carries an error that must end the run (not a bad row): e.g. the images folder is not writable."""


def _store_original(data: bytes, sha: str, fmt: str, images_dir: Path) -> Path:
    """Write the original bytes as images_dir/ab/abcdef....ext, atomically; existing files are kept."""
    ext = EXTENSIONS.get(fmt, "." + fmt.lower() if fmt else ".bin")
    dest = images_dir / sha[:2] / (sha + ext)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _prepare(item: Item, data: bytes, route: str, images_dir: Path | None, db_dir: Path,
             holder_of: Callable[[str], int | None]) -> Item:
    """Decode and preprocess ``data`` into ``item`` (pixels and info), or set its error; bytes the
    gallery already holds (``holder_of(sha256)`` finds the ok row) make it a duplicate, not decoded."""
    sha = hashlib.sha256(data).hexdigest()
    item.info = {"content_sha256": sha, "bytes": len(data)}
    if images_dir is None:
        item.info["path"] = item.url
    item.duplicate_of = holder_of(sha)
    if item.duplicate_of is not None:
        return item
    try:
        img = decode(data, item.url)
        pixels = preprocess(img, route)
    except ImageError as exc:
        item.error = f"{exc.reason}: {exc.problem}"
        return item
    item.info.update(width=img.width, height=img.height, format=img.format)
    if images_dir is not None:
        try:
            stored = _store_original(data, sha, img.format or "", images_dir)
        except OSError as exc:
            raise _Fatal(f"{images_dir}: cannot store images there ({exc.strerror or exc})") from exc
        try:
            item.info["path"] = str(stored.relative_to(db_dir))
        except ValueError:
            item.info["path"] = str(stored)
    item.pixels = pixels
    return item


def _produce(source: Iterator[Item], db_path, encoder: Encoder, options: IngestOptions, out: queue.Queue,
             stop: threading.Event, images_dir: Path, fetcher: Fetcher):
    """Producer thread body: everything up to encoding. Puts Items, then None (done) or an exception.

    ``fetcher`` belongs to the main thread, which closes it when the run stops: downloads in flight are
    aborted then, so an interrupted run does not wait for a hung server's deadline."""
    conn = store.connect(db_path, apply_migrations=False)
    db_dir = Path(db_path).resolve().parent
    route = encoder.settings.preprocess
    window = max(10_000, 8 * encoder.settings.batch_size + 4 * options.workers + options.queue_size + 2 * CHUNK)

    def holder_of(sha: str) -> int | None:
        return store.find_by_content(conn, sha)

    def put(item):
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def todo() -> Iterator[tuple[Item, str]]:
        """Source items that need work, as (item, url) pairs for the fetcher; skips and failures are put."""
        for x in needs_work(conn, source, options, window, stop):
            if x.skipped or x.error is not None:  # a skip count, or a bad CSV row: recorded as failed
                put(x)
            elif x.local:
                put(read_local(x))
            else:
                yield x, x.url

    def read_local(item: Item) -> Item:
        try:
            data = Path(item.url).read_bytes()
        except OSError as exc:
            item.error = f"unreadable: {exc.strerror or exc}"
            return item
        return _prepare(item, data, route, None, db_dir, holder_of)

    try:
        results = fetch_many(((item, url) for item, url in todo()), workers=options.workers, fetcher=fetcher)
        try:
            for res in results:
                if stop.is_set():  # e.g. "cancelled" by the main thread closing the fetcher: not recorded
                    break
                item: Item = res.key
                item.http_status = res.http_status
                if not res.ok:
                    item.error = res.reason
                    put(item)
                else:
                    put(_prepare(item, res.data, route, images_dir, db_dir, holder_of))
        finally:
            results.close()
        put(None)
    except BaseException as exc:  # handed to the main thread, which re-raises it
        put(exc)
    finally:
        conn.close()


# ---------------------------------------------------------------- main loop


def _tag(error: str) -> str:
    return error.split(":", 1)[0].strip()


def run(conn, db_path, source: Iterator[Item], source_name: str, encoder: Encoder, options: IngestOptions, *,
        total: int | None = None,
        progress: Callable[[Summary], None] | None = None) -> Summary:
    """Ingest ``source`` into the gallery at ``conn``; returns the run's summary.

    KeyboardInterrupt stops the run cleanly: what was committed stays, the run is recorded as
    interrupted, and the exception propagates.
    """
    store.ensure_model(conn, encoder.record())
    images_dir = Path(options.images_dir or default_images_dir(db_path))
    summary = Summary(source=source_name, total=total)
    summary.run_id = store.start_run(conn, source_name)
    started = time.monotonic()
    out: queue.Queue = queue.Queue(maxsize=options.queue_size)
    stop = threading.Event()
    fetcher = Fetcher(options.fetch, workers=options.workers)
    producer = threading.Thread(target=_produce, name="ingest-producer", daemon=True,
                                args=(source, db_path, encoder, options, out, stop, images_dir, fetcher))
    buckets: dict[tuple, list[Item]] = {}  # decoded items by pixel shape, waiting to be encoded
    others: list[Item] = []  # failures and duplicates: no encoding, committed with the next batch
    # content of the items in buckets -> later items with the same bytes (other URLs): not encoded, recorded
    # as duplicates right after the first one is recorded ok
    waiting: dict[str, list[Item]] = {}
    # content recorded ok lately (oldest first, bounded like the producer's window): a copy that the
    # producer prepared before that commit is a duplicate too, not encoded
    committed: dict[str, None] = {}
    bs = encoder.settings.batch_size
    last_commit = last_progress = time.monotonic()

    def commit(items: list[Item]):
        nonlocal last_commit
        outcomes = []
        if items:
            feats = l2_normalise(encode_pixels(encoder, [x.pixels for x in items]))  # (n, D)
            for x, v in zip(items, feats):
                outcomes.append({**x.row(), "status": "ok", "vector": v})
                for y in waiting.pop(x.info["content_sha256"], ()):  # its holder is found by content
                    outcomes.append({**y.row(), "status": "duplicate"})
                committed[x.info["content_sha256"]] = None
            while len(committed) > 10_000:
                del committed[next(iter(committed))]
        for x in others:
            if x.error is not None:
                outcomes.append({**x.row(), "status": "failed"})
            else:
                outcomes.append({**x.row(), "status": "duplicate", "duplicate_of": x.duplicate_of})
        results = store.commit_batch(conn, outcomes)
        for o, (_, status) in zip(outcomes, results):
            if o["status"] == "failed":
                if status == "failed":
                    summary.failed += 1
                    summary.reasons[_tag(o["error"])] = summary.reasons.get(_tag(o["error"]), 0) + 1
                else:
                    summary.skipped += 1  # a transient failure of a row that is already ok elsewhere
            elif status == "duplicate":
                summary.duplicate += 1
            else:
                summary.new += 1
        others.clear()
        last_commit = time.monotonic()
        report()

    def report():
        nonlocal last_progress
        last_progress = time.monotonic()
        summary.seconds = last_progress - started
        if progress:
            progress(summary)

    status = "crashed"
    producer.start()
    try:
        while True:
            try:
                item = out.get(timeout=0.5)
            except queue.Empty:
                item = False
            if item is None:
                break
            if isinstance(item, BaseException):
                if isinstance(item, _Fatal):
                    raise InputError(str(item)) from item
                raise item
            if item is not False:
                if item.skipped:
                    summary.skipped += item.skipped
                elif item.error is not None or item.duplicate_of is not None:
                    others.append(item)
                elif item.info["content_sha256"] in waiting:  # the same bytes wait in a bucket already
                    item.pixels = None
                    waiting[item.info["content_sha256"]].append(item)
                elif item.info["content_sha256"] in committed:  # ... or were just recorded: found by content
                    item.pixels = None
                    others.append(item)
                else:
                    waiting[item.info["content_sha256"]] = []
                    bucket = buckets.setdefault(item.pixels.shape, [])
                    bucket.append(item)
                    if len(bucket) >= bs:
                        commit(buckets.pop(item.pixels.shape))
                        continue
                pending = sum(len(b) for b in buckets.values())
                if pending >= 4 * bs:  # many shapes, none full: encode the largest group
                    commit(buckets.pop(max(buckets, key=lambda s: len(buckets[s]))))
                    continue
            if item is False and buckets:  # the producer is behind: encode what is ready
                commit(buckets.pop(max(buckets, key=lambda s: len(buckets[s]))))
            elif others and (len(others) >= 256 or time.monotonic() - last_commit > 2):
                commit([])
            elif time.monotonic() - last_progress > 0.2:
                report()
        for shape in list(buckets):
            commit(buckets.pop(shape))
        if others:
            commit([])
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        stop.set()
        fetcher.close()  # aborts downloads in flight (Ctrl-C must not wait for a hung server)
        producer.join(timeout=30)
        summary.seconds = time.monotonic() - started
        summary.status = status
        counts = {"new": summary.new, "skipped": summary.skipped, "failed": summary.failed,
                  "duplicate": summary.duplicate, "images_per_s": summary.images_per_s}
        store.finish_run(conn, summary.run_id, counts, status)
    return summary


def ingest_csv(conn, db_path, csv_path, encoder: Encoder, options: IngestOptions, *, progress=None) -> Summary:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    total = max(0, count_lines(csv_path) - 1)
    return run(conn, db_path, csv_items(csv_path), str(csv_path), encoder, options, total=total, progress=progress)


def ingest_dir(conn, db_path, folder, encoder: Encoder, options: IngestOptions, *, progress=None) -> Summary:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    total = sum(1 for _ in dir_items(folder))
    return run(conn, db_path, dir_items(folder), str(folder.resolve()), encoder, options, total=total,
               progress=progress)
