"""
What tasks keep in ``task_state_store``: writes that survive a failing store, entries that belong
to one try cycle, and the Rescale sensor's wait for its job's verdict across reschedules.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from airflow_provider_hpc import durable
from airflow_provider_hpc.durable import TaskState, fingerprint
from airflow_provider_hpc.hooks.rescale import JobStatus, RescaleRun
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor


class Store:
    """A ``task_state_store`` double: JSON values by key; the first ``failures`` writes raise."""

    def __init__(self, failures: int = 0) -> None:
        self.values: dict[str, Any] = {}
        self.failures = failures
        self.attempts = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, **_: Any) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise RuntimeError("500 Internal Server Error")
        self.values[key] = value

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


@dataclass
class Ti:
    """The part of a task instance the state uses: its try cycle."""

    max_tries: int = 2
    try_number: int = 1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class Log:
    """Keeps the formatted log lines by level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda message, *args, **_: self.lines.append((level, message % args if args else message))


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "WRITE_BACKOFF", 0.0)


def test_a_write_is_tried_again_until_it_lands() -> None:
    store, log = Store(failures=2), Log()
    state = TaskState({"task_state_store": store, "ti": Ti()}, "k", log)

    assert state.set({"key": "abc"}, what="Muse run x/abc") is True
    assert store.values["k"] == {"key": "abc", "cycle": 2} and store.attempts == 3
    assert not log.lines


def test_a_store_that_keeps_failing_is_logged_with_what_it_held_and_the_task_goes_on() -> None:
    store, log = Store(failures=99), Log()
    state = TaskState({"task_state_store": store, "ti": Ti()}, "k", log)

    assert state.set({"key": "abc"}, what="Muse run x/abc") is False
    assert store.attempts == durable.WRITE_ATTEMPTS
    assert [level for level, _ in log.lines] == ["error"]
    assert "Muse run x/abc" in log.lines[0][1] and "going on" in log.lines[0][1]


def test_an_entry_belongs_to_its_try_cycle() -> None:
    store = Store()
    TaskState({"task_state_store": store, "ti": Ti(max_tries=2)}, "k", Log()).set({"key": "abc"}, what="x")
    entry = store.values["k"]

    assert TaskState({"task_state_store": store, "ti": Ti(max_tries=2, try_number=2)}, "k", Log()).same_cycle(entry)
    # Clearing a task instance raises its max_tries: a new cycle, which runs anew.
    assert not TaskState({"task_state_store": store, "ti": Ti(max_tries=4)}, "k", Log()).same_cycle(entry)
    # A runtime that does not say is never taken for the same cycle.
    assert not TaskState({"task_state_store": store, "ti": object()}, "k", Log()).same_cycle(entry)


def test_without_a_store_nothing_is_kept_and_nothing_fails() -> None:
    state = TaskState({"ti": Ti()}, "k", Log())

    assert not state.available and state.get() is None and state.set({"key": "abc"}, what="x") is False


def test_a_fingerprint_changes_with_any_input() -> None:
    base = fingerprint(name="sw", cmd="python /add.py 4 5", files=["a.txt"])

    assert base == fingerprint(files=["a.txt"], cmd="python /add.py 4 5", name="sw")
    assert base != fingerprint(name="sw", cmd="python /add.py 4 6", files=["a.txt"])
    assert base != fingerprint(name="sw", cmd="python /add.py 4 5", files=["b.txt"])


# ----- RescaleRunSensor in reschedule mode ------------------------------------------------------------


T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
DONE = RescaleRun(id="1", date_started="2024-05-01T12:00:01Z", date_completed="2024-05-01T12:05:00Z")
# The run completed, its job not yet (another run still going), nothing failed.
JOB_GOING = [JobStatus("Queued", T0, None), JobStatus("Executing", T0 + timedelta(seconds=1), None)]


class FakeRescaleHook:
    """Answers a completed run and a job still executing."""

    def get_run(self, job_id: str, run_id: str) -> RescaleRun:
        return DONE

    def get_job_statuses(self, job_id: str) -> list[JobStatus]:
        return list(JOB_GOING)


def poke_once(context: dict[str, Any]) -> Any:
    """One poke by a fresh sensor instance, as each reschedule gets."""
    sensor = RescaleRunSensor(
        task_id="wait", job_id="jobA", run_id="1", deferrable=False, mode="reschedule", outcome_wait=0.3, poke_interval=0.05,
    )
    sensor.__dict__["hook"] = FakeRescaleHook()
    return sensor.poke(context)


def test_the_wait_for_the_job_verdict_spans_reschedules() -> None:
    context = {"task_state_store": Store(), "ti": Ti()}

    assert poke_once(context) is False  # the job may still say how it ended
    time.sleep(0.35)
    done = poke_once(context)  # a new instance: the wait started at the first poke, not now

    assert done and done.xcom_value["status"] == "success" and "not completed yet" in done.xcom_value["reason"]


# ----- RescaleSnapshotRunOperator: a refused request may be asked again ---------------------------------


class RefusingSnapshotHook:
    """A run in progress whose snapshot request is refused with a 400."""

    def get_run(self, job_id: str, run_id: str) -> RescaleRun:
        return RescaleRun(id="1", date_started="2024-05-01T12:00:01Z")

    def list_output_files(self, job_id: str, run_id: str) -> list[Any]:
        return []

    def snapshot_run(self, job_id: str, run_id: str) -> Any:
        from airflow_provider_hpc.exceptions import RescaleApiError

        raise RescaleApiError("HTTP 400 from the server", status=400)


def test_a_refused_snapshot_request_leaves_no_entry_so_a_retry_asks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_hpc.exceptions import RescaleApiError
    from airflow_provider_hpc.links.rescale import RescaleJobLink
    from airflow_provider_hpc.operators.rescale import SNAPSHOT_STATE_KEY, RescaleSnapshotRunOperator

    monkeypatch.setattr(RescaleJobLink, "persist", staticmethod(lambda *args, **kwargs: ""))
    store = Store()
    task = RescaleSnapshotRunOperator(task_id="snap", job_id="jobA", run_id="1", deferrable=False)
    task.__dict__["hook"] = RefusingSnapshotHook()
    with pytest.raises(RescaleApiError, match="400"):
        task.execute({"task_state_store": store, "ti": Ti()})
    assert SNAPSHOT_STATE_KEY not in store.values
