"""
Deferred waits that ride out a metadata database outage, for the database outage scenario.

``muse_{i}`` submit a Muse run each and wait for it; ``rescale_{i}`` wait on Rescale jobs the test
started (the even ones end in the triggerer, ``end_from_trigger``). Every remote command waits for
a gate file the test creates while PostgreSQL is down, so the runs end during the outage and every
wait can complete only once the database is back.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

# test_database_outage.py holds the same numbers.
MUSE_WAITS = 20
RESCALE_WAITS = 10
POLL = {"poll_interval": 1.0, "max_poll_interval": 2.0}
# A retry would show in try_number, which the test reports: it expects none.
RETRY = {"retries": 2, "retry_delay": timedelta(seconds=5)}

with DAG("system_database_outage", schedule=None, start_date=datetime(2025, 1, 1), catchup=False,
         max_active_tasks=MUSE_WAITS + RESCALE_WAITS, tags=["system"]):
    gate = "{{ dag_run.conf['gate'] }}"
    for i in range(MUSE_WAITS):
        MuseRunOperator(task_id=f"muse_{i}", name="sw_example",
                        cmd="until [ -e %s ]; do sleep 1; done; python /add.py %d 300" % (gate, i),
                        deferrable=True, timeout=1800, **POLL, **RETRY)
    for i in range(RESCALE_WAITS):
        RescaleRunSensor(task_id=f"rescale_{i}", job_id="{{ dag_run.conf['job_ids'][%d] }}" % i, run_id="1",
                         deferrable=True, timeout=1800, outcome_wait=10, end_from_trigger=i % 2 == 0, **POLL, **RETRY)
