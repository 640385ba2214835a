"""
One Muse cluster run: ``python /add.py 4 5`` on ``sw_example``, whose stdout (``9.0``) a downstream task prints.

Needs a ``muse_default`` connection (see docs/connections.md); against the local emulator,
``make demo`` sets it through ``AIRFLOW_CONN_MUSE_DEFAULT``.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_hpc.operators.muse import MuseRunOperator

# Poll every 10 s or more on the real services (docs/errors.md, "A deferred task failed with no
# error in its log"); only the demo and the tests set MUSE_EXAMPLE_POLL_SECONDS lower, for the
# emulator's runs of a second.
POLL_SECONDS = float(os.environ.get("MUSE_EXAMPLE_POLL_SECONDS", "10"))
# Every deferrable task has retries: a Muse retry re-attaches to the run its first try submitted
# and returns its result, without a second submission.
RETRIES = {"retries": 2, "retry_delay": timedelta(seconds=5)}

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
        poll_interval=POLL_SECONDS,
        max_poll_interval=30,
        timeout=3600,
        **RETRIES,
    )

    @task
    def show(result: dict[str, Any]) -> float:
        """Print the run's result and hand it on as a number."""
        total = float(result["stdout"])
        print(f"Muse run {result['key']} (SLURM job {result['job_id']}) says 4 + 5 = {total}")
        return total

    show(add.output)
