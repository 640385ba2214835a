"""
PostgreSQL as Airflow's metadata database: a fresh cluster in a temporary folder, or an existing server.

The fresh cluster is made with the operating system's binaries (``initdb``, ``postgres``), listens
on 127.0.0.1 on a free port with its unix socket in its own folder, and is owned by the unprivileged
``postgres`` user when run as root (PostgreSQL refuses to run as root). It can be stopped and
started again on the same port, so a test can take the database away for a while.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from dev.airflow_stack import free_port
from dev.cluster.processes import MARKER_ENV, ServerProcess

DATABASE = "airflow"
ROLE = "airflow"
START_TIMEOUT = 60.0
#: Settings for a throw-away test database: durability traded for speed, room for every pool.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "64MB",
}


class PostgresServer:
    """
    A metadata database for the deployment.

    :param bin_dir: the folder of ``initdb`` and ``postgres`` (None with ``existing_url``).
    :param marker: the deployment's id, put in the server's environment.
    :param existing_url: use this running server instead of making one (``postgresql://...``).
    """

    def __init__(self, bin_dir: Path | None, marker: str, *, existing_url: str | None = None) -> None:
        self.bin_dir = bin_dir
        self.marker = marker
        self.existing_url = existing_url
        self.folder: Path | None = None
        self.port = 0
        self._password = ""
        self._process: ServerProcess | None = None

    # ----- where it is ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://user:password@host:port/db`` (a secret: never print it, see :attr:`display_url`)."""
        if self.existing_url:
            return self.existing_url
        return f"postgresql://{ROLE}:{quote(self._password, safe='')}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def sqlalchemy_url(self) -> str:
        """The URL for ``[database] sql_alchemy_conn`` (the psycopg2 driver)."""
        return _with_scheme(self.url, "postgresql+psycopg2")

    @property
    def celery_result_backend(self) -> str:
        """The URL for ``[celery] result_backend`` (Celery's database backend on the same server)."""
        return "db+" + self.sqlalchemy_url

    @property
    def display_url(self) -> str:
        """The URL with its password masked, fit for a log line."""
        return mask_password(self.url)

    # ----- life cycle ----------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Make and start a fresh cluster (or check the existing server); return once it takes connections."""
        if self.existing_url:
            _wait_connectable(self.url, START_TIMEOUT)
            return self
        if self.folder is None:
            self._init_cluster()
        self._process = ServerProcess("postgres", self._server_argv(), self.folder / "postgres.log", self._env(),
                                      user=self._os_user()).start()
        try:
            _wait_connectable(self._admin_url(), START_TIMEOUT, self._process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self._process.log_tail()}") from None
        self._create_database()
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended), keeping its data to start again."""
        if self._process is not None:
            self._process.stop(signal.SIGINT, grace=30, whole_group=False)
            self._process = None

    def cleanup(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    @property
    def running(self) -> bool:
        """Whether this deployment's own server is alive (always True for an existing one)."""
        return bool(self.existing_url) or (self._process is not None and self._process.running)

    def log_tail(self, chars: int = 3000) -> str:
        """Return the end of the server's log."""
        return self._process.log_tail(chars) if self._process else ""

    # ----- internals -----------------------------------------------------------------------------

    def _os_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise RuntimeError("Running as root with neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")

    def _env(self) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C", MARKER_ENV: self.marker}

    @property
    def data_dir(self) -> Path | None:
        """The server's data folder (tables and WAL), or None for an existing server or before the start."""
        return None if self.folder is None else self.folder / "data"

    def _init_cluster(self) -> None:
        # Directly under /tmp (not a pytest folder of mode 0700) so the postgres user can reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="hpc-cluster-pg-"))
        self.port = free_port()
        self._password = secrets.token_urlsafe(18)
        password_file = self.folder / "pwfile"
        password_file.write_text(self._password + "\n")
        password_file.chmod(0o600)
        user = self._os_user()
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (self.folder, password_file):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        argv = [
            str(self.bin_dir / "initdb"), "-D", str(self.folder / "data"), "-U", ROLE, "--pwfile", str(password_file),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
        ]
        done = subprocess.run(argv, env=self._env(), user=user, capture_output=True, text=True, timeout=120)
        password_file.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    def _server_argv(self) -> list[str]:
        assert self.folder is not None
        argv = [str(self.bin_dir / "postgres"), "-D", str(self.folder / "data"), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.folder)]
        for name, value in SERVER_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _admin_url(self) -> str:
        return f"postgresql://{ROLE}:{quote(self._password, safe='')}@127.0.0.1:{self.port}/postgres"

    def _create_database(self) -> None:
        import psycopg2

        connection = psycopg2.connect(self._admin_url())
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            connection.close()


def _with_scheme(url: str, scheme: str) -> str:
    return urlunsplit(urlsplit(url)._replace(scheme=scheme))


def mask_password(url: str) -> str:
    """Return ``url`` with the password of its user info replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_info = f"{parts.username or ''}:***"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user_info}@{host}"))


def _wait_connectable(url: str, timeout: float, process: ServerProcess | None = None) -> None:
    import psycopg2

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and not process.running:
            raise AssertionError("PostgreSQL exited while starting")
        try:
            psycopg2.connect(url, connect_timeout=2).close()
            return
        except psycopg2.OperationalError as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"PostgreSQL at {mask_password(url)} did not accept connections: {error}") from None
        time.sleep(0.2)
