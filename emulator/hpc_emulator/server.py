"""
Run the emulator on a real socket, in a background thread: for tests, the demo and the CLI.

``EmulatorServer`` binds a socket itself (port 0 picks a free one), so the URLs are known before
the first request, and serves it with uvicorn. Stopping it ends every job command the emulator
started and removes the data folder when the server made it (or was told to).
"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI

from hpc_emulator.app import close_engines, create_app
from hpc_emulator.config import DEMO_USER, Counters, EmulatorConfig
from hpc_emulator.tls import TlsFiles, make_tls_files

START_TIMEOUT = 30.0
# How long a stop waits for requests in flight (a slow download, say) before it cuts them.
GRACEFUL_SHUTDOWN_SECONDS = 5.0


class _ThreadServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the thread that owns the process."""

    def install_signal_handlers(self) -> None:  # pragma: no cover - older uvicorn versions
        """Install nothing: the server runs outside the main thread."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """
        Cut idle TLS connections at once, then shut down as uvicorn does.

        uvicorn closes an idle keep-alive connection politely; over TLS that means waiting for
        the client's ``close_notify``, which a client keeping the connection in its pool never
        sends: every stop would then last the whole graceful-shutdown timeout.
        """
        if self.config.is_ssl:
            for connection in list(self.server_state.connections):
                cycle = getattr(connection, "cycle", None)
                transport = getattr(connection, "transport", None)
                if transport is not None and (cycle is None or cycle.response_complete):
                    transport.abort()
        await super().shutdown(sockets)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket on ``host:port`` (``0`` picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class EmulatorServer:
    """
    The emulator on a real socket: ``with EmulatorServer(config) as emulator: ... emulator.muse_url``.

    :param config: what to serve. When not given, the defaults, with a temporary data folder the
        server makes now and removes on stop.
    :param host: the address to bind; loopback by default.
    :param port: the port to bind; ``0`` picks a free one.
    :param delete_data_dir: remove ``config.data_dir`` on stop, as a temporary folder.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delete_data_dir: bool = False,
    ) -> None:
        self._own_data_dir: Path | None = None
        if config is None:
            config = EmulatorConfig(data_dir=Path(tempfile.mkdtemp(prefix="hpc-emulator-")))
            delete_data_dir = True
        if delete_data_dir:
            self._own_data_dir = Path(config.data_dir)
        self.config = config
        self.host = host
        self.counters = Counters()
        self.tls: TlsFiles | None = None
        self._sock = bind_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._app: FastAPI | None = None

    # -- where it is --------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http(s)://HOST:PORT`` without a trailing ``/``."""
        scheme = "https" if self.config.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def muse_url(self) -> str:
        """The Muse base URL, ending in ``/api/`` as the real service's does."""
        return f"{self.base_url}/api/"

    @property
    def rescale_url(self) -> str:
        """The Rescale platform URL (the hook adds ``/api/...``)."""
        return self.base_url

    @property
    def deletes_data_dir(self) -> bool:
        """Whether stopping removes the data folder (a temporary one)."""
        return self._own_data_dir is not None

    @property
    def ca_path(self) -> Path | None:
        """The CA certificate clients must trust when TLS is on."""
        return self.tls.ca_path if self.tls else None

    def connection_extra(self) -> dict[str, Any]:
        """The extras both Airflow connections need: the CA to trust when TLS is on."""
        return {"verify": str(self.ca_path)} if self.ca_path else {}

    def muse_connection(self, user: str = DEMO_USER) -> dict[str, Any]:
        """An Airflow connection (JSON form) for the Muse side with one configured user."""
        return {
            "conn_type": "muse",
            "host": self.muse_url,
            "login": user,
            "password": self.config.muse_users[user].password,
            "extra": self.connection_extra(),
        }

    def rescale_connection(self, api_key: str | None = None) -> dict[str, Any]:
        """An Airflow connection (JSON form) for the Rescale side with one accepted API key."""
        key = api_key or sorted(self.config.rescale_api_keys)[0]
        return {"conn_type": "rescale", "host": self.rescale_url, "password": key, "extra": self.connection_extra()}

    def airflow_conn_env(self) -> dict[str, str]:
        """``AIRFLOW_CONN_MUSE_DEFAULT`` and ``AIRFLOW_CONN_RESCALE_DEFAULT`` pointing here."""
        return {
            "AIRFLOW_CONN_MUSE_DEFAULT": json.dumps(self.muse_connection(_first_user(self.config))),
            "AIRFLOW_CONN_RESCALE_DEFAULT": json.dumps(self.rescale_connection()),
        }

    # -- life cycle ---------------------------------------------------------------------------

    def _uvicorn_config(self) -> uvicorn.Config:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        ssl_options: dict[str, Any] = {}
        if self.config.tls:
            self.tls = make_tls_files(self.config.data_dir / "tls", extra_hosts=(self.host,))
            ssl_options = {"ssl_certfile": str(self.tls.cert_path), "ssl_keyfile": str(self.tls.key_path)}
        self._app = create_app(self.config, self.counters)
        return uvicorn.Config(
            self._app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            # Keep-alive longer than any client's poll interval, so pooled connections are reused.
            timeout_keep_alive=75,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            **ssl_options,
        )

    def start(self) -> EmulatorServer:
        """Serve in a background thread; return once the server accepts requests."""
        self._server = _ThreadServer(self._uvicorn_config())
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="hpc-emulator", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"The emulator did not start on {self.base_url}")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        """Block until the server stops (it runs in a background thread)."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=0.5)

    def stop(self) -> None:
        """Stop serving, end every job command, and remove the data folder the server made."""
        # Commands first: a request waiting on one (an off-cluster run) then ends at once, and
        # no job starts while the server winds down.
        if self._app is not None:
            close_engines(self._app)
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=START_TIMEOUT + GRACEFUL_SHUTDOWN_SECONDS)
        if self._app is not None:
            # Again, in case a command started in between or the server's shutdown did not finish.
            close_engines(self._app, wait=GRACEFUL_SHUTDOWN_SECONDS)
        self._cleanup()

    def _cleanup(self) -> None:
        self._sock.close()
        if self._own_data_dir is not None:
            shutil.rmtree(self._own_data_dir, ignore_errors=True)

    def __enter__(self) -> EmulatorServer:
        """Start serving; the block's end stops the server."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop the server, whatever happened in the block."""
        self.stop()


def _first_user(config: EmulatorConfig) -> str:
    if not config.muse_users:
        raise ValueError("The emulator has no Muse user to build a connection with")
    return DEMO_USER if DEMO_USER in config.muse_users else sorted(config.muse_users)[0]
