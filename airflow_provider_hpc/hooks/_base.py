"""What both hooks share: reading the Airflow connection into transport settings, secrets, both transports."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk import BaseHook

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.hooks._forms import connection_form_widgets, ui_field_behaviour
from airflow_provider_hpc.hooks._shared_connection import read_shared
from airflow_provider_hpc.transport.aio import AsyncTransport
from airflow_provider_hpc.transport.base import MAX_KEEPALIVE_TIMEOUT, TransportSettings
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.transport.sync import SyncTransport

if TYPE_CHECKING:
    from airflow.sdk import Connection


_CA_BUNDLE_ENV = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def mask(secret: str | None) -> None:
    """Register a secret with Airflow's secrets masker so no log line can show it."""
    if not secret:
        return
    from airflow.sdk.log import mask_secret

    mask_secret(secret)


async def amask(secret: str | None) -> None:
    """Register a secret with Airflow's secrets masker without blocking the event loop (triggers)."""
    if not secret:
        return
    from airflow.sdk.log import amask_secret

    await amask_secret(secret)


def clean_secret(value: Any, what: str, conn_id: str) -> str | None:
    """
    Return a password, API key or token without the whitespace around it, or ``None`` when empty.

    A stray newline pasted with a key would travel in a header or a form and show, escaped, in
    error text where neither redaction nor Airflow's masker recognises it. A control character
    inside the value is refused, without repeating the value.

    :param value: the secret as the connection holds it.
    :param what: what it is (``password``, ``API key``...), for the error.
    :param conn_id: the connection, for the error.
    """
    if value is None:
        return None
    text = str(value).strip()
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise HpcApiError(
            f"Connection {conn_id!r}: the {what} holds a control character (a pasted line break?); "
            "enter it again without one"
        )
    return text or None


def settings_from_connection(
    conn: Connection, *, default_url: str | None = None, default_path: str = "", extra: Mapping[str, Any] | None = None
) -> TransportSettings:
    """
    Read the transport settings of an Airflow connection.

    ``host`` may be a whole base URL (``http://147.100.179.250/api/``) or a bare host name, in
    which case ``port``, ``schema`` (the path) and the ``scheme`` extra complete it.

    :param conn: the Airflow connection.
    :param default_url: the base URL when the connection gives no host (Rescale's platform).
    :param default_path: the path after a bare host name (``api`` for Muse).
    :param extra: the connection's extras already parsed (default: parsed here).
    """
    extras = conn.extra_dejson if extra is None else extra

    def field(name: str, default: Any = None) -> Any:
        return extra_value(extras, conn.conn_type, name, default)

    host = (conn.host or "").strip()
    if not host:
        if not default_url:
            raise HpcApiError(f"Connection {conn.conn_id!r} has no host (the service's base URL)")
        base = default_url
    elif "://" in host:
        base = host
    else:
        scheme = str(field("scheme") or "https").strip().lower()
        port = f":{conn.port}" if conn.port else ""
        path = (conn.schema or default_path).strip("/")
        base = f"{scheme}://{host}{port}/{path}"
    parts = urlsplit(base)
    if parts.username is not None or parts.password is not None:
        # In the URL they would travel into log lines, XCom values and UI links; say nothing of them.
        raise HpcApiError(
            f"Connection {conn.conn_id!r}: the host URL holds credentials; put them in the login and password fields"
        )
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        # Name the scheme only: a URL may carry credentials.
        raise HpcApiError(
            f"Connection {conn.conn_id!r}: the host is not an http(s) URL (scheme {parts.scheme!r}); "
            "give the service's base URL, e.g. https://platform.rescale.com or http://147.100.179.250/api/"
        )
    if not base.endswith("/"):
        base += "/"
    policy = RetryPolicy.from_dict({"max_attempts": _number(field("max_attempts"), int)})
    defaults = TransportSettings(base_url=base)
    min_rate = _number(field("min_download_rate"), float)
    return TransportSettings(
        base_url=base,
        verify=_verify_setting(conn, extras),
        connect_timeout=_number(field("connect_timeout"), float) or defaults.connect_timeout,
        read_timeout=_number(field("read_timeout"), float) or defaults.read_timeout,
        request_timeout=_number(field("request_timeout"), float) or defaults.request_timeout,
        min_download_rate=defaults.min_download_rate if min_rate is None else max(0.0, min_rate),
        rate_window=_number(field("rate_window"), float) or defaults.rate_window,
        keepalive_timeout=min(
            MAX_KEEPALIVE_TIMEOUT,
            max(1.0, _number(field("keepalive_timeout"), float) or defaults.keepalive_timeout),
        ),
        retry=policy,
    )


def _verify_setting(conn: Connection, extra: Mapping[str, Any]) -> bool | str:
    """
    Return what TLS verification uses, by one rule for the sync and async transports.

    ``verify`` false turns it off; ``ca_bundle`` (or a path in ``verify``) names the CA file; with
    neither, ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` from the environment, else the system's
    store and certifi's. Turning verification off while naming a CA file is a contradiction,
    refused; a CA file that is not there is refused before any request.
    """
    verify = _as_verify(extra_value(extra, conn.conn_type, "verify", True))
    ca_bundle = str(extra_value(extra, conn.conn_type, "ca_bundle") or "").strip()
    if ca_bundle and verify is False:
        raise HpcApiError(
            f"Connection {conn.conn_id!r} sets verify false and a ca_bundle: drop one "
            "(verify false trusts any certificate, so the CA bundle would be ignored)"
        )
    if verify is True:
        verify = ca_bundle or next((os.environ[name] for name in _CA_BUNDLE_ENV if os.environ.get(name)), True)
    if isinstance(verify, str) and not os.path.exists(verify):
        raise HpcApiError(f"Connection {conn.conn_id!r}: the CA bundle {verify!r} does not exist")
    return verify


def extra_value(extra: Mapping[str, Any], conn_type: str, name: str, default: Any = None) -> Any:
    """
    Return the extra ``name`` of a connection's parsed extras, or ``default`` when it is missing or empty.

    Older connection forms stored their fields as ``extra__{conn_type}__{name}``: both spellings are read.
    """
    for key in (name, f"extra__{conn_type}__{name}"):
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


class HpcHttpHook(BaseHook):
    """
    Base of the Muse and Rescale hooks: one Airflow connection, one sync and one async transport.

    :param conn_id: the Airflow connection id.
    :param retry: a retry policy overriding the connection's ``max_attempts`` extra.
    """

    conn_type: str
    error_class: type[HpcApiError] = HpcApiError
    default_url: str | None = None
    default_path: str = ""

    def __init__(self, conn_id: str, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conn_id = conn_id
        self.retry_policy = retry
        self._async: AsyncTransport | None = None
        self._parsed_extras: tuple[Connection, dict[str, Any]] | None = None
        self._warned = False

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Return the connection form's labels, placeholders and hidden fields (for forms that ask the hook)."""
        return ui_field_behaviour(cls.conn_type)

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Return the connection form's extra fields as WTForms fields (for forms that ask the hook)."""
        return connection_form_widgets(cls.conn_type)

    @cached_property
    def connection(self) -> Connection:
        """The Airflow connection (read once per hook)."""
        conn = self.get_connection(self.conn_id)
        self._register_secrets(conn)
        return conn

    def _extras(self, conn: Connection) -> dict[str, Any]:
        """
        The connection's extras, parsed once per connection object.

        Each ``extra_dejson`` also registers the sensitive extras with Airflow's masker, which in a
        triggerer is a round trip to its supervisor: a dozen per trigger start, thousands of triggers.
        """
        if self._parsed_extras is None or self._parsed_extras[0] is not conn:
            self._parsed_extras = (conn, conn.extra_dejson or {})
        return self._parsed_extras[1]

    def extra(self, conn: Connection, name: str, default: Any = None) -> Any:
        """Return the extra ``name`` of ``conn`` (either spelling), or ``default`` when missing or empty."""
        return extra_value(self._extras(conn), conn.conn_type, name, default)

    def _settings(self, conn: Connection) -> TransportSettings:
        settings = settings_from_connection(
            conn, default_url=self.default_url, default_path=self.default_path, extra=self._extras(conn)
        )
        if self.retry_policy is not None:
            settings = replace(settings, retry=self.retry_policy)
        self._warn_once(conn, settings)
        return settings

    def _warn_once(self, conn: Connection, settings: TransportSettings) -> None:
        """Say once per hook when the connection gives up TLS's protection."""
        if self._warned:
            return
        self._warned = True
        if settings.verify is False:
            self.log.warning(
                "Connection %r: TLS certificates are not verified (verify false); anyone on the network "
                "path can read and change the exchange", self.conn_id,
            )
        if settings.base_url.lower().startswith("http://") and self._secrets_of(conn):
            self.log.warning(
                "Connection %r: credentials go over plain http; use https where the service offers it. Host: %s",
                self.conn_id, settings.base_url,
            )

    def _register_secrets(self, conn: Connection) -> None:
        for secret in self._secrets_of(conn):
            mask(secret)

    def _secrets_of(self, conn: Connection) -> list[str]:
        """Return the connection's secrets (password, token extras), stripped; subclasses may add more."""
        candidates = {
            "password": conn.password,
            "token": self.extra(conn, "token"),
            "API key": self.extra(conn, "api_key"),
        }
        cleaned = (clean_secret(value, what, conn.conn_id) for what, value in candidates.items())
        return [secret for secret in cleaned if secret]

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
            # One read per event loop and connection id: a triggerer's thousands of hooks share it.
            shared = await read_shared(self.conn_id, self.aget_connection)
            conn = shared.conn
            # Parsed without the blocking masker call; the sync code below then reads this parse.
            self._parsed_extras = (conn, shared.extras)
            secrets = self._secrets_of(conn)
            await shared.mask(secrets, amask)
            self._async = AsyncTransport(self._settings(conn), error_class=self.error_class, log=self.log, secrets=secrets)
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
