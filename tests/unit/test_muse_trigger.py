"""MuseJobTrigger without a network: the hook's state call is scripted, the aiohttp session lease is real."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from typing import Any

import pytest
from airflow.sdk import Connection

from airflow_provider_hpc.exceptions import InvalidIdentifierError, MuseApiError
from airflow_provider_hpc.transport import aio
from airflow_provider_hpc.hooks.muse import MuseCr, MuseHook, MuseReport
from airflow_provider_hpc.triggers._polling import PollSchedule
from airflow_provider_hpc.triggers.muse import MuseJobTrigger

SECRET = "s3cret-muse-password"
KEY = "58ae6cea-df31-4059-9466-b817c337985d"


def report(cr: str, state: str | None = None, latest_cr: str | None = None) -> MuseReport:
    return MuseReport(name="sw_example", cr=MuseCr(cr), latest_cr=latest_cr, latest_state=state, job_id=2459394)


class ScriptedState:
    """Stands for ``MuseHook.a_get_state``: answers (or raises) the scripted items, the last one forever."""

    def __init__(self, items: Iterable[MuseReport | Exception]) -> None:
        self.items = list(items)
        self.calls = 0
        self.open_sessions: list[Any] = []

    async def __call__(self, hook: MuseHook, name: str, key: str) -> MuseReport:
        assert (name, key) == ("sw_example", KEY)
        pool = aio._SESSIONS.get(asyncio.get_running_loop())
        self.open_sessions = list(pool.sessions.values()) if pool else []
        item = self.items[min(self.calls, len(self.items) - 1)]
        self.calls += 1
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture
def connection(monkeypatch: pytest.MonkeyPatch) -> Connection:
    conn = Connection(conn_id="muse_test", conn_type="muse", host="http://127.0.0.1:9/api/", login="me", password=SECRET)

    async def aget_connection(cls: type, conn_id: str) -> Connection:
        assert conn_id == "muse_test"
        return conn

    monkeypatch.setattr(MuseHook, "aget_connection", classmethod(aget_connection))
    return conn


def script(monkeypatch: pytest.MonkeyPatch, *items: MuseReport | Exception) -> ScriptedState:
    scripted = ScriptedState(items)
    async def a_get_state(hook: MuseHook, name: str, key: str) -> MuseReport:
        return await scripted(hook, name, key)

    monkeypatch.setattr(MuseHook, "a_get_state", a_get_state)
    return scripted


def make_trigger(**overrides: Any) -> MuseJobTrigger:
    kwargs: dict[str, Any] = {
        "muse_conn_id": "muse_test",
        "name": "sw_example",
        "key": KEY,
        "poll_interval": 0.01,
        "max_poll_interval": 0.02,
        "max_poll_failures": 3,
        "retry": {"max_attempts": 2, "initial_wait": 0.01},
    }
    kwargs.update(overrides)
    return MuseJobTrigger(**kwargs)


async def all_events(trigger: MuseJobTrigger) -> list[dict[str, Any]]:
    return [event.payload async for event in trigger.run()]


async def test_ok_event_after_state_changes(
    connection: Connection, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted = script(
        monkeypatch,
        report("WAIT", "PENDING", "IN_PROGRESS"),
        report("WAIT", "RUNNING", "IN_PROGRESS"),
        report("OK", "COMPLETED", "ENDED_OK"),
    )
    events = await all_events(make_trigger())
    assert len(events) == 1
    event = events[0]
    assert set(event) == {"status", "name", "key", "report", "message"}
    assert event["status"] == "ok"
    assert (event["name"], event["key"]) == ("sw_example", KEY)
    assert event["report"] == report("OK", "COMPLETED", "ENDED_OK").to_dict()
    assert MuseReport.from_dict(event["report"]).is_successful
    assert scripted.calls == 3
    logged = capsys.readouterr().out  # Airflow's structlog writes task and trigger logs to stdout
    # Only a change on the way is the trigger's own line (at INFO): the first state is what the
    # sensor logged when it deferred, and the end is in the event, which the triggerer logs.
    assert "PENDING -> RUNNING" in logged
    assert "is PENDING" not in logged and "-> COMPLETED" not in logged


async def test_nok_event_names_the_state(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    script(monkeypatch, report("WAIT", "RUNNING"), report("NOK", "FAILED", "ENDED_NOK"))
    (event,) = await all_events(make_trigger())
    assert event["status"] == "nok"
    assert event["report"]["cr"] == "NOK"
    assert "FAILED" in event["message"] and KEY in event["message"] and "2459394" in event["message"]


async def test_timeout_event_keeps_the_last_report(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, report("WAIT", "RUNNING"))
    started = time.monotonic()
    (event,) = await all_events(make_trigger(deadline=time.time() + 0.15))
    assert event["status"] == "timeout"
    assert event["report"]["latest_state"] == "RUNNING"
    assert "no cancel endpoint" in event["message"]
    assert scripted.calls >= 2
    assert time.monotonic() - started < 2


async def test_no_poll_before_first_poll_at(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    # The deferring task has just looked at the run: the trigger's first poll waits its turn.
    polled_at: list[float] = []
    scripted = script(monkeypatch, report("OK", "COMPLETED", "ENDED_OK"))

    async def a_get_state(hook: MuseHook, name: str, key: str) -> MuseReport:
        polled_at.append(time.time())
        return await scripted(hook, name, key)

    monkeypatch.setattr(MuseHook, "a_get_state", a_get_state)
    first_poll_at = time.time() + 0.3
    (event,) = await all_events(make_trigger(first_poll_at=first_poll_at))
    assert event["status"] == "ok"
    assert len(polled_at) == 1 and polled_at[0] >= first_poll_at


async def test_a_first_poll_at_in_the_past_polls_at_once(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    # A triggerer that restarts long after the deferral does not wait again.
    script(monkeypatch, report("OK", "COMPLETED", "ENDED_OK"))
    started = time.monotonic()
    (event,) = await all_events(make_trigger(first_poll_at=time.time() - 3600))
    assert event["status"] == "ok"
    assert time.monotonic() - started < 0.2


async def test_the_deadline_beats_a_later_first_poll_at(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, report("WAIT", "RUNNING"))
    started = time.monotonic()
    (event,) = await all_events(make_trigger(deadline=time.time() + 0.15, first_poll_at=time.time() + 60))
    assert event["status"] == "timeout"
    assert scripted.calls == 1  # one look at the deadline, so the timeout names the last state
    assert time.monotonic() - started < 2


async def test_transient_failures_are_absorbed(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    flaky = MuseApiError("HTTP 503 from the server", status=503, retryable=True)
    scripted = script(monkeypatch, flaky, flaky, report("OK", "COMPLETED"))
    (event,) = await all_events(make_trigger(max_poll_failures=3))
    assert event["status"] == "ok"
    assert scripted.calls == 3


async def test_error_event_after_the_failure_budget(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, report("WAIT", "RUNNING"), MuseApiError("Request timed out", retryable=True))
    (event,) = await all_events(make_trigger(max_poll_failures=3))
    assert event["status"] == "error"
    assert event["report"]["latest_state"] == "RUNNING"
    assert "3 times in a row" in event["message"]
    assert scripted.calls == 1 + 3


@pytest.mark.parametrize(
    "error",
    [
        MuseApiError("The Muse service answered an error", error="unknown key", error_type="KeyError"),
        MuseApiError("HTTP 404 from the server", status=404),
        InvalidIdentifierError("Run key 'a/b' is not a valid identifier"),
    ],
)
async def test_permanent_error_ends_at_once(connection: Connection, monkeypatch: pytest.MonkeyPatch, error: MuseApiError) -> None:
    scripted = script(monkeypatch, error)
    (event,) = await all_events(make_trigger())
    assert event["status"] == "error"
    assert event["report"] is None
    assert scripted.calls == 1


async def test_missing_connection_is_an_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    async def aget_connection(cls: type, conn_id: str) -> Connection:
        raise LookupError(f"The conn_id `{conn_id}` isn't defined")

    monkeypatch.setattr(MuseHook, "aget_connection", classmethod(aget_connection))
    (event,) = await all_events(make_trigger())
    assert event["status"] == "error"
    assert "muse_test" in event["message"]


async def test_cancellation_closes_the_shared_session(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = script(monkeypatch, report("WAIT", "RUNNING"))
    trigger = make_trigger(poll_interval=5, max_poll_interval=5)
    task = asyncio.ensure_future(anext(trigger.run()))
    while scripted.calls == 0:
        await asyncio.sleep(0.01)
    (session,) = scripted.open_sessions
    assert not session.closed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert session.closed
    pool = aio._SESSIONS.get(asyncio.get_running_loop())
    assert pool is None or not pool.sessions


async def test_polls_share_one_session(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    scripted = script(monkeypatch, report("WAIT", "RUNNING"), report("WAIT", "RUNNING"), report("OK", "COMPLETED"))
    original = MuseHook.a_get_state

    async def spy(hook: MuseHook, name: str, key: str) -> MuseReport:
        result = await original(hook, name, key)
        seen.extend(id(s) for s in scripted.open_sessions)
        return result

    monkeypatch.setattr(MuseHook, "a_get_state", spy)
    (event,) = await all_events(make_trigger())
    assert event["status"] == "ok"
    assert len(seen) == 3 and len(set(seen)) == 1
    pool = aio._SESSIONS.get(asyncio.get_running_loop())
    assert pool is None or not pool.sessions


def test_serialize_round_trips_with_plain_values_and_no_secret() -> None:
    trigger = make_trigger(deadline=1_900_000_000.5, first_poll_at=1_899_999_000.25)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_hpc.triggers.muse.MuseJobTrigger"
    text = json.dumps(kwargs)  # plain JSON: no objects, nothing the database cannot hold
    assert SECRET not in text and "password" not in text and "report" not in text
    assert set(kwargs) == {
        "muse_conn_id", "name", "key", "poll_interval", "max_poll_interval", "deadline", "max_poll_failures", "retry",
        "end_from_trigger", "first_poll_at",
    }
    rebuilt = MuseJobTrigger(**json.loads(text))
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["retry"]["max_attempts"] == 2


async def test_serialized_kwargs_stay_secret_free_after_running(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    script(monkeypatch, report("OK", "COMPLETED"))
    trigger = make_trigger()
    await all_events(trigger)
    assert SECRET not in json.dumps(trigger.serialize()[1])
    assert SECRET not in repr(trigger)


async def test_on_kill_says_the_run_keeps_going(capsys: pytest.CaptureFixture[str]) -> None:
    await make_trigger().on_kill()
    logged = capsys.readouterr().out
    assert "no way to cancel" in logged and KEY in logged


async def test_polls_start_one_interval_apart_however_long_each_takes(
    connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A poll that queued for a pooled connection must not push the next one back: the interval is
    # from one poll's start to the next, so a run's end is seen within one interval.
    starts: list[float] = []
    items = [report("WAIT", "RUNNING")] * 3 + [report("OK", "COMPLETED")]

    async def slow_state(hook: MuseHook, name: str, key: str) -> MuseReport:
        starts.append(time.monotonic())
        await asyncio.sleep(0.2)
        return items[len(starts) - 1]

    monkeypatch.setattr(MuseHook, "a_get_state", slow_state)
    (event,) = await all_events(make_trigger(poll_interval=0.6, max_poll_interval=0.6))
    assert event["status"] == "ok"
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    assert len(gaps) == 3
    # 0.6 s apart; waiting the interval after each poll's end would make them 0.8 s apart.
    assert all(0.59 <= gap < 0.75 for gap in gaps), gaps


async def test_a_failed_poll_is_followed_by_a_whole_interval(connection: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    # A poll that failed after the transport's retries says the service is struggling: no quicker
    # poll after it.
    starts: list[float] = []
    items: list[MuseReport | Exception] = [MuseApiError("Bad gateway", status=502), report("OK", "COMPLETED")]

    async def failing_state(hook: MuseHook, name: str, key: str) -> MuseReport:
        starts.append(time.monotonic())
        await asyncio.sleep(0.2)
        item = items[len(starts) - 1]
        if isinstance(item, Exception):
            raise item
        return item

    monkeypatch.setattr(MuseHook, "a_get_state", failing_state)
    (event,) = await all_events(make_trigger(poll_interval=0.4, max_poll_interval=0.4))
    assert event["status"] == "ok"
    assert starts[1] - starts[0] >= 0.59  # the 0.2 s poll, then the whole 0.4 s


def test_a_wait_counts_from_the_poll_s_start_never_below_half_nor_past_the_deadline() -> None:
    assert PollSchedule(10.0, 10.0).next_wait(False, elapsed=3.0) == 7.0
    # A poll that took most of the wait (retries, Retry-After) is still followed by half of it.
    assert PollSchedule(10.0, 10.0).next_wait(False, elapsed=8.0) == 5.0
    # The deadline caps the shortened wait, not the whole one: no poll before the deadline's.
    near = PollSchedule(10.0, 10.0, deadline=time.time() + 4.0).next_wait(False, elapsed=1.0)
    assert 3.9 < near <= 4.0
