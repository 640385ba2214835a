"""Blocking HTTP for workers: ``requests`` under the shared retry policy, same-origin redirects only."""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urljoin

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from airflow_provider_hpc.transport.base import CHUNK_SIZE, BaseTransport, BodyBudget, TransportSettings, UploadFile
from airflow_provider_hpc.transport import errors
from airflow_provider_hpc.transport.errors import TransportError, redact
from airflow_provider_hpc.transport.multipart import MultipartBody
from airflow_provider_hpc.transport.paging import MAX_PAGES, PageWalk
from airflow_provider_hpc.transport.urls import endpoint_of, origin

T = TypeVar("T")


class _SameOriginSession(requests.Session):
    """
    A session that follows redirects only on the origin it was sent to.

    ``requests`` drops the ``Authorization`` header on a redirect to another host, but a 307/308
    sends the body again, and Muse's token and password travel in the body. A redirect elsewhere
    (or from ``http`` to ``https``) is not followed: the caller gets the 3xx and says so.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        """Return where a redirect leads when it stays on the same origin, else ``None`` (not followed)."""
        target = super().get_redirect_target(resp)
        if target and origin(urljoin(resp.url, target)) != origin(resp.url):
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
        # With trust_env, requests walks the whole environment twice per request for proxy
        # variables (a fifth of the client's CPU per file of a harvest) and reads ~/.netrc, whose
        # basic auth would replace the service's own credentials. The proxies (and no_proxy) are
        # read once, here, for the connection's origin; the CA bundle variables are already in
        # ``settings.verify`` (see hooks/_base.py).
        self.session.trust_env = False
        self.session.proxies.update(requests.utils.get_environ_proxies(settings.base_url))

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
        total_timeout: float | None = None,
        paced: bool = False,
    ) -> Any:
        """
        Send a request and hand the streaming response to ``handle``, all under the retry policy.

        A failure while ``handle`` reads the body (a dropped connection, a retryable
        :class:`~.errors.TransportError` such as an md5 mismatch) retries the whole exchange when the request
        is idempotent. ``handle`` reads the body with :func:`body_chunks` or :func:`read_capped`,
        which keep it to ``total_timeout`` and, for a ``paced`` download, to the settings'
        ``min_download_rate``. Both count from the moment the answer's headers arrive: the upload
        and the server's own work before it answers are not the answer's slowness.

        :param idempotent: whether a retry may repeat the request; defaults to ``True`` for GET only.
        :param total_timeout: seconds reading the answer may take (``None``: no total limit).
        :param paced: hold the body to ``min_download_rate`` (file downloads).
        """
        url = self.url(path)
        endpoint = endpoint_of(method, url)
        idempotent = method.upper() in ("GET", "HEAD") if idempotent is None else idempotent
        settings = self.settings

        def attempt() -> Any:
            budget = partial(
                BodyBudget, self.error_class, endpoint, timeout=total_timeout,
                min_rate=(settings.min_download_rate or None) if paced else None, window=settings.rate_window,
            )
            response = self._send(method, url, endpoint, idempotent, params, data, json_body, files, headers, budget)
            with response:
                try:
                    return handle(response)
                except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                    raise self._transport_error(exc, endpoint, idempotent) from None
                except TransportError as exc:
                    if exc.retryable and not idempotent:
                        exc.retryable = False
                    raise

        return self.retrier.call(endpoint, attempt)

    def _send(
        self, method, url, endpoint, idempotent, params, data, json_body, files, headers,
        budget: Callable[[], BodyBudget],
    ) -> requests.Response:
        upload = MultipartBody(data or {}, files) if files else None
        if upload is not None:
            data, headers = upload, {**(headers or {}), "Content-Type": upload.content_type}
        with ExitStack() as stack:
            if upload is not None:
                stack.callback(upload.close)
            try:
                # verify is passed on every request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE
                # override the session's own setting, which would ignore the connection's choice.
                response = self.session.request(
                    method, url, params=params, data=data, json=json_body,
                    headers=headers, timeout=self.timeout, stream=True, verify=self.settings.verify,
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise self._transport_error(exc, endpoint, idempotent) from None
            except requests.RequestException as exc:  # too many redirects, an invalid URL or header...
                detail = redact(f"{type(exc).__name__}: {exc}", self.secrets)[:300]
                raise self.error_class(f"Request failed: {detail}", endpoint=endpoint) from None
            except OSError as exc:  # an input file that could not be read, or changed while sent
                raise self.error_class(f"Could not send the request's files: {exc}", endpoint=endpoint) from None
        # Started now, headers in hand; read by body_chunks and read_capped, the error answer's included.
        response.hpc_budget = budget()
        response.hpc_sent = upload  # what was sent of each file (size, md5), for the caller to check
        if response.status_code >= 400:
            with response:
                try:
                    body = read_capped(response, errors.ERROR_BODY_BYTES)
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
        endpoint = endpoint_of(method, self.url(path))

        def read_json(response: requests.Response) -> Any:
            return self.parse_json(read_capped(response, errors.MAX_JSON_BYTES + 1), endpoint, response.status_code)

        # A request that may be repeated is cut at request_timeout; one that creates work is not:
        # giving up on its answer would leave the work done and the retry doing it again.
        if kwargs.get("idempotent", method.upper() in ("GET", "HEAD")):
            kwargs.setdefault("total_timeout", self.settings.request_timeout)
        return self.fetch(method, path, read_json, **kwargs)

    def send_files(
        self,
        method: str,
        path: str,
        files: Sequence[UploadFile],
        *,
        fields: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        check: Callable[[Any, MultipartBody], Any] = lambda answer, sent: answer,
    ) -> Any:
        """
        Send files (streamed, see :class:`~.multipart.MultipartBody`) and return ``check(answer, sent)``.

        ``check`` compares the JSON answer with what was sent (sizes, md5s) inside the attempt, so a
        retryable error it raises (a :class:`TransferIntegrityError`) sends the files again. No total
        time limit applies (a large file takes what it takes); the answer is bounded as any.
        """
        endpoint = endpoint_of(method, self.url(path))

        def read_json(response: requests.Response) -> Any:
            answer = self.parse_json(read_capped(response, errors.MAX_JSON_BYTES + 1), endpoint, response.status_code)
            return check(answer, response.hpc_sent)

        return self.fetch(method, path, read_json, data=fields, files=files, headers=headers, idempotent=idempotent)

    def get_json(self, path: str, params: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> Any:
        """GET a JSON document."""
        return self.request_json("GET", path, params=params, headers=headers)

    def get_bytes(self, path: str, *, limit: int, headers: Mapping[str, str] | None = None) -> bytes | None:
        """
        GET a small body whole, or ``None`` when it holds more than ``limit`` decoded bytes.

        Bounded like a JSON answer (``request_timeout``, ``limit``): for a file shown in a log,
        never for a file stored (see :meth:`download`).
        """

        def read(response: requests.Response) -> bytes | None:
            body = read_capped(response, limit + 1)
            return body if len(body) <= limit else None

        return self.fetch("GET", path, read, headers=headers, total_timeout=self.settings.request_timeout)

    def iter_pages(
        self, path: str, *, page_size: int = 100, headers: Mapping[str, str] | None = None, max_pages: int = MAX_PAGES
    ) -> Iterator[Any]:
        """Yield every item of a paginated list (see :class:`~.paging.PageWalk` for when it stops)."""
        walk = PageWalk(self.url(path), resolve=self.url, error_class=self.error_class, page_size=page_size, max_pages=max_pages)
        while (url := walk.next_url()) is not None:
            yield from walk.take(self.get_json(url, headers=headers))

    def download(
        self,
        path: str,
        sink: Callable[[Iterable[bytes | memoryview]], T],
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        """
        Stream a GET body into ``sink`` (which writes and checks it), retrying the whole transfer.

        A dropped connection, or a retryable error the sink raises (an md5 or size mismatch),
        starts the transfer again; the sink must leave nothing behind when it raises (see
        :func:`airflow_provider_hpc.storage.file_sink`).

        :param sink: takes the body's chunks and returns what it stored. A chunk is valid only
            until the next one is asked for (a plain body is read into one reused buffer): a
            sink that keeps one copies it (``bytes(chunk)``).
        """
        return self.fetch(
            "GET", path, lambda response: sink(body_chunks(response)), params=params, headers=headers, paced=True
        )


def body_chunks(response: requests.Response, size: int = CHUNK_SIZE) -> Iterator[bytes | memoryview]:
    """
    Yield a streaming body's decoded chunks as they arrive (at most about ``size`` bytes each).

    A chunk is only valid until the next one is asked for: a plain body (no content coding, a
    ``Content-Length``) is read into one reused buffer, so a caller that keeps a chunk longer
    (another thread, a list) copies it first. A compressed body is counted as it inflates, never
    inflated whole first, and a server that drips bytes is seen dripping (the response's
    :class:`~.base.BodyBudget`, set by :meth:`SyncTransport.fetch`, cuts it).
    """
    budget: BodyBudget | None = getattr(response, "hpc_budget", None)
    message = _plain_message(response)
    if message is not None:
        yield from _plain_chunks(response, message, size, budget)
        return
    read = _read_some(response.raw)
    parts: list[bytes] = []
    held = 0
    while piece := read(size):
        if budget is not None:
            budget.take(len(piece))
        # One socket read is a TLS record or so: gathered to about ``size`` before going on, so a
        # large file costs a few hundred writes and hash updates, not tens of thousands.
        parts.append(piece)
        held += len(piece)
        if held >= size:
            yield parts[0] if len(parts) == 1 else b"".join(parts)
            parts, held = [], 0
    if parts:
        yield b"".join(parts)


def _plain_message(response: requests.Response) -> http.client.HTTPResponse | None:
    """Return the ``http.client`` answer under a body that can be read straight from its socket, else ``None``."""
    raw = response.raw
    message = getattr(raw, "_fp", None)
    if not isinstance(message, http.client.HTTPResponse) or message.chunked or message.length is None:
        return None
    if response.headers.get("Content-Encoding", "identity").strip().lower() not in ("", "identity"):
        return None  # compressed: urllib3 inflates it, bounded (see _read_some)
    reader = message.fp
    if reader is None or not hasattr(reader, "readinto1") or raw.tell() != 0:
        return None
    return message


def _plain_chunks(
    response: requests.Response, message: http.client.HTTPResponse, size: int, budget: BodyBudget | None
) -> Iterator[memoryview]:
    """
    Yield a plain body of known length, read from the socket's buffered reader into one reused buffer.

    urllib3's ``read1`` costs a few Python calls, a new ``bytes`` and a copy per TLS record (16 KiB),
    and gathering the records to ``size`` another copy: 0.21 to 0.60 CPU s per 256 MiB, against
    0.16 s here (docs/benchmarks.md, "Changes for the transfer and harvest targets"), where each
    record is decrypted straight into the buffer. ``readinto1`` returns
    whatever one socket read brings, so the budget still sees a dripping server at every record.
    A body cut short is urllib3's error, as on its own read path; a complete one hands the
    connection back to the pool.
    """
    reader: Any = message.fp
    left = int(message.length or 0)
    buffer = memoryview(bytearray(max(1, min(size, left))))
    while left:
        filled, end = 0, min(len(buffer), left)
        while filled < end:
            got = _read_into(reader, buffer[filled:end])
            if not got:
                raise urllib3.exceptions.ProtocolError(
                    f"Connection broken: the body ended {left - filled} bytes short of its Content-Length"
                )
            if budget is not None:
                budget.take(got)
            filled += got
        left -= filled
        message.length = left  # http.client's own count, as if it had read the bytes itself
        yield buffer[:filled]
    message.close()  # the socket stays open: the body is complete, the connection reusable
    response.raw.release_conn()


def _read_into(reader: Any, view: memoryview) -> int:
    """One socket read into ``view``; socket errors become urllib3's, as its own reads raise them."""
    try:
        return reader.readinto1(view)
    except TimeoutError as exc:
        raise urllib3.exceptions.ReadTimeoutError(None, None, "Read timed out.") from exc  # type: ignore[arg-type]
    except ssl.SSLError as exc:
        raise urllib3.exceptions.SSLError(exc) from exc
    except OSError as exc:
        raise urllib3.exceptions.ProtocolError(f"Connection broken: {exc!r}", exc) from exc


def _read_some(raw: Any) -> Callable[[int], bytes]:
    """Return a reader giving what one socket read brings, decoded (whatever is there, up to ``n``)."""
    # urllib3 2.6+ bounds the decoded bytes one read1 gives (pinned in the provider's dependencies).
    fp = getattr(raw, "_fp", None)
    if hasattr(raw, "read1") and fp is not None and hasattr(fp, "read1"):
        return lambda n: raw.read1(n, decode_content=True)
    # A body that is not a socket (a test double) has no read1: plain reads, same decoding.
    return lambda n: raw.read(n, decode_content=True)


def read_capped(response: requests.Response, limit: int) -> bytes:
    """Read at most about ``limit`` decoded bytes of a streaming body."""
    body = bytearray()
    for chunk in body_chunks(response, 64 * 1024):
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body)
