"""
A Rescale snapshot whose first try dies right after the request was answered and kept.

``start`` submits a job whose run writes a line every 0.3 s for a minute (long enough to be in
progress while both tries of ``snapshot`` run).

The retry must find the request in ``task_state_store``, take no second snapshot, and wait for
the one already asked for.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG

from airflow_provider_hpc.operators.rescale import SNAPSHOT_STATE_KEY, RescaleSnapshotRunOperator
from airflow_provider_hpc.operators.rescale_submit import RescaleSubmitJobOperator

LONG_RUN = {
    "name": "snapshot-retry",
    "jobanalyses": [{"command": "i=0; while [ $i -lt 200 ]; do echo step $i >> log.txt; sleep 0.3; i=$((i+1)); done"}],
}


class WorkerLost(BaseException):
    """The simulated death of the worker running the first try (no error of the store)."""


class _DiesOnceAnswered:
    """Wraps the real ``task_state_store``: the write holding the snapshot's answer lands, then the try dies."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def get(self, key: str, default: Any = None) -> Any:
        """Read through to the real store."""
        return self._store.get(key, default)

    def set(self, key: str, value: Any, **kwargs: Any) -> None:
        """Write through; die once the snapshot's answer is kept."""
        self._store.set(key, value, **kwargs)
        if key == SNAPSHOT_STATE_KEY and value.get("result") is not None:
            raise WorkerLost("worker lost right after the snapshot request was answered")

    def delete(self, key: str) -> None:
        """Delete through to the real store."""
        self._store.delete(key)


class SnapshotDyingOnce(RescaleSnapshotRunOperator):
    """A snapshot task whose first try dies once its request was answered and kept."""

    def execute(self, context: Any) -> dict[str, Any]:
        """Run as usual, with a store that kills the first try after the answer is kept."""
        if context["ti"].try_number == 1:
            context["task_state_store"] = _DiesOnceAnswered(context["task_state_store"])
        return super().execute(context)


with DAG(dag_id="rescale_snapshot_retry", schedule=None, start_date=datetime(2025, 1, 1), catchup=False):
    start = RescaleSubmitJobOperator(task_id="start", job=LONG_RUN, wait_for_completion=False)
    start >> SnapshotDyingOnce(
        task_id="snapshot",
        job_id=start.output["job_id"],
        run_id="1",
        wait_for_file=True,
        retries=1,
        retry_delay=timedelta(seconds=0),
        poll_interval=0.3,
        max_poll_interval=0.6,
        wait_timeout=120,
    )
