"""Commands that search a gallery: ``query`` (and its contact sheet), ``dupes``, ``serve``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .common import AllowPrivateOpt, DbOpt, OfflineOpt, WeightsOpt, _open_db, app


@app.command()
def query(
    image: Optional[Path] = typer.Argument(None, help="Query image file."),
    url: Optional[str] = typer.Option(None, "--url", help="Query by an image URL instead."),
    image_id: Optional[int] = typer.Option(None, "--id", help="Query by the id of an image already in the gallery."),
    k: int = typer.Option(10, "-k", "--k", help="How many results."),
    db: Optional[Path] = DbOpt,
    weights: Optional[str] = WeightsOpt,
    offline: bool = OfflineOpt,
    exact: bool = typer.Option(False, "--exact", help="Exact search over every vector, even where an index is built."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="Index lists to probe (default: the index's own, more for larger -k)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of {rank, id, url, path, score, ...}."),
    allow_private: bool = AllowPrivateOpt,
    where: Optional[List[str]] = typer.Option(None, "--where", help="Only images whose metadata (the CSV's other columns) matches KEY OP VALUE, OP one of = != < <= > >= ~ (LIKE); numeric when VALUE is a number; repeatable, all must hold. E.g. --where tag=cat --where year>=2020."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Only results with at least this cosine similarity."),
    include_self: bool = typer.Option(False, "--include-self", help="With --id: keep the query image (and rows holding the same bytes) in the results."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML contact sheet of the results (thumbnails inlined) to this file."),
    open_html: bool = typer.Option(False, "--open", help="Open the --html contact sheet in the web browser."),
):
    """Find the gallery images most like a query image (cosine similarity)."""
    import json

    from retrieval import query as Q
    from retrieval.errors import ConfigError, InputError
    from retrieval.safety import redact_url

    if sum(x is not None for x in (image, url, image_id)) != 1:
        raise ConfigError("give exactly one query: an image file, --url URL or --id N")
    if k < 1:
        raise ConfigError(f"-k {k}: expected a positive number")
    from retrieval import lifecycle

    if open_html and html is None:
        raise ConfigError("--open opens the contact sheet: give --html FILE too")
    if nprobe is not None and nprobe < 1:
        raise ConfigError(f"--nprobe {nprobe}: expected a positive number")
    search = {"exact": True if exact else None, "nprobe": nprobe}
    conditions = [lifecycle.parse_where(w) for w in where or ()]
    db_path, conn = _open_db(db, readonly=True)
    filtered = bool(conditions) or min_score is not None
    img = None
    if image_id is not None:
        exclude = () if include_self else lifecycle.same_bytes(conn, image_id)
        if filtered or exclude:
            vector = Q.vector_of(conn, image_id)
            results = lifecycle.search(conn, vector, k, where=conditions, min_score=min_score, exclude=exclude,
                                       **search)
        else:
            results = Q.by_id(conn, image_id, k, **search)
    else:
        # imported here: a query by id needs no encoder, decoder or HTTP client
        from retrieval.decode import decode, open_path
        from retrieval.hub import resolve_weights

        model = Q.gallery_model(conn)
        encoder = Q.gallery_encoder(conn, resolve_weights(weights, variant=model["variant"],
                                                          allow_download=not offline))
        if url is not None:
            from retrieval.fetch import FetchConfig, Fetcher

            with Fetcher(FetchConfig(allow_private=True if allow_private else None)) as fetcher:
                res = fetcher.fetch(url)
            if not res.ok:
                raise InputError(f"{redact_url(url)}: {res.reason}")
            img = decode(res.data, redact_url(url))
        else:
            img = open_path(image)
        if filtered:
            results = lifecycle.search(conn, Q.vector_of_image(encoder, img), k, where=conditions,
                                       min_score=min_score, **search)
        else:
            results = Q.by_image(conn, encoder, img, k, **search)
    local = {r["id"]: bool(r["path"]) and r["path"] == r["url"] for r in results}  # a local file: url is its key
    if html is not None:
        _contact_sheet(html, open_html, results, conn, db_path, img, image, url, image_id)
    for r in results:
        r["path"] = Q.display_path(r["path"], db_path)
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    if not results:
        typer.echo("no results: no image matches" if filtered else "no results: the gallery holds no vectors")
        return
    typer.echo(f"{'rank':>4}  {'score':>6}  {'id':>6}  url, then the stored file and the metadata")
    pad = f"{'':>4}  {'':>6}  {'':>6}"
    for r in results:
        typer.echo(f"{r['rank']:>4}  {r['score']:6.4f}  {r['id']:>6}  {r['path'] if local[r['id']] else r['url']}")
        if r["path"] and not local[r["id"]]:
            typer.echo(f"{pad}  {r['path']}")
        if r["meta"]:
            typer.echo(f"{pad}  " + ", ".join(f"{key}={value}" for key, value in r["meta"].items()))


@app.command()
def dupes(
    threshold: float = typer.Option(0.95, "--threshold", help="Cosine similarity from which two images count as near-duplicates."),
    db: Optional[Path] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the groups as JSON."),
):
    """Groups of near-duplicate images (connected components of pairs at or above --threshold; exact copies included)."""
    import json

    from retrieval import lifecycle
    from retrieval import query as Q

    db_path, conn = _open_db(db, readonly=True)
    found = lifecycle.dupes(conn, threshold)
    for g in found["groups"]:
        for m in g["images"]:
            m["path"] = Q.display_path(m["path"], db_path)
    if as_json:
        typer.echo(json.dumps(found, indent=2, ensure_ascii=False))
        return
    for g in found["groups"]:
        typer.echo(f"group {g['group']}: {g['size']} images, representative {g['representative']}")
        for m in g["images"]:
            copy = f"  (same bytes as {m['duplicate_of']})" if m["duplicate_of"] is not None else ""
            typer.echo(f"  {m['id']:>6}  {m['score']:6.4f}  {m['url']}{copy}")
    typer.echo(f"{len(found['groups'])} group{'s' * (len(found['groups']) != 1)} of near-duplicates, "
               f"{found['images']} images, threshold {threshold:g} ({found['vectors']} vectors compared "
               f"in {found['seconds']:.1f} s)")


def _contact_sheet(html, open_html, results, conn, db_path, img, image, url, image_id):
    """``query --html``: write the contact sheet (and ``--open`` it); a note on stderr says where."""
    import webbrowser

    from retrieval import contactsheet, thumbs
    from retrieval.errors import InputError

    if image_id is not None:
        label, query_thumb = f"image #{image_id}", thumbs.get(conn, image_id, db_path)
    else:
        label, query_thumb = (url if url is not None else str(image)), thumbs.make(img)
    page = contactsheet.render(results, conn, db_path, query_label=label, query_thumb=query_thumb)
    try:
        contactsheet.write(html, page)
    except OSError as exc:
        raise InputError(f"{html}: cannot write the contact sheet ({exc.strerror or exc})") from exc
    typer.echo(f"contact sheet: {html}", err=True)
    if open_html:
        webbrowser.open(html.resolve().as_uri())


@app.command()
def serve(
    db: Optional[Path] = DbOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default serves this machine only; another address is announced with a warning."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    weights: Optional[str] = WeightsOpt,
    offline: bool = OfflineOpt,
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest image upload accepted, in MB."),
    timeout: float = typer.Option(60.0, "--timeout", help="Search by URL: total seconds allowed for the download."),
    max_mb: float = typer.Option(50.0, "--max-mb", help="Search by URL: largest download accepted, in MB."),
    allow_private: bool = typer.Option(False, "--allow-private", help="Search by URL may fetch from loopback and private addresses (as ingest --allow-private)."),
    lazy: bool = typer.Option(False, "--lazy", help="Load the model on the first search by image, not in the background at start-up."),
):
    """Start the local web app on a gallery: search by upload, paste, URL or id; results as a grid; a JSON API."""
    import math

    from retrieval import web
    from retrieval.errors import ConfigError

    web.require()
    from retrieval.web.serve import run
    from retrieval.web.service import GalleryService, fetch_config

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a port number from 0 to 65535")
    for name, value in (("--max-upload-mb", max_upload_mb), ("--max-mb", max_mb), ("--timeout", timeout)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} {value:g}: expected a positive number")
    path, conn = _open_db(db, must_exist=True)  # applies pending migrations (the thumbnails table)
    conn.close()
    service = GalleryService(path, weights=weights, offline=offline, allow_private=allow_private,
                             max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                             fetch=fetch_config(allow_private, deadline=timeout, max_bytes=int(max_mb * 1024 * 1024)))
    run(service, host, port, warm=not lazy)
