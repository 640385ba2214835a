"""
The fault soak's DAG, run on a real scheduler and triggerer by ``scripts/soak.py``.

Its plan is read from ``soak_plan.json`` next to this file (``make soak`` writes both into its
deployment's DAG folder), or from the file ``HPC_SOAK_PLAN`` names (the system tests serve this
folder as a DAG bundle), so the DAG stays the same from one parse to the next; without a plan the
file defines no DAG:

- ``muse``: the keyword arguments of each mapped ``MuseRunOperator`` (``cmd``, ``returned_type``);
- ``rescale_runs``: how many Rescale runs to watch; run ``i`` is ``dag_run.conf["rescale"][i]``
  (``{"job_id", "run_id"}``), since the soak makes the Rescale jobs just before triggering;
- ``settings``: retries and polling, shared by every task.

Each Rescale run is watched by a deferrable ``RescaleRunSensor`` and then harvested by
``RescaleDownloadOutputsOperator``; a failed run leaves its harvest ``upstream_failed``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.operators.rescale_download import RescaleDownloadOutputsOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

DAG_ID = "hpc_soak"
PLAN_PATH = Path(os.environ.get("HPC_SOAK_PLAN") or Path(__file__).with_name("soak_plan.json"))


def _plan() -> dict | None:
    try:
        return json.loads(PLAN_PATH.read_text())
    except FileNotFoundError:
        return None


PLAN = _plan()

if PLAN is not None:
    settings = PLAN["settings"]
    polling = {
        "poll_interval": settings["poll_interval"],
        "max_poll_interval": settings["max_poll_interval"],
        "max_poll_failures": settings["max_poll_failures"],
    }
    with DAG(DAG_ID, schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
             max_active_tasks=settings["max_active_tasks"], tags=["soak"]):
        MuseRunOperator.partial(
            task_id="muse",
            name="sw_example",
            deferrable=True,
            retries=settings["muse_retries"],
            retry_delay=timedelta(seconds=settings["retry_delay"]),
            **polling,
        ).expand_kwargs(PLAN["muse"])

        for index in range(PLAN["rescale_runs"]):
            wait = RescaleRunSensor(
                task_id=f"rescale_wait_{index}",
                job_id="{{ dag_run.conf['rescale'][%d]['job_id'] }}" % index,
                run_id="{{ dag_run.conf['rescale'][%d]['run_id'] }}" % index,
                deferrable=True,
                timeout=settings["rescale_timeout"],
                outcome_wait=10,
                retries=settings["rescale_wait_retries"],
                retry_delay=timedelta(seconds=settings["retry_delay"]),
                **polling,
            )
            harvest = RescaleDownloadOutputsOperator(
                task_id=f"rescale_harvest_{index}",
                job_id="{{ dag_run.conf['rescale'][%d]['job_id'] }}" % index,
                run_id="{{ dag_run.conf['rescale'][%d]['run_id'] }}" % index,
                concurrency=4,
                retries=settings["harvest_retries"],
                retry_delay=timedelta(seconds=settings["retry_delay"]),
            )
            wait >> harvest
