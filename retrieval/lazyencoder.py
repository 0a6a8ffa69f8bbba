"""An ingest into an existing gallery loads the model only when something needs encoding.

A re-run over a source the gallery already holds (every row skipped, failed or a duplicate of stored
bytes) never loads the weights (~4 s and ~750 MB for base). The weights are still checked against the
gallery's model before the run starts, by their sha256, which is remembered per file (path, size, mtime,
inode) in ``<cache>/weights-sha256.json`` so that this check does not read the weights again either.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .encoder import Encoder, EncoderSettings, load_encoder
from .weights import file_sha256

SHA_CACHE_NAME = "weights-sha256.json"
SHA_CACHE_MAX = 64  # files remembered


def _cache_file() -> Path:
    from .hub import default_cache_dir

    return default_cache_dir() / SHA_CACHE_NAME


def _identity(path: Path) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def weights_sha256(path) -> str:
    """The file's sha256, from the cache when the file (path, size, mtime, inode) is unchanged since it was
    hashed; otherwise hashed now and remembered (a cache that cannot be read or written is ignored)."""
    path = Path(path).resolve()
    ident = _identity(path)
    cache_file = _cache_file()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(path))
    if ident is not None and isinstance(hit, dict) and hit.get("id") == ident and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = file_sha256(path)
    if ident is not None and ident == _identity(path):
        cache.pop(str(path), None)
        cache[str(path)] = {"id": ident, "sha256": digest}
        while len(cache) > SHA_CACHE_MAX:
            cache.pop(next(iter(cache)))
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0), encoding="utf-8")
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return digest


class LazyEncoder:
    """Stands in for an :class:`Encoder` whose gallery model is already recorded and whose weights' sha256
    matched it: ``settings`` now, the model (``get``) on first use."""

    def __init__(self, weights_path, settings: EncoderSettings, sha256: str):
        self.weights_path = Path(weights_path)
        self.settings = settings
        self.sha256 = sha256
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                enc = load_encoder(self.weights_path, self.settings)
                enc._sha256 = self.sha256  # checked already: not hashed again
                self._encoder = enc
            return self._encoder
