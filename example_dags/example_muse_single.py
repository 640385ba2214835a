"""
One Muse cluster run: ``python /add.py 4 5`` on ``sw_example``, whose stdout (``9.0``) a downstream task prints.

Needs a ``muse_default`` connection (see docs/connections.md); against the local emulator,
``make demo`` sets it through ``AIRFLOW_CONN_MUSE_DEFAULT``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_hpc.operators.muse import MuseRunOperator

with DAG(
    dag_id="example_muse_single",
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    tags=["example", "muse"],
    doc_md=__doc__,
):
    add = MuseRunOperator(
        task_id="add",
        name="sw_example",
        cmd="python /add.py 4 5",
        returned_type="stdout",
        # 2 s suits the emulator's quick runs; on a real cluster keep the default 10 s or more
        # (docs/errors.md: "A deferred task failed with no error in its log").
        poll_interval=2,
        max_poll_interval=30,
        timeout=3600,
    )

    @task
    def show(result: dict[str, Any]) -> float:
        """Print the run's result and hand it on as a number."""
        total = float(result["stdout"])
        print(f"Muse run {result['key']} (SLURM job {result['job_id']}) says 4 + 5 = {total}")
        return total

    show(add.output)
