"""
The DAGs of the worker-cost benchmark (``benchmarks/worker_cost.py``), one per way of waiting.

Each DAG maps one ``MuseJobSensor`` over ``jobs`` Muse runs that the benchmark submitted just
before triggering it; run ``i`` watches ``dag_run.conf["keys"][i]``. The plan is read from
``bench_worker_cost.json`` next to this file (the benchmark writes both into the deployment's DAG
folder), so the DAGs stay the same from one parse to the next:

- ``jobs``: how many sensors (and Muse runs) per DAG run;
- ``poke_interval``: seconds between two checks, in every mode; the deferred trigger polls at the
  same fixed interval (``max_poll_interval`` equal to it, so no backoff).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from airflow.sdk import DAG

from airflow_provider_hpc.sensors.muse import MuseJobSensor

PLAN_PATH = Path(__file__).with_name("bench_worker_cost.json")
# The ways of waiting that are compared, by DAG id suffix.
MODES = {
    "deferrable": {"deferrable": True},
    "end_from_trigger": {"deferrable": True, "end_from_trigger": True},
    "reschedule": {"deferrable": False, "mode": "reschedule"},
    "poke": {"deferrable": False, "mode": "poke"},
}


def _plan() -> dict | None:
    try:
        return json.loads(PLAN_PATH.read_text())
    except FileNotFoundError:
        return None


PLAN = _plan()

if PLAN is not None:
    for _mode, _kwargs in MODES.items():
        with DAG(f"bench_worker_{_mode}", schedule=None, start_date=datetime(2024, 1, 1), catchup=False,
                 max_active_tasks=PLAN["jobs"], tags=["benchmark"]):
            MuseJobSensor.partial(
                task_id="watch",
                name="sw_example",
                poke_interval=PLAN["poke_interval"],
                max_poll_interval=PLAN["poke_interval"],
                timeout=PLAN["timeout"],
                **_kwargs,
            ).expand(key=["{{ dag_run.conf['keys'][%d] }}" % index for index in range(PLAN["jobs"])])
