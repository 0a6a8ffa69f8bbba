"""A disk cache of prepared (folded) weights, so that ``query IMAGE`` does not redo start-up work.

Loading an encoder costs, besides the forward pass: the weights file's sha256 (the gallery checks it)
and :func:`retrieval.model.prepare` (LayerNorm, LayerScale and the attention scale folded into the
weights, in float64, rounded once). Neither depends on the query. The first ``query`` with a weights
file stores both under ``<cache>/prepared/<key>/`` (``$DINOV2_CACHE``, default
``~/.cache/dinov2-retrieval``): one ``.npy`` per prepared array and ``meta.json`` (the file's sha256,
the model's config, the precision). Later queries memory-map the arrays (``np.load(mmap_mode="r")``).

The key is the weights file's resolved path, size, modification time (ns) and inode, and the precision:
a file replaced or rewritten gets a new key. The arrays are exactly what ``prepare`` returns (the
test compares them array by array and the features they give). ``DINOV2_PREPARED_CACHE=0`` turns the
cache off. A cache entry that cannot be read is ignored (and rewritten).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from hashlib import sha256
from pathlib import Path

import numpy as np

ENV = "DINOV2_PREPARED_CACHE"
VERSION = 1  # bump when model.prepare's output changes


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def cache_root() -> Path:
    from .hub import default_cache_dir

    return default_cache_dir() / "prepared"


def key(weights_path, precision: str) -> str:
    p = Path(weights_path).resolve()
    st = p.stat()
    ident = f"{VERSION}|{p}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{precision}"
    return sha256(ident.encode()).hexdigest()[:32]


def _flatten(arrays: dict) -> dict:
    flat = {}
    for name, value in arrays.items():
        if name == "layers":
            for i, layer in enumerate(value):
                for lname, arr in layer.items():
                    flat[f"layers.{i}.{lname}"] = arr
        else:
            flat[name] = value
    return flat


def _unflatten(flat: dict, depth: int) -> dict:
    arrays = {"layers": [{} for _ in range(depth)]}
    for name, arr in flat.items():
        if name.startswith("layers."):
            _, i, lname = name.split(".", 2)
            arrays["layers"][int(i)][lname] = arr
        else:
            arrays[name] = arr
    return arrays


def load_encoder(weights_path, settings):
    """Like :func:`retrieval.encoder.load_encoder`, through the cache (its sha256 already known)."""
    from . import encoder as E

    if not enabled():
        return E.load_encoder(weights_path, settings)
    try:
        folder = cache_root() / key(weights_path, settings.precision)
    except OSError:
        return E.load_encoder(weights_path, settings)
    cached = _read(folder, weights_path, settings)
    if cached is not None:
        return cached
    enc = E.load_encoder(weights_path, settings)
    try:
        _write(folder, enc, settings)
    except OSError:  # a read-only or full cache: the query still works
        pass
    return enc


def _read(folder: Path, weights_path, settings):
    from . import encoder as E
    from . import model as M
    from .variants import ModelConfig

    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        cfg = ModelConfig(**meta["config"])
        flat = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in meta["arrays"]}
        dtype = np.dtype(meta["dtype"])
        if any(a.dtype != dtype for a in flat.values()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    model = M.Model(cfg=cfg, arrays=_unflatten(flat, cfg.depth), dtype=dtype.type)
    return E.Encoder(model=model, settings=settings, weights_path=Path(weights_path), _sha256=meta["weights_sha256"])


def _write(folder: Path, enc, settings) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        flat = _flatten(enc.model.arrays)
        for name, arr in flat.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        meta = {"version": VERSION, "weights_sha256": enc.weights_sha256, "config": asdict(enc.model.cfg),
                "dtype": np.dtype(enc.model.dtype).name, "precision": settings.precision, "arrays": sorted(flat),
                "weights_path": str(enc.weights_path)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            tmp.rename(folder)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
