"""Stream the rows of a CSV file of image URLs, keeping every bad row as data (a reason), never raising for it.

    rows = read_rows("data.csv")          # opens the file now: InputError if it cannot be read at all
    rows.url_column, rows.header           # which column holds the URLs, the header (None if there is none)
    for row in rows:                       # Row(line, url, meta, error), one per non-blank record
        if row.error: ...                  # "empty-url", "invalid-url: ...", "malformed-row: ...", "encoding: ..."

The file is read record by record (``csv.reader`` over the open text file): memory does not grow with the
number of rows, and a field can never exceed ``csv.field_size_limit()`` (an unclosed quote is reported as a
malformed row, and reading resumes on the next line).

Encoding: a UTF-8 BOM is skipped (``utf-8-sig``), a UTF-16 or UTF-32 BOM switches to that encoding (Excel's
"Unicode text"), and so does UTF-16 without a BOM (recognised by its NUL bytes in every other position).
The file is opened with ``errors="surrogateescape"``, so invalid bytes never stop the reader: a record that
contains some gets ``error="encoding: ..."`` and its text is kept with U+FFFD in place of each bad byte (so
it can always be printed or stored); in UTF-16/32 a bad code unit becomes U+FFFD. Pass ``encoding="latin-1"``
(or any codec) for a file that is not UTF-8.

Binary files (an image, a spreadsheet, a compressed file... passed by mistake) are refused with one line
naming the file and what it looks like: NUL bytes in a file that is not UTF-16/32, or control characters
making up more than 5% of its first 64 KB.

Header: the first non-blank record is a header when none of its cells looks like a URL (contains ``://``, or
starts like ``www.`` / ``host.tld/``). The URL column is chosen by what its cells hold: among the first
:data:`SAMPLE_ROWS` data rows, the column with the most cells that look like a URL or an image file name
(``cat.jpg``); on a tie, the one whose header is named (case-insensitive; spaces and hyphens count as
underscores) url, image_url, imageurl, img_url, image, link, src or uri, then the leftmost. When no cell
looks like either, the named column, else the first. ``url_column=`` names it explicitly (a header name or a
1-based number). ``url_column_how`` says how it was chosen ("by content", "by name", "first column",
"given"). Without a header the other columns are kept in ``meta`` as col2, col3, ...

Delimiter: ``,`` unless the first line has no comma but a tab (TSV) or, for a header line, a semicolon
(Excel in many locales); ``delimiter=`` overrides.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from retrieval.errors import InputError

__all__ = ["Row", "CsvRows", "read_rows", "check_url", "clean_url", "URL_COLUMN_NAMES", "MAX_URL_LENGTH",
           "SAMPLE_ROWS"]

URL_COLUMN_NAMES = ("url", "image_url", "imageurl", "img_url", "image", "link", "src", "uri")
MAX_URL_LENGTH = 8192
SAMPLE_ROWS = 100  # data rows looked at to choose the URL column
_FILE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".heic", ".jp2", ".qoi")
# what a binary file passed as a CSV looks like, for the message
_MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
          (b"PK\x03\x04", "a ZIP archive (an .xlsx or .ods spreadsheet?)"), (b"\x1f\x8b", "a gzip file"),
          (b"%PDF", "a PDF document"), (b"\x7fELF", "a program"), (b"SQLite format 3\x00", "an SQLite database"),
          (b"\xd0\xcf\x11\xe0", "an old Office document (.xls?)"), (b"BZh", "a bzip2 file"),
          (b"\xfd7zXZ", "an xz file"), (b"7z\xbc\xaf", "a 7-Zip archive"), (b"II*\x00", "a TIFF image"),
          (b"MM\x00*", "a TIFF image"), (b"BM", "a BMP image"))
_BINARY_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f]")

# zero-width and BOM characters that survive copy-paste and str.strip()
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060\u200e\u200f"
_SURROGATE = re.compile("[\udc80-\udcff]")
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_SCHEME_AND_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*)(.*)$", re.S)
_SCHEMELESS_URL = re.compile(r"^(www\.|[\w\-]+(\.[\w\-]+)+/)", re.I)
_ASCII_HOST = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=%\-]+$")
# the common case, accepted without urlsplit: http(s)://dns.name[:port][/?#printable-ascii]
_PLAIN_URL = re.compile(r"(?i)^https?://(?:[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?"
                        r"(?::(\d{1,5}))?(?:[/?#][!-~]*)?\Z")


@dataclass(slots=True)
class Row:
    """One non-blank CSV record. ``line`` is the 1-based line of the file where the record starts."""

    line: int
    url: str
    meta: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------- URLs


def clean_url(url: str) -> str:
    """Strip surrounding whitespace and invisible characters; percent-encode spaces after the host.

    Spaces inside paths are common in CSV files (``http://x/my photo.jpg``); they become ``%20``. Nothing
    else is changed (non-ASCII paths and IDN hosts are left to ``requests``, which encodes them).
    """
    s = url.strip().strip(_INVISIBLE).strip()
    if " " in s:
        m = _SCHEME_AND_AUTHORITY.match(s)
        if m:
            s = m.group(1) + m.group(2).replace(" ", "%20")
    return s


def check_url(url: str) -> str | None:
    """The reason ``url`` (after :func:`clean_url`) cannot be downloaded, or None if it looks fetchable.

    Accepted: http/https with a host, optional valid port, IDN hosts, non-ASCII paths. Reasons are
    ``"empty-url"`` or ``"invalid-url: <why>"``.
    """
    return _check_clean(clean_url(url))


def _check_clean(u: str) -> str | None:
    m = _PLAIN_URL.match(u)
    if m is not None and len(u) <= MAX_URL_LENGTH and (m.group(1) is None or int(m.group(1)) <= 65535):
        return None
    if not u:
        return "empty-url"
    if len(u) > MAX_URL_LENGTH:
        return f"invalid-url: longer than {MAX_URL_LENGTH} characters"
    if _CONTROL.search(u):
        return "invalid-url: contains control characters (tab, newline, ...)"
    if _SURROGATE.search(u):
        return "invalid-url: contains bytes that are not valid UTF-8"
    try:
        parts = urlsplit(u)
    except ValueError as exc:
        return f"invalid-url: {exc}"
    scheme = parts.scheme.lower()
    if "://" not in u or not scheme:
        return "invalid-url: not an absolute http:// or https:// URL"
    if scheme not in ("http", "https"):
        return f"invalid-url: scheme '{scheme}' not supported (only http and https)"
    host = parts.hostname
    if not host:
        return "invalid-url: no host"
    try:
        parts.port
    except ValueError:
        return "invalid-url: bad port"
    if host.isascii():
        if ":" in host:  # IPv6 literal: urlsplit has already checked the brackets
            return None
        if not _ASCII_HOST.match(host) or host.startswith(".") or ".." in host:
            return f"invalid-url: bad host name '{host}'"
    else:
        try:
            import idna  # a dependency of requests, which uses it the same way

            idna.encode(host, uts46=True)
        except ImportError:  # pragma: no cover - requests always brings idna
            try:
                host.encode("idna")
            except UnicodeError:
                return f"invalid-url: bad international host name '{host}'"
        except (UnicodeError, ValueError) as exc:  # idna.IDNAError is a UnicodeError
            return f"invalid-url: bad international host name '{host}' ({exc})"
    return None


# ---------------------------------------------------------------- reading


def _looks_like_url(cell: str) -> bool:
    c = cell.strip()
    return "://" in c or bool(_SCHEMELESS_URL.match(c))


def _looks_fetchable(cell: str) -> bool:
    """A cell that looks like a URL, or like an image file's name (``cat.jpg``, ``photos/a b.PNG``)."""
    c = cell.strip().strip(_INVISIBLE).strip()
    if not c or len(c) > MAX_URL_LENGTH:
        return False
    if _looks_like_url(c):
        return True
    return "\n" not in c and c.lower().endswith(_FILE_SUFFIXES) and len(c) > 4


def _sniff_encoding(head: bytes) -> str:
    """utf-32 / utf-16 by their BOM or (UTF-16 without one) by NULs in every other byte, else utf-8-sig."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    sample = head[: 4096 - 4096 % 2]
    if len(sample) >= 8:
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) >= 0.9 * len(odd) and even.count(0) <= 0.1 * len(even):
            return "utf-16-le"
        if even.count(0) >= 0.9 * len(even) and odd.count(0) <= 0.1 * len(odd):
            return "utf-16-be"
    return "utf-8-sig"


def _norm_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().strip(_INVISIBLE).strip().lower())


def _fix_text(s: str) -> str:
    """Replace surrogate-escaped bytes by U+FFFD (only called when some are present)."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _bad_bytes(s: str) -> str:
    return " ".join(f"0x{ord(c) - 0xDC00:02X}" for c in _SURROGATE.findall(s)[:3])


class CsvRows:
    """An iterator of :class:`Row` over one CSV file; see the module docstring. Use :func:`read_rows`.

    Attributes (known once constructed): ``path``, ``encoding``, ``delimiter``, ``header`` (list of names,
    or None), ``url_column`` (its name, or ``"col1"``-style when there is no header), ``url_index``.
    Close it (or use ``with``) to release the file early; it closes itself when exhausted.
    """

    def __init__(self, path, *, encoding: str | None = None, delimiter: str | None = None,
                 url_column: str | int | None = None):
        self.path = str(path)
        p = Path(path)
        try:
            with open(p, "rb") as fb:
                head = fb.read(65536)
        except FileNotFoundError:
            raise InputError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{self.path}: is a directory, not a CSV file") from None
        except PermissionError:
            raise InputError(f"{self.path}: permission denied") from None
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read ({exc.strerror or exc})") from None

        if encoding is None:
            encoding = _sniff_encoding(head)
        else:
            try:
                codecs.lookup(encoding)
            except LookupError:
                raise InputError(f"{self.path}: unknown encoding '{encoding}'") from None
        self.encoding = encoding
        wide = encoding.lower().replace("_", "-").startswith(("utf-16", "utf-32"))
        kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
        if b"\x00" in head and not wide:
            raise InputError(f"{self.path}: not a text CSV file: it contains NUL bytes"
                             f" ({f'it looks like {kind}' if kind else 'an image, a spreadsheet, a compressed file?'})")

        head_text = head.decode(encoding, "replace")
        controls = len(_BINARY_CONTROLS.findall(head_text))
        if controls > max(8, len(head_text) // 20) or (head_text.count("\ufffd") > max(64, len(head_text) // 4)):
            raise InputError(f"{self.path}: not a text CSV file: binary data"
                             f" ({f'it looks like {kind}' if kind else f'{controls} control characters in its first {len(head)} bytes'})")
        first_line = next((ln for ln in head_text.splitlines() if ln.strip().strip(_INVISIBLE)), "")
        if delimiter is None:
            delimiter = ","
            if "," not in first_line:
                if "\t" in first_line:
                    delimiter = "\t"
                elif ";" in first_line and "://" not in first_line:
                    delimiter = ";"
        if len(delimiter) != 1:
            raise InputError(f"{self.path}: delimiter must be one character, got {delimiter!r}")
        self.delimiter = delimiter

        try:
            # surrogateescape works for byte-oriented codecs only; UTF-16/32 replace bad code units by U+FFFD
            self._file = open(p, "r", encoding=encoding, errors="replace" if wide else "surrogateescape", newline="")
        except OSError as exc:  # pragma: no cover - it could be read a moment ago
            raise InputError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        self._reader = csv.reader(self._file, delimiter=delimiter)
        self._prev_line = 0
        self._pending: deque = deque()  # records read ahead (to choose the URL column), handed out first
        self._closed = False

        self.header: list[str] | None = None
        self._names: list[str] = []
        self.url_index = 0
        self.url_column_how = "given" if url_column is not None else "first column"
        first = self._next_record()
        if first is not None:
            if first[0] == "error" or any(_looks_like_url(c) for c in first[1]):
                self._pending.append(first)
            else:
                self.header = [_fix_text(c) if _SURROGATE.search(c) else c for c in first[1]]
        if url_column is None:
            while len(self._pending) < SAMPLE_ROWS:
                rec = self._next_record()
                if rec is None:
                    break
                self._pending.append(rec)
        self._setup_columns(url_column)

    # -- columns

    def _by_content(self, named: int | None) -> int | None:
        """The column whose sampled cells most often look like a URL or an image file name (ties: the named
        column, then the leftmost), or None when no cell does."""
        scores: dict[int, int] = {}
        for rec in self._pending:
            if rec[0] == "error":
                continue
            for i, cell in enumerate(rec[1]):
                if _looks_fetchable(cell):
                    scores[i] = scores.get(i, 0) + 1
        if not scores:
            return None
        best = max(scores.values())
        if named is not None and scores.get(named, 0) == best:
            return named
        return min(i for i, s in scores.items() if s == best)

    def _setup_columns(self, url_column) -> None:
        if self.header is None:
            if url_column is not None and not (isinstance(url_column, int) or str(url_column).isdigit()):
                raise InputError(f"{self.path}: no header row, so no column named '{url_column}' "
                                 "(give a 1-based column number instead)")
            if url_column is not None:
                self.url_index = int(url_column) - 1
            else:
                found = self._by_content(None)
                self.url_index = found or 0
                self.url_column_how = "by content" if found is not None else "first column"
            if self.url_index < 0:
                raise InputError(f"{self.path}: column numbers start at 1")
            self.url_column = f"col{self.url_index + 1}"
            return
        names: list[str] = []
        seen: set[str] = set()
        for i, h in enumerate(self.header):
            name = h.strip().strip(_INVISIBLE).strip() or f"col{i + 1}"
            base, k = name, 2
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            seen.add(name)
            names.append(name)
        self._names = names
        normed = [_norm_name(h) for h in self.header]
        if url_column is None:
            named = next((i for i, n in enumerate(normed) if n in URL_COLUMN_NAMES), None)
            found = self._by_content(named)
            if found is not None:
                self.url_index = found
                self.url_column_how = "by name" if found == named else "by content"
            else:
                self.url_index = named if named is not None else 0
                self.url_column_how = "by name" if named is not None else "first column"
        elif isinstance(url_column, int) or (str(url_column).isdigit() and _norm_name(str(url_column)) not in normed):
            self.url_index = int(url_column) - 1
            if not 0 <= self.url_index < len(names):
                raise InputError(f"{self.path}: no column {url_column} (the header has {len(names)})")
        else:
            want = _norm_name(str(url_column))
            if want not in normed:
                raise InputError(f"{self.path}: no column named '{url_column}' "
                                 f"(columns: {', '.join(names[:20])})")
            self.url_index = normed.index(want)
        self.url_column = names[self.url_index] if self.url_index < len(names) else f"col{self.url_index + 1}"

    def _name(self, i: int) -> str:
        if i < len(self._names):
            return self._names[i]
        name = f"col{i + 1}"
        while name in self._names:
            name += "_"
        return name

    # -- records

    def _next_record(self):
        """(start line, fields) of the next non-blank record, ("error", line, message) for a csv.Error,
        or None at the end."""
        while True:
            try:
                fields = next(self._reader)
            except StopIteration:
                return None
            except csv.Error as exc:
                line = self._prev_line + 1
                self._prev_line = self._reader.line_num
                return ("error", line, str(exc))
            line = self._prev_line + 1
            self._prev_line = self._reader.line_num
            if not any(f.strip() for f in fields):
                continue
            return line, fields

    def _make_row(self, line: int, fields: list[str]) -> Row:
        error = None
        bad_col = None
        for i, f in enumerate(fields):
            if not f.isascii() and _SURROGATE.search(f):
                if bad_col is None:
                    bad_col = i
                    detail = _bad_bytes(f)
                fields[i] = _fix_text(f)
        meta = {}
        ui = self.url_index
        for i, f in enumerate(fields):
            if i != ui:
                meta[self._name(i) if self.header is not None else f"col{i + 1}"] = f
        if ui >= len(fields):
            expected = f", expected {len(self.header)}" if self.header is not None else ""
            return Row(line, "", meta, f"malformed-row: {len(fields)} field(s){expected}; no '{self.url_column}' cell")
        raw = fields[ui]
        url = clean_url(raw)
        if bad_col is not None:
            where = self._name(bad_col) if self.header is not None else f"col{bad_col + 1}"
            error = (f"encoding: invalid {self.encoding.replace('-sig', '').upper()} byte(s) {detail} "
                     f"in column '{where}' (is the file in another encoding?)")
        elif "\n" in url or "\r" in url:
            error = "malformed-row: the URL cell spans several lines (an unclosed quote?)"
        else:
            error = _check_clean(url)
        return Row(line, url, meta, error)

    def __iter__(self) -> Iterator[Row]:
        return self

    def __next__(self) -> Row:
        if self._closed:
            raise StopIteration
        if self._pending:
            rec = self._pending.popleft()
        else:
            rec = self._next_record()
        if rec is None:
            self.close()
            raise StopIteration
        if rec[0] == "error":
            _, line, msg = rec
            return Row(line, "", {}, f"malformed-row: {msg} (records up to line {self._prev_line} skipped)")
        return self._make_row(*rec)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()

    def __enter__(self) -> "CsvRows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def read_rows(path, *, encoding: str | None = None, delimiter: str | None = None,
              url_column: str | int | None = None) -> CsvRows:
    """Open ``path`` now (InputError if it cannot be read at all) and return an iterator of :class:`Row`.

    ``url_column``: a header name (or 1-based column number) to take URLs from, instead of guessing.
    """
    return CsvRows(path, encoding=encoding, delimiter=delimiter, url_column=url_column)
