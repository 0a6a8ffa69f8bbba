"""Commands that look after a gallery: ``stats``, ``doctor``, ``index``, ``vec-path``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .common import DbOpt, _DB_IN_USE, _db_path, _open_db, app


@app.command()
def stats(
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
):
    """Counts by status, the model, the database's size and the last runs."""
    import json

    from retrieval import store

    db_path, conn = _open_db(db, readonly=True)
    s = store.stats(conn)
    if as_json:
        typer.echo(json.dumps(s, indent=2, default=str))
        return
    c = s["counts"]
    typer.echo(f"database   {db_path} ({s['file_bytes'] / 1e6:.1f} MB)")
    typer.echo(f"images     {c.get('total', 0)}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed, {c.get('duplicate', 0)} duplicate; {s['vectors']} vectors")
    ix = s["index"]
    if ix["state"] == "trained":
        typer.echo(f"index      {ix['lists']} lists, probing {ix['nprobe']}; trained on {ix['trained_on']} vectors "
                   f"({ix['trained_at']}), {ix['vectors']} now")
    else:
        typer.echo(f"index      none: exact search over {ix['vectors']} vectors")
    if ix["advice"]:
        typer.echo(f"           {ix['advice']}")
    m = s["model"]
    if m:
        typer.echo(f"model      {m['variant']}, dim {m['dim']}, {m['preprocess']}, interpolation {m['interpolation']}, pooling {m['pooling']}, weights sha256 {m['weights_sha256'][:12]}…")
    else:
        typer.echo("model      none yet")
    wal = f"; -wal file {s['wal_bytes'] / 1e6:.1f} MB not yet in the .db" if s.get("wal_bytes") else ""
    typer.echo(f"backup     python cli.py backup FILE (or sqlite3 {db_path} \".backup FILE\", or VACUUM INTO 'FILE'), not cp{wal}")
    if s["runs"]:
        typer.echo("last runs")
        for r in s["runs"]:
            rate = f"{r['images_per_s']:.2f} img/s" if r.get("images_per_s") is not None else ""
            typer.echo(f"  #{r['id']} {r['started_at']} {r['status']:<11} new {r['new']}, skipped {r['skipped']}, failed {r['failed']}, duplicate {r['duplicate']}  {rate}  {r['source']}")


@app.command()
def doctor(
    db: Optional[Path] = DbOpt,
    repair: bool = typer.Option(False, "--repair", help="Fix what can be fixed without losing an ok row that has a vector; checkpoint the WAL."),
    recover: Optional[Path] = typer.Option(None, "--recover", help="A damaged database: copy every readable row into this NEW file (a working gallery) and say what was lost."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
):
    """Check a gallery database (integrity, vectors vs rows, norms, model, migrations, runs, files, WAL) and say how to repair it.

    Exit 0 when healthy (after --repair: when every problem was fixed), 1 when problems remain.
    """
    import json
    import shlex

    from retrieval import doctor as D
    from retrieval.errors import ConfigError

    _DB_IN_USE[:] = [_db_path(db)]
    if recover is not None:
        from retrieval.recover import recover as recover_db

        if repair:
            raise ConfigError("give --repair or --recover, not both")
        source = _db_path(db)
        result = recover_db(source, recover)
        after = D.examine(recover)
        if as_json:
            typer.echo(json.dumps({**result.as_dict(), "healthy": after.healthy}, indent=2, default=str))
        else:
            typer.echo("\n".join(result.lines()))
            if after.healthy:
                src_q, new_q = shlex.quote(str(source)), shlex.quote(str(recover))
                typer.echo(f"{recover}: a healthy gallery. Use it with --db {new_q}, or put it in place of the "
                           f"damaged one (keep a copy of that first if you like): "
                           f"rm -f {shlex.quote(str(source) + '-wal')} {shlex.quote(str(source) + '-shm')} "
                           f"&& mv {new_q} {src_q}")
            else:
                typer.echo(D.format_report(after))
        if not after.healthy:
            raise typer.Exit(1)
        return
    report = D.examine(_db_path(db), repair_it=repair)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        typer.echo(D.format_report(report))
    if not report.healthy:
        raise typer.Exit(1)


@app.command("index")
def build_index(
    db: Optional[Path] = DbOpt,
    lists: Optional[int] = typer.Option(None, "--lists", help="Number of lists (k-means centroids). Default: about sqrt(N)."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="Lists a top-10 query probes (default 12; more for larger -k)."),
    force: bool = typer.Option(False, "--force", help="Build even below 50,000 vectors, where exact search is fast."),
    drop: bool = typer.Option(False, "--drop", help="Remove the index: search becomes exact."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line."),
):
    """Build (or rebuild/retrain) the search index: k-means lists over the gallery's vectors, in the database."""
    import time

    from retrieval import index as X
    from retrieval.errors import ConfigError

    db_path, conn = _open_db(db, must_exist=True)
    if drop:
        X.drop(conn)
        typer.echo(f"{db_path}: index removed; search is exact")
        return
    n = X.count_vectors(conn)
    if n == 0:
        raise ConfigError(f"{db_path}: the gallery holds no vectors yet: nothing to index")
    if n < X.EXACT_BELOW and not force and lists is None:
        typer.echo(f"{db_path}: {n} vectors: exact search is fast below {X.EXACT_BELOW:,}; no index built "
                   "(--force builds one anyway)")
        return
    if lists is not None and lists < 1:
        raise ConfigError(f"--lists {lists}: expected a positive number")
    if nprobe is not None and nprobe < 1:
        raise ConfigError(f"--nprobe {nprobe}: expected a positive number")
    shown = {"on": (not quiet) and sys.stderr.isatty(), "any": False}

    def progress(stage, done, total):
        if shown["on"]:
            sys.stderr.write(f"\r{stage}: {done}/{total}\033[K")
            sys.stderr.flush()
            shown["any"] = True

    t = time.perf_counter()
    st = X.build(conn, nlist=lists, nprobe=nprobe, progress=progress)
    if shown["any"]:
        sys.stderr.write("\n")
    typer.echo(f"{db_path}: index of {st['nlist']} lists over {st['trained_on']} vectors (k-means on {st['sample']}), "
               f"probing {st['nprobe']}; {time.perf_counter() - t:.1f} s")


@app.command("vec-path")
def vec_path():
    """Print the sqlite-vec extension's path, for `.load` in the sqlite3 shell."""
    import sqlite_vec

    typer.echo(sqlite_vec.loadable_path())
