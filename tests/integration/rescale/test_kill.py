"""
Killing a deferred Rescale wait stops the run; a triggerer restart stops nothing.

The trigger runs under Airflow's own ``TriggerRunner.run_trigger``, which tells the two apart: a
user's action (mark failed / success, clear) cancels the trigger's task with a special message and
calls ``on_kill``; a triggerer shutting down or handing the trigger to another triggerer cancels
it plainly.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from airflow.jobs.triggerer_job_runner import TriggerRunner

from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger
from tests.integration.rescale.support import FAST_RETRY, RescaleApi, rebuild

TRIGGER_ID = 1


def user_action_message() -> str:
    """The message Airflow's triggerer cancels a trigger with when a user acted on its task."""
    from airflow.jobs import triggerer_job_runner

    return triggerer_job_runner._USER_ACTION_CANCEL_MSG


async def run_then_cancel(trigger: RescaleRunTrigger, api: RescaleApi, job_id: str, *, user_action: bool) -> None:
    """Run ``trigger`` under Airflow's TriggerRunner until the run is going, then cancel it."""
    runner = TriggerRunner()
    runner.triggers[TRIGGER_ID] = {"name": "rescale-wait", "events": 0, "is_watcher": False}  # type: ignore[typeddict-item]
    task = asyncio.create_task(runner.run_trigger(TRIGGER_ID, trigger))
    runner.triggers[TRIGGER_ID]["task"] = task
    # Let the trigger poll a few times while the run is in progress.
    await asyncio.to_thread(api.wait_started, job_id)
    await asyncio.sleep(0.3)
    assert not task.done(), "the trigger fired before it could be cancelled"
    if user_action:
        runner.to_cancel.append(TRIGGER_ID)
        await runner.cancel_triggers()
    else:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runner.events == type(runner.events)(), "a cancelled trigger must not fire an event"
    await close_all_sessions()


def wait_trigger(job_id: str, **kwargs: Any) -> RescaleRunTrigger:
    """A trigger on run 1 of ``job_id``, rebuilt from its serialized form as the triggerer does."""
    settings: dict[str, Any] = {"poll_interval": 0.05, "max_poll_interval": 0.1, "retry": FAST_RETRY.to_dict()}
    return rebuild(RescaleRunTrigger(job_id=job_id, run_id="1", **{**settings, **kwargs}))


@pytest.fixture(autouse=True)
def no_greenback_portal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip greenback's portal, which only sync-in-async trigger code needs."""
    monkeypatch.setenv("AIRFLOW_DISABLE_GREENBACK_PORTAL", "true")


def test_user_kill_stops_the_run_exactly_once(api: RescaleApi) -> None:
    job_id = api.start_job("sleep 30")

    asyncio.run(run_then_cancel(wait_trigger(job_id), api, job_id, user_action=True))

    assert api.stops(job_id) == 1
    assert api.wait_job_completed(job_id)[-2:] == ["Stopping", "Completed"]
    assert api.wait_completed(job_id)["dateCompleted"]


def test_triggerer_restart_stops_nothing(api: RescaleApi) -> None:
    job_id = api.start_job("sleep 30")

    asyncio.run(run_then_cancel(wait_trigger(job_id), api, job_id, user_action=False))
    time.sleep(0.3)  # nothing is stopped later either

    assert api.stops(job_id) == 0
    assert api.run(job_id)["dateCompleted"] is None


def test_user_kill_with_cancel_on_kill_off_stops_nothing(api: RescaleApi) -> None:
    job_id = api.start_job("sleep 30")

    asyncio.run(run_then_cancel(wait_trigger(job_id, cancel_on_kill=False), api, job_id, user_action=True))

    assert api.stops(job_id) == 0
    assert api.run(job_id)["dateCompleted"] is None


def test_kill_of_a_run_that_just_completed_is_harmless(api: RescaleApi) -> None:
    job_id = api.start_job("true")
    api.wait_job_completed(job_id)

    asyncio.run(wait_trigger(job_id).on_kill())

    # Stopping a completed run answers {} and changes nothing.
    assert api.stops(job_id) == 1
    assert api.wait_job_completed(job_id)[-1] == "Completed"


def test_kill_gives_up_in_bounded_time_when_the_platform_stalls(api: RescaleApi, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_provider_hpc.triggers import rescale as rescale_triggers

    monkeypatch.setattr(rescale_triggers, "ON_KILL_TIMEOUT", 0.5)
    job_id = api.start_job("sleep 30")
    api.wait_started(job_id)
    # The platform asks to come back in a minute: the stop would be retried long after the kill.
    api.set_faults(
        [{"route": "POST /api/jobs/*/runs/*/stop/", "probability": 1.0, "action": {"status": 429, "retry_after": 60}}]
    )
    trigger = rebuild(RescaleRunTrigger(job_id=job_id, run_id="1"))

    started = time.monotonic()
    asyncio.run(trigger.on_kill())

    assert time.monotonic() - started < 5
    assert api.stops(job_id) == 0
