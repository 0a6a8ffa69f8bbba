"""Text from untrusted sources (servers, CSV cells, file names) made safe to show and store.

    clean_text("bad \x1b]0;pwned\x07 title")   -> 'bad \\u001b]0;pwned\\u0007 title'
    redact_url("https://user:secret@host/a.jpg") -> 'https://host/a.jpg'

:func:`clean_text` is the one cleaning function: the CLI passes everything it writes to the terminal
through it (``cli.py`` wraps stdout and stderr), and the ingest passes every failure reason through it
before storing it (``images.error``). It replaces C0 and C1 control characters (ESC, BEL, CSI ``\\x9b``,
...), DEL, the bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069, U+200E, U+200F,
U+061C), the line and paragraph separators and lone surrogates by the escape ``\\uXXXX``. That form is
also a valid JSON string escape standing for the same character, so JSON output stays valid and exact.
"""

from __future__ import annotations

import re

__all__ = ["clean_text", "redact_url", "redact_text", "has_unsafe"]

# every character a terminal may act on, or that reorders what is displayed after it
_UNSAFE_CORE = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE = re.compile(f"[{_UNSAFE_CORE}\t\n]")  # a single-line text: tab and newline escaped too
_UNSAFE_KEEP_LINES = re.compile(f"[{_UNSAFE_CORE}]")  # for whole outputs: tab and newline kept
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
_USERINFO_ANYWHERE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s@]*@")


def _escape(m: re.Match) -> str:
    return f"\\u{ord(m.group(0)):04x}"


def clean_text(text, *, keep_newlines: bool = False) -> str:
    """``text`` with every control, bidi-override and separator character replaced by ``\\uXXXX``.

    ``keep_newlines=True`` keeps newlines and tabs (for whole outputs made of lines); otherwise the
    result is one line. Carriage returns are always escaped (they overwrite what a line showed).
    """
    s = text if isinstance(text, str) else str(text)
    pattern = _UNSAFE_KEEP_LINES if keep_newlines else _UNSAFE
    return pattern.sub(_escape, s) if pattern.search(s) else s


def has_unsafe(text: str) -> bool:
    """Whether ``text`` holds a character :func:`clean_text` would escape (newlines and tabs excepted)."""
    return _UNSAFE_KEEP_LINES.search(text) is not None


def redact_url(url: str) -> str:
    """``url`` without its user info (``user:password@``); anything else unchanged."""
    return _USERINFO.sub(r"\1", url, count=1) if "@" in url else url


def redact_text(text: str) -> str:
    """``text`` with the user info of every ``scheme://user:pass@`` URL in it removed."""
    return _USERINFO_ANYWHERE.sub(r"\1", text) if "@" in text else text


class SafeTextStream:
    """A text stream that passes everything written to it through :func:`clean_text` (newlines and tabs kept)
    before writing it to ``stream``. ``cli.py`` puts one in front of stdout and stderr, so nothing the
    program prints -- file names, URLs, server texts, CSV cells -- can reach the terminal raw. ``raw`` is
    the stream underneath, for the program's own escape sequences (the progress line)."""

    def __init__(self, stream):
        self.raw = stream

    def write(self, text) -> int:
        if not isinstance(text, str):  # text only: click then uses this object itself, never its buffer
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.raw.write(clean_text(text, keep_newlines=True))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        if name == "buffer":  # writing bytes underneath would bypass the cleaning
            raise AttributeError(name)
        return getattr(self.raw, name)
