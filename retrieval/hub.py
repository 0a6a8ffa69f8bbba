"""Getting weights: where they are looked for, and downloading them from the hub into a cache.

Environment:
    DINOV2_HUB_URL   hub base address (default ``variants.HUB_BASE_URL``)
    DINOV2_CACHE     cache directory (default ``$XDG_CACHE_HOME/dinov2-retrieval`` or ``~/.cache/dinov2-retrieval``)
    DINOV2_WEIGHTS   a weights file to use
    DINOV2_OFFLINE   ``1`` forbids any network access

Cache layout: ``<cache>/<variant>/model.safetensors`` (and ``model.safetensors.part`` while downloading).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import sys
import time
from pathlib import Path

import requests
import urllib3

from . import variants
from .errors import ConfigError, DownloadError, WeightsError, WeightsUnavailableError
from .weights import file_sha256

__all__ = [
    "ENV_HUB_URL", "ENV_CACHE", "ENV_WEIGHTS", "ENV_OFFLINE", "SEED_WEIGHTS", "FILENAME",
    "hub_base_url", "default_cache_dir", "is_offline", "cached_path", "download", "resolve_weights", "HOW_TO",
]

ENV_HUB_URL = "DINOV2_HUB_URL"
ENV_CACHE = "DINOV2_CACHE"
ENV_WEIGHTS = "DINOV2_WEIGHTS"
ENV_OFFLINE = "DINOV2_OFFLINE"
SEED_WEIGHTS = "vit-dinov2-base.npz"  # the seed's convention: the weights next to where you run
FILENAME = "model.safetensors"

TIMEOUT = (10.0, 60.0)  # connect, read (seconds between bytes)
RETRIES = 2  # automatic resumes after a dropped connection, within one download() call
RETRY_DELAY = 1.0  # seconds, times the attempt number
CHUNK = 1 << 20

DOWNLOAD_FAILED = ("Without the download: pass --weights PATH or set DINOV2_WEIGHTS (a model.safetensors, .npz "
                   "or .pth file you have), set DINOV2_HUB_URL to a mirror of the hub, or get them once online "
                   "with `python cli.py weights download` and then work with --offline")
HOW_TO = ("run `python cli.py weights download`, pass --weights PATH, or set DINOV2_WEIGHTS"
          " (a model.safetensors, .npz or .pth file)")


def hub_base_url() -> str:
    return os.environ.get(ENV_HUB_URL) or variants.HUB_BASE_URL


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dinov2-retrieval"


def is_offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def cached_path(variant: str = variants.DEFAULT_VARIANT, cache_dir=None) -> Path:
    """Where ``download(variant)`` puts the file (it may not exist)."""
    return Path(cache_dir).expanduser() / variant / FILENAME if cache_dir else default_cache_dir() / variant / FILENAME


# ---------------------------------------------------------------- progress


class _Progress:
    """One self-overwriting line on stderr: bytes, percentage, speed."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.last = 0.0
        self.start = time.monotonic()
        self.start_bytes = 0
        self.shown = False

    def begin(self, done: int):
        self.start, self.start_bytes = time.monotonic(), done

    def update(self, done: int, total: int | None, force: bool = False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        rate = (done - self.start_bytes) / max(now - self.start, 1e-6) / 1e6
        if total:
            text = f"{self.label}: {100 * done / total:5.1f}%  {done / 1e6:7.1f}/{total / 1e6:.1f} MB  {rate:6.1f} MB/s"
        else:
            text = f"{self.label}: {done / 1e6:7.1f} MB  {rate:6.1f} MB/s"
        sys.stderr.write("\r" + text + "  ")
        sys.stderr.flush()
        self.shown = True

    def end(self):
        if self.enabled and self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.shown = False


def _say(message: str, enabled: bool) -> None:
    if enabled:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------- download


class _Interrupted(Exception):
    """The connection dropped mid-body: the .part file keeps what arrived."""


@contextlib.contextmanager
def _locked(directory: Path, progress: bool):
    """Serialise downloads of one variant between processes (advisory lock on the directory)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(f"waiting for another download into {directory} ...", progress)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a ``Content-Range: bytes a-b/total`` header."""
    try:
        unit, spec = (value or "").split(" ", 1)
        span, total = spec.split("/", 1)
        first = None if span.strip() == "*" else int(span.split("-", 1)[0])
        return first, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None, None


def _fetch(url: str, part: Path, bar: _Progress) -> None:
    """One HTTP request appending to (or restarting) ``part``; raises _Interrupted on a dropped body."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dinov2-gallery", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = requests.get(url, stream=True, timeout=TIMEOUT, headers=headers, allow_redirects=True)
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"{url}: cannot connect ({_reason(exc)})") from None
    with resp:
        status = resp.status_code
        if status == 416 and have:  # asked past the end: the .part is complete, or longer than the file
            _, total = _content_range_total(resp.headers.get("Content-Range"))
            if total == have:
                return
            part.unlink()
            raise _Interrupted("the partial file did not match the server's file; restarting")
        if status == 206 and have:
            first, total = _content_range_total(resp.headers.get("Content-Range"))
            if first != have:
                part.unlink()
                raise _Interrupted(f"the server resumed at byte {first}, not {have}; restarting")
            mode = "ab"
        elif status == 200:
            mode, have, total = "wb", 0, None  # a full answer (a server may ignore Range): start over
        else:
            reason = f" {resp.reason}" if resp.reason else ""
            raise DownloadError(f"{url}: HTTP {status}{reason}")
        length = resp.headers.get("Content-Length")
        if total is None and length is not None and length.isdigit():
            total = have + int(length)
        done = have
        bar.begin(done)
        bar.update(done, total, force=True)
        if resp.headers.get("Content-Encoding", "identity").strip().lower() in ("", "identity"):
            # straight from the socket, as bytes arrive: requests' iter_content (and urllib3's read(n))
            # discard a partly filled chunk when the connection drops or times out; this keeps every byte
            chunks = _arrived(resp.raw)
        else:
            chunks = resp.iter_content(CHUNK)
        with open(part, mode) as f:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                        http.client.HTTPException, ConnectionError, TimeoutError) as exc:
                    raise _Interrupted(f"connection lost after {done:,} of {total or '?'} bytes"
                                       f" ({_reason(exc)})") from None
                try:
                    f.write(chunk)
                except OSError as exc:
                    raise DownloadError(f"{part}: cannot write ({exc.strerror or _reason(exc)})") from None
                done += len(chunk)
                bar.update(done, total)
        bar.update(done, total, force=True)
        if total is not None and done < total:
            raise _Interrupted(f"connection closed after {done:,} of {total:,} bytes")


def _arrived(raw):
    read1 = getattr(raw, "read1", None)
    while True:
        data = read1(CHUNK, decode_content=False) if read1 else raw.read(CHUNK, decode_content=False)
        if not data:
            return
        yield data


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return text if len(text) <= 200 else text[:200].rsplit(" ", 1)[0] + " ..."  # not cut mid-word


def download(variant: str = variants.DEFAULT_VARIANT, cache_dir=None, *, base_url: str | None = None,
             sha256: str | None = None, progress: bool = True) -> Path:
    """Download a variant's ``model.safetensors`` into ``<cache>/<variant>/`` and return its path.

    Resumes a previous ``.part`` with an HTTP Range request, resumes automatically after a dropped
    connection (``RETRIES`` times), verifies the sha256 (``sha256`` or the pinned one in
    ``variants.OFFICIAL``; unpinned variants get their computed hash reported), and moves the file into
    place atomically. A file already in the cache that verifies is returned without network access.
    """
    if variant not in variants.OFFICIAL:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(variants.OFFICIAL)}")
    expected = (sha256 or variants.OFFICIAL[variant][3] or "").strip().lower() or None
    if expected is not None and (len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected)):
        raise ConfigError(f"--sha256 {sha256!r} is not a 64-digit hex sha256")
    url = variants.hub_url(variant, base_url or hub_base_url())
    final = cached_path(variant, cache_dir)
    part = final.with_name(final.name + ".part")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"{final.parent}: cannot create the cache directory ({exc.strerror})") from None

    with _locked(final.parent, progress):
        if final.is_file():
            if expected is None or file_sha256(final) == expected:
                _say(f"{variant} weights already in the cache", progress)
                return final
            _say(f"{final} does not match the expected sha256; downloading it again", progress)
        if is_offline():
            raise DownloadError(f"{url}: not downloading, {ENV_OFFLINE}=1 forbids network access")
        _say(f"Downloading DINOv2 {variant} weights ({variants.OFFICIAL[variant][2]}) from {url}\n  into {final}",
             progress)
        bar = _Progress(variant, progress)
        attempt = 0
        while True:
            try:
                _fetch(url, part, bar)
                break
            except _Interrupted as exc:
                bar.end()
                attempt += 1
                if attempt > RETRIES:
                    kept = part.stat().st_size if part.exists() else 0
                    raise DownloadError(f"{url}: {exc}; {kept:,} bytes kept in {part}, run the command again"
                                        " to resume") from None
                _say(f"{exc}; resuming (attempt {attempt + 1})", progress)
                time.sleep(RETRY_DELAY * attempt)
            except BaseException:
                bar.end()
                raise
        bar.end()

        digest = file_sha256(part)
        if expected is not None and digest != expected:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: sha256 mismatch: got {digest}, expected {expected}; download discarded")
        if expected is None:
            _say(f"sha256 {digest} (no pinned hash for {variant}: not verified)", progress)
        os.replace(part, final)
    return final


# ---------------------------------------------------------------- which file every command uses


def _existing(path: Path, where: str = "") -> Path:
    path = path.expanduser()
    if path.is_dir() and (path / FILENAME).is_file():  # a save_pretrained / hub snapshot directory
        return path / FILENAME
    if not path.exists():
        raise WeightsError(path, f"no such file{where}")
    if path.is_dir():
        raise WeightsError(path, f"is a directory without a {FILENAME}{where}")
    return path


def resolve_weights(explicit=None, *, variant: str | None = None, allow_download: bool = True,
                    progress: bool = True) -> Path:
    """The weights file every command uses, in this order:

    1. ``explicit`` (``--weights PATH`` or ``--weights VARIANT``): a path must exist;
    2. ``$DINOV2_WEIGHTS`` (a path or a variant name): a path must exist;
    3. ``./vit-dinov2-base.npz`` (the seed's convention), when the wanted variant is the default;
    4. ``<cache>/<variant>/model.safetensors``;
    5. a download of that variant into the cache, unless ``allow_download`` is false or
       ``DINOV2_OFFLINE=1``; otherwise WeightsUnavailableError saying how to get weights.

    ``variant``: the one wanted when neither 1 nor 2 names weights (a gallery's own); the default
    variant when None or not an official one. A variant name in 1 or 2 (``small``, ``base-reg``, ...;
    an existing file of that name wins) means steps 4 and 5 for that variant.
    """
    for value, where in ((explicit, ""), (os.environ.get(ENV_WEIGHTS), f" (set in {ENV_WEIGHTS})")):
        if value is None or str(value) == "":
            continue
        if str(value) in variants.OFFICIAL and not Path(value).exists():
            return _variant_weights(str(value), allow_download, progress)
        return _existing(Path(value), where)
    if variant not in variants.OFFICIAL:
        variant = variants.DEFAULT_VARIANT
    seed = Path.cwd() / SEED_WEIGHTS
    if variant == variants.DEFAULT_VARIANT and seed.is_file():
        return seed
    return _variant_weights(variant, allow_download, progress)


def _variant_weights(variant: str, allow_download: bool, progress: bool) -> Path:
    """A variant's cached weights, downloaded first when missing and allowed."""
    cached = cached_path(variant)
    if cached.is_file():
        return cached
    if allow_download and not is_offline():
        try:
            return download(variant, progress=progress)
        except DownloadError as exc:
            raise DownloadError(f"{exc}. {DOWNLOAD_FAILED}") from None
    why = f"{ENV_OFFLINE}=1" if is_offline() else "not downloading"
    raise WeightsUnavailableError(f"no {variant} weights found ({why}; looked in {cached.parent}): {HOW_TO}")
