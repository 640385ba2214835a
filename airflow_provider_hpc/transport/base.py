"""What the sync and async transports share: their settings, URLs, errors and secrets."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin

import requests
import urllib3.exceptions

from airflow_provider_hpc.transport.errors import (
    TransportError,
    decode_json,
    error_from_answer,
    is_certificate_error,
    redact,
    request_never_sent,
)
from airflow_provider_hpc.transport.retry import Retrier, RetryPolicy, parse_retry_after
from airflow_provider_hpc.transport.urls import origin, origin_text

CHUNK_SIZE = 1024 * 1024


#: The longest an idle connection is kept in the pool (a bound on what a connection extra may ask).
MAX_KEEPALIVE_TIMEOUT = 600.0


@dataclass(frozen=True)
class TransportSettings:
    """
    Where and how to reach a service: base URL, TLS, timeouts and retries.

    :param base_url: the URL every relative path is joined to; ends with ``/``.
    :param verify: verify TLS certificates (or a CA bundle path).
    :param connect_timeout: seconds to open a connection.
    :param read_timeout: seconds to wait between two bytes of an answer.
    :param request_timeout: seconds one JSON request may take in all, answer read included
        (``read_timeout`` bounds each read only: a server dripping a byte at a time never trips it).
    :param min_download_rate: bytes per second a file download must keep up, measured over each
        ``rate_window`` seconds; a slower transfer is cut (and tried again, as a dropped one).
    :param rate_window: seconds over which ``min_download_rate`` is measured.
    :param keepalive_timeout: seconds an idle pooled connection is kept for the next request (the
        async side). Longer than the poll interval, so a trigger polling every 30 s reuses its
        connection instead of opening (and handshaking) a new one each round; at most
        :data:`MAX_KEEPALIVE_TIMEOUT`.
    :param retry: the retry policy.
    """

    base_url: str
    verify: bool | str = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    request_timeout: float = 120.0
    min_download_rate: float = 10 * 1024
    rate_window: float = 60.0
    keepalive_timeout: float = 75.0
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True)
class UploadFile:
    """
    One multipart file part, opened afresh on every attempt so a retry sends the whole file.

    :param field: the form field name (``file`` for Muse and Rescale).
    :param filename: the name the server sees.
    :param opener: returns a new binary file object positioned at the start.
    :param size: the file's size in bytes (the body is sent with a ``Content-Length``).
    """

    field: str
    filename: str
    opener: Callable[[], IO[bytes]]
    size: int


class BodyBudget:
    """
    The bounds on reading one answer's body: its total time and the pace it must keep.

    Fed the size of every decoded chunk as it arrives (:meth:`take`), it raises the transport's
    error once the deadline passed or the transfer fell below ``min_rate`` over a whole window.

    :param error_class: the error raised.
    :param endpoint: the request, for the error.
    :param timeout: seconds the whole exchange may take (``None``: no total limit).
    :param min_rate: bytes per second to keep up over each ``window`` (``None``: any pace).
    :param window: seconds over which ``min_rate`` is measured.
    """

    def __init__(
        self,
        error_class: type[TransportError],
        endpoint: str,
        *,
        timeout: float | None = None,
        min_rate: float | None = None,
        window: float = 60.0,
    ) -> None:
        self.error_class = error_class
        self.endpoint = endpoint
        self.timeout = timeout
        self.min_rate = min_rate
        self.window = window
        now = time.monotonic()
        self.deadline = None if timeout is None else now + timeout
        self._window_start = now
        self._window_bytes = 0

    def take(self, size: int) -> None:
        """Count ``size`` more bytes read; raise when the answer is too slow."""
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise self.error_class(
                f"The answer took longer than {self.timeout:g} s in all (request_timeout); giving up",
                endpoint=self.endpoint,
            )
        if self.min_rate is None:
            return
        self._window_bytes += size
        elapsed = now - self._window_start
        if elapsed >= self.window:
            if self._window_bytes < self.min_rate * elapsed:
                # Retryable like a dropped connection: the transfer starts again from nothing.
                raise self.error_class(
                    f"The download slowed to {self._window_bytes / elapsed:.0f} bytes/s over {elapsed:.0f} s, "
                    f"below min_download_rate ({self.min_rate:g} bytes/s); cutting it",
                    endpoint=self.endpoint,
                    retryable=True,
                )
            self._window_start, self._window_bytes = now, 0


# Joined URLs by (base URL, path): pure values, shared by every transport of the process. Room
# for a few URLs per trigger at 10,000 triggers (a Rescale trigger polls two or three), so a
# triggerer of that size does not empty the cache every round; a few hundred bytes per entry.
_JOINED_URLS: dict[tuple[str, str], str] = {}
_JOINED_URLS_MAX = 65_536

class BaseTransport:
    """What the sync and async transports share: URLs, errors and secrets."""

    def __init__(
        self,
        settings: TransportSettings,
        *,
        error_class: type[TransportError] = TransportError,
        log: logging.Logger | Any = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.error_class = error_class
        self.log = log or logging.getLogger(__name__)
        self.secrets: list[str] = [s for s in secrets if s]
        self.retrier = Retrier(settings.retry, self.log)

    def add_secret(self, secret: str | None) -> None:
        """Remember a secret so it is redacted from every error excerpt."""
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def url(self, path_or_url: str) -> str:
        """Join a relative path to the base URL; an absolute URL must stay on the same origin."""
        # A trigger asks for the same path at every poll: joining and checking it each time cost
        # a tenth of its CPU per poll. Only URLs that passed the origin check are remembered.
        key = (self.settings.base_url, path_or_url)
        joined = _JOINED_URLS.get(key)
        if joined is not None:
            return joined
        url = urljoin(self.settings.base_url, path_or_url)
        if origin(url) != origin(self.settings.base_url):
            raise self.error_class(
                f"Not following the server to another origin with credentials: {origin_text(url)}"
            )
        if len(_JOINED_URLS) >= _JOINED_URLS_MAX:
            _JOINED_URLS.clear()
        _JOINED_URLS[key] = url
        return url

    def _http_error(self, status: int, body: bytes, endpoint: str, retry_after: str | None, idempotent: bool) -> TransportError:
        return error_from_answer(
            status,
            body,
            endpoint=endpoint,
            error_class=self.error_class,
            retry_after=parse_retry_after(retry_after),
            idempotent=idempotent,
            secrets=self.secrets,
        )

    def _transport_error(self, exc: BaseException, endpoint: str, idempotent: bool) -> TransportError:
        detail = redact(type(exc).__name__ + ": " + str(exc), self.secrets)[:300]
        if is_certificate_error(exc):
            # Trying again cannot make a certificate trusted: fail at once, saying what to change.
            return self.error_class(
                f"The server's TLS certificate could not be verified ({detail}); give the connection a "
                "ca_bundle extra, or verify false if you trust the network",
                endpoint=endpoint,
            )
        timeouts = (requests.Timeout, urllib3.exceptions.TimeoutError, asyncio.TimeoutError)
        reason = "timed out" if isinstance(exc, timeouts) else "connection failed"
        return self.error_class(
            f"Request {reason}: {detail}",
            endpoint=endpoint,
            retryable=idempotent or request_never_sent(exc),
        )

    def _redirect_error(self, status: int, location: str, endpoint: str) -> TransportError:
        target = urljoin(self.settings.base_url, location)
        return self.error_class(
            "The server redirected to another origin; not following it with credentials. If the service "
            f"moved (for example to https), put the new URL in the connection. Redirected to: {origin_text(target)}",
            status=status,
            endpoint=endpoint,
        )

    def parse_json(self, body: bytes, endpoint: str, status: int) -> Any:
        """Parse a JSON body, turning a non-JSON body into this transport's error class."""
        return decode_json(body, endpoint=endpoint, status=status, error_class=self.error_class, secrets=self.secrets)
