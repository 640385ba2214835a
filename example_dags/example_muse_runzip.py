"""
A Muse run whose whole run folder (``run.zip``) is kept in object storage and read downstream.

The operator streams ``run.zip`` to its task folder under ``[hpc] results_base`` (any fsspec URL,
e.g. ``s3://bucket/hpc``) and returns where it is; ``read_stdout`` opens the zip from there and
reads ``__WS__stdout.txt``. The ``Asset`` outlet lets other DAGs be scheduled on each new result.
"""

from __future__ import annotations

import os
import zipfile
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, ObjectStoragePath, task

from airflow_provider_hpc.operators.muse import MuseRunOperator

# Poll every 10 s or more on the real services (docs/errors.md, "A deferred task failed with no
# error in its log"); only the demo and the tests set MUSE_EXAMPLE_POLL_SECONDS lower, for the
# emulator's runs of a second.
POLL_SECONDS = float(os.environ.get("MUSE_EXAMPLE_POLL_SECONDS", "10"))
# Every deferrable task has retries: a Muse retry re-attaches to the run its first try submitted
# and returns its result, without a second submission.
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}

ADD_RESULTS = Asset("muse://sw_example/add-results")

with DAG(
    dag_id="example_muse_runzip",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example", "muse"],
    doc_md=__doc__,
):
    add = MuseRunOperator(
        task_id="add",
        name="sw_example",
        cmd="python /add.py 4 55",
        returned_type="run.zip",
        poll_interval=POLL_SECONDS,
        max_poll_interval=30,
        timeout=3600,
        **RETRIES,
        outlets=[ADD_RESULTS],
    )

    @task
    def read_stdout(result: dict[str, Any]) -> str:
        """Open the stored run.zip and return the run's __WS__stdout.txt."""
        archive = ObjectStoragePath(result["file"]["path"])
        with archive.open("rb") as handle, zipfile.ZipFile(handle) as zipped:
            member = next(n for n in zipped.namelist() if n.rsplit("/", 1)[-1] == "__WS__stdout.txt")
            text = zipped.read(member).decode()
        print(f"{archive} ({result['file']['size']} bytes) holds {member}: {text.strip()}")
        return text.strip()

    read_stdout(add.output)
