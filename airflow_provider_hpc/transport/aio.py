"""Non-blocking HTTP for triggers: aiohttp, one pooled session per event loop and origin."""

from __future__ import annotations

import asyncio
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from functools import cached_property
from typing import Any
from urllib.parse import urljoin

import aiohttp

from airflow_provider_hpc.transport.base import BaseTransport
from airflow_provider_hpc.transport import errors
from airflow_provider_hpc.transport.errors import redact
from airflow_provider_hpc.transport.paging import MAX_PAGES, PageWalk
from airflow_provider_hpc.transport.urls import endpoint_of, origin

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Same-origin redirects followed at most (as on the sync side).
MAX_REDIRECTS = 5
#: Connections one shared session keeps open at most (per event loop and origin).
CONNECTION_LIMIT = 100


class _LoopSessions:
    """The aiohttp sessions of one event loop, one per origin, shared by every user while any is active."""

    def __init__(self) -> None:
        self.sessions: dict[tuple, aiohttp.ClientSession] = {}
        self.users: dict[tuple, int] = {}


_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSessions] = weakref.WeakKeyDictionary()
_SSL_CONTEXTS: dict[str, ssl.SSLContext] = {}


def _ssl_for(verify: bool | str) -> ssl.SSLContext | bool:
    """Return an SSL context built once per verify setting (building one per request costs CPU)."""
    if verify is False:
        return False
    key = verify if isinstance(verify, str) else ""
    if key not in _SSL_CONTEXTS:
        _SSL_CONTEXTS[key] = ssl.create_default_context(cafile=key or None)
        if not key:
            try:
                import certifi

                _SSL_CONTEXTS[key].load_verify_locations(certifi.where())
            except ImportError:  # the system store is enough
                pass
    return _SSL_CONTEXTS[key]


class AsyncTransport(BaseTransport):
    """
    Non-blocking HTTP for triggers: aiohttp, one session per event loop and origin.

    The session is shared by every trigger polling the same service, and closed when the last
    of them leaves (see :meth:`session_lease`), so a cancelled trigger never leaks a session.
    """

    @cached_property
    def _key(self) -> tuple:
        return origin(self.settings.base_url)

    def _acquire(self) -> tuple[_LoopSessions, aiohttp.ClientSession]:
        """Take a hold on the running loop's shared session for this origin (made when there is none)."""
        loop = asyncio.get_running_loop()
        # get() first: setdefault() would build a pool and a weak reference at every request.
        pool = _SESSIONS.get(loop) or _SESSIONS.setdefault(loop, _LoopSessions())
        key = self._key
        session = pool.sessions.get(key)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                # Kept alive past the poll interval: aiohttp's 15 s default made every 30 s poll
                # open a new connection (a TLS handshake per trigger per round).
                connector=aiohttp.TCPConnector(
                    limit=CONNECTION_LIMIT, ttl_dns_cache=300, keepalive_timeout=self.settings.keepalive_timeout
                ),
                headers={"User-Agent": "airflow-provider-hpc"},
            )
            pool.sessions[key] = session
        pool.users[key] = pool.users.get(key, 0) + 1
        return pool, session

    def _release(self, pool: _LoopSessions, session: aiohttp.ClientSession) -> bool:
        """Give a hold back; return whether it was the last one, so the session must be closed."""
        key = self._key
        pool.users[key] -= 1
        if pool.users[key] <= 0 and pool.sessions.get(key) is session:
            del pool.sessions[key]
            del pool.users[key]
            return True
        return False

    @asynccontextmanager
    async def session_lease(self) -> AsyncIterator[aiohttp.ClientSession]:
        """Hold the shared session for the duration of the block (a trigger holds it for its life)."""
        pool, session = self._acquire()
        try:
            yield session
        finally:
            if self._release(pool, session):
                await asyncio.shield(session.close())

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        body_limit: int | None = None,
    ) -> Any:
        """
        Send a request under the retry policy and return its JSON body.

        Each attempt is bounded in all by the settings' ``request_timeout`` (answer read included)
        and its body by ``MAX_JSON_BYTES`` of decoded bytes. Redirects are followed on the same
        origin only, as on the sync side: another host's answer never decides a run's outcome.

        :param body_limit: return the body's bytes instead of its JSON, or ``None`` when it holds
            more than this many decoded bytes (see :meth:`get_bytes`).
        """
        url = self.url(path)
        endpoint = endpoint_of(method, url)
        idempotent = method.upper() in ("GET", "HEAD") if idempotent is None else idempotent
        # A request that creates work is not cut at request_timeout (see the sync side's request_json).
        timeout = self._timeouts[0 if idempotent else 1]
        ssl_setting = self._ssl_setting(url, endpoint)
        # The hold is taken and given back by hand, not with session_lease: a context manager is
        # two more objects per request (its generator and itself), alive for the whole exchange.
        pool, session = self._acquire()
        args = (session, method, url, params, headers, timeout, ssl_setting, endpoint, idempotent, body_limit)
        try:
            # The first attempt runs bare, with its arguments passed rather than captured in a
            # closure (a cell per variable, alive as long as the request); the retrier takes over
            # only after a failure it retries, with the same waits, log lines and count.
            try:
                return await self._attempt(*args)
            except errors.TransportError as exc:
                if not self.retrier.retries(exc):
                    raise
                failure = exc
            return await self.retrier.aretry(endpoint, failure, self._attempt, *args)
        finally:
            if self._release(pool, session):
                await asyncio.shield(session.close())

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        timeout: aiohttp.ClientTimeout,
        ssl_setting: ssl.SSLContext | bool,
        endpoint: str,
        idempotent: bool,
        body_limit: int | None,
    ) -> Any:
        """One attempt of :meth:`request_json`: the exchange, same-origin redirects, the body read and parsed."""
        target, query = url, params
        try:
            for _hop in range(MAX_REDIRECTS + 1):
                async with session.request(
                    method, target, params=query, headers=headers, timeout=timeout, ssl=ssl_setting,
                    allow_redirects=False,
                ) as response:
                    if response.status in REDIRECT_STATUSES:
                        target = self._same_origin_target(response, target, endpoint)
                        query = None  # the Location carries its own query
                        continue
                    wanted = errors.MAX_JSON_BYTES if body_limit is None else body_limit
                    limit = errors.ERROR_BODY_BYTES if response.status >= 400 else wanted + 1
                    body = await _read_capped(response, limit)
                    if response.status >= 400:
                        raise self._http_error(
                            response.status, body, endpoint, response.headers.get("Retry-After"), idempotent
                        )
                    if body_limit is not None:
                        return body if len(body) <= body_limit else None
                    return self.parse_json(body, endpoint, response.status)
            raise self.error_class(f"More than {MAX_REDIRECTS} redirects; giving up", endpoint=endpoint)
        except asyncio.TimeoutError as exc:
            if isinstance(exc, aiohttp.ServerTimeoutError):  # one read or the connection: retried
                raise self._transport_error(exc, endpoint, idempotent) from None
            # The whole exchange outlived request_timeout: a server this slow is not asked again at once.
            raise self.error_class(
                f"The answer took longer than {self.settings.request_timeout:g} s in all (request_timeout); giving up",
                endpoint=endpoint,
            ) from None
        except aiohttp.ClientError as exc:
            raise self._transport_error(exc, endpoint, idempotent) from None
        except errors.TransportError:
            # The provider's own errors pass as they are (InvalidIdentifierError and
            # UnsafePathError are ValueErrors too, and must not be taken for the next case).
            raise
        except ValueError as exc:  # a header value the client refuses to send
            raise self.error_class(
                f"The request could not be sent: {type(exc).__name__}: {redact(str(exc), self.secrets)[:200]}",
                endpoint=endpoint,
            ) from None

    def _ssl_setting(self, url: str, endpoint: str) -> ssl.SSLContext | bool:
        """Return the TLS context of a request; a CA file that cannot be read is this transport's error."""
        if not url.startswith("https"):
            return True
        try:
            return _ssl_for(self.settings.verify)
        except (OSError, ssl.SSLError) as exc:
            raise self.error_class(
                f"The CA bundle {self.settings.verify!r} could not be loaded: {type(exc).__name__}: {exc}",
                endpoint=endpoint,
            ) from None

    @cached_property
    def _timeouts(self) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
        """The timeouts of a request that may be repeated, and of one that creates work (built once)."""
        settings = self.settings
        per_read = {"sock_connect": settings.connect_timeout, "sock_read": settings.read_timeout}
        return aiohttp.ClientTimeout(total=settings.request_timeout, **per_read), aiohttp.ClientTimeout(**per_read)

    def _same_origin_target(self, response: aiohttp.ClientResponse, current: str, endpoint: str) -> str:
        """Return where a redirect leads when it stays on the same origin; raise otherwise."""
        location = response.headers.get("Location", "")
        target = urljoin(current, location)
        if not location or origin(target) != origin(current):
            raise self._redirect_error(response.status, location, endpoint)
        return target

    def get_json(
        self, path: str, params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> Awaitable[Any]:
        """GET a JSON document (await the result)."""
        # A plain function handing back request_json's coroutine: no coroutine of its own per poll.
        return self.request_json("GET", path, params=params, headers=headers)

    async def get_bytes(self, path: str, *, limit: int, headers: Mapping[str, str] | None = None) -> bytes | None:
        """GET a small body whole, or ``None`` when it holds more than ``limit`` decoded bytes (as on the sync side)."""
        return await self.request_json("GET", path, headers=headers, body_limit=limit)

    async def iter_pages(
        self, path: str, *, page_size: int = 100, headers: Mapping[str, str] | None = None, max_pages: int = MAX_PAGES
    ) -> AsyncIterator[Any]:
        """Yield every item of a paginated list, by the same rules as the sync side (:class:`~.paging.PageWalk`)."""
        walk = PageWalk(self.url(path), resolve=self.url, error_class=self.error_class, page_size=page_size, max_pages=max_pages)
        while (url := walk.next_url()) is not None:
            for item in walk.take(await self.get_json(url, headers=headers)):
                yield item


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """
    Read at most about ``limit`` decoded bytes of a body.

    A body that announces a sane length and no content coding is read whole (the common case, one
    call); any other is read chunk by chunk as aiohttp inflates it, so a gzip bomb is cut at the
    limit instead of being inflated whole first.
    """
    if (
        response.content_length is not None
        and response.content_length <= limit
        and not response.headers.get("Content-Encoding")
    ):
        return await response.read()
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body)


async def close_all_sessions() -> None:
    """Close every shared session of the running loop (tests, and processes shutting down)."""
    pool = _SESSIONS.pop(asyncio.get_running_loop(), None)
    if pool:
        for session in pool.sessions.values():
            await session.close()

