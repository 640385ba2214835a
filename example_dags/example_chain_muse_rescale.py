"""
A chain of two services: Muse prepares each case, Rescale solves it, a reduce reads every result.

1. ``prepare`` (mapped ``MuseRunOperator``): one Muse cluster run per case adds its numbers and
   returns ``stdout.txt``, written to object storage under ``[hpc] results_base`` (``s3://...``
   in a multi-machine deployment, so the next task reads it from another worker).
2. ``solve`` (mapped ``RescaleSubmitJobOperator``): one Rescale job per case takes that file as its
   input, squares the number and writes ``result.txt``; the task waits in the triggerer.
3. ``harvest`` (mapped ``RescaleDownloadOutputsOperator``): each job's outputs are downloaded,
   checked against their md5, into the asset ``hpc-chain-results``.
4. ``table`` reads every harvested ``result.txt`` and prints one line per case.

A DAG scheduled on the asset (``example_chain_downstream``) runs once the chain has finished.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, Asset, ObjectStoragePath, Param, task

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.operators.rescale_download import RescaleDownloadOutputsOperator
from airflow_provider_hpc.operators.rescale_submit import RescaleSubmitJobOperator

CHAIN_RESULTS = Asset("hpc-chain-results")
# Poll every 10 s or more on the real services (docs/errors.md, "A deferred task failed with no
# error in its log"): set CHAIN_EXAMPLE_POLL_SECONDS; the demo and the tests set it lower, for the
# emulator's runs of seconds.
POLL = float(os.environ.get("CHAIN_EXAMPLE_POLL_SECONDS", "10"))
WAIT = {"poll_interval": POLL, "max_poll_interval": 30, "retries": 2, "retry_delay": timedelta(seconds=5)}

#: The Rescale job: the case's number, squared. ``user_included`` runs the command as given.
SOLVER = {
    "name": "chain-solver",
    "jobanalyses": [
        {
            "analysis": {"code": "user_included", "version": "0"},
            "command": "awk '{ printf \"%g\\n\", $1 * $1 }' stdout.txt > result.txt",
            "hardware": {"coreType": "emerald", "coresPerSlot": 1, "slots": 1, "walltime": 1},
        }
    ],
}

with DAG(
    dag_id="example_chain_muse_rescale",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example", "muse", "rescale"],
    doc_md=__doc__,
    params={"cases": Param(["python /add.py 1 2", "python /add.py 3 4", "python /add.py 5 6.5"], type="array")},
):

    @task
    def commands(params: dict[str, Any]) -> list[str]:
        """The Muse command of each case."""
        return list(params["cases"])

    prepare = MuseRunOperator.partial(
        task_id="prepare", name="sw_example", returned_type="stdout.txt", timeout=3600, **WAIT
    ).expand(cmd=commands())

    solve = RescaleSubmitJobOperator.partial(task_id="solve", job=SOLVER, timeout=3600, **WAIT).expand(
        input_files=prepare.output.map(lambda result: [result["file"]["path"]])
    )

    harvest = RescaleDownloadOutputsOperator.partial(task_id="harvest", outlets=[CHAIN_RESULTS]).expand_kwargs(
        solve.output.map(lambda job: {"job_id": job["job_id"], "run_id": job["run_ids"][0]})
    )

    @task
    def table(prepared: list[dict[str, Any]], harvested: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Read every harvested result and print one line per case."""
        rows = []
        for case, (muse, manifest) in enumerate(zip(prepared, harvested)):
            result = next(f for f in manifest["files"] if f["relative_path"] == "result.txt")
            rows.append({
                "case": case,
                "muse_key": muse["key"],
                "prepared": ObjectStoragePath(muse["file"]["path"]).read_text().strip(),
                "rescale_job": manifest["job_id"],
                "solved": ObjectStoragePath(result["path"]).read_text().strip(),
            })
        print(f"{'case':>4}  {'Muse key':<36}  {'prepared':>8}  {'Rescale job':<11}  {'solved':>8}")
        for row in rows:
            print(f"{row['case']:>4}  {row['muse_key']:<36}  {row['prepared']:>8}  {row['rescale_job']:<11}  {row['solved']:>8}")
        return rows

    table(prepare.output, harvest.output)


with DAG(
    dag_id="example_chain_downstream",
    schedule=[CHAIN_RESULTS],
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example"],
    doc_md="Runs when `example_chain_muse_rescale` has harvested its results (the asset `hpc-chain-results`).",
):

    @task
    def announce(triggering_asset_events: Any = None) -> int:
        """Say which harvest this run follows."""
        events = [event for events in (triggering_asset_events or {}).values() for event in events]
        for event in events:
            print("harvested:", event.extra)
        return len(events)

    announce()
