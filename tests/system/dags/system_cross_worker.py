"""
A producer and its consumer on two different Celery workers, the result passing through S3.

``produce`` (queue ``worker_a``) runs ``python /add.py 20 22`` on Muse and stores ``stdout.txt``
under ``[hpc] results_base`` (``s3://...``); ``consume`` (queue ``worker_b``) reads it from there
and checks it. The workers share no disk: only object storage can carry the file across.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import DAG, ObjectStoragePath, task

from airflow_provider_hpc.operators.muse import MuseRunOperator

with DAG("system_cross_worker", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["system"]):
    produce = MuseRunOperator(
        task_id="produce", name="sw_example", cmd="python /add.py 20 22", returned_type="stdout.txt",
        queue="worker_a", poll_interval=1, max_poll_interval=2, timeout=600,
    )

    @task(queue="worker_b")
    def consume(result: dict[str, Any]) -> dict[str, Any]:
        """Read the producer's stdout.txt from object storage and check it holds 42."""
        path = ObjectStoragePath(result["file"]["path"])
        text = path.read_text().strip()
        if float(text) != 42.0:
            raise ValueError(f"{path} holds {text!r}, not 42")
        return {"path": str(path), "text": text}

    consume(produce.output)
