"""
Helpers of the Rescale integration tests: a client of the emulator, a fake task instance, and a
way to run a deferring task to its end (its trigger in asyncio after a real ``serialize()``
round trip, then its resume method, as the triggerer and the worker do).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from airflow.sdk.exceptions import TaskDeferred
from airflow.triggers.base import BaseTrigger

from hpc_emulator import EmulatorServer
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.transport.retry import RetryPolicy

WAIT_SECONDS = 20.0
#: The API key of the tests' connection: long enough for the secrets masker, easy to look for.
API_KEY = "rk-test-0123456789abcdef-SECRET"
#: A fast but patient retry policy: five attempts, waits of milliseconds, Retry-After capped low.
FAST_RETRY = RetryPolicy(max_attempts=5, initial_wait=0.01, max_wait=0.05, max_retry_after=0.1)


def wait_for(probe: Callable[[], Any], timeout: float = WAIT_SECONDS, interval: float = 0.05) -> Any:
    """Call ``probe`` until it returns something truthy; return that (fail the test on timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"Timed out after {timeout}s")


@dataclass
class RescaleApi:
    """A plain HTTP client of the emulator's Rescale side, to set up jobs and observe them."""

    server: EmulatorServer
    session: requests.Session

    @property
    def api_key(self) -> str:
        """The API key the connections hold."""
        return sorted(self.server.config.rescale_api_keys)[0]

    def url(self, path: str) -> str:
        """Return the absolute v2 URL of an API path such as ``jobs/``."""
        return f"{self.server.rescale_url}/api/v2/{path}"

    def start_job(self, command: str, *, runs: list[dict[str, Any]] | None = None, **extra: Any) -> str:
        """Create and submit a job running ``command``; return its id."""
        body: dict[str, Any] = {"name": "test", "jobanalyses": [{"command": command}], **extra}
        if runs is not None:
            body["runs"] = runs
        created = self.session.post(self.url("jobs/"), json=body, timeout=10)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        submitted = self.session.post(self.url(f"jobs/{job_id}/submit/"), timeout=10)
        assert submitted.status_code == 200, submitted.text
        return job_id

    def run(self, job_id: str, run_id: str = "1") -> dict[str, Any]:
        """Return a run as the API shows it."""
        answer = self.session.get(self.url(f"jobs/{job_id}/runs/{run_id}/"), timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_started(self, job_id: str, run_id: str = "1") -> dict[str, Any]:
        """Wait until the run's process has started."""
        return wait_for(lambda: (run := self.run(job_id, run_id))["dateStarted"] and run)

    def wait_completed(self, job_id: str, run_id: str = "1") -> dict[str, Any]:
        """Wait until the run has completed (outputs uploaded)."""
        return wait_for(lambda: (run := self.run(job_id, run_id))["dateCompleted"] and run)

    def wait_job_completed(self, job_id: str) -> list[str]:
        """Wait until the job's latest status is ``Completed``; return its statuses in date order."""

        def completed() -> list[str] | None:
            results = self.session.get(self.url(f"jobs/{job_id}/statuses/"), timeout=10).json()["results"]
            history = [s["status"] for s in sorted(results, key=lambda s: s["statusDate"])]
            return history if history[-1] == "Completed" else None

        return wait_for(completed)

    def wait_file(self, job_id: str, run_id: str, relative_path: str) -> None:
        """Wait until a file of the running run's working folder exists."""

        def present() -> bool:
            answer = self.session.get(self.url(f"jobs/{job_id}/runs/{run_id}/directory-contents/"), timeout=10)
            return answer.status_code == 200 and any(e["path"] == relative_path for e in answer.json())

        wait_for(present)

    def wait_lines(self, job_id: str, run_id: str, relative_path: str, count: int) -> list[str]:
        """Wait until a file of the running run holds at least ``count`` lines; return its last lines."""

        def lines() -> list[str] | None:
            answer = self.session.get(
                self.url(f"jobs/{job_id}/runs/{run_id}/tail/{relative_path}/"), params={"lines": count}, timeout=10
            )
            found = answer.json()["lines"] if answer.status_code == 200 else []
            return found if len(found) >= count else None

        return wait_for(lines)

    def set_faults(self, rules: list[dict[str, Any]]) -> None:
        """Replace the emulator's fault rules."""
        answer = requests.post(f"{self.server.base_url}/_emulator/faults", json=rules, timeout=10)
        assert answer.status_code < 300, answer.text

    def requests_to(self, route: str) -> int:
        """Return how many requests reached a route template, e.g. ``GET /api/files/{file_id}/contents/``."""
        return self.server.counters.snapshot().get("requests", {}).get(route, 0)

    def stops(self, job_id: str, run_id: str = "1") -> int:
        """Return how many stop requests the run received."""
        return self.server.counters.get("rescale_stops", f"{job_id}/{run_id}")




@dataclass
class FakeTaskInstance:
    """The little of a task instance the operators use: ``xcom_push`` and the ids of the default output folder."""

    task_id: str = "task"
    dag_id: str = "dag"
    run_id: str = "manual__test"
    map_index: int = -1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        """Keep a pushed value, checking it is JSON-able as XCom requires."""
        json.dumps(value)
        self.xcom[key] = value




def rebuild(trigger: BaseTrigger) -> BaseTrigger:
    """Rebuild a trigger from ``serialize()``, as the triggerer does (JSON round trip included)."""
    classpath, kwargs = trigger.serialize()
    kwargs = json.loads(json.dumps(kwargs))
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


async def first_event(trigger: BaseTrigger) -> dict[str, Any]:
    """Run a trigger until its first event; return the payload."""
    try:
        async for event in trigger.run():
            return event.payload
    finally:
        await close_all_sessions()
    raise AssertionError("The trigger ended without an event")


@dataclass
class Deferral:
    """What a task handed to the triggerer: the rebuilt trigger, its kwargs, and the resume method."""

    trigger: BaseTrigger
    serialized: dict[str, Any]
    method_name: str
    kwargs: dict[str, Any]


def execute_until_deferred(operator: Any, context: dict[str, Any]) -> Deferral:
    """Call ``operator.execute`` and return its deferral (fail if it finished without deferring)."""
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)
    trigger = deferred.value.trigger
    return Deferral(rebuild(trigger), trigger.serialize()[1], deferred.value.method_name, deferred.value.kwargs or {})


def run_deferrable(operator: Any, context: dict[str, Any], api_key: str | None = None) -> tuple[Any, dict[str, Any]]:
    """
    Run a deferring task to its end: execute, the trigger until its event, then the resume method.

    Returns the task's result and the trigger event. When ``api_key`` is given, checks it is in
    neither the trigger's kwargs nor the event.
    """
    deferral = execute_until_deferred(operator, context)
    event = asyncio.run(first_event(deferral.trigger))
    if api_key:
        assert api_key not in json.dumps(deferral.serialized)
        assert api_key not in json.dumps(event)
    next_kwargs = json.loads(json.dumps({**deferral.kwargs, "event": event}))
    return operator.resume_execution(deferral.method_name, next_kwargs, context), event
