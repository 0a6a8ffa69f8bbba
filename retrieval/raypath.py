"""The Ray engine: ``cli.py ingest --engine ray``. Imported only for that engine (it imports Ray).

The driver (this process, beside the gallery) does what needs the gallery; the cluster does the rest:

1. merge the shards a killed run left in the shards folder (``shards.merge``: already merged ones are passed
   over), so that what they hold is not done again;
2. read the CSV as a stream and keep the rows that need work (``ingest.needs_work``: the same skip rules
   as a local ingest, no network request for a known URL), in rounds of ``round_rows``;
3. ship each round as blocks of ``block_rows`` rows to a Ray Data pipeline:
   - ``_fetch_block``, Ray tasks: download (``fetch.fetch_many``), hash, decode and preprocess
     (``ingest._prepare``), optionally store originals; failures become failed rows, never dropped;
   - ``_Encode``, a pool of actors (``ActorPoolStrategy``): each loads the weights once (from the object
     store, put there by the driver, so the nodes need no copy of the weights file), runs our NumPy
     encoder with as many threads as the CPUs Ray gives it, and returns the block as a shard table;
4. write each block that comes back as a Parquet shard (``shards.write_shard``) and merge the shards into
   the gallery every few seconds in large transactions (``shards.merge``).

A killed actor is restarted by Ray and its block retried (Ray Data's actors: ``max_restarts=-1``,
``max_task_retries=-1``); a fetch task whose worker dies is retried (Ray's ``max_retries``, 3 by default). A
killed driver leaves the shards it wrote; the next run merges them first and then does only what is still
missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import ingest as I
from . import shards as S
from . import store
from .encoder import Encoder, EncoderSettings, encode_pixels, l2_normalise
from .errors import ConfigError, ImageError, InputError
from .weights import load_params

RAY_HINT = "the ray engine needs Ray and pyarrow, which are not installed: pip install -e '.[ray]'"
FETCH_CPUS = 0.125  # a download/decode task mostly waits on the network; it reserves this much of a CPU
MERGE_EVERY_S = 2.0  # the driver merges the shards received at most this often (and at the end)


def require_ray() -> None:
    """ConfigError saying how to install Ray when it (or pyarrow) is missing. Does not import Ray: some of
    its settings are read from the environment when it is first imported (see :func:`start`)."""
    import importlib.util

    for name in ("ray", "pyarrow"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken installation, or a module blocked with sys.modules[name] = None
            found = False
        if not found:
            raise ConfigError(RAY_HINT)


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # a running cluster ("auto", "HOST:PORT", "ray://..."); None: start one here
    shards_dir: Path | None = None  # default: <db stem>_shards beside the database
    block_rows: int = 64  # rows per block, and so per shard
    round_rows: int = 100_000  # rows of the CSV shipped per Ray Data execution (the driver holds one round)
    actors: int | None = None  # encoder actors; default: as many as fit (one per node with the default CPUs)
    actor_cpus: float | None = None  # CPUs reserved per actor; default: a whole node less the fetch tasks' share
    fetch_tasks: int | None = None  # concurrent download/decode tasks; default: 2 per actor
    num_cpus: int | None = None  # CPUs of the local instance started when there is no address

    def __post_init__(self):
        if not 1 <= self.block_rows <= 100_000:
            raise ConfigError(f"--block-rows {self.block_rows}: expected a whole number from 1 to 100000")
        if self.round_rows < self.block_rows:
            raise ConfigError(f"round of {self.round_rows} rows: at least one block ({self.block_rows}) expected")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors {self.actors}: expected a positive number")
        if self.actor_cpus is not None and not self.actor_cpus > 0:
            raise ConfigError(f"--actor-cpus {self.actor_cpus}: expected a positive number")


def default_shards_dir(db_path) -> Path:
    p = Path(db_path).resolve()
    return p.with_name(p.stem + "_shards")


def start(address: str | None = None, **init_kwargs):
    """Connect to the cluster at ``address``, or start a local Ray instance (no dashboard), unless this
    process is connected already. On a cluster our package travels with the job (``runtime_env.py_modules``),
    so every node runs the driver's code. Returns the ``ray`` module."""
    require_ray()
    if address is None and "ray" not in sys.modules:
        # a one-machine instance listens on 127.0.0.1 only (Ray otherwise binds the machine's address); Ray
        # reads this when it is first imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(f"{RAY_HINT} ({exc})") from None
    if ray.is_initialized():
        return ray
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:  # workers on this machine import our package from the driver's sys.path
        kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parent)]}
    kwargs.update(init_kwargs)
    ray.init(address=address, **kwargs)
    return ray


# ---------------------------------------------------------------- the tasks and actors (run on the cluster)

_ITEM_COLUMNS = ("seq", "url", "url_hash", "meta", "mtime", "local", "error", "file", "fetch_url")


def _items_table(items: list[dict]):
    import pyarrow as pa

    types_ = {"seq": pa.int64(), "url": pa.string(), "url_hash": pa.string(), "meta": pa.string(),
              "mtime": pa.float64(), "local": pa.bool_(), "error": pa.string(), "file": pa.string(),
              "fetch_url": pa.string()}
    return pa.table({c: pa.array([x[c] for x in items], type=types_[c]) for c in _ITEM_COLUMNS})


def _fetch_block(block, *, route: str, fetch_config, workers: int, images_dir: str | None, db_dir: str):
    """A block of work items -> the same rows fetched, hashed, decoded and preprocessed (pixels as bytes
    with their height and width), or failed with their reason. Rows stay in input order."""
    import pyarrow as pa

    from .fetch import Fetcher, fetch_many

    rows = block.to_pylist()
    items = []
    for r in rows:
        meta = json.loads(r["meta"]) if r["meta"] else None
        items.append(I.Item(url=r["url"], url_hash=r["url_hash"], meta=meta, mtime=r["mtime"], local=r["local"],
                            error=r["error"], file=Path(r["file"]) if r["file"] else None, fetch_url=r["fetch_url"]))
    images = Path(images_dir) if images_dir else None
    db = Path(db_dir)

    def no_holder(sha):  # content dedup happens at merge time, against the whole gallery
        return None

    def prepare(item, data, local):
        item = I._prepare(item, data, route, None if local else images, db, no_holder)
        if not local and images is None:
            item.info.pop("path", None)  # no original kept: the URL is the reference
        return item

    todo = []
    for i, x in enumerate(items):
        if x.error is not None:
            continue
        if x.local:
            try:  # confined to its folder by the driver (csv_items); only a regular file within --max-mb is read
                data = I.read_local_bytes(x.file or x.url, None, fetch_config.max_bytes)
            except ImageError as exc:
                x.error = f"{exc.reason}: {exc.problem}"
                continue
            items[i] = prepare(x, data, True)
        else:
            todo.append((i, x.fetch_url or x.url))
    if todo:
        with Fetcher(fetch_config, workers=workers) as fetcher:
            for res in fetch_many(todo, workers=workers, fetcher=fetcher):
                x = items[res.key]
                x.http_status = res.http_status
                if not res.ok:
                    x.error = res.reason
                else:
                    try:
                        items[res.key] = prepare(x, res.data, False)
                    except I._Fatal as exc:
                        raise InputError(str(exc)) from exc
    out = {c: [] for c in ("seq", "url", "url_hash", "error", "http_status", "content_sha256", "width", "height",
                           "format", "bytes", "path", "mtime", "meta", "pixels", "pixel_h", "pixel_w")}
    for r, x in zip(rows, items):
        info = x.info
        px = x.pixels if x.error is None else None
        out["seq"].append(r["seq"])
        out["url"].append(x.url)
        out["url_hash"].append(x.url_hash)
        out["error"].append(x.error)
        out["http_status"].append(x.http_status)
        out["content_sha256"].append(info.get("content_sha256"))
        out["width"].append(info.get("width"))
        out["height"].append(info.get("height"))
        out["format"].append(info.get("format"))
        out["bytes"].append(info.get("bytes"))
        out["path"].append(info.get("path"))
        out["mtime"].append(x.mtime)
        out["meta"].append(r["meta"])
        out["pixels"].append(None if px is None else np.ascontiguousarray(px, np.float32).tobytes())
        out["pixel_h"].append(None if px is None else int(px.shape[1]))
        out["pixel_w"].append(None if px is None else int(px.shape[2]))
    t = {"seq": pa.int64(), "http_status": pa.int32(), "width": pa.int32(), "height": pa.int32(),
         "bytes": pa.int64(), "mtime": pa.float64(), "pixels": pa.large_binary(), "pixel_h": pa.int32(),
         "pixel_w": pa.int32()}
    return pa.table({c: pa.array(v, type=t.get(c, pa.string())) for c, v in out.items()})


class _Encode:
    """An actor of the encoder pool: loads the weights once, then turns fetched blocks into shard tables."""

    def __init__(self, weights, settings: EncoderSettings, record: dict):
        import ray

        from . import model as M

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        threads = max(1, math.ceil(cpus - 1e-9))
        # The forward pass splits its work over M.THREADS threads of its own and runs BLAS on one thread
        # meanwhile (model.py): our threads get the CPUs Ray gave this actor, BLAS one thread (Ray sets
        # OMP_NUM_THREADS for fractional CPUs to 1; kept so). A BLAS left at more threads rounds its calls
        # differently when they come from a thread other than the main one, as Ray Data's calls do: the
        # vectors would then not be bit for bit those of a local ingest.
        M.THREADS = threads
        try:
            from threadpoolctl import threadpool_limits

            self._blas = threadpool_limits(limits=1, user_api="blas")
        except Exception:  # threadpoolctl missing: BLAS keeps Ray's OMP_NUM_THREADS
            self._blas = None
        params, cfg = ray.get(weights[0]) if isinstance(weights, list) else weights
        from .encoder import PRECISIONS

        model = M.prepare(params, cfg, dtype=PRECISIONS[settings.precision])
        self.encoder = Encoder(model=model, settings=settings, weights_path=Path("<object store>"))
        self.record = record
        self.threads = threads

    def __call__(self, block):
        import pyarrow as pa

        cols = {c: block.column(c).to_pylist() for c in block.column_names if c != "pixels"}
        pixels_col = block.column("pixels")
        n = block.num_rows
        status = []
        todo, arrays = [], []
        first: dict[str, int] = {}  # content -> the row of this block that is encoded
        for i in range(n):
            if cols["error"][i] is not None:
                status.append("failed")
                continue
            sha = cols["content_sha256"][i]
            if sha in first:  # the same bytes at another URL of this block: not encoded twice
                status.append("duplicate")
                continue
            first[sha] = i
            status.append("ok")
            buf = pixels_col[i].as_buffer()
            arrays.append(np.frombuffer(buf, np.float32).reshape(3, cols["pixel_h"][i], cols["pixel_w"][i]))
            todo.append(i)
        dim = int(self.record["dim"])
        vectors = np.zeros((n, dim), np.float32)
        if arrays:
            vectors[todo] = l2_normalise(encode_pixels(self.encoder, arrays))  # (len(todo), D)
        rows = {c: cols[c] for c in S.COLUMNS if c not in ("vector", "status")}
        rows["status"] = status
        table = S.make_table(rows, vectors, {"model": self.record, "shard_id": "", "version": S.VERSION})
        return table.replace_schema_metadata(None)


# ---------------------------------------------------------------- the driver


def _resources(ray, opts: RayOptions) -> tuple[float, int, int]:
    """(CPUs per actor, actors, concurrent fetch tasks) for the cluster."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    cpus = sorted(n["Resources"]["CPU"] for n in nodes) or [1.0]
    per_actor = opts.actor_cpus or max(cpus[0] - 2 * FETCH_CPUS, 0.5)
    actors = opts.actors or max(1, sum(int((c - 2 * FETCH_CPUS) // per_actor) or 1 for c in cpus))
    fetch = opts.fetch_tasks or 2 * actors
    return per_actor, actors, fetch


def _shard_tag() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}"


def ingest_csv(conn, db_path, csv_path, weights_path, settings: EncoderSettings, options: I.IngestOptions,
               ray_options: RayOptions, *, progress: Callable[[I.Summary], None] | None = None,
               url_column: str | None = None) -> I.Summary:
    """Ingest a CSV through Ray (see the module's docstring); returns the run's summary, like a local ingest."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: no such CSV file")
    ray = start(ray_options.address, **({"num_cpus": ray_options.num_cpus} if ray_options.num_cpus else {}))
    import ray.data

    shards_dir = Path(ray_options.shards_dir or default_shards_dir(db_path))
    if ray_options.address is None or options.images_dir is not None:
        images_dir = Path(options.images_dir or I.default_images_dir(db_path)).resolve()
    else:
        images_dir = None  # on a cluster, originals are kept only in a folder every node can write (--images-dir)
    params, cfg = load_params(weights_path)
    # the record of the vectors, as Encoder.record() makes it (without preparing a model in the driver)
    record = Encoder(model=types.SimpleNamespace(cfg=cfg), settings=settings, weights_path=Path(weights_path)).record()
    store.ensure_model(conn, record)

    summary = I.Summary(source=str(csv_path), total=max(0, I.count_lines(csv_path) - 1))
    summary.run_id = store.start_run(conn, str(csv_path))
    started = time.monotonic()

    def report():
        summary.seconds = time.monotonic() - started
        if progress:
            progress(summary)

    def take(m: S.MergeSummary):
        summary.new += m.new
        summary.duplicate += m.duplicate
        summary.failed += m.failed
        summary.skipped += m.skipped
        for tag, k in m.reasons.items():
            summary.reasons[tag] = summary.reasons.get(tag, 0) + k
        report()

    status = "crashed"
    try:
        if shards_dir.is_dir():  # a run killed before merging what it had written
            take(S.merge(conn, shards_dir))
        per_actor, actors, fetch_tasks = _resources(ray, ray_options)
        weights_ref = [ray.put((params, cfg))]
        del params
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        tag = _shard_tag()
        n_shards = 0
        window = max(10_000, 2 * ray_options.round_rows)
        root = Path(options.files_root or csv_path.resolve().parent).resolve()
        rows = I.read_rows(csv_path, url_column=url_column)
        summary.url_column, summary.url_column_how = rows.url_column, rows.url_column_how
        source = I.csv_items(csv_path, root, rows, I.gallery_dir(db_path))
        work = I.needs_work(conn, source, options, I.Recent(window))
        seq = 0
        done = False
        while not done:
            items = []
            for x in work:
                if x.skipped:
                    summary.skipped += x.skipped
                    continue
                items.append({"seq": seq, "url": x.url, "url_hash": x.url_hash, "mtime": x.mtime, "local": x.local,
                              "error": x.error, "file": str(x.file) if x.file else None, "fetch_url": x.fetch_url,
                              "meta": json.dumps(x.meta, ensure_ascii=False, sort_keys=True) if x.meta else None})
                seq += 1
                if len(items) >= ray_options.round_rows:
                    break
            else:
                done = True
            report()
            if not items:
                break
            blocks = [_items_table(items[i:i + ray_options.block_rows])
                      for i in range(0, len(items), ray_options.block_rows)]
            ds = ray.data.from_arrow(blocks)
            ds = ds.map_batches(
                _fetch_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                fn_kwargs={"route": settings.preprocess, "fetch_config": options.fetch, "workers": options.workers,
                           "images_dir": str(images_dir) if images_dir else None,
                           "db_dir": str(Path(db_path).resolve().parent)},
                num_cpus=FETCH_CPUS, compute=ray.data.TaskPoolStrategy(size=fetch_tasks))
            ds = ds.map_batches(
                _Encode, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
                fn_constructor_kwargs={"weights": weights_ref, "settings": settings, "record": record},
                num_cpus=per_actor, compute=ray.data.ActorPoolStrategy(size=actors))
            # (Ray Data's actors have max_restarts=-1 and max_task_retries=-1: a killed actor is restarted and
            # its block retried; tests/test_ray.py kills one)
            pending: list[Path] = []
            last = time.monotonic()
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                info = S.new_info(record, str(csv_path))
                table = table.replace_schema_metadata({S.META_KEY: json.dumps(info, sort_keys=True).encode()})
                pending.append(S.write_shard(shards_dir, f"{tag}-{n_shards:06d}", table))
                n_shards += 1
                if time.monotonic() - last >= MERGE_EVERY_S:
                    take(S.merge(conn, pending))
                    pending.clear()
                    last = time.monotonic()
            if pending:
                take(S.merge(conn, pending))
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summary.seconds = time.monotonic() - started
        summary.status = status
        counts = {"new": summary.new, "skipped": summary.skipped, "failed": summary.failed,
                  "duplicate": summary.duplicate, "images_per_s": summary.images_per_s}
        store.finish_run(conn, summary.run_id, counts, status)
    return summary
