"""The Celery broker: a private ``redis-server`` on 127.0.0.1 (no persistence), or an existing Redis by URL."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from dev.airflow_stack import free_port
from dev.cluster.processes import MARKER_ENV, ServerProcess

START_TIMEOUT = 30.0


class RedisServer:
    """
    The broker of the CeleryExecutor.

    :param program: the ``redis-server`` program (None with ``existing_url``).
    :param marker: the deployment's id, put in the server's environment.
    :param existing_url: use this running Redis instead (``redis://host:port/0``).
    """

    def __init__(self, program: Path | None, marker: str, *, existing_url: str | None = None) -> None:
        self.program = program
        self.marker = marker
        self.existing_url = existing_url
        self.port = 0
        self.folder: Path | None = None
        self._process: ServerProcess | None = None

    @property
    def url(self) -> str:
        """The broker URL for ``[celery] broker_url``."""
        return self.existing_url or f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server (or check the existing one); return once it answers PING."""
        if not self.existing_url:
            self.folder = Path(tempfile.mkdtemp(prefix="hpc-cluster-redis-"))
            self.port = free_port()
            # No RDB snapshots, no AOF: a broker of throw-away test runs writes nothing to disk.
            argv = [str(self.program), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                    "--appendonly", "no", "--dir", str(self.folder), "--daemonize", "no", "--protected-mode", "yes"]
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), MARKER_ENV: self.marker}
            self._process = ServerProcess("redis", argv, self.folder / "redis.log", env).start()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process is not None and not self._process.running:
                raise AssertionError(f"redis-server exited while starting:\n{self._process.log_tail()}")
            try:
                if redis.Redis.from_url(self.url, socket_timeout=2).ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise AssertionError("Redis did not answer PING") from None
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the private server and remove its folder (an existing server is left alone)."""
        if self._process is not None:
            self._process.stop(grace=10)
            self._process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def log_tail(self, chars: int = 3000) -> str:
        """Return the end of the server's log."""
        return self._process.log_tail(chars) if self._process else ""
