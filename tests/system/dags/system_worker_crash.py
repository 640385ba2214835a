"""
A Muse run whose first try's worker dies between the submit and the deferral.

``run`` (queue ``worker_a``, up to three retries) submits ``python /add.py 20 22`` behind a gate file and, on
its first try that submits (try 1 unless the machine was too loaded to start it), stops right after the run's key is persisted in ``task_state_store``: it
writes a marker file (its host name, its process id, the key) and blocks, so the test can kill
that worker's machine while it is there. The retry must re-attach to the same run.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator

#: How long the first try blocks before it fails on its own: far beyond the test's kill.
BLOCK_SECONDS = 300.0


class BlockAfterSubmit(MuseRunOperator):
    """On the first try to submit, after the persisted key, announce it in a marker file and block."""

    def _resume_or_submit(self, context: Any) -> Any:
        found = super()._resume_or_submit(context)
        marker = Path(context["dag_run"].conf["submitted_marker"])
        # The first try that gets this far blocks: on a loaded machine try 1 may die before it starts.
        if not marker.exists():
            note = {"host": os.environ.get("HPC_CLUSTER_HOSTNAME"), "pid": os.getpid(), "key": found[0],
                    "try": context["ti"].try_number}
            # Written whole then renamed: the test never reads half a file.
            marker.with_suffix(".tmp").write_text(json.dumps(note))
            marker.with_suffix(".tmp").rename(marker)
            time.sleep(BLOCK_SECONDS)
            raise RuntimeError("this try was to be killed while it blocked after the submit, and was not")
        return found


with DAG("system_worker_crash", schedule=None, start_date=datetime(2025, 1, 1), catchup=False, tags=["system"]):
    BlockAfterSubmit(
        task_id="run", name="sw_example", returned_type="stdout.txt", queue="worker_a",
        cmd="until [ -e {{ dag_run.conf['gate'] }} ]; do sleep 0.2; done; python /add.py 20 22",
        deferrable=True, retries=3, retry_delay=timedelta(seconds=2), poll_interval=1, max_poll_interval=2, timeout=600,
    )
