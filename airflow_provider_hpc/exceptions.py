"""The provider's one exception family: every error it raises is an :class:`HpcApiError`."""

from __future__ import annotations

from typing import Any

from airflow.exceptions import AirflowException

from airflow_provider_hpc.transport.errors import TransportError


class HpcApiError(TransportError, AirflowException):
    """
    An HPC service answered with an error, or could not be reached.

    It carries what :class:`~airflow_provider_hpc.transport.errors.TransportError` does: ``message``,
    ``status``, ``endpoint``, the server's ``error``/``error_type``/``more``, a redacted ``excerpt``,
    whether it is ``retryable`` and the ``retry_after`` the server asked for.
    """


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
