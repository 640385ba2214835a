"""
What the Muse integration tests share: a minimal task context, an in-memory ``task_state_store``,
and a driver that runs an operator the way a worker and a triggerer would, against the emulator.

The driver runs ``execute``; when the task defers, it rebuilds the trigger from ``serialize()``
(as the triggerer does from the metadata database), runs it with asyncio, and resumes the task
through ``resume_execution`` with the event's payload, as the task runner does.
"""

from __future__ import annotations

import asyncio
import importlib
import json
from dataclasses import dataclass, field
from typing import Any

import requests
from airflow.sdk.exceptions import TaskDeferred

from hpc_emulator import EmulatorServer
from airflow_provider_hpc.triggers.muse import MuseJobTrigger

#: Poll settings that keep a test's wait within a fraction of a second.
FAST_POLL = {"poll_interval": 0.05, "max_poll_interval": 0.2}
#: A transport retry policy whose waits last milliseconds (crosses into triggers as plain numbers).
FAST_RETRY = {"max_attempts": 4, "initial_wait": 0.01, "max_wait": 0.05, "max_retry_after": 0.2}


class MemoryStateStore:
    """Stands for Airflow's ``TaskStateStoreAccessor``: JSON values by key, kept across tries."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.writes: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        """Return the stored value (a JSON copy, as the real store gives), or ``default``."""
        return json.loads(json.dumps(self.values[key])) if key in self.values else default

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        """Store a JSON value under ``key``."""
        if value is None:
            raise ValueError("Cannot set value as None")
        self.values[key] = json.loads(json.dumps(value))
        self.writes.append(key)

    def delete(self, key: str) -> None:
        """Forget ``key`` (no error when absent)."""
        self.values.pop(key, None)

    def clear(self) -> None:
        """Forget every key."""
        self.values.clear()


@dataclass
class FakeTaskInstance:
    """The part of a running task instance the Muse operators and sensors use."""

    task_id: str = "muse_task"
    dag_id: str = "muse_dag"
    run_id: str = "manual__2026-01-01T00:00:00+00:00"
    map_index: int = -1
    try_number: int = 1
    xcom: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        """Keep a pushed value (JSON round trip, as the XCom table does)."""
        self.xcom[key] = json.loads(json.dumps(value))

    def xcom_pull(self, task_ids: Any = None, key: str = "return_value", **_: Any) -> Any:
        """Return a pushed value of this task instance."""
        return self.xcom.get(key)

    def get_first_reschedule_date(self, context: Any) -> None:
        """Say this is the first reschedule (reschedule-mode sensors ask)."""
        return None


class OutletEvents(dict):
    """``context["outlet_events"]``: one accessor with an ``extra`` dict per asset."""

    def __missing__(self, asset: Any) -> Any:
        accessor = type("OutletEventAccessor", (), {})()
        accessor.extra = {}
        self[asset] = accessor
        return accessor


def make_context(
    store: MemoryStateStore | None = None, ti: FakeTaskInstance | None = None, **ti_fields: Any
) -> dict[str, Any]:
    """Return a minimal task context: ``ti``, ``task_state_store`` (unless ``None``) and ``outlet_events``."""
    context: dict[str, Any] = {"ti": ti or FakeTaskInstance(**ti_fields), "outlet_events": OutletEvents()}
    if store is not None:
        context["task_state_store"] = store
    return context


def rebuild(trigger: Any) -> MuseJobTrigger:
    """Rebuild a trigger from ``serialize()`` through JSON, as the triggerer does from the database."""
    classpath, kwargs = trigger.serialize()
    kwargs = json.loads(json.dumps(kwargs))
    module, _, name = classpath.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


async def first_event(trigger: Any) -> dict[str, Any]:
    """Run a trigger until its first event and return the payload."""
    async for event in trigger.run():
        return event.payload
    raise AssertionError("the trigger ended without an event")


@dataclass
class Driven:
    """What :func:`drive` saw: the task's return value, and every deferral and event on the way."""

    value: Any = None
    deferrals: list[TaskDeferred] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


def drive(task: Any, context: dict[str, Any], *, max_deferrals: int = 5) -> Driven:
    """Run ``task`` as a worker plus a triggerer would: execute, then every deferral, then resume."""
    driven = Driven()
    try:
        driven.value = task.execute(context)
        return driven
    except TaskDeferred as deferred:
        current = deferred
    for _ in range(max_deferrals):
        driven.deferrals.append(current)
        payload = asyncio.run(first_event(rebuild(current.trigger)))
        driven.events.append(payload)
        # The task runner hands the payload through JSON (the next_kwargs column).
        payload = json.loads(json.dumps(payload))
        try:
            driven.value = task.resume_execution(current.method_name, {"event": payload}, context)
            return driven
        except TaskDeferred as deferred:
            current = deferred
    raise AssertionError(f"the task deferred more than {max_deferrals} times")


def set_faults(emulator: EmulatorServer, rules: list[dict[str, Any]]) -> None:
    """Replace the emulator's fault rules through its admin endpoint."""
    answer = requests.post(f"{emulator.base_url}/_emulator/faults", json=rules, timeout=10)
    answer.raise_for_status()


def submissions(emulator: EmulatorServer) -> int:
    """Return how many cluster runs the emulator accepted."""
    return emulator.counters.get("muse_submissions", "")


#: The Muse account's password: long enough for the secrets masker, so leak checks mean something.
PASSWORD = "s3cret-muse-password-42"

STATE_ROUTE = "GET /api/software/muse/state/{name}/{key}/"
SUBMIT_ROUTE = "POST /api/software/muse/run/{name}/"


