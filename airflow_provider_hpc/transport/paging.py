"""
One walk through a paginated list, the same rules on the sync and async sides.

Rescale pages answer ``count``, ``next``, ``previous`` and ``results``. The ``next`` URL may drop
``page_size`` (the server then falls back to 25 a page), so it is carried over to every page.

The walk ends on the last page (no ``next``), on an empty page, or once ``count`` items were
read; an empty page while ``count`` says items remain is an error, not a short list. A ``next`` already followed, or more pages than the cap (the first page's ``count`` divided
by its length, plus :data:`PAGE_SLACK`; at most ``max_pages``), stops it with an error: a broken
or hostile server must not keep a worker or a triggerer asking forever, nor spend the hourly
request budget Rescale gives an API key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from airflow_provider_hpc.transport.errors import TransportError
from airflow_provider_hpc.transport.urls import endpoint_of, with_query

#: The most pages one walk follows.
MAX_PAGES = 100_000
#: Pages tolerated beyond what the first page's ``count`` announces (items added meanwhile).
PAGE_SLACK = 2


class PageWalk:
    """
    The URLs to ask in turn, and the items of each page answered.

    :param first_url: the list's absolute URL.
    :param resolve: joins a ``next`` link to the base URL and checks its origin (the transport's ``url``).
    :param error_class: the error raised for a malformed page or a walk that does not end.
    :param page_size: items asked per page.
    :param max_pages: the most pages followed.
    """

    def __init__(
        self,
        first_url: str,
        *,
        resolve: Callable[[str], str],
        error_class: type[TransportError],
        page_size: int = 100,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self.resolve = resolve
        self.error_class = error_class
        self.page_size = page_size
        self.max_pages = max_pages
        self._next: str | None = with_query(first_url, page=1, page_size=page_size)
        self._seen: set[str] = set()
        self._read = 0
        self._count: int | None = None

    def next_url(self) -> str | None:
        """Return the URL of the next page to ask, or ``None`` once the last page was read."""
        url = self._next
        if url is None:
            return None
        if len(self._seen) >= self.max_pages:
            raise self.error_class(f"The list has more than {self.max_pages} pages; stopping", endpoint=endpoint_of("GET", url))
        self._seen.add(url)
        return url

    def take(self, page: Any) -> list[Any]:
        """Return the items of the page just answered for :meth:`next_url`, and note where the list goes on."""
        endpoint = endpoint_of("GET", self._next or "")
        items = page_results(page, self.error_class, endpoint)
        following = next_page_link(page, self.error_class, endpoint)
        self._read += len(items)
        if self._count is None:
            self._count = _count_of(page)
            if self._count is not None and items:
                self.max_pages = min(self.max_pages, math.ceil(self._count / len(items)) + PAGE_SLACK)
        if not items and following and self._count is not None and self._read < self._count:
            # Stopping here would hand back a list silently short of what the server announced.
            raise self.error_class(
                f"The server answered an empty page after {self._read} of the {self._count} items it announces; stopping",
                endpoint=endpoint,
            )
        done = not items or (self._count is not None and self._read >= self._count)
        self._next = with_query(self.resolve(following), page_size=self.page_size) if following and not done else None
        if self._next in self._seen:
            raise self.error_class(
                f"The server's next page repeats an earlier one; stopping. Repeated page: {self._next[:200]}",
                endpoint=endpoint,
            )
        return items


def _count_of(page: Mapping[str, Any]) -> int | None:
    """Return a page's ``count`` when it is a sane whole number, else ``None`` (then it decides nothing)."""
    count = page.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return None
    return count


def next_page_link(page: Mapping[str, Any], error_class: type[TransportError], endpoint: str) -> str | None:
    """Return the ``next`` link of a page, ``None`` on the last page, or raise when it is not a URL."""
    following = page.get("next")
    if following is None or following == "":
        return None
    if not isinstance(following, str):
        raise error_class(f"The page's next link is not a URL: {str(following)[:100]!r}", endpoint=endpoint)
    return following


def page_results(page: Any, error_class: type[TransportError], endpoint: str) -> list[Any]:
    """Return the ``results`` list of one page, or raise a clear error when the page is malformed."""
    if not isinstance(page, dict) or not isinstance(page.get("results"), list):
        raise error_class("A page of the list has no 'results' list", endpoint=endpoint)
    return page["results"]
