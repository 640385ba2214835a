"""
The transport both hooks share: settings, retry policy, errors, sessions, paging and streaming.

Sync (``requests``) serves workers; async (``aiohttp``) serves triggers. Both use the same
:class:`RetryPolicy` and the same rules for what may be tried again:

- idempotent requests (GET, and POSTs the caller marks idempotent) retry on connection errors,
  timeouts, 429 (waiting ``Retry-After``, capped) and 500/502/503/504, with exponential backoff
  and jitter, a bounded number of attempts, and one log line per retry saying why;
- requests that create work retry only when the request surely never reached the server
  (the TCP/TLS connection could not be opened);
- any other 4xx fails at once with the server's message.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import functools
import hashlib
import json
import logging
import random
import re
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
import requests
import tenacity
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from airflow_provider_hpc.exceptions import HpcApiError, InvalidIdentifierError

if TYPE_CHECKING:
    from airflow.sdk import Connection

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
ERROR_EXCERPT_CHARS = 300
# A JSON answer larger than this is refused: every documented JSON answer is a few KiB.
MAX_JSON_BYTES = 32 * 1024 * 1024
CHUNK_SIZE = 1024 * 1024
_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=~-]{0,254}")


def validate_segment(value: Any, what: str) -> str:
    """
    Return ``value`` as a string safe to put into a URL path segment, or raise.

    :param value: a software name, run key, job id or run id.
    :param what: what the value is, for the error message.
    """
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    # fullmatch, not match: "$" would let a trailing newline through ("key\n").
    if not text or not _SAFE_SEGMENT.fullmatch(text) or ".." in text:
        raise InvalidIdentifierError(
            f"{what} {value!r} is not a valid identifier: use letters, digits and . _ - only "
            "(no '/', '..', '?', '#', spaces)"
        )
    return text


@dataclass(frozen=True)
class RetryPolicy:
    """
    How many times and how long to retry a request; plain numbers so it crosses into triggers.

    :param max_attempts: attempts in all, the first included.
    :param initial_wait: seconds before the first retry; doubles each time, with jitter.
    :param max_wait: the longest backoff between two attempts.
    :param max_retry_after: the longest ``Retry-After`` honoured; longer asks are capped.
    """

    max_attempts: int = 5
    initial_wait: float = 1.0
    max_wait: float = 30.0
    max_retry_after: float = 300.0

    def to_dict(self) -> dict[str, float]:
        """Return the policy as JSON-able numbers (trigger kwargs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RetryPolicy:
        """Build a policy from :meth:`to_dict` output; missing keys take defaults."""
        data = data or {}
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if data.get(k) is not None})

    def backoff(self, attempt: int) -> float:
        """
        Return the exponential backoff with jitter before retry number ``attempt`` (from 1).

        ``initial_wait * 2 ** (attempt - 1)`` plus up to ``initial_wait`` of jitter, at most ``max_wait``.
        """
        exponential = self.initial_wait * 2 ** min(max(attempt, 1) - 1, 60)
        return max(0.0, min(self.max_wait, exponential + random.uniform(0, self.initial_wait)))

    def wait_for(self, exc: BaseException, attempt: int) -> float:
        """Return how long to wait after ``exc``: the server's ``Retry-After`` (capped) or the backoff."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return max(0.0, min(float(retry_after), self.max_retry_after))
        return self.backoff(attempt)


@dataclass(frozen=True)
class TransportSettings:
    """
    Where and how to reach a service: base URL, TLS, timeouts and retries.

    :param base_url: the URL every relative path is joined to; ends with ``/``.
    :param verify: verify TLS certificates (or a CA bundle path).
    :param connect_timeout: seconds to open a connection.
    :param read_timeout: seconds to wait between two bytes of an answer.
    :param retry: the retry policy.
    """

    base_url: str
    verify: bool | str = True
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retry: RetryPolicy = RetryPolicy()

    @classmethod
    def from_connection(
        cls, conn: Connection, *, default_url: str | None = None, default_path: str = ""
    ) -> TransportSettings:
        """
        Read the settings of an Airflow connection.

        ``host`` may be a whole base URL (``http://147.100.179.250/api/``) or a bare host name, in
        which case ``port``, ``schema`` (the path) and the ``scheme`` extra complete it.
        """
        host = (conn.host or "").strip()
        if not host:
            if not default_url:
                raise HpcApiError(f"Connection {conn.conn_id!r} has no host (the service's base URL)")
            base = default_url
        elif "://" in host:
            base = host
        else:
            scheme = str(connection_extra(conn, "scheme") or "https").strip().lower()
            port = f":{conn.port}" if conn.port else ""
            path = (conn.schema or default_path).strip("/")
            base = f"{scheme}://{host}{port}/{path}"
        parts = urlsplit(base)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            # Name the scheme only: a URL may carry credentials.
            raise HpcApiError(
                f"Connection {conn.conn_id!r}: the host is not an http(s) URL (scheme {parts.scheme!r}); "
                "give the service's base URL, e.g. https://platform.rescale.com or http://147.100.179.250/api/"
            )
        if not base.endswith("/"):
            base += "/"
        policy = RetryPolicy.from_dict({"max_attempts": _number(connection_extra(conn, "max_attempts"), int)})
        verify = _as_verify(connection_extra(conn, "verify", True))
        ca_bundle = str(connection_extra(conn, "ca_bundle") or "").strip()
        if ca_bundle and verify is True:
            verify = ca_bundle
        return cls(
            base_url=base,
            verify=verify,
            connect_timeout=_number(connection_extra(conn, "connect_timeout"), float) or 10.0,
            read_timeout=_number(connection_extra(conn, "read_timeout"), float) or 60.0,
            retry=policy,
        )


def connection_extra(conn: Connection, name: str, default: Any = None) -> Any:
    """
    Return the extra ``name`` of a connection, or ``default`` when it is missing or empty.

    Older connection forms stored their fields as ``extra__{conn_type}__{name}``: both spellings are read.
    """
    extra = conn.extra_dejson or {}
    for key in (name, f"extra__{conn.conn_type}__{name}"):
        value = extra.get(key)
        if value is not None and value != "":
            return value
    return default


def _number(value: Any, kind: type) -> Any:
    if value in (None, ""):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise HpcApiError(f"Connection extra value {value!r} is not a number") from None


def _as_verify(value: Any) -> bool | str:
    if value is None:
        return True
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("false", "no", "0", "off"):
            return False
        if lowered in ("true", "yes", "1", "on", ""):
            return True
        return value  # a CA bundle path
    return bool(value)


def optional_int(value: Any) -> int | None:
    """Return ``value`` as an int, or ``None`` when it is missing or not a number (never a bool)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def parse_retry_after(value: str | None) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for (seconds or an HTTP date), or ``None``."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP dates are always GMT
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text`` by ``***``."""
    for secret in secrets:
        if secret and len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


def body_excerpt(body: bytes, secrets: Iterable[str] = ()) -> str:
    """Return a short, single-line, readable excerpt of a body (tags of an HTML page stripped)."""
    text = body[: ERROR_EXCERPT_CHARS * 8].decode("utf-8", errors="replace")
    if "<" in text and ">" in text:
        text = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", text)
        text = re.sub(r"<[^>]+>", " ", text)
    text = " ".join(text.split())
    text = redact(text, secrets)
    if len(text) > ERROR_EXCERPT_CHARS:
        text = text[:ERROR_EXCERPT_CHARS] + "..."
    return text or "(empty body)"


def decode_json(
    body: bytes, *, endpoint: str, status: int | None, error_class: type[HpcApiError], secrets: Iterable[str] = ()
) -> Any:
    """Parse a JSON body; an empty, HTML or truncated body becomes a clear ``error_class``."""
    if len(body) > MAX_JSON_BYTES:
        raise error_class(
            f"The answer is larger than {MAX_JSON_BYTES} bytes, too large for a JSON document",
            endpoint=endpoint,
            status=status,
        )
    if not body.strip():
        raise error_class("The server answered with an empty body where JSON was expected", endpoint=endpoint, status=status)
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise error_class(
            "The server answered with a body that is not JSON (a proxy or login page?)",
            endpoint=endpoint,
            status=status,
            excerpt=body_excerpt(body, secrets),
        ) from None


def error_from_answer(
    status: int,
    body: bytes,
    *,
    endpoint: str,
    error_class: type[HpcApiError],
    retry_after: float | None,
    idempotent: bool,
    secrets: Iterable[str] = (),
) -> HpcApiError:
    """Build the error for a 4xx/5xx answer, reading the server's ``error``/``type``/``more`` or ``detail``."""
    secrets = tuple(secrets)
    fields: dict[str, Any] = {}
    excerpt: str | None = None
    try:
        data = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and any(k in data for k in ("error", "detail", "message", "type")):
        fields = server_error_fields(data, secrets)
    else:
        excerpt = body_excerpt(body, secrets)
    # A 429 was refused before any work started, so even a submit may try again after the wait.
    retryable = status in RETRYABLE_STATUSES and (idempotent or status == 429)
    return error_class(
        f"HTTP {status} from the server",
        status=status,
        endpoint=endpoint,
        excerpt=excerpt,
        retryable=retryable,
        retry_after=retry_after if status in (429, 503) else None,
        **fields,
    )


def server_error_fields(data: Mapping[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Return ``error``/``error_type``/``more`` keyword arguments from an error body, redacted."""
    secrets = tuple(secrets)
    error = data.get("error") or data.get("detail") or data.get("message")

    def clean(value: Any) -> str | None:
        if value is None or value == "":
            return None
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        return redact(text, secrets)[:1000]

    return {"error": clean(error), "error_type": clean(data.get("type")), "more": clean(data.get("more"))}


def _request_never_sent(exc: BaseException) -> bool:
    """Whether a requests/aiohttp failure happened before the request could reach the server."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, aiohttp.ClientConnectorError)):
        return True
    if isinstance(exc, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", None)
        return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))
    return False


def _is_certificate_error(exc: BaseException) -> bool:
    """Whether a failure is a TLS certificate that could not be verified (not worth a retry)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return True
    return isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _describe(exc: BaseException) -> str:
    """Say in a few words why an attempt failed (for the retry log line; secrets are already redacted)."""
    if isinstance(exc, HpcApiError):
        text = exc.message
        if exc.status and str(exc.status) not in text:
            text += f" (status {exc.status})"
        if exc.error:
            text += f": {exc.error[:200]}"
        return text
    return type(exc).__name__


@functools.lru_cache(maxsize=8192)
def endpoint_of(method: str, url: str) -> str:
    """Return ``METHOD /path`` of a request, as errors name it (no query string: no key, no token)."""
    # Cached: a trigger names the same endpoint at every poll (pure function of two strings).
    return f"{method.upper()} {urlsplit(url).path}"


_endpoint = endpoint_of


class _Retrier:
    """Runs an attempt function under a :class:`RetryPolicy`, logging each retry with its reason."""

    def __init__(self, policy: RetryPolicy, log: logging.Logger | Any) -> None:
        self.policy = policy
        self.log = log

    def _kwargs(self, endpoint: str, done: int = 0) -> dict[str, Any]:
        """Tenacity's settings; ``done`` attempts already failed before tenacity took over."""
        policy = self.policy

        def wait(state: tenacity.RetryCallState) -> float:
            return policy.wait_for(state.outcome.exception(), state.attempt_number + done)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            self._log_retry(endpoint, state.outcome.exception(), state.attempt_number + done,
                            state.next_action.sleep if state.next_action else 0.0)

        return {
            "stop": tenacity.stop_after_attempt(self.max_attempts - done),
            "wait": wait,
            "retry": tenacity.retry_if_exception(lambda e: isinstance(e, HpcApiError) and e.retryable),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    @property
    def max_attempts(self) -> int:
        """The attempts in all (at least one)."""
        return max(1, int(self.policy.max_attempts))

    def _gave_up(self, exc: HpcApiError) -> None:
        # A retryable error that escapes the loop is one the attempts ran out on: say so.
        if exc.retryable and self.max_attempts > 1:
            exc.note_attempts(self.max_attempts)

    def call(self, endpoint: str, attempt: Callable[[], Any]) -> Any:
        """Call ``attempt`` until it succeeds, fails for good, or the attempts run out."""
        try:
            return tenacity.Retrying(sleep=lambda seconds: _sleep(seconds), **self._kwargs(endpoint))(attempt)
        except HpcApiError as exc:
            self._gave_up(exc)
            raise

    def _log_retry(self, endpoint: str, exc: BaseException | None, attempt: int, wait: float) -> None:
        self.log.warning(
            "%s failed (%s); retry %d of %d in %.1fs", endpoint, _describe(exc), attempt, self.max_attempts - 1, wait
        )

    async def acall(self, endpoint: str, attempt: Callable[[], Any]) -> Any:
        """Await ``attempt()`` until it succeeds, fails for good, or the attempts run out."""
        # The first attempt runs bare: building tenacity's machinery for every poll took about a
        # fifth of a trigger's time per poll. On a retryable failure tenacity takes over for the
        # attempts left, with the same waits, log lines and count as if it had run the first one.
        try:
            return await attempt()
        except HpcApiError as exc:
            if not exc.retryable or self.max_attempts == 1:
                raise
            first_failure = exc
        try:
            wait = self.policy.wait_for(first_failure, 1)
            self._log_retry(endpoint, first_failure, 1, wait)
            await _async_sleep(wait)
            return await tenacity.AsyncRetrying(
                sleep=lambda seconds: _async_sleep(seconds), **self._kwargs(endpoint, done=1)
            )(attempt)
        except HpcApiError as exc:
            self._gave_up(exc)
            raise


def _sleep(seconds: float) -> None:
    """Wait between two sync attempts (tenacity's own sleep, which tests replace)."""
    tenacity.nap.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    """Wait between two async attempts without blocking the event loop."""
    await asyncio.sleep(seconds)


@dataclass(frozen=True)
class UploadFile:
    """
    One multipart file part, opened afresh on every attempt so a retry sends the whole file.

    :param field: the form field name (``file`` for Muse).
    :param filename: the name the server sees.
    :param opener: returns a new binary file object positioned at the start.
    """

    field: str
    filename: str
    opener: Callable[[], IO[bytes]]


# Joined URLs by (base URL, path): pure values, shared by every transport of the process.
_JOINED_URLS: dict[tuple[str, str], str] = {}
_JOINED_URLS_MAX = 20_000


class BaseTransport:
    """What the sync and async transports share: URLs, errors and secrets."""

    def __init__(
        self,
        settings: TransportSettings,
        *,
        error_class: type[HpcApiError] = HpcApiError,
        log: logging.Logger | Any = None,
        secrets: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.error_class = error_class
        self.log = log or logging.getLogger(__name__)
        self.secrets: list[str] = [s for s in secrets if s]
        self.retrier = _Retrier(settings.retry, self.log)

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
        if _origin(url) != _origin(self.settings.base_url):
            raise self.error_class(
                f"The server pointed to another origin ({_origin_text(url)}); not following it with credentials"
            )
        if len(_JOINED_URLS) >= _JOINED_URLS_MAX:
            _JOINED_URLS.clear()
        _JOINED_URLS[key] = url
        return url

    def _http_error(self, status: int, body: bytes, endpoint: str, retry_after: str | None, idempotent: bool) -> HpcApiError:
        return error_from_answer(
            status,
            body,
            endpoint=endpoint,
            error_class=self.error_class,
            retry_after=parse_retry_after(retry_after),
            idempotent=idempotent,
            secrets=self.secrets,
        )

    def _transport_error(self, exc: BaseException, endpoint: str, idempotent: bool) -> HpcApiError:
        detail = redact(type(exc).__name__ + ": " + str(exc), self.secrets)[:300]
        if _is_certificate_error(exc):
            # Trying again cannot make a certificate trusted: fail at once, saying what to change.
            return self.error_class(
                f"The server's TLS certificate could not be verified ({detail}); give the connection a "
                "ca_bundle extra, or verify false if you trust the network",
                endpoint=endpoint,
            )
        reason = "timed out" if isinstance(exc, (requests.Timeout, asyncio.TimeoutError)) else "connection failed"
        return self.error_class(
            f"Request {reason}: {detail}",
            endpoint=endpoint,
            retryable=idempotent or _request_never_sent(exc),
        )

    def _redirect_error(self, status: int, location: str, endpoint: str) -> HpcApiError:
        target = urljoin(self.settings.base_url, location)
        return self.error_class(
            f"The server redirected to another origin ({_origin_text(target)}); not following it with "
            "credentials. If the service moved (for example to https), put the new URL in the connection",
            status=status,
            endpoint=endpoint,
        )

    def parse_json(self, body: bytes, endpoint: str, status: int) -> Any:
        """Parse a JSON body, turning a non-JSON body into this transport's error class."""
        return decode_json(body, endpoint=endpoint, status=status, error_class=self.error_class, secrets=self.secrets)


@functools.lru_cache(maxsize=1024)
def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _origin_text(url: str) -> str:
    scheme, netloc = _origin(url)
    return f"{scheme}://{netloc.rpartition('@')[2]}"  # never repeat credentials put in a URL


def with_query(url: str, **params: Any) -> str:
    """Return ``url`` with ``params`` set in its query string (others kept)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update({k: str(v) for k, v in params.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))


class _SameOriginSession(requests.Session):
    """
    A session that follows redirects only on the origin it was sent to.

    ``requests`` drops the ``Authorization`` header on a redirect to another host, but a 307/308
    sends the body again, and Muse's token and password travel in the body. A redirect elsewhere
    (or from ``http`` to ``https``) is not followed: the caller gets the 3xx and says so.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target and _origin(urljoin(resp.url, target)) != _origin(resp.url):
            return None
        return target


class SyncTransport(BaseTransport):
    """Blocking HTTP for workers: one pooled ``requests.Session`` per hook."""

    def __init__(self, settings: TransportSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.session = _SameOriginSession()
        self.session.max_redirects = 5
        # Retries are ours (tenacity); urllib3's own would hide them from the policy and the log.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=32, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.verify = settings.verify
        self.session.headers["User-Agent"] = "airflow-provider-hpc"

    @property
    def timeout(self) -> tuple[float, float]:
        """The (connect, read) timeout of every request."""
        return (self.settings.connect_timeout, self.settings.read_timeout)

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    def fetch(
        self,
        method: str,
        path: str,
        handle: Callable[[requests.Response], Any],
        *,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        json_body: Any = None,
        files: Sequence[UploadFile] = (),
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """
        Send a request and hand the streaming response to ``handle``, all under the retry policy.

        A failure while ``handle`` reads the body (a dropped connection, a retryable
        :class:`HpcApiError` such as an md5 mismatch) retries the whole exchange when the request
        is idempotent.

        :param idempotent: whether a retry may repeat the request; defaults to ``True`` for GET only.
        """
        url = self.url(path)
        endpoint = _endpoint(method, url)
        idempotent = method.upper() in ("GET", "HEAD") if idempotent is None else idempotent

        def attempt() -> Any:
            response = self._send(method, url, endpoint, idempotent, params, data, json_body, files, headers)
            with response:
                try:
                    return handle(response)
                except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                    raise self._transport_error(exc, endpoint, idempotent) from None
                except HpcApiError as exc:
                    if exc.retryable and not idempotent:
                        exc.retryable = False
                    raise

        return self.retrier.call(endpoint, attempt)

    def _send(self, method, url, endpoint, idempotent, params, data, json_body, files, headers) -> requests.Response:
        with ExitStack() as stack:
            parts = [(f.field, (f.filename, stack.enter_context(f.opener()))) for f in files] or None
            try:
                # verify is passed on every request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
                # override the session's own setting, which would ignore the connection's choice.
                response = self.session.request(
                    method, url, params=params, data=data, json=json_body, files=parts,
                    headers=headers, timeout=self.timeout, stream=True, verify=self.settings.verify,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise self._transport_error(exc, endpoint, idempotent) from None
            except requests.RequestException as exc:  # too many redirects, an invalid URL or header...
                detail = redact(f"{type(exc).__name__}: {exc}", self.secrets)[:300]
                raise self.error_class(f"Request failed: {detail}", endpoint=endpoint) from None
        if response.status_code >= 400:
            with response:
                try:
                    body = read_capped(response, 64 * 1024)
                except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                    # The connection dropped in the middle of the error answer.
                    raise self._transport_error(exc, endpoint, idempotent) from None
            raise self._http_error(response.status_code, body, endpoint, response.headers.get("Retry-After"), idempotent)
        if response.is_redirect:
            response.close()
            raise self._redirect_error(response.status_code, response.headers.get("Location", ""), endpoint)
        return response

    def request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return its JSON body (bounded in size, clear error when not JSON)."""
        endpoint = _endpoint(method, self.url(path))

        def read_json(response: requests.Response) -> Any:
            return self.parse_json(read_capped(response, MAX_JSON_BYTES + 1), endpoint, response.status_code)

        return self.fetch(method, path, read_json, **kwargs)

    def get_json(self, path: str, params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> Any:
        """GET a JSON document."""
        return self.request_json("GET", path, params=params, headers=headers)

    def iter_pages(
        self, path: str, *, page_size: int = 100, headers: Mapping[str, str] | None = None, max_pages: int = 100_000
    ) -> Iterator[Any]:
        """
        Yield every item of a paginated list (Rescale's ``count``/``next``/``previous``/``results``).

        ``page_size`` is carried over to every ``next`` URL, which servers may drop.
        """
        url: str | None = with_query(self.url(path), page=1, page_size=page_size)
        seen: set[str] = set()
        while url:
            if len(seen) >= max_pages:
                raise self.error_class(f"The list has more than {max_pages} pages; stopping", endpoint=_endpoint("GET", url))
            seen.add(url)
            page = self.get_json(url, headers=headers)
            yield from page_results(page, self.error_class, _endpoint("GET", url))
            following = next_page_link(page, self.error_class, _endpoint("GET", url))
            if not following:
                return
            url = with_query(self.url(following), page_size=page_size)
            if url in seen:
                raise self.error_class(f"The server's next page repeats an earlier one ({url}); stopping")

    def download(
        self,
        path: str,
        dest: Any,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        expected_size: int | None = None,
        expected_md5: str | None = None,
        max_bytes: int | None = None,
    ) -> Any:
        """
        Stream a GET body to ``dest`` (an ``ObjectStoragePath``) atomically, retrying the whole transfer.

        A dropped connection or an md5/size mismatch retries the transfer; nothing half-written
        is ever visible under ``dest``. Returns a :class:`~airflow_provider_hpc.storage.StoredFile`.
        """
        from airflow_provider_hpc.storage import write_atomically

        def write(response: requests.Response) -> Any:
            return write_atomically(
                response.iter_content(CHUNK_SIZE), dest,
                expected_size=expected_size, expected_md5=expected_md5, max_bytes=max_bytes,
            )

        return self.fetch("GET", path, write, params=params, headers=headers)


def read_capped(response: requests.Response, limit: int) -> bytes:
    """Read at most about ``limit`` bytes of a streaming body."""
    body = bytearray()
    for chunk in response.iter_content(64 * 1024):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body)


def next_page_link(page: Mapping[str, Any], error_class: type[HpcApiError], endpoint: str) -> str | None:
    """Return the ``next`` link of a page, ``None`` on the last page, or raise when it is not a URL."""
    following = page.get("next")
    if following is None or following == "":
        return None
    if not isinstance(following, str):
        raise error_class(f"The page's next link is not a URL: {str(following)[:100]!r}", endpoint=endpoint)
    return following


def page_results(page: Any, error_class: type[HpcApiError], endpoint: str) -> list[Any]:
    """Return the ``results`` list of one page, or raise a clear error when the page is malformed."""
    if not isinstance(page, dict) or not isinstance(page.get("results"), list):
        raise error_class("A page of the list has no 'results' list", endpoint=endpoint)
    return page["results"]


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

    @property
    def _key(self) -> tuple:
        return _origin(self.settings.base_url)

    @asynccontextmanager
    async def session_lease(self) -> AsyncIterator[aiohttp.ClientSession]:
        """Hold the shared session for the duration of the block (a trigger holds it for its life)."""
        loop = asyncio.get_running_loop()
        # get() first: setdefault() would build a pool and a weak reference at every request.
        pool = _SESSIONS.get(loop) or _SESSIONS.setdefault(loop, _LoopSessions())
        key = self._key
        session = pool.sessions.get(key)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300),
                headers={"User-Agent": "airflow-provider-hpc"},
            )
            pool.sessions[key] = session
        pool.users[key] = pool.users.get(key, 0) + 1
        try:
            yield session
        finally:
            pool.users[key] -= 1
            if pool.users[key] <= 0 and pool.sessions.get(key) is session:
                del pool.sessions[key]
                del pool.users[key]
                await asyncio.shield(session.close())

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Send a request under the retry policy and return its JSON body."""
        url = self.url(path)
        endpoint = _endpoint(method, url)
        idempotent = method.upper() in ("GET", "HEAD") if idempotent is None else idempotent
        timeout = aiohttp.ClientTimeout(
            sock_connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
        )
        ssl_setting = _ssl_for(self.settings.verify) if url.startswith("https") else True

        async with self.session_lease() as session:

            async def attempt() -> Any:
                try:
                    async with session.request(
                        method, url, params=params, headers=headers, timeout=timeout, ssl=ssl_setting
                    ) as response:
                        body = await _read_capped(response, MAX_JSON_BYTES + 1)
                        if response.status >= 400:
                            raise self._http_error(
                                response.status, body, endpoint, response.headers.get("Retry-After"), idempotent
                            )
                        return self.parse_json(body, endpoint, response.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    raise self._transport_error(exc, endpoint, idempotent) from None

            return await self.retrier.acall(endpoint, attempt)

    async def get_json(self, path: str, params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> Any:
        """GET a JSON document."""
        return await self.request_json("GET", path, params=params, headers=headers)


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read a body whole when it announces a sane length, else chunk by chunk up to ``limit``."""
    if response.content_length is not None and response.content_length <= limit:
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


def md5_of(chunks: Iterable[bytes]) -> str:
    """Return the hex md5 of a byte stream."""
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
