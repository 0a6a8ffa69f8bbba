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
import socket
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import store, thumbs
from .csvread import read_rows
from .decode import decode
from .encoder import Encoder, encode_pixels, l2_normalise
from .errors import ConfigError, ImageError, InputError
from .fetch import FetchConfig, Fetcher, MemoryBudget, fetch_many
from .lifecycle import gallery_dir, local_key
from .preprocess import preprocess
from .safety import clean_text, redact_url

# Failures a later run may retry (up to max_attempts): the server or network may recover.
TRANSIENT_TAGS = ("timeout", "deadline", "incomplete", "connection", "cancelled", "http-408", "http-429", "tls",
                  "host-busy", "host-failing")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".jp2", ".qoi"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
CHUNK = 256  # rows looked up in the gallery at a time
MTIME_TOLERANCE = 1e-6  # seconds: stored mtimes are floats (older galleries' nanoseconds were divided by 1e9)


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
    # downloads in flight plus preprocessed images waiting for the encoder, together (MiB; see fetch.MemoryBudget)
    memory_mb: float = 1024
    files_root: Path | None = None  # local files may be read from here (default: the CSV's or --dir's folder)
    copy_originals: bool = False  # local files: store a copy under images_dir too (else the file is the original)

    def __post_init__(self):
        if not 1 <= self.workers <= 256:
            raise ConfigError(f"--workers {self.workers}: expected a whole number from 1 to 256")
        if not 1 <= self.max_attempts <= 1000:
            raise ConfigError(f"--max-attempts {self.max_attempts}: expected a whole number from 1 to 1000")
        if not (isinstance(self.memory_mb, (int, float)) and 1 / 1024 <= self.memory_mb <= 2**20):
            raise ConfigError(f"--memory-mb {self.memory_mb}: expected a number of megabytes from 1/1024 to {2**20}")


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
    url_column: str | None = None  # a CSV's URL column ("photo_url")
    url_column_how: str | None = None  # how it was chosen: "by content", "by name", "first column", "given"
    memory_peak: int = 0  # the most bytes the memory budget held at once (downloads + images waiting)

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
            "memory_peak_mb": round(self.memory_peak / 2**20, 1),
            **({"url_column": self.url_column, "url_column_how": self.url_column_how}
               if self.url_column is not None else {}),
        }


@dataclass
class Item:
    """One source row on its way to the gallery."""

    url: str
    url_hash: str
    meta: dict | None = None
    mtime: float | None = None  # local files: st_mtime in seconds (float)
    http_status: int | None = None
    error: str | None = None  # set: record as failed
    pixels: np.ndarray | None = None  # set: encode and record as ok
    info: dict = field(default_factory=dict)  # content_sha256, width, height, format, bytes, path
    skipped: int = 0  # a marker item that only counts skipped rows
    local: bool = False  # a local file (``file``): read it, don't fetch it
    file: Path | None = None  # a local file's absolute path (``url`` is its key: relative to the gallery's folder)
    duplicate_of: int | None = None  # set: its bytes are already in the gallery as this row (no encoding)
    reserved: int = 0  # bytes of the run's memory budget its pixels hold, until encoded
    fetch_url: str | None = None  # the URL to download when it differs from ``url`` (which has no user info)
    thumb: thumbs.Thumb | None = None  # made from the decoded image; stored with the ok row (thumbs.py)
    original: str | None = None  # set: read the bytes from this file instead of fetching the URL (reindex)
    id: int | None = None  # set: the images.id to record the row under (reindex keeps the source's ids)

    def row(self) -> dict:
        # stored failure reasons never hold control or bidi characters (server texts, file names, CSV cells)
        r = {"url": self.url, "url_hash": self.url_hash, "meta": self.meta or None, "mtime": self.mtime,
             "http_status": self.http_status, "error": None if self.error is None else clean_text(self.error)}
        if self.id is not None:
            r["id"] = self.id
        r.update(self.info)
        return r


def default_images_dir(db_path) -> Path:
    p = Path(db_path).resolve()
    return p.with_name(p.stem + "_images")


# ---------------------------------------------------------------- sources


def _skip(known: dict | None, options: IngestOptions, mtime: float | None = None) -> bool:
    """Whether a row the gallery already holds needs no work (and no network request)."""
    if known is None:
        return False
    if mtime is not None and (known["mtime"] is None or abs(known["mtime"] - mtime) > MTIME_TOLERANCE):
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


def inside(path, root) -> bool:
    """Whether ``path`` (already resolved) is ``root`` (resolved) or lies under it."""
    try:
        Path(path).relative_to(root)
        return True
    except ValueError:
        return False


def outside_error(name, root) -> str:
    return (f"outside-folder: {name} is not inside {root} (local files are read only from the CSV's or --dir's "
            "folder; --files-root DIR names another)")


def local_item(path: Path, meta: dict | None = None, root: Path | None = None, base: Path | None = None) -> Item:
    """A local file as an item, keyed by its path relative to ``base`` (the gallery's folder) when it lies inside
    it, else by its absolute path; ``mtime`` in seconds. With ``root``: a path that resolves (symlinks followed)
    outside ``root`` is a failed item, and nothing about the file (not even its mtime) is looked at."""
    if root is not None and not inside(os.path.realpath(path), root):
        return Item(url=str(path), url_hash=store.url_hash(str(path)), meta=meta, error=outside_error(path, root))
    path = Path(os.path.abspath(path))
    path = path.parent.resolve() / path.name  # keyed by its own name (a symlink is not keyed by its target)
    try:
        mtime = path.stat().st_mtime_ns / 1e9
    except OSError:
        mtime = None
    key = local_key(path, base) if base is not None else str(path)
    return Item(url=key, url_hash=store.url_hash(key), mtime=mtime, meta=meta, local=True, file=path)


def read_local_bytes(path, root: Path | None, max_bytes: int) -> bytes:
    """The bytes of a local image file, or ImageError with a reason tag and nothing read from anything that is
    not a regular file inside ``root`` (symlinks resolved): ``outside-folder``, ``not-a-file`` (a FIFO, device,
    socket or folder: opened non-blocking and checked with fstat before any read), ``too-large`` (by its size,
    before reading; a file that grows while read is stopped at the limit), ``unreadable``."""
    real = os.path.realpath(path)
    if root is not None and not inside(real, root):
        raise ImageError(path, outside_error(path, root), "outside-folder")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)  # O_NOFOLLOW: the resolved name must not have become a symlink since
    except OSError as exc:
        raise ImageError(path, f"cannot open it ({exc.strerror or exc})", "unreadable") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise ImageError(path, f"{kind}, not a regular file: not read", "not-a-file")
        if st.st_size > max_bytes:
            raise ImageError(path, f"{st.st_size} bytes, more than the {max_bytes}-byte limit (--max-mb): not read",
                             "too-large")
        os.set_blocking(fd, True)
        parts, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        if size > max_bytes:
            raise ImageError(path, f"more than the {max_bytes}-byte limit (--max-mb)", "too-large")
        return b"".join(parts)
    except OSError as exc:
        raise ImageError(path, f"cannot read it ({exc.strerror or exc})", "unreadable") from None
    finally:
        os.close(fd)


def _cells(meta: dict | None) -> dict | None:
    """A CSV row's other columns without its empty (blank) cells: an empty cell is no value."""
    return {k: v for k, v in meta.items() if not (isinstance(v, str) and not v.strip())} if meta else None


def csv_items(path, files_root=None, rows=None, base: Path | None = None) -> Iterator[Item]:
    """CSV rows as items. A cell with no scheme that names an existing file (relative to the CSV's folder, or
    absolute) is a local image (keyed relative to ``base``, see :func:`local_item`), if it resolves (symlinks
    followed) inside the CSV's folder, or inside ``files_root`` when given; any other path is a failed item
    (``outside-folder``), with nothing about the file looked at. A row with a bad or missing URL becomes a failed
    item, keyed by its line when it has no URL at all. Empty cells are left out of ``meta``.
    ``rows``: the CSV already opened (read_rows)."""
    folder = Path(path).resolve().parent
    root = Path(files_root).resolve() if files_root is not None else folder
    with (rows if rows is not None else read_rows(path)) as rows:
        for row in rows:
            row.meta = _cells(row.meta)
            if row.error and row.error.startswith("invalid-url") and "://" not in row.url:
                local = folder / row.url
                real = Path(os.path.realpath(local))
                if not inside(real, root):
                    yield Item(url=str(local), url_hash=store.url_hash(str(local)), meta=row.meta,
                               error=outside_error(row.url, root))
                    continue
                if local.is_file() or (local.exists() and not local.is_dir()):
                    yield local_item(real, row.meta, base=base)
                    continue
                row.error = "invalid-url: neither an http(s) URL nor an existing file"
            url = row.url or f"csv:{folder / Path(path).name}:{row.line}"
            shown = redact_url(url)  # stored, keyed and shown without user:password@; still sent to its host
            yield Item(url=shown, url_hash=store.url_hash(shown), meta=row.meta, error=row.error,
                       fetch_url=url if shown != url else None)


def dir_items(folder, files_root=None, base: Path | None = None) -> Iterator[Item]:
    """Image files under ``folder`` (recursive, sorted, hidden entries skipped), keyed by their path relative to
    ``base`` (the gallery's folder) when inside it, else by absolute path. A name that resolves outside the
    folder (a symlink out; or outside ``files_root`` when given) is a failed item."""
    root = Path(folder).resolve()
    confine = Path(files_root).resolve() if files_root is not None else root
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            yield local_item(path, {"relative_path": str(path.relative_to(root))}, confine, base)


class Recent:
    """URL hashes handed on lately: a window of the last ``window`` remembered, plus those still at the fetcher
    (however far ahead it reads), so a URL repeated in the source while its first copy is in the pipeline is
    skipped; anything older has been committed and ``store.known`` finds it."""

    def __init__(self, window: int = 10_000):
        self.window = window
        self.recent: set[str] = set()
        self.order: deque[str] = deque()
        self.fetching: set[str] = set()  # handed to the fetcher, no result yet

    def __contains__(self, h: str) -> bool:
        return h in self.recent or h in self.fetching

    def remember(self, h: str) -> None:
        """The window counts from here: until the row is committed."""
        self.fetching.discard(h)
        self.recent.add(h)
        self.order.append(h)
        if len(self.order) > self.window:
            self.recent.discard(self.order.popleft())


def needs_work(conn, source: Iterator[Item], options: IngestOptions, recent: Recent | None = None,
               stop: threading.Event | None = None, track_fetches: bool = False) -> Iterator[Item]:
    """The items of ``source`` that need work, in order, looked up in the gallery at ``conn`` CHUNK rows at
    a time; after each chunk that skipped rows, a marker ``Item(skipped=n)``. Skipped: rows the gallery
    knows and need not retry (:func:`_skip`), and a URL in ``recent`` (its first copy may still be in the
    pipeline). ``track_fetches``: an item to download counts as at the fetcher until the caller remembers
    it (``recent.remember``) when its result is back; otherwise every item is remembered as it is handed on."""
    recent = recent if recent is not None else Recent()
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
            if track_fetches and x.error is None and not x.local and x.original is None:
                recent.fetching.add(x.url_hash)
            else:
                recent.remember(x.url_hash)
            yield x
        if skipped:
            yield Item(url="", url_hash="", skipped=skipped)


# ---------------------------------------------------------------- producer


FLUSH = "flush"  # producer -> main thread: encode the images waiting now (the producer waits for memory)


class _Fatal(Exception):
    """Carries an error that must end the run (not a bad row): e.g. the images folder is not writable."""


def _store_original(data: bytes, sha: str, fmt: str, images_dir: Path, written: set | None = None) -> Path:
    """Write the original bytes as images_dir/ab/abcdef....ext, atomically; existing files are kept. A file
    written here is added to ``written`` (the run removes those no row refers to when it stops)."""
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
        if written is not None:
            written.add(dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _prepare(item: Item, data: bytes, route: str, images_dir: Path | None, db_dir: Path,
             holder_of: Callable[[str], int | None], written: set | None = None) -> Item:
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
    item.thumb = thumbs.try_make(img)
    if images_dir is not None:
        try:
            stored = _store_original(data, sha, img.format or "", images_dir, written)
        except OSError as exc:
            raise _Fatal(f"{images_dir}: cannot store images there ({exc.strerror or exc})") from exc
        try:
            item.info["path"] = str(stored.relative_to(db_dir))
        except ValueError:
            item.info["path"] = str(stored)
    item.pixels = pixels
    return item


def remove_uncommitted(conn, written, db_dir: Path, run_id: int) -> list[Path]:
    """After a run stopped early: delete the originals it stored that no row refers to (their rows were never
    committed), unless another ingest is running on the gallery (it may be about to commit a row naming one).
    Best effort: anything left is reported by ``doctor`` (orphan_files) and removed by ``doctor --repair``."""
    removed = []
    try:
        for r in conn.execute("SELECT id, pid, host FROM runs WHERE status = 'running' AND id != ?", (run_id,)):
            if r["pid"] is None or r["host"] != socket.gethostname() or store._pid_alive(int(r["pid"])):
                return removed
        for path in sorted(written):
            names = {str(path)}
            try:
                names.add(str(Path(path).relative_to(db_dir)))
            except ValueError:
                pass
            marks = ", ".join("?" * len(names))
            if conn.execute(f"SELECT 1 FROM images WHERE path IN ({marks}) LIMIT 1", tuple(names)).fetchone():
                continue
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    except store.SQLITE_ERRORS:
        pass
    return removed


def _produce(source: Iterator[Item], db_path, encoder: Encoder, options: IngestOptions, out: queue.Queue,
             stop: threading.Event, images_dir: Path, fetcher: Fetcher, budget: MemoryBudget | None = None,
             local_root: Path | None = None, written: set | None = None):
    """Producer thread body: everything up to encoding. Puts Items, then None (done) or an exception.

    ``fetcher`` belongs to the main thread, which closes it when the run stops: downloads in flight are
    aborted then, so an interrupted run does not wait for a hung server's deadline."""
    conn = store.connect(db_path, apply_migrations=False)
    db_dir = Path(db_path).resolve().parent
    route = encoder.settings.preprocess
    window = max(10_000, 8 * encoder.settings.batch_size + 4 * options.workers + options.queue_size + 2 * CHUNK)
    recent = Recent(window)

    def holder_of(sha: str) -> int | None:
        return store.find_by_content(conn, sha)

    def put(item):
        if budget is not None and item is not None and not isinstance(item, BaseException) \
                and item.pixels is not None and not item.reserved:
            # wait for room in the memory budget (the encoder frees it); never blocks when no image waits
            n = item.pixels.nbytes
            if budget.acquire(n, kind="pixels", until=time.monotonic()):
                item.reserved = n
            else:
                try:
                    out.put_nowait(FLUSH)  # the encoder should encode what waits now, not when its queue runs dry
                except queue.Full:  # it has plenty to do anyway
                    pass
                if budget.acquire(n, kind="pixels", cancel=stop):
                    item.reserved = n
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def todo() -> Iterator[tuple[Item, str]]:
        """Source items that need work, as (item, url) pairs for the fetcher; skips and failures are put."""
        for x in needs_work(conn, source, options, recent, stop, track_fetches=True):
            if x.skipped or x.error is not None:  # a skip count, or a bad CSV row: recorded as failed
                put(x)
            elif x.local or x.original is not None:
                put(read_local(x))
            else:  # remembered once its result is back (the fetcher may read far ahead)
                yield x, x.fetch_url or x.url

    def read_local(item: Item) -> Item:
        try:
            data = read_local_bytes(item.original or item.file or item.url, local_root, options.fetch.max_bytes)
        except ImageError as exc:
            item.error = f"{exc.reason}: {exc.problem}"
            return item
        # a local file stays where it is (unless --copy-originals); a stored original (reindex) is kept like a download
        keep = images_dir if options.copy_originals or not item.local else None
        return _prepare(item, data, route, keep, db_dir, holder_of, written)

    try:
        results = fetch_many(((item, url) for item, url in todo()), workers=options.workers, fetcher=fetcher)
        try:
            for res in results:
                if stop.is_set():  # e.g. "cancelled" by the main thread closing the fetcher: not recorded
                    break
                item: Item = res.key
                recent.remember(item.url_hash)  # the window counts from here: until the row is committed
                item.http_status = res.http_status
                if not res.ok:
                    item.error = res.reason
                    put(item)
                else:
                    data, res.data = res.data, None
                    try:
                        prepared = _prepare(item, data, route, images_dir, db_dir, holder_of, written)
                    finally:
                        del data
                        res.release()  # the download's bytes are gone: back to the budget
                    put(prepared)
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
        progress: Callable[[Summary], None] | None = None, column: tuple | None = None,
        local_root: Path | None = None) -> Summary:
    """Ingest ``source`` into the gallery at ``conn``; returns the run's summary.

    KeyboardInterrupt stops the run cleanly: what was committed stays, the run is recorded as
    interrupted, and the exception propagates.
    """
    lazy = encoder if hasattr(encoder, "get") else None  # a LazyEncoder: the model is loaded on first use
    if lazy is None:
        store.ensure_model(conn, encoder.record())
    images_dir = Path(options.images_dir or default_images_dir(db_path))
    summary = Summary(source=source_name, total=total)
    summary.url_column, summary.url_column_how = column or (None, None)
    summary.run_id = store.start_run(conn, source_name)
    started = time.monotonic()
    out: queue.Queue = queue.Queue(maxsize=options.queue_size)
    stop = threading.Event()
    budget = MemoryBudget(max(1, int(options.memory_mb * 2**20)))
    written: set = set()  # originals this run stored (the producer adds; read after it has stopped)
    fetcher = Fetcher(options.fetch, workers=options.workers, budget=budget)
    producer = threading.Thread(target=_produce, name="ingest-producer", daemon=True,
                                args=(source, db_path, encoder, options, out, stop, images_dir, fetcher, budget,
                                      local_root, written))
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

    def unreserve(x: Item):
        if x.reserved:
            budget.release(x.reserved, kind="pixels")
            x.reserved = 0

    def commit(items: list[Item]):
        nonlocal last_commit
        outcomes = []
        thumbnails = {}  # index in outcomes -> the ok row's thumbnail
        if items:
            if lazy is not None and not lazy.loaded:
                store.ensure_model(conn, lazy.get().record())
            enc = lazy.get() if lazy is not None else encoder
            feats = l2_normalise(encode_pixels(enc, [x.pixels for x in items]))  # (n, D)
            for x in items:
                x.pixels = None
                unreserve(x)
            for x, v in zip(items, feats):
                thumbnails[len(outcomes)] = x.thumb
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
        with store.transaction(conn):  # rows, vectors and thumbnails together
            results = store.commit_batch(conn, outcomes)
            thumbs.save_many(conn, [(results[i][0], t) for i, t in thumbnails.items() if results[i][1] == "ok"])
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
            if item is FLUSH:
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
                    unreserve(item)
                    waiting[item.info["content_sha256"]].append(item)
                elif item.info["content_sha256"] in committed:  # ... or were just recorded: found by content
                    item.pixels = None
                    unreserve(item)
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
        if status != "completed" and not producer.is_alive():
            remove_uncommitted(conn, written, Path(db_path).resolve().parent, summary.run_id)
        summary.seconds = time.monotonic() - started
        summary.status = status
        summary.memory_peak = budget.peak
        counts = {"new": summary.new, "skipped": summary.skipped, "failed": summary.failed,
                  "duplicate": summary.duplicate, "images_per_s": summary.images_per_s}
        store.finish_run(conn, summary.run_id, counts, status)
        # the run's writes go into the database file itself: a copy of the .db alone misses nothing
        try:
            store.checkpoint(conn)
        except store.SQLITE_ERRORS:  # e.g. the disk is full: the WAL keeps the data, the next run folds it in
            pass
    return summary


def ingest_csv(conn, db_path, csv_path, encoder: Encoder, options: IngestOptions, *, progress=None,
               url_column: str | None = None) -> Summary:
    """``url_column``: the CSV column holding the URLs (a header name or 1-based number), instead of choosing
    it by what the cells hold; the summary's ``url_column`` says which one was used and how."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    total = max(0, count_lines(csv_path) - 1)
    root = Path(options.files_root or csv_path.resolve().parent).resolve()
    rows = read_rows(csv_path, url_column=url_column)
    return run(conn, db_path, csv_items(csv_path, root, rows, gallery_dir(db_path)), str(csv_path), encoder, options,
               total=total, progress=progress, column=(rows.url_column, rows.url_column_how), local_root=root)


def ingest_dir(conn, db_path, folder, encoder: Encoder, options: IngestOptions, *, progress=None) -> Summary:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    root = Path(options.files_root or folder).resolve()
    total = sum(1 for _ in dir_items(folder, root))
    return run(conn, db_path, dir_items(folder, root, gallery_dir(db_path)), str(folder.resolve()), encoder, options,
               total=total, progress=progress, local_root=root)
