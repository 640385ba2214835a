"""
Watch a Rescale run, snapshot it midway, wait for it to complete, and harvest its outputs.

Trigger it with the run to follow, e.g. ``{"job_id": "QTVia", "run_id": "1"}``:

1. ``midway`` waits until the run's log (``log_path``) has ``midway_lines`` lines;
2. ``snapshot`` takes a snapshot of the run's working folder and waits until it is an output file;
3. ``watch`` waits, in the triggerer, until the run has completed, writing each new line of the
   log to the task log, and fails if the job's statuses say the run did not succeed;
4. ``harvest`` downloads every output file (all pages, in parallel, md5-checked) to object
   storage: ``output_path`` (``s3://...``, ``gs://...``, a local folder) or the task's own
   results folder under ``[hpc] results_base``;
5. ``summarize`` reads ``results/summary.csv`` from the harvested files.

Needs a ``rescale_default`` connection (see docs/rescale.md). Against the local emulator,
``make demo`` sets it through ``AIRFLOW_CONN_RESCALE_DEFAULT`` and submits a run that fits
(``scripts/rescale_demo_job.py``). The tasks poll every 5 seconds at first, backing off to a
minute while nothing changes; ``RESCALE_EXAMPLE_POLL_SECONDS`` sets the first interval (the
tests, whose runs last seconds, poll faster).
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, ObjectStoragePath, Param, PokeReturnValue, task
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.operators.rescale import RescaleSnapshotRunOperator
from airflow_provider_hpc.operators.rescale_download import RescaleDownloadOutputsOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

SUMMARY_PATH = "results/summary.csv"
#: Seconds between two polls at first (and after each change); waits back off up to a minute.
POLL_SECONDS = float(os.environ.get("RESCALE_EXAMPLE_POLL_SECONDS", "5"))

with DAG(
    dag_id="example_rescale_harvest",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example", "rescale"],
    doc_md=__doc__,
    params={
        "job_id": Param("", type="string", description="The Rescale job id"),
        "run_id": Param("1", type="string", description="The run id within the job"),
        "log_path": Param("logs/solver.log", type="string", description="The file of the run to follow"),
        "midway_lines": Param(3, type="integer", minimum=1, description="Log lines written before the snapshot"),
        "output_path": Param("", type="string", description="Where to harvest (empty: the task's results folder)"),
    },
):

    @task.sensor(poke_interval=POLL_SECONDS, timeout=3600, mode="poke")
    def midway(job_id: str, rescale_run_id: str, log_path: str, lines: int | str) -> PokeReturnValue:
        """Wait until the run's log holds ``lines`` lines (the run is then well under way)."""
        if not job_id:
            raise AirflowFailException("Trigger the DAG with a job_id (and run_id) to follow")
        hook = RescaleHook()
        if hook.get_run(job_id, rescale_run_id).is_completed:
            raise AirflowFailException(
                f"Run {rescale_run_id} of job {job_id} completed before it could be snapshotted midway"
            )
        try:
            written = hook.tail(job_id, rescale_run_id, log_path, lines=int(lines))
        except HpcApiError as exc:
            if exc.status in (400, 404):  # not started yet, or the log not created yet
                return PokeReturnValue(is_done=False)
            raise
        return PokeReturnValue(is_done=len(written) >= int(lines))

    gate = midway("{{ params.job_id }}", "{{ params.run_id }}", "{{ params.log_path }}", "{{ params.midway_lines }}")

    snapshot = RescaleSnapshotRunOperator(
        task_id="snapshot",
        job_id="{{ params.job_id }}",
        run_id="{{ params.run_id }}",
        wait_for_file=True,
        poll_interval=POLL_SECONDS,
        max_poll_interval=60,
        wait_timeout=3600,
    )

    watch = RescaleRunSensor(
        task_id="watch",
        job_id="{{ params.job_id }}",
        run_id="{{ params.run_id }}",
        tail_path="{{ params.log_path }}",
        poll_interval=POLL_SECONDS,
        max_poll_interval=60,
        timeout=6 * 3600,
    )

    harvest = RescaleDownloadOutputsOperator(
        task_id="harvest",
        job_id="{{ params.job_id }}",
        run_id="{{ params.run_id }}",
        output_path="{{ params.output_path }}",
        concurrency=4,
    )

    @task
    def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
        """Read the harvested ``results/summary.csv`` and return its last step and residual."""
        entry = next((f for f in manifest["files"] if f["relative_path"] == SUMMARY_PATH), None)
        if entry is None:
            raise AirflowFailException(f"The run produced no {SUMMARY_PATH}")
        rows = list(csv.DictReader(io.StringIO(ObjectStoragePath(entry["path"]).read_text())))
        last = rows[-1]
        print(f"{len(rows)} steps; final residual {last['residual']} (read from {entry['path']})")
        return {"steps": len(rows), "final_residual": float(last["residual"]), "path": entry["path"]}

    gate >> snapshot >> watch >> harvest
    summarize(harvest.output)
