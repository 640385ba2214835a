"""The provider's one exception family: every error it raises is an :class:`HpcApiError`."""

from __future__ import annotations

from typing import Any

from airflow.exceptions import AirflowException


class HpcApiError(AirflowException):
    """
    An HPC service answered with an error, or could not be reached.

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


class MuseApiError(HpcApiError):
    """The Muse web service answered with an error (its ``{"error", "more", "type"}`` body or a bad status)."""


class RescaleApiError(HpcApiError):
    """The Rescale API answered with an error (its ``detail`` body or a bad status)."""


class MuseJobFailed(HpcApiError):
    """A Muse cluster run ended badly (``cr`` is ``NOK``): the message names the key, job id and state."""


class RescaleRunFailed(HpcApiError):
    """A Rescale run completed without success (stopped, or a failure status reason)."""


class JobTimeout(HpcApiError):
    """A wait for a remote run outlived its ``timeout``; the remote run may still be going."""


class TransferIntegrityError(HpcApiError):
    """Downloaded bytes do not match the size or md5 the server announced; nothing was kept."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("retryable", True)
        super().__init__(message, **kwargs)


class UnsafePathError(HpcApiError, ValueError):
    """A path from the server (``relativePath``, zip member) would write outside the destination."""


class InvalidIdentifierError(HpcApiError, ValueError):
    """A name, key or id is not safe to put into a URL; no request was made."""
