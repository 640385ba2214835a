"""
The Airflow side of the production-shaped deployment: CeleryExecutor, PostgreSQL, S3, two workers, two triggerers.

Built on :class:`dev.airflow_stack.AirflowStack` (its REST helpers, process groups and log files),
with the metadata database on PostgreSQL. The scheduler, DAG processor and API server share the
deployment's home, as on a control machine; each worker and each triggerer has an AIRFLOW_HOME,
a TMPDIR and a log folder of its own, as on a machine of its own, so nothing can pass between
tasks through a local disk: results go to S3 (``[hpc] results_base``) and task logs too (remote
logging), which is how the API server reads the logs of tasks that ran on either worker.

No log server is started (``--skip-serve-logs``): Airflow's binds every interface and the UI
could reach only one worker's port anyway; a task's log is on S3 once each part of its try
(up to a deferral, the trigger, the resumption) has ended.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from dev.airflow_stack import START_TIMEOUT, AirflowStack, wait_for
from dev.cluster.broker import RedisServer
from dev.cluster.hostname import HOSTNAME_ENV
from dev.cluster.object_store import CONN_ID as S3_CONN_ID
from dev.cluster.object_store import S3Server
from dev.cluster.postgres import PostgresServer
from dev.cluster.processes import MARKER_ENV, kill_marked

#: Seconds without a heartbeat after which a triggerer's triggers go to another (Airflow's default is 30).
TRIGGERER_HEALTH_CHECK_THRESHOLD = 10
#: Task slots per worker: enough for the scenarios, few enough for two cores.
WORKER_CONCURRENCY = 6
DEFAULT_QUEUE = "default"
#: Where in the bucket the task and trigger logs go (remote logging).
REMOTE_LOG_PREFIX = "logs"


@dataclass(frozen=True)
class Worker:
    """
    One Celery worker: its host name (as Airflow records it) and its own queue.

    :param name: the host name, also the process's name in the deployment (``worker-a``).
    :param queue: the queue only this worker serves, besides ``default`` (``worker_a``).
    """

    name: str
    queue: str


WORKERS = (Worker("worker-a", "worker_a"), Worker("worker-b", "worker_b"))
TRIGGERERS = ("triggerer-1", "triggerer-2")


class ClusterDeployment(AirflowStack):
    """
    Airflow on CeleryExecutor: API server, scheduler, DAG processor, two triggerers, two Celery workers.

    :param home: the deployment's folder (each worker and triggerer gets a sub-folder of its own).
    :param dag_bundles: DAG bundle name -> folder of DAG files (served as local DAG bundles).
    :param postgres: the running metadata database.
    :param redis: the running Celery broker.
    :param s3: the running object store (results and remote logs).
    :param marker: the deployment's id, put in every process's environment.
    :param extra_env: more environment (the emulator's ``AIRFLOW_CONN_*``...).
    """

    def __init__(
        self,
        home: Path,
        dag_bundles: Mapping[str, Path],
        *,
        postgres: PostgresServer,
        redis: RedisServer,
        s3: S3Server,
        marker: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.postgres = postgres
        self.redis = redis
        self.s3 = s3
        self.marker = marker
        self.dag_bundles = dict(dag_bundles)
        #: Encrypts the connections and trigger kwargs Airflow stores, as production must.
        self.fernet_key = Fernet.generate_key().decode()
        super().__init__(home, next(iter(self.dag_bundles.values())), {**self._cluster_env(), **(extra_env or {})})

    def _cluster_env(self) -> dict[str, str]:
        bundles = [
            {"name": name, "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
             "kwargs": {"path": str(folder), "refresh_interval": 30}}
            for name, folder in self.dag_bundles.items()
        ]
        return {
            MARKER_ENV: self.marker,
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.sqlalchemy_url,
            "AIRFLOW__CELERY__BROKER_URL": self.redis.url,
            "AIRFLOW__CELERY__RESULT_BACKEND": self.postgres.celery_result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": DEFAULT_QUEUE,
            "AIRFLOW__CORE__PARALLELISM": "32",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "256",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            # One API worker: two cores serve four processes of it poorly.
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "dev.cluster.hostname.from_environment",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": str(TRIGGERER_HEALTH_CHECK_THRESHOLD),
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            # Results and logs on shared object storage: the workers share no disk.
            **self.s3.airflow_conn_env(),
            "AIRFLOW__HPC__RESULTS_BASE": self.s3.url("results"),
            "AIRFLOW__LOGGING__REMOTE_LOGGING": "True",
            "AIRFLOW__LOGGING__REMOTE_BASE_LOG_FOLDER": f"s3://{self.s3.bucket}/{REMOTE_LOG_PREFIX}",
            "AIRFLOW__LOGGING__REMOTE_LOG_CONN_ID": S3_CONN_ID,
            "AIRFLOW__LOGGING__DELETE_LOCAL_LOGS": "False",
        }

    # ----- one machine per process ---------------------------------------------------------------

    def machine_env(self, name: str) -> dict[str, str]:
        """Return the environment of a process that runs as if on its own machine ``name``."""
        folder = self.home / name
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            **self.env,
            "AIRFLOW_HOME": str(folder),
            "TMPDIR": str(folder / "tmp"),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(folder / "logs"),
            HOSTNAME_ENV: name,
        }

    # ----- life cycle ----------------------------------------------------------------------------

    def start_services(self) -> ClusterDeployment:
        """Start every service of a prepared deployment; return once the API, triggerers and workers are up."""
        self.spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.api_port))
        self.spawn("scheduler", "scheduler")
        self.spawn("dag-processor", "dag-processor")
        for name in TRIGGERERS:
            self.start_triggerer(name)
        for worker in WORKERS:
            self.start_worker(worker)
        wait_for(self._api_up, START_TIMEOUT, "the API server")
        wait_for(self._workers_ready, START_TIMEOUT, "both Celery workers")
        wait_for(lambda: len(self.live_triggerers()) == len(TRIGGERERS), START_TIMEOUT, "both triggerers' heartbeats")
        return self

    def start_triggerer(self, name: str) -> None:
        """Start (or start again) one triggerer on its own machine."""
        self.spawn(name, "triggerer", "--skip-serve-logs", env=self.machine_env(name), cwd=self.home / name)

    def start_worker(self, worker: Worker) -> None:
        """Start one Celery worker on its own machine, serving ``default`` and its own queue."""
        self.spawn(
            worker.name, "celery", "worker", "--queues", f"{DEFAULT_QUEUE},{worker.queue}",
            "--celery-hostname", f"{worker.name}@%h", "--concurrency", str(WORKER_CONCURRENCY),
            "--skip-serve-logs", "--without-mingle", "--without-gossip",
            env=self.machine_env(worker.name), cwd=self.home / worker.name,
        )

    def _workers_ready(self) -> bool:
        self._api_up()  # fails at once if any process died
        return all(f"{worker.name}@" in self.log_text(worker.name) and " ready." in self.log_text(worker.name)
                   for worker in WORKERS)

    def kill_leftovers(self) -> list[int]:
        """SIGKILL every live process of this deployment (found by its marker variable); return their ids."""
        return kill_marked(self.marker)

    def all_logs(self) -> str:
        """Return every log this deployment wrote on its disks: services, each machine's task and trigger logs."""
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.home.rglob("*.log")))

    # ----- the metadata database (PostgreSQL) ----------------------------------------------------

    def _query(self, sql: str, *params: Any) -> list[tuple]:
        import psycopg2

        # AirflowStack's statements use SQLite's "?" placeholders; psycopg2 wants "%s".
        connection = psycopg2.connect(self.postgres.url, connect_timeout=10)
        try:
            with connection, connection.cursor() as cursor:
                cursor.execute(sql.replace("?", "%s"), params)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def query(self, sql: str, *params: Any) -> list[tuple]:
        """Run one SQL statement on the metadata database (PostgreSQL, ``?`` placeholders); return its rows."""
        return self._query(sql, *params)

    def execute_script(self, sql: str) -> None:
        """Run SQL statements on the metadata database and commit them."""
        self._query(sql)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """Return one XCom value of a run (the first map index of a mapped task), decoded."""
        rows = self._query(
            'SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = ? AND "key" = ? ORDER BY map_index',
            dag_id, run_id, task_id, key,
        )
        if not rows:
            raise KeyError(f"{task_id}/{key}")
        # psycopg2 decodes the JSONB column. A worker's value (Task Execution API) is the JSON value
        # itself: decoding once more, as AirflowStack does for SQLite's text, would turn "59.0"
        # into 59.0. A value the triggerer wrote (end_from_trigger) is JSON text inside the JSONB:
        # an object or array as text is that, and is decoded once (Airflow's API reads both so too).
        value = rows[0][0]
        if isinstance(value, str) and value[:1] in ("{", "["):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    def live_triggerers(self) -> dict[str, int]:
        """Return the running triggerers whose heartbeat is fresh: host name -> job id."""
        rows = self._query(
            "SELECT hostname, id FROM job WHERE job_type = 'TriggererJob' AND state = 'running' "
            "AND latest_heartbeat > now() - make_interval(secs => ?) ORDER BY id",
            float(TRIGGERER_HEALTH_CHECK_THRESHOLD),
        )
        return {hostname: job_id for hostname, job_id in rows}

    def triggers_by_triggerer(self, trigger_ids: list[int] | None = None) -> dict[int | None, int]:
        """Return how many triggers each triggerer job holds (None: unassigned), of ``trigger_ids`` or all."""
        if trigger_ids is None:
            rows = self._query("SELECT triggerer_id, COUNT(*) FROM trigger GROUP BY triggerer_id")
        else:
            rows = self._query(
                "SELECT triggerer_id, COUNT(*) FROM trigger WHERE id = ANY(?) GROUP BY triggerer_id", list(trigger_ids)
            )
        return {triggerer: count for triggerer, count in rows}

    def hostnames(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """Return the host that ran each task instance of a run (its latest try), by task id."""
        rows = self._query("SELECT task_id, hostname FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id)
        return dict(rows)

    def wait_run_finished(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Wait until a DAG run ends; return its state (on a timeout, fail with the logs that tell why)."""
        def finished() -> str | None:
            state = self.run_state(dag_id, run_id)
            return state if state in ("success", "failed") else None

        try:
            return wait_for(finished, timeout, f"DAG run {dag_id}/{run_id}", interval=1.0)
        except AssertionError:
            raise AssertionError(
                f"{dag_id}/{run_id} did not finish: {self.task_states(dag_id, run_id)}\n{self.service_log_tails()}"
            ) from None

    def service_log_tails(self, chars: int = 2500) -> str:
        """Return the end of every service's latest log, one section each (for failure messages)."""
        names = ["scheduler", "dag-processor", "api-server", *TRIGGERERS, *(w.name for w in WORKERS)]
        return "\n".join(f"--- {name} ---\n{self.log_tail(name, chars)}" for name in names)
