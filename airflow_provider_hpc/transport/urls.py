"""URLs the transports build and check: endpoints named in errors, origins, query strings."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


@functools.lru_cache(maxsize=65536)
def endpoint_of(method: str, url: str) -> str:
    """Return ``METHOD /path`` of a request, as errors name it (no query string: no key, no token)."""
    # Cached: a trigger names the same endpoint at every poll (pure function of two strings). The
    # bound must hold one entry per trigger and more: an LRU cache smaller than the URLs polled in
    # turn misses on every call (at 8,192 entries, every poll of 10,000 triggers did).
    return f"{method.upper()} {urlsplit(url).path}"


@functools.lru_cache(maxsize=1024)
def origin(url: str) -> tuple[str, str]:
    """Return the ``(scheme, netloc)`` of a URL, lower-cased: what "the same origin" compares."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def origin_text(url: str) -> str:
    """Return a URL's origin for a message, never repeating credentials put in the URL."""
    scheme, netloc = origin(url)
    return f"{scheme}://{netloc.rpartition('@')[2]}"


def with_query(url: str, **params: Any) -> str:
    """Return ``url`` with ``params`` set in its query string (others kept)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update({k: str(v) for k, v in params.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))
