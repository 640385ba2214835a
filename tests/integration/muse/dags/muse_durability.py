"""
Muse runs whose tries fail where a second cluster job would be easy to start by mistake.

- ``muse_lost_after_collect``: the first try collects the result, then its worker is lost before
  Airflow stores the return value; the retry must collect the same run again.
- ``muse_store_down``: every ``task_state_store`` write fails (the API server answering 500); the
  task must go on waiting on the run it submitted, not fail and submit again on its retry.
- ``muse_inputs_changed``: the command depends on the try; the first try dies after storing its
  key, and the retry, whose inputs differ, must submit anew and say why.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG

from airflow_provider_hpc.operators.muse import MuseRunOperator
from muse_retry_reattach import MuseRunOperatorDyingOnce, WorkerLost

FAST = {"retries": 1, "retry_delay": timedelta(seconds=0), "poll_interval": 0.3, "max_poll_interval": 0.6, "timeout": 120}


class MuseRunOperatorLostAfterCollect(MuseRunOperator):
    """A ``MuseRunOperator`` whose first try is lost once it has collected the result."""

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Collect as usual; on the first try, die before Airflow stores the value."""
        value = super().execute_complete(context, event)
        if context["ti"].try_number == 1:
            raise WorkerLost("worker lost after collecting the result")
        return value


class _FailingStore:
    """A ``task_state_store`` whose every write fails, as when the API server answers 500."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.writes = 0

    def get(self, key: str, default: Any = None) -> Any:
        """Read through to the real store."""
        return self._store.get(key, default)

    def set(self, key: str, value: Any, **kwargs: Any) -> None:
        """Fail, as an unavailable API server does."""
        self.writes += 1
        raise RuntimeError(f"500 Internal Server Error while storing {key!r} (write {self.writes})")

    def delete(self, key: str) -> None:
        """Delete through to the real store."""
        self._store.delete(key)


class MuseRunOperatorStoreDown(MuseRunOperator):
    """A ``MuseRunOperator`` whose state store never accepts a write."""

    def execute(self, context: Any) -> dict[str, Any]:
        """Run as usual with a failing store."""
        context["task_state_store"] = _FailingStore(context["task_state_store"])
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resume as usual with a failing store."""
        context["task_state_store"] = _FailingStore(context["task_state_store"])
        return super().execute_complete(context, event)


with DAG(dag_id="muse_lost_after_collect", schedule=None, start_date=datetime(2025, 1, 1), catchup=False):
    MuseRunOperatorLostAfterCollect(task_id="add", name="sw_example", cmd="python /add.py 4 5", **FAST)

with DAG(dag_id="muse_store_down", schedule=None, start_date=datetime(2025, 1, 1), catchup=False):
    MuseRunOperatorStoreDown(task_id="add", name="sw_example", cmd="sleep 1; python /add.py 4 5", **FAST)

with DAG(dag_id="muse_inputs_changed", schedule=None, start_date=datetime(2025, 1, 1), catchup=False):
    # A template that renders differently on the retry: a fixed DAG, a re-rendered input.
    MuseRunOperatorDyingOnce(task_id="add", name="sw_example", cmd="python /add.py {{ ti.try_number }} 5", **FAST)
