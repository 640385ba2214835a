"""
The fault soak's volume through the production-shaped deployment (scenario 5 of the system tests).

The DAG, the plan and the checks are ``make soak``'s (``dev/soak/airflow_phase.py``); what differs
is where this deployment keeps things: the metadata in PostgreSQL, results and task logs on S3,
and each worker's and triggerer's local files in a folder of its own. The secret scan reads all of
them: every file of every machine's folder, every object in the bucket (results and remote task
logs), PostgreSQL's data folder raw (tables and WAL, after a checkpoint) and the values Airflow
wrote into its tables as they were written (``soak_audit``, filled by database triggers, since
trigger rows are deleted once their task resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Iterator

from hpc_emulator import EmulatorServer

from airflow_provider_hpc.storage_sink import TEMP_PREFIX
from dev.cluster.deployment import REMOTE_LOG_PREFIX, ClusterDeployment
from dev.cluster.object_store import S3Server
from dev.cluster.postgres import PostgresServer
from dev.soak.airflow_phase import SOAK_DAG_ID, AirflowPhase
from dev.soak.workload import AirflowPlan

#: What ``dev/soak/airflow_phase.py``'s SQLite triggers copy, in PostgreSQL's dialect (idempotent:
#: a session may run the soak more than once on one database).
POSTGRES_AUDIT_SQL = """
CREATE TABLE IF NOT EXISTS soak_audit (id BIGSERIAL PRIMARY KEY, source TEXT NOT NULL, classpath TEXT, value TEXT);
CREATE OR REPLACE FUNCTION soak_audit_trigger_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO soak_audit (source, classpath, value) VALUES ('trigger kwargs', NEW.classpath, NEW.kwargs::text);
RETURN NEW; END $$;
CREATE OR REPLACE TRIGGER soak_audit_trigger AFTER INSERT OR UPDATE OF kwargs ON "trigger"
FOR EACH ROW EXECUTE FUNCTION soak_audit_trigger_row();
CREATE OR REPLACE FUNCTION soak_audit_xcom_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO soak_audit (source, value) VALUES ('xcom', NEW.value::text); RETURN NEW; END $$;
CREATE OR REPLACE TRIGGER soak_audit_xcom AFTER INSERT OR UPDATE OF value ON xcom
FOR EACH ROW EXECUTE FUNCTION soak_audit_xcom_row();
CREATE OR REPLACE FUNCTION soak_audit_next_kwargs_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO soak_audit (source, value) VALUES ('task_instance next_kwargs', NEW.next_kwargs::text);
RETURN NEW; END $$;
CREATE OR REPLACE TRIGGER soak_audit_next_kwargs AFTER UPDATE OF next_kwargs ON task_instance
FOR EACH ROW WHEN (NEW.next_kwargs IS NOT NULL) EXECUTE FUNCTION soak_audit_next_kwargs_row();
CREATE OR REPLACE FUNCTION soak_audit_rendered_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO soak_audit (source, value) VALUES ('rendered fields', NEW.rendered_fields::text);
RETURN NEW; END $$;
CREATE OR REPLACE TRIGGER soak_audit_rendered AFTER INSERT OR UPDATE OF rendered_fields
ON rendered_task_instance_fields FOR EACH ROW EXECUTE FUNCTION soak_audit_rendered_row();
"""
#: How long the task logs on S3 must stay unchanged before they are read: a try's log is uploaded
#: after its task process exits, which can be after its state (and the DAG run's) is final.
LOGS_QUIET_SECONDS = 10.0
LOGS_SETTLE_TIMEOUT = 180.0


class ClusterSoak(AirflowPhase):
    """
    The soak DAG once under faults on a running :class:`ClusterDeployment`, checked on PostgreSQL and S3.

    Call :meth:`install_audit` before the DAG runs (and before the runs whose values the scan
    should see), then :meth:`drive`, then :meth:`scan_for_secrets`; the deployment stays up.

    :param deployment: the running deployment (its triggerers, workers, PostgreSQL and S3).
    :param postgres: its metadata database server (its data folder is scanned raw).
    :param s3: its object store.
    """

    audit_sql = POSTGRES_AUDIT_SQL

    def __init__(self, args: argparse.Namespace, server: EmulatorServer, plan: AirflowPlan, secrets: dict[str, str],
                 issued_tokens: list[str], deployment: ClusterDeployment, postgres: PostgresServer,
                 s3: S3Server) -> None:
        super().__init__(args, server, plan, secrets, issued_tokens, deployment, deployment.fernet_key)
        self.postgres = postgres
        self.s3 = s3

    def install_audit(self) -> None:
        """Create the audit table and the database triggers that fill it."""
        self.stack.execute_script(self.audit_sql)

    # ----- where this deployment keeps things ------------------------------------------------------

    def settle(self) -> None:
        """Wait until the run's logs on S3 stop changing: the last tries' uploads come after the run's end."""
        prefix = f"{REMOTE_LOG_PREFIX}/dag_id={SOAK_DAG_ID}/run_id={self.run_id}/"
        deadline = time.monotonic() + LOGS_SETTLE_TIMEOUT
        seen, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline:
            count = len(self.s3.keys(prefix))
            if count != seen:
                seen, quiet_since = count, time.monotonic()
            elif time.monotonic() - quiet_since >= LOGS_QUIET_SECONDS:
                return
            time.sleep(1.0)
        self.problems.append(f"the task logs on S3 kept changing {LOGS_SETTLE_TIMEOUT:.0f} s after the run ended")

    def log_files(self, folder: str) -> Iterator[tuple[str, str]]:
        """The task logs as the API server reads them: on S3 (remote logging), whichever worker ran each part."""
        prefix = f"{REMOTE_LOG_PREFIX}/{folder}/"
        for key in self.s3.keys(prefix):
            yield key[len(prefix):], self.s3.read(key).decode(errors="replace")

    def read_result(self, location: str) -> bytes | None:
        """Read a result or manifest from S3 (``s3://conn@bucket/key``) or, for anything else, the local disk."""
        if not location.startswith("s3://"):
            return super().read_result(location)
        key = self._key(location)
        return self.s3.read(key) if key in self.s3.keys(key) else None

    def harvested_md5s(self, root: str) -> dict[str, str]:
        """Hash every object under a harvest's S3 prefix, as a downstream task on another machine would read it."""
        if not root.startswith("s3://"):
            return super().harvested_md5s(root)
        prefix = self._key(root).rstrip("/") + "/"
        return {
            key[len(prefix):]: hashlib.md5(self.s3.read(key), usedforsecurity=False).hexdigest()
            for key in self.s3.keys(prefix)
        }

    def partial_leftovers(self, root: str) -> list[str]:
        """Temporary objects, and multipart uploads never completed nor aborted, under a harvest's prefix."""
        if not root.startswith("s3://"):
            return super().partial_leftovers(root)
        prefix = self._key(root).rstrip("/") + "/"
        uploads = self.s3.client().list_multipart_uploads(Bucket=self.s3.bucket, Prefix=prefix).get("Uploads", [])
        return [key for key in self.s3.keys(prefix) if TEMP_PREFIX in key] + [
            f"open upload of {upload['Key']}" for upload in uploads
        ]

    def stored_blobs(self) -> Iterator[tuple[str, str, bytes]]:
        """Every machine's files, every object in the bucket, and PostgreSQL's data folder, raw."""
        yield from super().stored_blobs()
        for key in self.s3.keys():
            category = "s3_" + ("log" if key.startswith(f"{REMOTE_LOG_PREFIX}/") else "result" if key.startswith("results/") else "object")
            yield category, f"s3://{self.s3.bucket}/{key}", self.s3.read(key)
        data_dir = self.postgres.data_dir
        if data_dir is None:  # an existing server: its files are not ours to read
            return
        self.stack.execute_script("CHECKPOINT")
        for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
            yield "postgres_files", f"postgres:{path.relative_to(data_dir)}", path.read_bytes()

    def _key(self, location: str) -> str:
        """The object key of ``s3://[conn@]bucket/key`` in this deployment's bucket."""
        authority, _, key = location.removeprefix("s3://").partition("/")
        bucket = authority.rpartition("@")[2]
        assert bucket == self.s3.bucket, f"{location} is outside the deployment's bucket {self.s3.bucket}"
        return key
