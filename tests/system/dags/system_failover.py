"""
Many deferred waits at once, for the triggerer failover scenario.

``muse_{i}`` submit a Muse run each and wait for it; ``rescale_{i}`` wait on Rescale jobs the test
started, ending in the triggerer (``end_from_trigger``, no second worker run). Every remote
command waits for a gate file the test creates once the failover is over, so each event comes
from the surviving triggerer.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor

# test_triggerer_failover.py holds the same numbers.
MUSE_WAITS = 100
RESCALE_WAITS = 100
# 200 triggers on two cores: poll every 2 s backing off to 5 s, about 50 requests a second in all.
POLL = {"poll_interval": 2.0, "max_poll_interval": 5.0}

with DAG("system_failover", schedule=None, start_date=datetime(2025, 1, 1), catchup=False,
         max_active_tasks=MUSE_WAITS + RESCALE_WAITS, tags=["system"]):
    gate = "{{ dag_run.conf['gate'] }}"
    for i in range(MUSE_WAITS):
        MuseRunOperator(task_id=f"muse_{i}", name="sw_example",
                        cmd="until [ -e %s ]; do sleep 1; done; python /add.py %d 100" % (gate, i),
                        deferrable=True, timeout=1800, **POLL)
    for i in range(RESCALE_WAITS):
        RescaleRunSensor(task_id=f"rescale_{i}", job_id="{{ dag_run.conf['job_ids'][%d] }}" % i, run_id="1",
                         deferrable=True, timeout=1800, outcome_wait=10, end_from_trigger=True, **POLL)
