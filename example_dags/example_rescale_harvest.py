"""
Start a Rescale job, snapshot its run midway, wait for it to complete, and harvest its outputs.

The job is a small solver written in POSIX shell (``SOLVER``): for ``steps`` steps it appends a
line to ``logs/solver.log``, then writes ``results/summary.csv``, one field file per step and
``post/report.txt``. Replace its analysis, command and hardware with your own software's.

0. ``start`` creates and submits the job and returns at once (``wait_for_completion=False``): the
   tasks below follow its run;
1. ``midway`` waits until the run's log (``log_path``) has ``midway_lines`` lines;
2. ``snapshot`` takes a snapshot of the run's working folder and waits until it is an output file;
3. ``watch`` waits, in the triggerer, until the run has completed, writing each new line of the
   log to the task log, and fails if the job's statuses say the run did not succeed;
4. ``harvest`` downloads every output file (all pages, in parallel, md5-checked) to object
   storage: ``output_path`` (``s3://...``, ``gs://...``, a local folder) or the task's own
   results folder under ``[hpc] results_base``;
5. ``summarize`` reads ``results/summary.csv`` from the harvested files.

Needs a ``rescale_default`` connection (see docs/rescale.md); ``make demo`` points it at the
local emulator through ``AIRFLOW_CONN_RESCALE_DEFAULT``. The tasks poll every
``RESCALE_EXAMPLE_POLL_SECONDS`` at first (10 unless set), backing off to a minute while nothing
changes: poll every 10 s or more on the real services (docs/errors.md, "A deferred task failed
with no error in its log"); the demo and the tests set it lower, for the emulator's runs of
seconds. Every deferrable task has retries: a retry re-attaches to what its first try started, it
never starts a second job.
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, ObjectStoragePath, Param, PokeReturnValue, task
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_hpc.exceptions import HpcApiError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.operators.rescale import RescaleSnapshotRunOperator
from airflow_provider_hpc.operators.rescale_download import RescaleDownloadOutputsOperator
from airflow_provider_hpc.operators.rescale_submit import RescaleSubmitJobOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

SUMMARY_PATH = "results/summary.csv"
#: Seconds between two polls at first (and after each change); waits back off up to a minute.
POLL_SECONDS = float(os.environ.get("RESCALE_EXAMPLE_POLL_SECONDS", "10"))
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}

#: The solver's command: plain POSIX shell, so it runs on any Rescale core type and on the emulator.
SOLVER_COMMAND = r"""
set -e
mkdir -p logs results/fields post
echo "step,residual" > results/summary.csv
i=1
while [ "$i" -le "$STEPS" ]; do
  residual=$((99999 / (i * i)))
  line="step $i of $STEPS: residual 0.$(printf '%05d' "$residual")"
  echo "$line" >> logs/solver.log
  echo "$line"
  printf 'field %s\n%s\n' "$i" "$residual" > "results/fields/field_$(printf '%03d' "$i").dat"
  echo "$i,0.$(printf '%05d' "$residual")" >> results/summary.csv
  sleep "$STEP_SECONDS"
  i=$((i + 1))
done
echo "solver converged after $STEPS steps" >> logs/solver.log
printf 'a run of %s steps\n' "$STEPS" > post/report.txt
""".strip()

#: The job body, as Rescale's API reference gives it; ``envVars`` carries the DAG's params.
SOLVER = {
    "name": "example-solver",
    "jobanalyses": [
        {
            "analysis": {"code": "user_included", "version": "0"},
            "command": SOLVER_COMMAND,
            "hardware": {"coreType": "emerald", "coresPerSlot": 1, "slots": 1, "walltime": 1},
            "envVars": {"STEPS": "{{ params.steps }}", "STEP_SECONDS": "{{ params.step_seconds }}"},
        }
    ],
}
with DAG(
    dag_id="example_rescale_harvest",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example", "rescale"],
    doc_md=__doc__,
    params={
        "steps": Param(40, type="integer", minimum=1, maximum=1000, description="The solver's steps"),
        "step_seconds": Param(0.5, type="number", minimum=0, description="Seconds between two steps"),
        "log_path": Param("logs/solver.log", type="string", description="The file of the run to follow"),
        "midway_lines": Param(3, type="integer", minimum=1, description="Log lines written before the snapshot"),
        # May be left empty in the trigger form (null): the harvest then goes to the task's results folder.
        "output_path": Param(None, type=["null", "string"], description="Where to harvest (empty: the task's results folder)"),
    },
):

    start = RescaleSubmitJobOperator(task_id="start", job=SOLVER, wait_for_completion=False, **RETRIES)
    job_id = start.output["job_id"]
    # A single-run job's run is its first; a sweep's runs are all in start.output["run_ids"].
    run_id = "1"

    @task.sensor(poke_interval=POLL_SECONDS, timeout=3600, mode="poke", **RETRIES)
    def midway(job_id: str, rescale_run_id: str, log_path: str, lines: int | str) -> PokeReturnValue:
        """Wait until the run's log holds ``lines`` lines (the run is then well under way)."""
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

    gate = midway(job_id, run_id, "{{ params.log_path }}", "{{ params.midway_lines }}")

    snapshot = RescaleSnapshotRunOperator(
        task_id="snapshot",
        job_id=job_id,
        run_id=run_id,
        wait_for_file=True,
        poll_interval=POLL_SECONDS,
        max_poll_interval=60,
        wait_timeout=3600,
        **RETRIES,
    )

    watch = RescaleRunSensor(
        task_id="watch",
        job_id=job_id,
        run_id=run_id,
        tail_path="{{ params.log_path }}",
        poll_interval=POLL_SECONDS,
        max_poll_interval=60,
        timeout=6 * 3600,
        **RETRIES,
    )

    harvest = RescaleDownloadOutputsOperator(
        task_id="harvest",
        job_id=job_id,
        run_id=run_id,
        output_path="{{ params.output_path or '' }}",
        concurrency=4,
        **RETRIES,
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

    start >> gate >> snapshot >> watch >> harvest
    summarize(harvest.output)
