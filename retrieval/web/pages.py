"""Server-rendered pages about the gallery's state: counts and model, recent runs, failures with their
reasons, duplicates. Every value from the database (URLs, errors, metadata: untrusted CSV content) goes
through :func:`esc`; links are made only for http(s) URLs."""

from __future__ import annotations

from html import escape
from urllib.parse import urlencode, urlsplit

NAV = (("/", "Search"), ("/gallery", "Gallery"), ("/failures", "Failures"), ("/duplicates", "Duplicates"))


def esc(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def link(url) -> str:
    """An http(s) URL as a link, anything else (a local path, javascript:...) as plain text."""
    text = esc(url)
    try:
        scheme = urlsplit(str(url)).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in ("http", "https"):
        return f'<a href="{text}" rel="noopener noreferrer nofollow" target="_blank">{text}</a>'
    return f"<span class=\"path\">{text}</span>"


def layout(title: str, body: str, current: str = "") -> str:
    mark = ' class="current"'
    nav = " ".join(f'<a href="{href}"{mark if href == current else ""}>{esc(label)}</a>' for href, label in NAV)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{esc(title)}</title><link rel=\"stylesheet\" href=\"/static/style.css\"></head>"
        f"<body><header><nav>{nav}</nav></header><main><h1>{esc(title)}</h1>{body}</main></body></html>\n"
    )


def table(headers, rows) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv(rows) -> str:
    """A two-column table: escaped labels, cells already escaped."""
    body = "".join(f"<tr><th>{esc(label)}</th><td>{cell}</td></tr>" for label, cell in rows)
    return f"<table><tbody>{body}</tbody></table>"


def gallery_page(service, params) -> str:
    s = service.stats()
    c = s["counts"]
    parts = [kv([
        ("database", esc(s["database"])),
        ("size", esc(f"{s['file_bytes'] / 1e6:.1f} MB")),
        ("images", esc(f"{c.get('total', 0)}: {c.get('ok', 0)} ok, {c.get('failed', 0)} failed, "
                       f"{c.get('duplicate', 0)} duplicate")),
        ("vectors", esc(s["vectors"])),
        ("thumbnails", esc(s["thumbnails"])),
        ("migrations", esc(", ".join(s["migrations"]))),
    ])]
    m = s["model"]
    parts.append("<h2>Model</h2>")
    if m:
        loaded = s["model_loaded"]
        state = ("loaded" + (f" in {loaded['load_seconds']:.1f} s" if loaded["load_seconds"] else "")
                 if loaded["loaded"] else (f"not loaded: {loaded['error']}" if loaded["error"] else "loading or not yet needed"))
        parts.append(kv([
            ("variant", esc(m["variant"])), ("dim", esc(m["dim"])), ("preprocess", esc(m["preprocess"])),
            ("interpolation", esc(m["interpolation"])), ("pooling", esc(m["pooling"])),
            ("weights sha256", esc(m["weights_sha256"])), ("encoder", esc(state)),
        ]))
    else:
        parts.append("<p>No model recorded yet: run <code>python cli.py ingest</code> first.</p>")
    parts.append("<h2>Recent runs</h2>")
    if s["runs"]:
        parts.append(table(
            ["run", "started", "finished", "status", "new", "skipped", "failed", "duplicate", "images/s", "source"],
            [(esc(r["id"]), esc(r["started_at"]), esc(r["finished_at"]), esc(r["status"]), esc(r["new"]),
              esc(r["skipped"]), esc(r["failed"]), esc(r["duplicate"]),
              esc(f"{r['images_per_s']:.2f}" if r.get("images_per_s") is not None else ""), esc(r["source"]))
             for r in s["runs"]]))
    else:
        parts.append("<p>No runs yet.</p>")
    return layout("Gallery", "".join(parts), "/gallery")


def _pager(base: str, total: int, limit: int, offset: int, extra: dict) -> str:
    links = []
    if offset > 0:
        links.append(f'<a href="{base}?{esc(urlencode({**extra, "offset": max(0, offset - limit)}))}">previous</a>')
    if offset + limit < total:
        links.append(f'<a href="{base}?{esc(urlencode({**extra, "offset": offset + limit}))}">next</a>')
    shown = f"{offset + 1}-{min(total, offset + limit)} of {total}" if total else "none"
    return f'<p class="pager">{esc(shown)} {" ".join(links)}</p>'


def failures_page(service, params) -> str:
    reason = params.get("reason") or None
    data = service.failures(100, params.get("offset", 0), reason)
    parts = []
    if data["reasons"]:
        parts.append("<h2>Reasons</h2>")
        parts.append(table(["reason", "images"], [
            (f'<a href="/failures?{esc(urlencode({"reason": tag}))}">{esc(tag)}</a>', esc(n))
            for tag, n in data["reasons"].items()]))
    else:
        parts.append("<p>No failures.</p>")
    if reason:
        parts.append(f'<p>Showing reason <b>{esc(reason)}</b> (<a href="/failures">all</a>).</p>')
    if data["rows"]:
        parts.append("<h2>Failed images</h2>")
        parts.append(_pager("/failures", data["total"], data["limit"], data["offset"], {"reason": reason} if reason else {}))
        parts.append(table(["id", "url", "reason", "attempts", "HTTP", "last tried"], [
            (esc(r["id"]), link(r["url"]), f'<span class="error">{esc(r["error"])}</span>', esc(r["attempts"]),
             esc(r["http_status"]), esc(r["updated_at"])) for r in data["rows"]]))
    return layout("Failures", "".join(parts), "/failures")


def duplicates_page(service, params) -> str:
    data = service.duplicates(50, params.get("offset", 0))
    parts = [f"<p>{esc(data['total'])} images have copies at other URLs (the same bytes; stored and encoded once).</p>"]
    if data["groups"]:
        parts.append(_pager("/duplicates", data["total"], data["limit"], data["offset"], {}))
        rows = []
        for g in data["groups"]:
            thumb = f'<a href="/?id={esc(g["id"])}"><img class="mini" src="{esc(g["thumbnail"])}" alt="image {esc(g["id"])}"></a>'
            copies = "<ul>" + "".join(f"<li>#{esc(d['id'])} {link(d['url'])}</li>" for d in g["duplicates"]) + "</ul>"
            rows.append((thumb, f"#{esc(g['id'])} {link(g['url'])}", copies))
        parts.append(table(["", "image", "duplicates"], rows))
    return layout("Duplicates", "".join(parts), "/duplicates")


def error_page(status: int, message: str) -> str:
    return layout(f"Error {status}", f'<p class="error">{esc(message)}</p>')
