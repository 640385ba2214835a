"""MuseJobTrigger against the emulator over real HTTP: one event per outcome, faults absorbed, nothing leaked."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
import requests

from hpc_emulator import EmulatorServer
from airflow_provider_hpc.transport import aio
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.triggers.muse import EVENT_STATUSES, MuseJobTrigger

from muse_support import FAST_POLL, FAST_RETRY, PASSWORD, STATE_ROUTE, first_event, rebuild, set_faults

EVENT_KEYS = {"status", "name", "key", "report", "message"}
REPORT_KEYS = {"name", "cr", "latest_cr", "latest_state", "job_id", "jobname", "request"}


def submit(cmd: str, **fields: Any) -> str:
    """Submit ``cmd`` to ``sw_example`` through the hook and return the run's key."""
    hook = MuseHook()
    try:
        return hook.submit("sw_example", cmd=cmd, **fields).key
    finally:
        hook.close()


def make_trigger(key: str, **overrides: Any) -> MuseJobTrigger:
    """A trigger on ``muse_default`` with fast polls, rebuilt from ``serialize()`` as the triggerer does."""
    kwargs: dict[str, Any] = {
        "muse_conn_id": "muse_default",
        "name": "sw_example",
        "key": key,
        "max_poll_failures": 3,
        "retry": FAST_RETRY,
        **FAST_POLL,
    }
    kwargs.update(overrides)
    return rebuild(MuseJobTrigger(**kwargs))


def run(trigger: MuseJobTrigger) -> dict[str, Any]:
    """Run the trigger to its event; check the payload is plain JSON and return it."""
    payload = asyncio.run(first_event(trigger))
    assert json.loads(json.dumps(payload)) == payload
    assert set(payload) == EVENT_KEYS
    assert payload["status"] in EVENT_STATUSES
    return payload


def test_ok_event_carries_the_final_report(muse: EmulatorServer) -> None:
    key = submit("python /add.py 4 5")

    event = run(make_trigger(key))

    assert event["status"] == "ok"
    assert (event["name"], event["key"]) == ("sw_example", key)
    report = event["report"]
    assert set(report) == REPORT_KEYS
    assert report["cr"] == "OK"
    assert report["latest_cr"] == "ENDED_OK"
    assert report["latest_state"] == "COMPLETED"
    assert isinstance(report["job_id"], int)
    assert report["jobname"].endswith("-ws-sw_example")
    assert report["request"]["cmd"] == "python /add.py 4 5"
    assert key in event["message"] and "ended well" in event["message"]


def test_nok_event_names_the_slurm_state(muse: EmulatorServer) -> None:
    key = submit("python /add.py 4 x")

    event = run(make_trigger(key))

    assert event["status"] == "nok"
    assert event["report"]["cr"] == "NOK"
    assert event["report"]["latest_state"] == "FAILED"
    assert event["report"]["latest_cr"] == "ENDED_NOK"
    assert "FAILED" in event["message"] and str(event["report"]["job_id"]) in event["message"]


def test_timeout_event_while_the_run_goes_on(muse: EmulatorServer) -> None:
    key = submit("sleep 5; python /add.py 1 2")

    started = time.monotonic()
    event = run(make_trigger(key, deadline=time.time() + 0.4))

    assert time.monotonic() - started < 3
    assert event["status"] == "timeout"
    assert event["report"]["cr"] == "WAIT"
    assert event["report"]["latest_state"] in ("PENDING", "RUNNING")
    assert "no cancel endpoint" in event["message"]
    # Muse cannot cancel: the run is still going on the cluster after the wait gave up.
    jobs = requests.get(f"{muse.base_url}/_emulator/muse/jobs", timeout=10).json()
    assert [job["state"] for job in jobs if job["key"] == key] == ["RUNNING"]


def test_error_event_for_a_key_the_service_does_not_know(muse: EmulatorServer) -> None:
    event = run(make_trigger(str(uuid.uuid4())))

    assert event["status"] == "error"
    assert event["report"] is None
    assert "404" in event["message"] and "Unknown key" in event["message"]
    # A refusal is permanent: no second poll.
    assert muse.counters.get("requests", STATE_ROUTE) == 1


def test_error_event_for_a_missing_connection(muse: EmulatorServer) -> None:
    event = run(make_trigger(str(uuid.uuid4()), muse_conn_id="muse_nowhere"))

    assert event["status"] == "error"
    assert "muse_nowhere" in event["message"]


def test_error_event_once_polling_keeps_failing(muse: EmulatorServer) -> None:
    key = submit("python /add.py 4 5")
    set_faults(muse, [{"route": STATE_ROUTE.replace("{name}/{key}", "*"), "action": {"status": 503}}])

    event = run(make_trigger(key, max_poll_failures=2, retry={**FAST_RETRY, "max_attempts": 2}))

    assert event["status"] == "error"
    assert "2 times in a row" in event["message"] and "503" in event["message"]
    # Two polls of two attempts each, no more.
    assert muse.counters.get("requests", STATE_ROUTE) == 4


def test_throttling_and_server_errors_during_polling_are_absorbed(muse: EmulatorServer) -> None:
    key = submit("sleep 0.3; python /add.py 4 5")
    route = "GET /api/software/muse/state/*"
    faults = [
        {"status": 429, "retry_after": 0.05},
        {"status": 503},
        {"status": 502},
        "pass",
        {"status": 500},
        {"status": 504},
        {"status": 429, "retry_after": 0.05},
        {"drop": True},
        {"status": 503},
    ]
    set_faults(muse, [{"route": route, "sequence": faults}])

    event = run(make_trigger(key))

    assert event["status"] == "ok"
    assert event["report"]["latest_state"] == "COMPLETED"
    served = requests.get(f"{muse.base_url}/_emulator/faults", timeout=10).json()
    assert served[0]["remaining"] == 0, "every injected fault was met and got past"
    assert sum(muse.counters.snapshot()["faults"].values()) == len(faults) - 1


def test_polls_of_one_trigger_share_one_session(muse: EmulatorServer) -> None:
    key = submit("sleep 0.4; python /add.py 4 5")
    seen: set[int] = set()
    original = aio.AsyncTransport.request_json

    async def spy(self: aio.AsyncTransport, *args: Any, **kwargs: Any) -> Any:
        pool = aio._SESSIONS.get(asyncio.get_running_loop())
        seen.update(id(session) for session in pool.sessions.values())
        return await original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aio.AsyncTransport, "request_json", spy)
        event = run(make_trigger(key))

    assert event["status"] == "ok"
    assert muse.counters.get("requests", STATE_ROUTE) >= 3
    assert len(seen) == 1


def test_cancellation_leaves_no_open_session(muse: EmulatorServer) -> None:
    key = submit("sleep 5; python /add.py 1 2")
    sessions: list[Any] = []

    async def scenario() -> None:
        trigger = make_trigger(key)
        task = asyncio.create_task(first_event(trigger))
        loop = asyncio.get_running_loop()
        while muse.counters.get("requests", STATE_ROUTE) < 2:
            await asyncio.sleep(0.01)
        pool = aio._SESSIONS.get(loop)
        sessions.extend(pool.sessions.values())
        assert sessions and not any(session.closed for session in sessions)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancellation went through (never swallowed), and the session went with the trigger.
        pool = aio._SESSIONS.get(loop)
        assert not pool or not pool.sessions
        assert all(session.closed for session in sessions)

    asyncio.run(scenario())
    assert len(sessions) == 1


def test_serialized_kwargs_hold_no_secret(muse: EmulatorServer) -> None:
    key = submit("python /add.py 4 5")
    hook = MuseHook()
    token = hook.get_token()
    hook.close()
    trigger = make_trigger(key)

    event = run(trigger)
    classpath, kwargs = trigger.serialize()

    assert classpath == "airflow_provider_hpc.triggers.muse.MuseJobTrigger"
    assert set(kwargs) == {
        "muse_conn_id", "name", "key", "poll_interval", "max_poll_interval", "deadline", "max_poll_failures", "retry",
        "end_from_trigger", "first_poll_at",
    }
    assert all(isinstance(v, (str, int, float, type(None), dict)) for v in kwargs.values())
    dumped = json.dumps(kwargs) + json.dumps(event)
    for secret in (PASSWORD, token):
        assert secret not in dumped
    assert "jwt" not in dumped and "token" not in dumped and "password" not in dumped
    assert rebuild(trigger).serialize() == (classpath, kwargs)
