"""
A Muse run whose whole run folder (``run.zip``) is kept in object storage and read downstream.

The operator streams ``run.zip`` to its task folder under ``[hpc] results_base`` (any fsspec URL,
e.g. ``s3://bucket/hpc``) and returns where it is; ``read_stdout`` opens the zip from there and
reads ``__WS__stdout.txt``. The ``Asset`` outlet lets other DAGs be scheduled on each new result.
"""

from __future__ import annotations

import zipfile
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, Asset, ObjectStoragePath, task

from airflow_provider_hpc.operators.muse import MuseRunOperator

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
        # 2 s suits the emulator's quick runs; on a real cluster keep the default 10 s or more
        # (docs/errors.md: "A deferred task failed with no error in its log").
        poll_interval=2,
        max_poll_interval=30,
        timeout=3600,
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
