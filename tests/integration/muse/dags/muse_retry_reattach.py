"""
A Muse run whose first try dies right after the run's key reached ``task_state_store``.

The first try submits, stores the key, then raises as a worker lost at that moment would; the
retry must find the key, re-attach to the same run (no second submission) and return its stdout.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_hpc.operators.muse import MuseRunOperator


class WorkerLost(BaseException):
    """
    The simulated death of the worker running the first try.

    A ``BaseException``, as a killed process is no error of the store: the operator tries failed
    store writes again, but never survives its worker.
    """


class _DiesAfterStoring:
    """Wraps the real ``task_state_store``: every write lands, then the try dies."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def get(self, key: str, default: Any = None) -> Any:
        """Read through to the real store."""
        return self._store.get(key, default)

    def set(self, key: str, value: Any, **kwargs: Any) -> None:
        """Write through to the real store, then die."""
        self._store.set(key, value, **kwargs)
        raise WorkerLost(f"worker lost right after storing {key!r}")

    def delete(self, key: str) -> None:
        """Delete through to the real store."""
        self._store.delete(key)


class MuseRunOperatorDyingOnce(MuseRunOperator):
    """A ``MuseRunOperator`` whose first try dies right after the key is stored."""

    def execute(self, context: Any) -> dict[str, Any]:
        """Run as usual, with a store that kills the first try after its write."""
        if context["ti"].try_number == 1:
            context["task_state_store"] = _DiesAfterStoring(context["task_state_store"])
        return super().execute(context)


with DAG(dag_id="muse_retry_reattach", schedule=None, start_date=datetime(2025, 1, 1), catchup=False):
    add = MuseRunOperatorDyingOnce(
        task_id="add",
        name="sw_example",
        # Long enough that the retry finds the run still going and re-attaches to it.
        cmd="sleep 2; python /add.py 4 5",
        retries=1,
        retry_delay=timedelta(seconds=0),
        poll_interval=0.3,
        max_poll_interval=0.6,
        timeout=120,
    )

    @task
    def show(result: dict[str, Any]) -> float:
        """Hand the run's stdout on as a number."""
        return float(result["stdout"])

    show(add.output)
