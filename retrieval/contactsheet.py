"""A self-contained HTML contact sheet of a query's results (``python cli.py query IMG --html FILE``).

One file that opens from disk and can be mailed: the query image and every result's thumbnail are
inlined as ``data:`` URIs, with rank, score, URL and metadata. Nothing is loaded from anywhere else
(a Content-Security-Policy says so too), no script, and every value is escaped: CSV content is untrusted,
so a ``<script>`` in a caption shows as text. Links are made only for http(s) URLs.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from urllib.parse import urlsplit

from . import thumbs

CSS = """
body{margin:16px;font:14px/1.4 system-ui,sans-serif;color:#1d1d1f;background:#f6f6f4}
h1{font-size:18px;margin:0 0 4px} .sub{color:#57606a;margin:0 0 12px}
.query{display:flex;gap:12px;align-items:center;margin-bottom:14px}
.query img{max-height:160px;max-width:240px;border:2px solid #0969da;border-radius:4px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:12px}
figure{margin:0;background:#fff;border-radius:6px;overflow:hidden;box-shadow:0 1px 2px rgba(0,0,0,.15)}
figure img{display:block;width:100%;height:170px;object-fit:cover;background:#eaeef2}
.nopic{height:170px;display:flex;align-items:center;justify-content:center;color:#57606a;background:#eaeef2}
figcaption{padding:6px;font-size:12px;word-break:break-word}
.score{font-weight:600;font-size:14px} .rank{color:#57606a;float:right}
dl{margin:4px 0 0} dt{font-weight:600;display:inline} dd{display:inline;margin:0} dd::after{content:"";display:block}
"""


def _esc(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def _link(url) -> str:
    text = _esc(url)
    try:
        scheme = urlsplit(str(url)).scheme.lower()
    except ValueError:
        scheme = ""
    if scheme in ("http", "https"):
        return f'<a href="{text}" rel="noopener noreferrer">{text}</a>'
    return text


def data_uri(thumb: thumbs.Thumb) -> str:
    return f"data:{thumb.mime};base64,{base64.b64encode(thumb.data).decode('ascii')}"


def render(results: list[dict], conn, db_path, *, query_label: str, query_thumb: thumbs.Thumb | None = None) -> str:
    """The contact sheet's HTML. ``results`` as ``query.by_image``/``by_id`` return them; thumbnails come
    from the gallery (``thumbs.get``: cached, or made from the stored original)."""
    tiles = []
    for r in results:
        thumb = thumbs.get(conn, r["id"], db_path)
        pic = (f'<img src="{data_uri(thumb)}" alt="result {_esc(r["rank"])}">' if thumb is not None
               else '<div class="nopic">no picture</div>')
        meta = "".join(f"<dt>{_esc(k)}:</dt> <dd>{_esc(v)}</dd>" for k, v in (r.get("meta") or {}).items())
        size = f" &middot; {_esc(r['width'])}&times;{_esc(r['height'])}" if r.get("width") else ""
        tiles.append(
            f'<figure>{pic}<figcaption><span class="score">{float(r["score"]):.4f}</span>'
            f'<span class="rank">#{_esc(r["rank"])} &middot; id {_esc(r["id"])}{size}</span>'
            f'<div class="url">{_link(r["url"])}</div>{f"<dl>{meta}</dl>" if meta else ""}</figcaption></figure>')
    query_pic = f'<img src="{data_uri(query_thumb)}" alt="query image">' if query_thumb is not None else ""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{csp}\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>Results for {_esc(query_label)}</title><style>{CSS}</style></head><body>"
        f"<div class=\"query\">{query_pic}<div><h1>{len(results)} images like {_esc(query_label)}</h1>"
        f"<p class=\"sub\">gallery {_esc(Path(db_path).name)} &middot; {_esc(when)} &middot; "
        "score = cosine similarity</p></div></div>"
        f"<div class=\"grid\">{''.join(tiles)}</div></body></html>\n"
    )


def write(path, html: str) -> Path:
    """Write the sheet atomically (a temporary file beside it, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path
