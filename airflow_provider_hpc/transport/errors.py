"""What a failed exchange says: the error base class, the server's error fields, redacted excerpts."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp
import requests
import urllib3.exceptions

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
ERROR_EXCERPT_CHARS = 300
# A JSON answer larger than this is refused: every documented JSON answer is a few KiB.
MAX_JSON_BYTES = 32 * 1024 * 1024
#: Bytes read of an error answer: it is only ever shown as a short excerpt.
ERROR_BODY_BYTES = 64 * 1024


class TransportError(Exception):
    """
    A service answered with an error, or could not be reached.

    The provider's own error family (:class:`airflow_provider_hpc.exceptions.HpcApiError`) builds on
    this class, so the transport raises the hook's error class without knowing Airflow.

    :param message: what happened, in one sentence.
    :param status: the HTTP status, or ``None`` when no answer came back.
    :param endpoint: ``METHOD path`` of the request (never a query string, never a token).
    :param error: the server's own error text (Muse ``error``, Rescale ``detail``).
    :param error_type: the server's error type (Muse ``type``).
    :param more: the server's extra details (Muse ``more``).
    :param excerpt: a short excerpt of the body, for non-JSON answers such as a proxy's HTML page.
    :param retryable: whether trying the same request again may succeed.
    :param retry_after: seconds the server asked to wait (``Retry-After``), if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        endpoint: str | None = None,
        error: str | None = None,
        error_type: str | None = None,
        more: Any = None,
        excerpt: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.message = message
        self.status = status
        self.endpoint = endpoint
        self.error = error
        self.error_type = error_type
        self.more = more
        self.excerpt = excerpt
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts: int | None = None
        super().__init__(self._render())

    def note_attempts(self, attempts: int) -> None:
        """Record that the request was tried ``attempts`` times before this error was raised."""
        self.attempts = attempts
        self.args = (self._render(),)

    def __str__(self) -> str:
        return self._render()

    def _render(self) -> str:
        parts = [self.message]
        if self.attempts and self.attempts > 1:
            parts[0] += f" (gave up after {self.attempts} attempts)"
        if self.endpoint:
            parts.append(f"endpoint: {self.endpoint}")
        if self.status is not None:
            parts.append(f"status: {self.status}")
        if self.error:
            parts.append(f"server said: {self.error}")
        if self.error_type:
            parts.append(f"type: {self.error_type}")
        if self.more:
            parts.append(f"more: {self.more}")
        if self.excerpt:
            parts.append(f"body: {self.excerpt!r}")
        return " | ".join(parts)


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
    body: bytes, *, endpoint: str, status: int | None, error_class: type[TransportError], secrets: Iterable[str] = ()
) -> Any:
    """Parse a JSON body; an empty, HTML or truncated body becomes a clear ``error_class``."""
    if len(body) > MAX_JSON_BYTES:
        raise error_class(
            f"The answer is larger than {MAX_JSON_BYTES} bytes, too large for a JSON document",
            endpoint=endpoint,
            status=status,
        )
    # isspace() rather than strip(): the same test without copying the body at every poll.
    if not body or body.isspace():
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
    error_class: type[TransportError],
    retry_after: float | None,
    idempotent: bool,
    secrets: Iterable[str] = (),
) -> TransportError:
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


def request_never_sent(exc: BaseException) -> bool:
    """Whether a requests/aiohttp failure happened before the request could reach the server."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, aiohttp.ClientConnectorError)):
        return True
    if isinstance(exc, getattr(aiohttp, "ConnectionTimeoutError", ())):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        reason = getattr(exc.args[0], "reason", None)
        return isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError))
    return False


def is_certificate_error(exc: BaseException) -> bool:
    """Whether a failure is a TLS certificate that could not be verified (not worth a retry)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return True
    return isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)


def describe(exc: BaseException) -> str:
    """Say in a few words why an attempt failed (for the retry log line; secrets are already redacted)."""
    if isinstance(exc, TransportError):
        text = exc.message
        if exc.status and str(exc.status) not in text:
            text += f" (status {exc.status})"
        if exc.error:
            text += f": {exc.error[:200]}"
        return text
    return type(exc).__name__
