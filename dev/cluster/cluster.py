"""
The whole production-shaped local deployment, started and stopped as one: the servers, then Airflow.

PostgreSQL (metadata), Redis (Celery broker), an S3 store (results, remote task logs) and the
Airflow services of :class:`~dev.cluster.deployment.ClusterDeployment`, all on 127.0.0.1. The
emulator (or the real services) is the caller's: its connections come in ``extra_env``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from dev.cluster.broker import RedisServer
from dev.cluster.deployment import TRIGGERERS, WORKERS, ClusterDeployment
from dev.cluster.object_store import S3Server
from dev.cluster.postgres import PostgresServer
from dev.cluster.processes import kill_marked
from dev.cluster.prerequisites import check_prerequisites


class LocalCluster:
    """
    Servers and Airflow services of one deployment; ``with LocalCluster(...) as cluster:`` runs them.

    :param home: the Airflow side's folder (must exist; PostgreSQL and Redis use temporary ones).
    :param dag_bundles: DAG bundle name -> folder of DAG files.
    :param extra_env: more environment for every Airflow process (``AIRFLOW_CONN_*`` of the emulator...).
    """

    def __init__(self, home: Path, dag_bundles: Mapping[str, Path], extra_env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.dag_bundles = dict(dag_bundles)
        self.extra_env = dict(extra_env or {})
        self.marker = uuid.uuid4().hex
        # Fails first, with the install command, when a server or a package is missing.
        found = check_prerequisites()
        self.postgres = PostgresServer(found.postgres_bin, self.marker, existing_url=found.postgres_url)
        self.redis = RedisServer(found.redis_server, self.marker, existing_url=found.redis_url)
        self.s3 = S3Server()
        self.airflow: ClusterDeployment | None = None

    def start(self) -> LocalCluster:
        """Start the servers, migrate the database, serialize the DAGs, start Airflow; stop all on failure."""
        try:
            self.postgres.start()
            self.redis.start()
            self.s3.start()
            self.airflow = ClusterDeployment(
                self.home, self.dag_bundles, postgres=self.postgres, redis=self.redis, s3=self.s3,
                marker=self.marker, extra_env=self.extra_env,
            )
            self.airflow.prepare()
            self.airflow.start_services()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> list[int]:
        """Stop Airflow, then the servers; return the ids of processes that outlived them (then killed)."""
        if self.airflow is not None:
            self.airflow.stop()
        self.s3.stop()
        self.redis.stop()
        self.postgres.cleanup()
        # Only now: every process of the deployment, servers included, carries the marker.
        return kill_marked(self.marker)

    def describe(self) -> str:
        """Return what runs where, for a person (no password: the database URL is masked)."""
        assert self.airflow is not None
        lines = [
            f"Airflow UI and REST API   {self.airflow.api_url}   (simple auth manager: every user is an admin, no login)",
            f"Metadata database         {self.postgres.display_url}",
            f"Celery broker             {self.redis.url}",
            f"S3 store (moto)           {self.s3.endpoint_url}   bucket {self.s3.bucket}",
            f"  results                 [hpc] results_base = {self.airflow.env['AIRFLOW__HPC__RESULTS_BASE']}",
            f"  task logs               {self.airflow.env['AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER']}",
            f"Celery workers            {', '.join(f'{w.name} (queues default,{w.queue})' for w in WORKERS)}",
            f"Triggerers                {', '.join(TRIGGERERS)}",
            f"Process logs              {self.home}/<service>-<n>.log",
        ]
        return "\n".join(lines)

    def __enter__(self) -> LocalCluster:
        """Start everything; the block's end stops everything."""
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop everything, whatever happened in the block."""
        self.stop()
