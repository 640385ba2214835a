"""
What the production-shaped deployment needs from the machine, and one clear message when it is missing.

PostgreSQL and Redis are operating-system packages (Debian's ``postgresql`` and ``redis-server``),
not Python ones, so ``make test`` never needs them; only ``make cluster`` and ``make test-system``
do. An existing server given by URL (``HPC_CLUSTER_POSTGRES_URL``, ``HPC_CLUSTER_REDIS_URL``)
stands in for the binaries.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

POSTGRES_URL_ENV = "HPC_CLUSTER_POSTGRES_URL"
REDIS_URL_ENV = "HPC_CLUSTER_REDIS_URL"
POSTGRES_PROGRAMS = ("initdb", "postgres")
#: The Python distributions of the deployment (the ``system`` and ``test`` extras of pyproject.toml).
PYTHON_MODULES = {
    "airflow.providers.celery": "apache-airflow-providers-celery",
    "airflow.providers.amazon": "apache-airflow-providers-amazon",
    "redis": "redis",
    "psycopg2": "psycopg2-binary",
    # Airflow 3 opens an async engine beside the sync one; on PostgreSQL its driver is asyncpg.
    "asyncpg": "asyncpg",
    "s3fs": "s3fs",
    "moto": "moto[server]",
}


class MissingPrerequisites(RuntimeError):
    """Raised when the machine lacks a server or a package; the message says what to install."""


@dataclass(frozen=True)
class Prerequisites:
    """
    Where the deployment's servers come from.

    :param postgres_bin: the folder of ``initdb`` and ``postgres``, or None when a URL is given.
    :param postgres_url: an existing PostgreSQL server's URL (``postgresql://user:pw@host:port/db``).
    :param redis_server: the ``redis-server`` program, or None when a URL is given.
    :param redis_url: an existing Redis server's URL (``redis://host:port/0``).
    """

    postgres_bin: Path | None
    postgres_url: str | None
    redis_server: Path | None
    redis_url: str | None


def find_postgres_bin() -> Path | None:
    """Return the folder holding ``initdb`` and ``postgres``: on PATH, else Debian's versioned folder."""
    on_path = [shutil.which(name) for name in POSTGRES_PROGRAMS]
    if all(on_path):
        # Debian links only the client programs into /usr/bin: initdb must sit beside postgres.
        return Path(os.path.realpath(on_path[1])).parent  # type: ignore[arg-type]
    # The newest major version first (/usr/lib/postgresql/15/bin, /usr/lib/postgresql/16/bin...).
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major_version, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in POSTGRES_PROGRAMS):
            return Path(folder)
    return None


def _major_version(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else 0


def install_hint(missing: list[str]) -> str:
    """Return the message naming what is missing and the exact commands that install it."""
    system = [name for name in missing if name in ("postgresql", "redis-server")]
    python = [name for name in missing if name not in system]
    lines = ["The production-shaped deployment (make cluster, make test-system) is missing: " + ", ".join(missing) + "."]
    if system:
        lines.append(f"Install the servers (as root):  apt-get install -y {' '.join(system)}")
        lines.append(
            f"(or point at running ones: {POSTGRES_URL_ENV}=postgresql://user:password@host:port/db, "
            f"{REDIS_URL_ENV}=redis://host:port/0)"
        )
    if python:
        lines.append("Install the Python packages:  .venv/bin/pip install -c constraints.txt " + " ".join(f"'{name}'" for name in python))
    return "\n".join(lines)


def check_prerequisites() -> Prerequisites:
    """Return where the servers come from; raise :class:`MissingPrerequisites` listing all that is missing."""
    missing: list[str] = []
    postgres_url = os.environ.get(POSTGRES_URL_ENV) or None
    postgres_bin = None if postgres_url else find_postgres_bin()
    if not postgres_url and postgres_bin is None:
        missing.append("postgresql")
    redis_url = os.environ.get(REDIS_URL_ENV) or None
    found_redis = None if redis_url else shutil.which("redis-server")
    if not redis_url and found_redis is None:
        missing.append("redis-server")
    for module, distribution in PYTHON_MODULES.items():
        if not _has_module(module):
            missing.append(distribution)
    if missing:
        raise MissingPrerequisites(install_hint(missing))
    broken = celery_import_error()
    if broken:
        raise MissingPrerequisites(broken)
    return Prerequisites(postgres_bin, postgres_url, Path(found_redis) if found_redis else None, redis_url)


def celery_import_error() -> str | None:
    """
    Return why the CeleryExecutor cannot be imported, or None when it can.

    A Celery release newer than the Celery provider knows fails only when a worker starts (celery
    5.7.0 dropped ``celery.backends.database.retry``, which apache-airflow-providers-celery 3.26.0
    imports); saying so here, with the versions, spares reading a worker's traceback.
    """
    # In a child with a throw-away AIRFLOW_HOME: importing Airflow here would write ~/airflow/airflow.cfg.
    with tempfile.TemporaryDirectory(prefix="hpc-cluster-check-") as home:
        env = {**os.environ, "AIRFLOW_HOME": home, "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
        done = subprocess.run(
            [sys.executable, "-c", "import airflow.providers.celery.executors.celery_executor_utils"],
            env=env, capture_output=True, text=True, timeout=120,
        )
    if done.returncode == 0:
        return None
    from importlib.metadata import version

    error = (done.stderr.strip().splitlines() or ["no error output"])[-1]
    return (
        f"The CeleryExecutor cannot be imported with celery {version('celery')} and "
        f"apache-airflow-providers-celery {version('apache-airflow-providers-celery')}: {error}\n"
        "Install a Celery release the provider supports, e.g.:  .venv/bin/pip install 'celery[redis]==5.6.3'"
    )


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def main() -> int:
    """Print what is missing (exit 1) or nothing (exit 0): the Makefile's check before the cluster targets."""
    try:
        check_prerequisites()
    except MissingPrerequisites as missing:
        print(missing)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
