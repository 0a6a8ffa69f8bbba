"""Metadata filters for search results: ``key=value`` on the CSV's other columns (``images.meta``).

Kept as two small functions so the same rules can later be routed through the library's general
filtering (``query --where``) without changing the web app or its API: the app only calls
:func:`parse` on the request's ``filter`` values and :func:`apply` on the search results.
"""

from __future__ import annotations

from ..errors import InputError

MAX_FILTERS = 20


def parse(values) -> list[tuple[str, str]]:
    """``["key=value", ...]`` -> ``[(key, value)]``; empty strings are ignored. A value may itself hold
    ``=``; keys and values are stripped. InputError names a filter without ``=`` or with an empty key."""
    filters = []
    for raw in values or ():
        for part in str(raw).split("\n"):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise InputError(f"filter {part.strip()!r}: expected key=value (a metadata column and its value)")
            filters.append((key.strip(), value.strip()))
    if len(filters) > MAX_FILTERS:
        raise InputError(f"{len(filters)} filters: at most {MAX_FILTERS}")
    return filters


def matches(meta: dict | None, filters) -> bool:
    """Whether a result's metadata has every ``key`` equal to ``value`` (compared as text, ignoring case)."""
    meta = meta or {}
    for key, value in filters:
        have = meta.get(key)
        if have is None or str(have).strip().casefold() != value.casefold():
            return False
    return True


def apply(results: list[dict], filters) -> list[dict]:
    """The results whose metadata matches every filter, re-ranked from 1 (order kept)."""
    if not filters:
        return results
    kept = [dict(r) for r in results if matches(r.get("meta"), filters)]
    for rank, r in enumerate(kept, start=1):
        r["rank"] = rank
    return kept
