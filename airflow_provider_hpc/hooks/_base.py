"""What both hooks share: reading the Airflow connection and building the sync and async transports."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.hooks._http import (
    AsyncTransport,
    RetryPolicy,
    SyncTransport,
    TransportSettings,
    connection_extra,
)

if TYPE_CHECKING:
    from airflow.sdk import Connection


def mask(secret: str | None) -> None:
    """Register a secret with Airflow's secrets masker so no log line can show it."""
    if not secret:
        return
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older task SDKs
        from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]
    mask_secret(secret)


class HpcHttpHook(BaseHook):
    """
    Base of the Muse and Rescale hooks: one Airflow connection, one sync and one async transport.

    :param conn_id: the Airflow connection id.
    :param retry: a retry policy overriding the connection's ``max_attempts`` extra.
    """

    error_class: type[HpcApiError] = HpcApiError
    default_url: str | None = None
    default_path: str = ""

    def __init__(self, conn_id: str, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.retry_policy = retry
        self._async: AsyncTransport | None = None

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection (read once per hook)."""
        conn = self.get_connection(self.conn_id)
        self._register_secrets(conn)
        return conn

    def _settings(self, conn: Connection) -> TransportSettings:
        settings = TransportSettings.from_connection(
            conn, default_url=self.default_url, default_path=self.default_path
        )
        if self.retry_policy is not None:
            settings = TransportSettings(**{**settings.__dict__, "retry": self.retry_policy})
        return settings

    def _register_secrets(self, conn: Connection) -> None:
        for secret in self._secrets_of(conn):
            mask(secret)

    def _secrets_of(self, conn: Connection) -> list[str]:
        """Return the connection's secrets (password, token extras); subclasses may add more."""
        candidates = (conn.password, connection_extra(conn, "token"), connection_extra(conn, "api_key"))
        return [str(s) for s in candidates if s]

    @cached_property
    def transport(self) -> SyncTransport:
        """The blocking transport used in workers."""
        conn = self.connection
        return SyncTransport(
            self._settings(conn), error_class=self.error_class, log=self.log, secrets=self._secrets_of(conn)
        )

    async def async_transport(self) -> AsyncTransport:
        """The non-blocking transport used in triggers; reads the connection with ``aget_connection``."""
        if self._async is None:
            conn = await self.aget_connection(self.conn_id)
            self._register_secrets(conn)
            self._async = AsyncTransport(
                self._settings(conn), error_class=self.error_class, log=self.log, secrets=self._secrets_of(conn)
            )
            self._on_async_connection(conn)
        return self._async

    @property
    def known_secrets(self) -> list[str]:
        """The secrets of the transports built so far, for redacting error text (never reads the connection)."""
        secrets: list[str] = []
        for transport in (self.__dict__.get("transport"), self._async):
            if transport is not None:
                secrets += [s for s in transport.secrets if s not in secrets]
        return secrets

    def _on_async_connection(self, conn: Connection) -> None:
        """Let a subclass read what it needs from the connection fetched asynchronously."""

    @property
    def base_url(self) -> str:
        """The service's base URL, ending with ``/``."""
        return self.transport.settings.base_url

    def close(self) -> None:
        """Close the pooled connections of the sync transport."""
        if "transport" in self.__dict__:
            self.transport.close()
