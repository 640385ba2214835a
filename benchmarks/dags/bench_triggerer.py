"""
The DAG of the real-triggerer benchmark (``benchmarks/airflow_triggerer.py``).

Two mapped deferrable sensors over the keys of Muse runs the benchmark submitted:

- ``watch``: ``MuseJobSensor``, the provider's way of waiting;
- ``anchor``: Airflow's ``HttpSensor`` on the same state URLs, the hand-written way.

The benchmark does not run the DAG's tasks on workers: it creates the run with ``airflow dags
trigger`` and then writes each mapped task instance as deferred with its trigger row, as the
execution API does when a task defers (``benchmarks/trigger_rows.py``). Only the triggerer runs.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.http.sensors.http import HttpSensor
from airflow.sdk import DAG, get_current_context, task

from airflow_provider_hpc.sensors.muse import MuseJobSensor

DAG_ID = "bench_triggerer"

with DAG(DAG_ID, schedule=None, start_date=datetime(2024, 1, 1), catchup=False, tags=["benchmark"]):

    @task
    def keys() -> list[str]:
        """The Muse keys this run watches, from its conf."""
        return list(get_current_context()["dag_run"].conf["keys"])

    watched = keys()
    MuseJobSensor.partial(task_id="watch", name="sw_example", deferrable=True).expand(key=watched)
    HttpSensor.partial(task_id="anchor", http_conn_id="hpc_bench_http", deferrable=True).expand(endpoint=watched)
